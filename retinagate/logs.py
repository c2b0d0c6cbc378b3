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


#: Loggers whose INFO messages are chatter for an operator (every task received and succeeded, every
#: sweep beat sends, every Alembic plugin, every highdicom object): shown from WARNING up unless
#: ``verbose`` or DEBUG. Celery's own start-up and connection lines ("... ready.", "Connected to")
#: stay: they say a worker is up.
CHATTY_LIBRARIES = (
    "celery.worker.strategy",
    "celery.app.trace",
    "celery.beat",
    "kombu",
    "amqp",
    "redis",
    "alembic",
    "highdicom",
)


def setup_logging(level: str = "INFO", fmt: Literal["text", "json"] = "text", *, verbose: bool = False) -> None:
    """Configures the root logger for a process; safe to call again (it replaces its own handler only,
    leaving handlers others installed, a test harness's say, in place).

    ``verbose`` (``RETINAGATE_LOG_VERBOSE``, ``retinagate -v``) lets the libraries in
    :data:`CHATTY_LIBRARIES` log at ``level`` too; without it they log from WARNING up.
    """
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
    # Library chatter: Celery logs every task received and succeeded, Alembic every plugin it sets up
    # (on each schema check, read-only commands included), highdicom every object it builds.
    quiet = not verbose and root.level > logging.DEBUG
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level) if quiet else root.level)
    try:
        from pynetdicom import _config

        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.LOG_HANDLER_LEVEL = "none"
    except ImportError:  # pragma: no cover - pynetdicom is a core dependency
        pass
