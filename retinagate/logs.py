"""Logging setup for entry points.

Library modules only call ``logging.getLogger(__name__)``; entry points call :func:`setup_logging`
once. Log records carry internal ids (instance row ids, association ids), never patient data: no
names, patient ids, birth dates or datasets at any level.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal

__all__ = ["setup_logging"]

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record (it may be replaced)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any ``extra=`` fields kept."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "INFO", fmt: Literal["text", "json"] = "text") -> None:
    """Configures the root logger for a process; safe to call again (it replaces its own handler only,
    leaving handlers others installed, a test harness's say, in place)."""
    handler = _StderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _StderrHandler)] + [handler]
    root.setLevel(level)
    # pynetdicom logs whole identifiers (patient names among them) at DEBUG; keep it at WARNING
    # whatever the root level, and turn its dataset logging off where the library offers it.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, root.level))
    # highdicom reports every object it builds at INFO; keep the service logs to our own events.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, root.level))
    # Alembic reports every plugin it sets up (on each schema check, read-only commands included) and
    # every migration step at INFO; RETINAGATE_LOG_LEVEL=DEBUG shows them again.
    logging.getLogger("alembic").setLevel(logging.WARNING if root.level > logging.DEBUG else root.level)
    try:
        from pynetdicom import _config

        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.LOG_HANDLER_LEVEL = "none"
    except ImportError:  # pragma: no cover - pynetdicom is a core dependency
        pass
