"""Load: eight cameras sending 50 photographs each at once while one worker process scores."""

from __future__ import annotations

import subprocess
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.interop]

CAMERAS = 8
PER_CAMERA = 50
#: Generous bounds on peak resident memory (MiB); measured figures are printed (pytest -s).
GATEWAY_BOUND_MIB = 1024
WORKER_PROCESS_BOUND_MIB = 1536


def test_eight_concurrent_associations_of_fifty_are_all_accepted_scored_and_delivered_in_bounded_memory(
    deployment, camera, parse_statuses
) -> None:
    deployment.fast_recovery()
    deployment.up()
    studies = [camera.photographs(PER_CAMERA, study=s) for s in range(1, CAMERAS + 1)]

    started = time.monotonic()
    senders = [subprocess.Popen(camera.command(paths, deployment.port), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for paths in studies]  # fmt: skip
    outputs = [sender.communicate(timeout=300)[0] for sender in senders]
    received_s = time.monotonic() - started
    for sender, output in zip(senders, outputs, strict=True):
        assert sender.returncode == 0 and parse_statuses(output) == [0x0000] * PER_CAMERA, output[-2000:]

    expected = CAMERAS * PER_CAMERA

    def all_delivered() -> bool:
        state = deployment.state()
        return state.done == expected and state.deliveries["delivered"] == 2 * expected

    try:
        deployment.wait_until(all_delivered, 420, "every instance scored and delivered", every_s=2)
    except AssertionError:
        raise AssertionError(f"{deployment.state()}\n{deployment.logs_tail()}") from None
    delivered_s = time.monotonic() - started
    peaks = {name: deployment.peak_rss_mib(name) for name in ("gateway", "worker", "beat")}
    print(f"\n{CAMERAS} x {PER_CAMERA} photographs: all accepted in {received_s:.1f} s, scored and delivered "
          f"in {delivered_s:.1f} s ({expected / delivered_s:.1f} photographs/s)")  # fmt: skip
    for name, by_pid in peaks.items():
        print(f"peak RSS {name}: " + ", ".join(f"pid {pid} {mib:.0f} MiB" for pid, mib in by_pid.items()))
    deployment.assert_one_result_each(expected)
    assert max(peaks["gateway"].values()) < GATEWAY_BOUND_MIB, peaks
    assert max(peaks["worker"].values()) < WORKER_PROCESS_BOUND_MIB, peaks
    deployment.assert_no_patient_data(camera)
