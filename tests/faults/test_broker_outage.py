"""redis-server stopped and started again while studies arrive and deliveries are in flight. Redis runs
without persistence, so the messages it held are gone: SQL is the source of truth, and the sweeper must
find that work again. In ``retinagate serve``'s layout, which the compose file shares (a scoring
worker, and a sending worker on threads for delivery), with beat. (A single worker taking every queue
also passes, but it spends most of a minute held by the frozen PACS; it is left out to keep CI short:
``LAYOUTS`` below has it.)"""

from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.interop]

PER_STUDY = 6
LAYOUTS = {
    "one worker": {"worker": ("--concurrency", "1")},
    "serve's layout": {
        "worker": ("--queues", "score,maintenance", "--concurrency", "1"),
        "sender": ("--queues", "deliver,maintenance", "--pool", "threads", "--concurrency", "4"),
    },
}


@pytest.mark.parametrize("layout", ["serve's layout"])
def test_a_redis_restart_while_studies_arrive_and_deliveries_are_in_flight_loses_nothing_and_does_nothing_twice(
    deployment, camera, layout: str
) -> None:
    deployment.fast_recovery()
    deployment.up(worker_args=LAYOUTS[layout]["worker"])
    if "sender" in LAYOUTS[layout]:
        deployment.start("sender", "worker", *LAYOUTS[layout]["sender"])
    processes = ["gateway", "beat", *LAYOUTS[layout]]
    first, in_flight, during, after = (camera.photographs(PER_STUDY, study=s) for s in (1, 2, 3, 4))
    reports = [camera.send(first, deployment.port)]

    # Deliveries in flight: the PACS frozen (it takes connections but never answers), a study scored.
    os.kill(deployment.pacs.process.pid, signal.SIGSTOP)
    try:
        reports.append(camera.send(in_flight, deployment.port))
        deployment.wait_until(lambda: deployment.state().done == 2 * PER_STUDY, 60, "the second study scored")
        time.sleep(1)  # the sender is waiting on the frozen PACS
        deployment.redis.stop()
        stopped_at = time.monotonic()
        # While Redis is away the gateway still stores and answers success: the instance is safe on
        # disk and in SQL, and the sweeper sends it later.
        reports.append(camera.send(during, deployment.port))
        time.sleep(max(0.0, 5 - (time.monotonic() - stopped_at)))
        deployment.redis.start()
        restarted_at = time.monotonic()
    finally:
        os.kill(deployment.pacs.process.pid, signal.SIGCONT)
    reports.append(camera.send(after, deployment.port))
    for report in reports:
        assert report.statuses == [0x0000] * PER_STUDY, report.output[-2000:]

    expected = 4 * PER_STUDY

    def all_delivered() -> bool:
        state = deployment.state()
        return state.done == expected and state.deliveries["delivered"] == 2 * expected

    try:
        deployment.wait_until(all_delivered, 120, "every instance scored and delivered after Redis came back")
    except AssertionError:
        raise AssertionError(f"{deployment.state()}\n{deployment.logs_tail()}") from None
    print(f"\n{layout}: Redis down {restarted_at - stopped_at:.1f} s with deliveries in flight; every instance "
          f"scored and delivered {time.monotonic() - restarted_at:.1f} s after it came back")  # fmt: skip
    # Nothing gave up on the broker: every process is still running.
    assert all(deployment.alive(name) for name in processes), deployment.logs_tail()
    deployment.wait_until(lambda: deployment.pacs.count() >= 2 * expected, 30, "Orthanc holds every output")
    deployment.assert_one_result_each(expected)
    deployment.assert_no_patient_data(camera)
