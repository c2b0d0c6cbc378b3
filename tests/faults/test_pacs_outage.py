"""The destination PACS down for a while, then back; and a destination that refuses an object for good.

Two Orthancs: the usual one, stopped and started again (same ports, same storage), and ``REFUSER``, which
accepts only Implicit VR Little Endian: the heatmap SC (JPEG Baseline, which cannot be converted) is
refused for good, while the SR (uncompressed, converted on the way) goes through.
"""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.interop]

PER_STUDY = 4
IMPLICIT_LITTLE = "1.2.840.10008.1.2"


def test_deliveries_outlast_a_pacs_outage_and_a_permanent_refusal_is_failed_once_and_not_retried(
    deployment, camera, make_orthanc
) -> None:
    refuser = make_orthanc("REFUSER", {"AcceptedTransferSyntaxes": [IMPLICIT_LITTLE]})
    pacs = deployment.pacs
    main, other = f"{pacs.ae_title}@127.0.0.1:{pacs.port}", f"REFUSER@127.0.0.1:{refuser.port}"
    # Three retries with backoff from 1 s: the first study's retries run out while the PACS is down.
    deployment.fast_recovery(RETINAGATE_DESTINATIONS=f"{main},{other}", RETINAGATE_DELIVERY_MAX_RETRIES="3")
    deployment.up()
    pacs.stop()
    down_at = time.monotonic()

    def to(destination: str) -> list[dict]:
        return [d for d in deployment.deliveries() if d["destination"] == destination]

    first = camera.photographs(PER_STUDY, study=1)
    assert camera.send(first, deployment.port).statuses == [0x0000] * PER_STUDY
    deployment.wait_until(
        lambda: [d["status"] for d in to(main)].count("failed") == 2 * PER_STUDY, 60,
        "the first study's deliveries to the stopped PACS used up their retries",
    )
    assert all(d["attempts"] == 4 and d["retryable"] for d in to(main)), to(main)
    second = camera.photographs(PER_STUDY, study=2)
    assert camera.send(second, deployment.port).statuses == [0x0000] * PER_STUDY
    deployment.wait_until(
        lambda: sum(d["status"] == "retrying" and d["attempts"] >= 2 for d in to(main)) == 2 * PER_STUDY, 60,
        "the second study's deliveries retrying with backoff",
    )
    time.sleep(max(0.0, 15 - (time.monotonic() - down_at)))
    pacs.start()
    back_at = time.monotonic()

    expected = 2 * PER_STUDY
    try:
        took = deployment.wait_until(
            lambda: [d["status"] for d in to(main)].count("delivered") == 2 * expected, 90,
            "every output delivered to the PACS once it was back",
        )
    except AssertionError:
        raise AssertionError(f"{to(main)}\n{deployment.logs_tail()}") from None
    print(f"\nPACS down {back_at - down_at:.0f} s: every output delivered {took:.1f} s after it came back "
          f"(retries in flight and retries used up alike)")  # fmt: skip
    deployment.assert_one_result_each(expected)

    # The refusing destination: each SC failed after one try, with the reason; each SR delivered.
    refused = [d for d in to(other) if d["kind"] == "sc"]
    assert len(refused) == expected and all(
        d["status"] == "failed" and not d["retryable"] and d["attempts"] == 1 and "not accepted" in d["last_error"]
        for d in refused
    ), refused
    assert all(d["status"] == "delivered" for d in to(other) if d["kind"] == "sr"), to(other)
    # ... and not retried: two more sweeps later nothing was tried again.
    time.sleep(12)
    assert [d["attempts"] for d in to(other) if d["kind"] == "sc"] == [1] * expected, to(other)
    assert refuser.count() == expected
    deployment.assert_no_patient_data(camera)
