"""The few error types callers route on.

The worker retries :class:`RetryableError` with backoff and marks the instance failed at once on
:class:`PermanentError`; everything else is a bug and fails loudly.
"""

from __future__ import annotations

__all__ = ["InputError", "PermanentError", "RetryableError"]


class PermanentError(Exception):
    """Retrying cannot help: the input is bad or unsupported. The message says what and why."""


class InputError(PermanentError, ValueError):
    """An image or DICOM instance that cannot be scored (undecodable, too large, truncated)."""


class RetryableError(Exception):
    """A transient failure (database locked, peer down, broker away): try again later."""
