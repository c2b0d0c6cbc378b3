"""PostgreSQL stopped for a few seconds and started again (a cluster of this test's own), with work in
the worker's hands and a camera sending meanwhile."""

from __future__ import annotations

import signal
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.interop, pytest.mark.postgres]

PER_STUDY = 4
OUT_OF_RESOURCES = 0xA700


def test_without_its_database_the_gateway_refuses_with_a700_and_workers_retry_until_it_returns(
    deployment, camera, postgres_cluster
) -> None:
    deployment.fast_recovery(RETINAGATE_DATABASE_URL=postgres_cluster.url)
    deployment.up()
    first, held, refused, after = (camera.photographs(PER_STUDY, study=s) for s in (1, 2, 3, 4))

    assert camera.send(first, deployment.port).statuses == [0x0000] * PER_STUDY
    deployment.wait_until(lambda: deployment.state().done == PER_STUDY, 60, "the first study scored")

    # A study stored and queued while the worker is frozen: it meets the outage when it thaws.
    deployment.kill("worker", signal.SIGSTOP)
    assert camera.send(held, deployment.port).statuses == [0x0000] * PER_STUDY
    deployment.wait_until(lambda: deployment.state().instances["queued"] == PER_STUDY, 30, "the study queued")
    received = len([p for p in deployment.storage_files() if "/in/" in p.as_posix()])
    postgres_cluster.stop()
    down_at = time.monotonic()
    deployment.kill("worker", signal.SIGCONT)

    # The gateway cannot record what it receives, so it acknowledges nothing and keeps no file.
    answer = camera.send(refused, deployment.port)
    assert answer.statuses == [OUT_OF_RESOURCES] * PER_STUDY, answer.output[-2000:]
    assert len([p for p in deployment.storage_files() if "/in/" in p.as_posix()]) == received
    time.sleep(max(0.0, 8 - (time.monotonic() - down_at)))
    postgres_cluster.start()
    up_at = time.monotonic()

    # Everything sent afterwards is stored; the camera sends the refused study again.
    for paths in (after, refused):
        answer = camera.send(paths, deployment.port)
        assert answer.statuses == [0x0000] * PER_STUDY, answer.output[-2000:]
    expected = 4 * PER_STUDY

    def all_delivered() -> bool:
        state = deployment.state()
        return state.done == expected and state.deliveries["delivered"] == 2 * expected

    try:
        took = deployment.wait_until(all_delivered, 90, "every instance scored and delivered")
    except AssertionError:
        raise AssertionError(f"{deployment.state()}\n{deployment.logs_tail()}") from None
    print(f"\nPostgreSQL down {up_at - down_at:.1f} s: {PER_STUDY} C-STOREs answered 0xA700 meanwhile; "
          f"everything scored and delivered {took:.1f} s after it returned")  # fmt: skip
    assert "will be retried" in deployment.log("worker"), "the worker never met the outage"
    assert all(deployment.alive(name) for name in ("gateway", "worker", "beat")), deployment.logs_tail()
    deployment.wait_until(lambda: deployment.pacs.count() >= 2 * expected, 30, "Orthanc holds every output")
    deployment.assert_one_result_each(expected)
    deployment.assert_storage_matches_rows()
    deployment.assert_no_patient_data(camera)
