"""dicom_gateway.enqueuer: batching, the circuit breaker, and what happens to unsent ids."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pytest

from dicom_gateway.enqueuer import Enqueuer


class _Broker:
    """Records sends; raises while ``down``; each send can be held until ``gate`` is set."""

    def __init__(self) -> None:
        self.down = False
        self.attempts: list[list[int]] = []
        self.sent: list[list[int]] = []
        self.marked: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def send(self, ids: Sequence[int]) -> None:
        self.gate.wait(10)
        self.attempts.append(list(ids))
        if self.down:
            raise ConnectionError("broker down")
        self.sent.append(list(ids))

    def mark(self, ids: Sequence[int]) -> None:
        self.marked.append(list(ids))


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_submitted_ids_are_sent_and_marked_queued() -> None:
    broker = _Broker()
    enqueuer = Enqueuer(broker.send, broker.mark)
    enqueuer.start()
    for instance_id in (1, 2, 3):
        enqueuer.submit(instance_id)
    _wait_for(lambda: sum(map(len, broker.marked)) == 3)
    enqueuer.stop()
    assert sorted(i for batch in broker.sent for i in batch) == [1, 2, 3]
    assert broker.marked == broker.sent


def test_ids_that_pile_up_go_out_in_batches_of_at_most_batch_size() -> None:
    broker = _Broker()
    broker.gate.clear()  # hold the first send so the rest accumulate
    enqueuer = Enqueuer(broker.send, broker.mark, batch_size=4)
    enqueuer.start()
    for instance_id in range(1, 12):
        enqueuer.submit(instance_id)
    broker.gate.set()
    _wait_for(lambda: sum(map(len, broker.sent)) == 11)
    enqueuer.stop()
    assert all(len(batch) <= 4 for batch in broker.sent)
    assert [i for batch in broker.sent for i in batch] == list(range(1, 12))


def test_after_a_failure_the_breaker_waits_before_trying_again_and_then_sends_everything() -> None:
    broker = _Broker()
    broker.down = True
    enqueuer = Enqueuer(broker.send, broker.mark, breaker_seconds=0.5)
    enqueuer.start()
    enqueuer.submit(1)
    _wait_for(lambda: enqueuer.breaker_open)
    enqueuer.submit(2)
    enqueuer.submit(3)
    time.sleep(0.2)
    assert broker.attempts == [[1]]  # no try while the breaker is open
    broker.down = False

    _wait_for(lambda: sum(map(len, broker.sent)) == 3)
    enqueuer.stop()
    assert sorted(i for batch in broker.sent for i in batch) == [1, 2, 3]
    assert broker.marked == broker.sent


def test_stop_sends_pending_ids_once_and_gives_up_while_the_broker_is_down() -> None:
    broker = _Broker()
    broker.down = True
    enqueuer = Enqueuer(broker.send, broker.mark, breaker_seconds=60)
    enqueuer.start()
    enqueuer.submit(1)
    _wait_for(lambda: enqueuer.breaker_open)
    enqueuer.submit(2)

    started = time.monotonic()
    enqueuer.stop()

    assert time.monotonic() - started < 2  # it does not wait for the breaker
    assert broker.attempts == [[1]] and broker.marked == []


def test_a_failure_to_mark_rows_does_not_stop_the_enqueuer() -> None:
    broker = _Broker()
    calls: list[list[int]] = []

    def mark(ids: Sequence[int]) -> None:
        calls.append(list(ids))
        raise RuntimeError("database locked")

    enqueuer = Enqueuer(broker.send, mark)
    enqueuer.start()
    enqueuer.submit(1)
    _wait_for(lambda: len(calls) == 1)
    enqueuer.submit(2)
    _wait_for(lambda: len(calls) == 2)
    enqueuer.stop()
    assert [i for batch in broker.sent for i in batch] == [1, 2]


def test_too_many_unsent_ids_keep_the_newest_and_leave_the_rest_to_the_sweeper() -> None:
    broker = _Broker()
    broker.down = True
    enqueuer = Enqueuer(broker.send, broker.mark, breaker_seconds=0.3, max_pending=3)
    enqueuer.start()
    enqueuer.submit(1)
    _wait_for(lambda: enqueuer.breaker_open)
    for instance_id in range(2, 8):
        enqueuer.submit(instance_id)
    broker.down = False
    _wait_for(lambda: broker.sent != [])
    enqueuer.stop()
    assert [i for batch in broker.sent for i in batch] == [5, 6, 7]


@pytest.mark.parametrize(
    ("keyword", "value"), [("batch_size", 0), ("batch_size", 2000), ("breaker_seconds", -1), ("max_pending", 0)]
)
def test_settings_out_of_range_are_refused_with_the_field_named(keyword: str, value: float) -> None:
    with pytest.raises(ValueError, match=keyword):
        Enqueuer(list, list, **{keyword: value})  # type: ignore[arg-type]


def test_with_a_linger_ids_arriving_together_share_a_task_and_a_lone_id_waits_at_most_the_linger() -> None:
    broker = _Broker()
    enqueuer = Enqueuer(broker.send, broker.mark, batch_size=4, linger=0.5)
    enqueuer.start()
    try:
        started = time.monotonic()
        enqueuer.submit(1)
        time.sleep(0.1)
        enqueuer.submit(2)  # within the linger: same task
        _wait_for(lambda: broker.sent == [[1, 2]])
        assert 0.45 <= time.monotonic() - started < 2.0  # sent when the linger ran out, not before
        for instance_id in range(3, 8):
            enqueuer.submit(instance_id)  # a full batch goes at once; the fifth waits for the linger
        _wait_for(lambda: sum(map(len, broker.sent)) == 7)
        assert broker.sent == [[1, 2], [3, 4, 5, 6], [7]]
    finally:
        enqueuer.stop()


def test_stopping_sends_what_is_lingering() -> None:
    broker = _Broker()
    enqueuer = Enqueuer(broker.send, broker.mark, batch_size=4, linger=10.0)
    enqueuer.start()
    enqueuer.submit(1)
    time.sleep(0.1)
    enqueuer.stop()
    assert broker.sent == [[1]]


def test_a_linger_outside_0_to_10_seconds_is_refused() -> None:
    broker = _Broker()
    with pytest.raises(ValueError, match="linger"):
        Enqueuer(broker.send, broker.mark, linger=11)
