"""redis-server stopped and started again while studies arrive. Redis runs without persistence, so the
messages it held are gone: SQL is the source of truth, and the sweeper must find that work again."""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.interop]

PER_STUDY = 6


def test_a_redis_restart_while_studies_arrive_loses_nothing_and_scores_nothing_twice(deployment, camera) -> None:
    deployment.fast_recovery()
    deployment.up()
    before, during, after = (camera.photographs(PER_STUDY, study=s) for s in (1, 2, 3))

    # A study arrives and Redis goes away at once: its messages are lost, queued or not yet taken.
    sent = camera.send(before, deployment.port)
    deployment.redis.stop()
    stopped_at = time.monotonic()
    # While Redis is away the gateway still stores and answers success: the instance is safe on disk
    # and in SQL, and the sweeper sends it later.
    sent_during = camera.send(during, deployment.port)
    time.sleep(max(0.0, 5 - (time.monotonic() - stopped_at)))
    deployment.redis.start()
    restarted_at = time.monotonic()
    sent_after = camera.send(after, deployment.port)
    for report in (sent, sent_during, sent_after):
        assert report.statuses == [0x0000] * PER_STUDY, report.output[-2000:]

    expected = 3 * PER_STUDY

    def all_delivered() -> bool:
        state = deployment.state()
        return state.done == expected and state.deliveries["delivered"] == 2 * expected

    try:
        deployment.wait_until(all_delivered, 120, "every instance scored and delivered after Redis came back")
    except AssertionError:
        raise AssertionError(f"{deployment.state()}\n{deployment.logs_tail()}") from None
    print(f"\nRedis down {restarted_at - stopped_at:.1f} s: every instance scored and delivered "
          f"{time.monotonic() - restarted_at:.1f} s after it came back")  # fmt: skip
    # Nothing gave up on the broker: every process is still running.
    assert all(deployment.alive(name) for name in ("gateway", "worker", "beat")), deployment.logs_tail()
    deployment.wait_until(lambda: deployment.pacs.count() >= 2 * expected, 30, "Orthanc holds every output")
    deployment.assert_one_result_each(expected)
    deployment.assert_no_patient_data(camera)
