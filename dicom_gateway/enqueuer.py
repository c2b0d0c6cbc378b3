"""Hands stored instances to the score queue, off the C-STORE path.

The C-STORE handler answers as soon as the file and its row are durable; sending the task to the
broker happens here, in one background thread. Ids are batched (one task per batch of at most
``batch_size``, gathered for up to ``linger`` seconds after the first one arrives, so that the images
of one study, or of a busy hour, share a task, its database commits and its delivery association),
and a circuit breaker stops trying for ``breaker_seconds`` after the broker fails,
because a failed send costs seconds. Ids that could not be sent stay in memory (bounded) and go out
when the breaker closes; their rows stay ``received`` meanwhile, so if the gateway stops first the
worker's sweeper re-sends them from SQL. Only a successful send moves a row to ``queued``, and only
from ``received`` (a worker may already have moved it on).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

from dicom_gateway import metrics

__all__ = ["Enqueuer"]

logger = logging.getLogger(__name__)

_STOP: Final = -1


class Enqueuer:
    """A background thread that sends score tasks for submitted instance ids.

    Args:
        send: Sends one task for a batch of ids; raises when the broker cannot take it
            (``retinagate.queue.enqueue_score`` bound to the settings).
        mark_queued: Moves rows from ``received`` to ``queued`` after a successful send.
        batch_size: Most ids per task, 1 to 1024.
        linger: Seconds to wait for more ids before sending a batch that is not full, 0 to 10.
        breaker_seconds: How long to stop sending after a failure, 0 to 3600.
        max_pending: Most unsent ids kept in memory; older ones are left to the sweeper.
        clock: Monotonic clock (tests pass a fake one).
    """

    def __init__(
        self,
        send: Callable[[Sequence[int]], None],
        mark_queued: Callable[[Sequence[int]], None],
        *,
        batch_size: int = 16,
        linger: float = 0.0,
        breaker_seconds: float = 15.0,
        max_pending: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= batch_size <= 1024:
            raise ValueError(f"batch_size is {batch_size}; expected 1 to 1024")
        if not 0 <= linger <= 10:
            raise ValueError(f"linger is {linger}; expected 0 to 10 seconds")
        if not 0 <= breaker_seconds <= 3600:
            raise ValueError(f"breaker_seconds is {breaker_seconds}; expected 0 to 3600")
        if max_pending < 1:
            raise ValueError(f"max_pending is {max_pending}; expected at least 1")
        self._send = send
        self._mark_queued = mark_queued
        self._batch_size = batch_size
        self._linger = linger
        self._first_pending_at = 0.0
        self._breaker_seconds = breaker_seconds
        self._max_pending = max_pending
        self._clock = clock
        self._inbox: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._pending: list[int] = []
        self._open_until = 0.0
        self._thread: threading.Thread | None = None

    @property
    def breaker_open(self) -> bool:
        """Whether sends are paused after a broker failure."""
        return self._clock() < self._open_until

    def start(self) -> None:
        """Starts the sending thread."""
        if self._thread is not None:
            raise RuntimeError("the enqueuer is already running")
        self._thread = threading.Thread(target=self._run, name="gateway-enqueuer", daemon=True)
        self._thread.start()

    def submit(self, instance_id: int) -> None:
        """Queues one instance id for sending; never blocks and never raises."""
        self._inbox.put(instance_id)

    def stop(self, timeout: float = 10.0) -> None:
        """Sends what is pending (one try, unless the breaker is open) and stops the thread."""
        if self._thread is None:
            return
        self._inbox.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("enqueuer did not stop within %.0f s; its rows stay 'received' for the sweeper", timeout)
        self._thread = None

    def _run(self) -> None:
        stopping = False
        while not stopping:
            wait = None
            if self._pending:
                ready_at = self._open_until if self.breaker_open else self._send_at()
                wait = max(0.0, ready_at - self._clock())
            try:
                item = self._inbox.get(timeout=wait) if wait != 0.0 else self._inbox.get_nowait()
            except queue.Empty:
                item = None
            while item is not None:
                if item == _STOP:
                    stopping = True
                else:
                    if not self._pending:
                        self._first_pending_at = self._clock()
                    self._pending.append(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            self._trim()
            if not self.breaker_open:
                self._flush(partial=stopping or self._clock() >= self._first_pending_at + self._linger)
        if self._pending:
            logger.warning(
                "stopping with %d unsent instance(s); they stay 'received' for the sweeper", len(self._pending)
            )

    def _send_at(self) -> float:
        """When the pending ids go out: now when a batch is full, else ``linger`` after the first came."""
        if len(self._pending) >= self._batch_size:
            return 0.0
        return self._first_pending_at + self._linger

    def _trim(self) -> None:
        overflow = len(self._pending) - self._max_pending
        if overflow > 0:
            del self._pending[:overflow]
            logger.warning("enqueuer holds too many unsent instances; %d left to the sweeper", overflow)

    def _flush(self, *, partial: bool) -> None:
        """Sends full batches, and the last one that is not full when ``partial``."""
        while self._pending and not self.breaker_open:
            if len(self._pending) < self._batch_size and not partial:
                return
            batch = self._pending[: self._batch_size]
            try:
                self._send(batch)
            except Exception as exc:
                self._open_until = self._clock() + self._breaker_seconds
                logger.warning(
                    "broker unavailable (%s): %d instance(s) stay 'received' (ids %d..%d); "
                    "retrying in %.0f s, the sweeper re-sends them if the gateway stops first",
                    type(exc).__name__,
                    len(self._pending),
                    min(self._pending),
                    max(self._pending),
                    self._breaker_seconds,
                )
                metrics.ENQUEUE_FAILURES.inc(len(batch))  # after the log line, so a watcher sees both
                return
            del self._pending[: len(batch)]
            metrics.ENQUEUED.inc(len(batch))
            try:
                self._mark_queued(batch)
            except Exception as exc:  # the task is sent; the row saying so is only bookkeeping
                logger.warning("could not mark %d instance(s) queued: %s", len(batch), type(exc).__name__)
