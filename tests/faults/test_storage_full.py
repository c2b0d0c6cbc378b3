"""The storage file system full: a small tmpfs as the storage folder, filled to the last block."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.interop]

PHOTOGRAPHS = 4
OUT_OF_RESOURCES = 0xA700


def test_a_full_storage_refuses_with_a700_leaves_nothing_behind_and_serves_again_when_space_returns(
    deployment, camera, small_filesystem
) -> None:
    storage = small_filesystem("8m")
    deployment.fast_recovery(RETINAGATE_STORAGE_DIR=str(storage))
    deployment.up()
    filler = deployment.fill(storage)
    paths = camera.photographs(PHOTOGRAPHS, study=1)

    refused = camera.send(paths, deployment.port)
    assert refused.statuses == [OUT_OF_RESOURCES] * PHOTOGRAPHS, refused.output[-2000:]
    assert deployment.state().total == 0
    assert deployment.storage_files(storage) == [filler], "a refused instance left a file behind"
    assert deployment.alive("gateway")

    filler.unlink()  # space returns
    accepted = camera.send(paths, deployment.port)
    assert accepted.statuses == [0x0000] * PHOTOGRAPHS, accepted.output[-2000:]

    def all_delivered() -> bool:
        state = deployment.state()
        return state.done == PHOTOGRAPHS and state.deliveries["delivered"] == 2 * PHOTOGRAPHS

    try:
        took = deployment.wait_until(all_delivered, 60, "every instance scored and delivered")
    except AssertionError:
        raise AssertionError(f"{deployment.state()}\n{deployment.logs_tail()}") from None
    print(f"\nstorage full: {PHOTOGRAPHS} x 0x{OUT_OF_RESOURCES:04X}; space freed: re-sent, scored and delivered "
          f"in {took:.1f} s")  # fmt: skip
    deployment.wait_until(lambda: deployment.pacs.count() >= 2 * PHOTOGRAPHS, 30, "Orthanc holds every output")
    deployment.assert_one_result_each(PHOTOGRAPHS)
    deployment.assert_storage_matches_rows(storage)
    deployment.assert_no_patient_data(camera)
