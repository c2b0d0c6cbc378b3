"""Keeps a worker alive when its Redis broker goes away: a guard for a kombu defect.

When the broker connection drops, Celery 5.7's consumer collects the connection (which detaches
kombu's transport from it, ``transport.client = None``) and then closes it, before reconnecting.
kombu's Redis channel stops closing at the first error, reading the pending ``BRPOP`` from the dead
socket, so the channel survives the collect half-closed. The second close, and the late
acknowledgement of any task that was running when the connection dropped, then ask the detached
transport for its connection parameters and fail with ``AttributeError: 'NoneType' object has no
attribute 'hostname'`` (kombu issue 582 shows the same error on another path). Celery treats only
connection errors as recoverable, so the worker logged "Unrecoverable error" and shut down: every
worker with a task in flight, the sender (delivery and maintenance) in particular, died with the
broker instead of reconnecting.

:func:`guard_detached_channels` makes a channel of a detached transport raise the Redis client's
``ConnectionError`` instead. Celery and kombu already handle that one: the close is ignored, a late
acknowledgement is logged ("Couldn't ack") and its message stays in Redis's unacknowledged set,
which hands it out again after the visibility timeout (every task is idempotent; the sweeper finds
anything a Redis without persistence lost). The consumer then reconnects with the
``broker_connection_retry`` policy, as it does when no task is in flight.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

__all__ = ["guard_detached_channels"]

_GUARD_MARK = "_retinagate_detached_guard"


def guard_detached_channels() -> None:
    """Makes kombu's Redis channels raise a connection error once their transport is detached.

    Idempotent; every worker process calls it through :func:`worker.app.create_app`.
    """
    from kombu.transport import redis as kombu_redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    original: Callable[..., Any] = kombu_redis.Channel._connparams
    if getattr(original, _GUARD_MARK, False):
        return

    @functools.wraps(original)
    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise RedisConnectionError("the broker connection of this channel was closed after a connection loss")
        return original(self, asynchronous=asynchronous)

    setattr(_connparams, _GUARD_MARK, True)
    setattr(kombu_redis.Channel, "_connparams", _connparams)  # noqa: B010 (mypy forbids assigning a method)
