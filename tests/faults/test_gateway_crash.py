"""The gateway SIGKILLed in the middle of a multi-image association, then started again; the camera
sends the whole association again, as a camera whose association failed does."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.interop]

PHOTOGRAPHS = 20


def test_a_gateway_killed_mid_association_keeps_only_whole_instances_and_takes_the_whole_resend(
    deployment, camera
) -> None:
    deployment.fast_recovery()
    deployment.up()
    # Uncompressed 1024 x 768 photographs (2.4 MB each): each C-STORE takes long enough to die in the middle.
    paths = camera.photographs(PHOTOGRAPHS, study=1, size=(1024, 768), transfer_syntax="explicit_little")
    sending = subprocess.Popen(camera.command(paths, deployment.port), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deployment.wait_until(lambda: deployment.state().total >= 3, 60, "a few instances stored", every_s=0.01)
        deployment.kill("gateway")
        output, _ = sending.communicate(timeout=60)
    finally:
        if sending.poll() is None:
            sending.kill()
            sending.wait()
    stored = deployment.state().total
    assert 3 <= stored < PHOTOGRAPHS, (stored, output[-2000:])
    # Every success the camera heard is stored (a row may exist whose answer the kill cut off).
    answered = output.count("DIMSE Status")
    assert answered <= stored, (answered, stored)
    # What was acknowledged is stored whole; the instance in flight left no file (at most its hidden
    # temporary, which the next start removes) and no row.
    deployment.assert_storage_matches_rows(temporaries=True)

    deployment.start_gateway()
    resent = camera.send(paths, deployment.port)
    assert resent.statuses == [0x0000] * PHOTOGRAPHS, resent.output[-2000:]
    assert deployment.state().total == PHOTOGRAPHS

    def all_delivered() -> bool:
        state = deployment.state()
        return state.done == PHOTOGRAPHS and state.deliveries["delivered"] == 2 * PHOTOGRAPHS

    try:
        took = deployment.wait_until(all_delivered, 120, "every instance scored and delivered")
    except AssertionError:
        raise AssertionError(f"{deployment.state()}\n{deployment.logs_tail()}") from None
    print(f"\ngateway SIGKILL after {stored}/{PHOTOGRAPHS} stored ({answered} answered): the re-sent association "
          f"was answered 0x0000 throughout; all scored and delivered {took:.1f} s after it")  # fmt: skip
    deployment.wait_until(lambda: deployment.pacs.count() >= 2 * PHOTOGRAPHS, 30, "Orthanc holds every output")
    deployment.assert_one_result_each(PHOTOGRAPHS)
    deployment.assert_storage_matches_rows()
    deployment.assert_no_patient_data(camera)
