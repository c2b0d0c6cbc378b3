"""Destination kinds below the network: how a STOW-RS answer and an HTTP status become verdicts, and
that every registered kind parses what it prints."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from retinagate.destinations import kinds, parse
from retinagate.destinations.stow import _http_verdict, _verdicts


def _item(uid: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPInstanceUID = uid
    if reason is not None:
        item.FailureReason = reason
    return item


def test_a_stow_answer_gives_each_instance_its_verdict_and_an_unmentioned_one_is_tried_again() -> None:
    answer = Dataset()
    answer.ReferencedSOPSequence = [_item("1.1")]
    answer.FailedSOPSequence = [_item("1.2", 0xA700), _item("1.3", 0xC000)]
    results = _verdicts(answer, ["1.1", "1.2", "1.3", "1.4"])
    assert {uid: r.verdict for uid, r in results.items()} == {
        "1.1": "delivered", "1.2": "retry", "1.3": "failed", "1.4": "retry"
    }  # fmt: skip
    assert results["1.3"].status == 0xC000 and "0xC000" in (results["1.3"].error or "")
    assert "neither references nor refuses" in (results["1.4"].error or "")


def test_an_answer_without_a_body_means_every_instance_was_stored() -> None:
    assert {r.verdict for r in _verdicts(Dataset(), ["1.1", "1.2"]).values()} == {"delivered"}


@pytest.mark.parametrize(
    ("status", "verdict"),
    [(400, "failed"), (401, "failed"), (404, "failed"), (409, "failed"), (415, "failed"), (408, "retry"),
     (429, "retry"), (500, "retry"), (503, "retry")],
)  # fmt: skip
def test_a_failed_stow_request_is_retried_only_where_waiting_can_help(status: int, verdict: str) -> None:
    assert _http_verdict(status) == verdict


@pytest.mark.parametrize("text", ["PACS@pacs.local:104", "VIEW ER@[fe80::1]:11112", "https://pacs.local/dicom-web"])
def test_every_kind_parses_back_what_it_is_named(text: str) -> None:
    destination = parse(text)
    assert type(destination) in kinds() and parse(destination.name) == destination


def test_a_bearer_token_is_read_from_its_file_at_each_send(tmp_path: Path) -> None:
    from retinagate.destinations.stow import StowDestination

    token = tmp_path / "token"
    destination = StowDestination(url="https://pacs.local/dicom-web", token_file=token)
    with pytest.raises(
        ValueError, match=f"destination https://pacs.local/dicom-web: token_file {token} cannot be read"
    ):
        destination.check_files()
    token.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        destination.check_files()
    token.write_text("first\n")
    assert destination._authorization() == "Bearer first"
    token.write_text("rotated")
    assert destination._authorization() == "Bearer rotated"
    basic = StowDestination(url="https://pacs.local/dicom-web", username="rg", password_file=token)
    assert basic._authorization() == "Basic cmc6cm90YXRlZA=="  # base64("rg:rotated")


def test_validating_the_destinations_setting_loads_no_protocol_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys\nfrom retinagate.settings import Settings\n"
        "Settings(destinations='PACS@h:104,https://h/dicom-web')\n"
        "print(sorted({'pynetdicom', 'requests', 'dicomweb_client'} & {m.split('.')[0] for m in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
