"""`retinagate deliveries`: failed deliveries listed per destination and sent again by hand."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from retinagate.cli import main
from retinagate.db import make_engine, session_factory, session_scope
from retinagate.models import Delivery, DeliveryStatus, utcnow
from retinagate.settings import Settings, load_settings
from worker.lease import HANDOFF

PACS = "PACS@127.0.0.1:104"


@pytest.fixture
def failed(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, worker_store_outputs: Callable[..., list[int]]
) -> tuple[Settings, dict[str, int], redis.Redis[Any]]:
    """Three outputs for PACS: one failed after its retries ran out, one refused, one delivered."""
    broker = redis_url.rsplit("/", 1)[0] + "/9"
    env = {
        "RETINAGATE_DATA_DIR": str(tmp_path / "var"),
        "RETINAGATE_BROKER_URL": broker,
        "RETINAGATE_DESTINATIONS": PACS,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(environ=env)
    queue = redis.Redis.from_url(broker)
    queue.flushdb()
    gave_up, refused, delivered = worker_store_outputs(settings, 3)
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as session:
        session.add_all([
            Delivery(output_id=gave_up, destination=PACS, status=DeliveryStatus.FAILED, attempts=9, retryable=True,
                     last_error="no association (gave up after 9 attempts)"),
            Delivery(output_id=refused, destination=PACS, status=DeliveryStatus.FAILED, attempts=1,
                     dimse_status=0xA900, last_error="C-STORE answered 0xA900"),
            Delivery(output_id=delivered, destination=PACS, status=DeliveryStatus.DELIVERED, attempts=1),
        ])  # fmt: skip
    engine.dispose()
    return settings, {"gave_up": gave_up, "refused": refused, "delivered": delivered}, queue


def _rows(settings: Settings) -> dict[int, tuple[str, int, bool]]:
    return {output: row[:3] for output, row in _leased_rows(settings).items()}


def _leased_rows(settings: Settings) -> dict[int, tuple[str, int, bool, str | None]]:
    engine = make_engine(settings)
    try:
        with session_scope(session_factory(engine)) as session:
            return {
                d.output_id: (d.status.value, d.attempts, d.retryable, d.lease_owner)
                for d in session.scalars(select(Delivery))
            }
    finally:
        engine.dispose()


def test_list_counts_deliveries_per_destination_telling_refusals_from_retries_that_ran_out(
    failed: tuple[Settings, dict[str, int], Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["deliveries", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        PACS: {"delivered": 1, "failed (refused)": 1, "failed (retries ran out)": 1}
    }


def test_retry_sends_again_what_ran_out_of_retries_and_refusals_only_when_asked(
    failed: tuple[Settings, dict[str, int], Any], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, outputs, queue = failed

    assert main(["deliveries", "retry"]) == 0

    assert capsys.readouterr().out.strip() == f"{PACS}: 1 delivery(ies) sent again"
    rows = _rows(settings)
    assert rows[outputs["gave_up"]] == ("pending", 0, False)
    # Queued after the commit: a hand-off lease has the sweeper send it should this process die first.
    assert (_leased_rows(settings)[outputs["gave_up"]][3] or "").startswith(HANDOFF)
    assert rows[outputs["refused"]] == ("failed", 1, False) and rows[outputs["delivered"]][0] == "delivered"
    message = json.loads(queue.lindex("deliver", 0) or b"{}")
    assert message["headers"]["task"] == "retinagate.deliver" and queue.llen("deliver") == 1

    assert main(["deliveries", "retry", "--refused", "--destination", PACS]) == 0
    assert _rows(settings)[outputs["refused"]] == ("pending", 0, False)
    assert main(["deliveries", "retry"]) == 0
    assert "nothing to send again" in capsys.readouterr().out


def test_retry_names_a_destination_that_is_not_configured(
    failed: tuple[Settings, dict[str, int], Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["deliveries", "retry", "--destination", "OTHER@127.0.0.1:11112"]) == 2
    error = capsys.readouterr().err
    assert "OTHER@127.0.0.1:11112 is not a configured destination" in error and PACS in error


def test_a_renamed_destination_leaves_its_old_deliveries_listed_and_unsent(
    failed: tuple[Settings, dict[str, int], Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.sweep import sweep

    settings, outputs, queue = failed
    monkeypatch.setenv("RETINAGATE_DESTINATIONS", json.dumps([{"address": PACS, "name": "ward-pacs"}]))
    renamed = load_settings()
    assert main(["deliveries", "list", "--json"]) == 0
    assert PACS in json.loads(capsys.readouterr().out)  # still listed under the old name
    assert main(["deliveries", "retry", "--destination", PACS]) == 0  # the address finds the renamed one
    assert "nothing to send again" in capsys.readouterr().out and queue.llen("deliver") == 0

    def probed_by(config: Settings) -> list[str]:
        """The destinations a sweep an hour from now (the failed row long due a probe) asks after."""
        asked: list[str] = []

        def probe(name: str) -> bool:
            asked.append(name)
            return False

        engine = make_engine(config)
        try:
            sweep(config, session_factory(engine), lambda ids: None, lambda ids: None,
                  now=utcnow() + timedelta(hours=1), probe=probe)  # fmt: skip
        finally:
            engine.dispose()
        return asked

    assert probed_by(renamed) == [] and probed_by(settings) == [PACS]  # under its old name it would be
    assert _rows(renamed)[outputs["gave_up"]] == ("failed", 9, True)


def test_check_says_which_destinations_answer_with_their_protocol_and_tls(
    tmp_path: Path, worker_receiver: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    live, down = worker_receiver("LIVE"), worker_receiver("DOWN", start=False)
    secret = {"address": "https://archive.example/dicom-web", "name": "archive", "token_file": "/nowhere/token"}
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("RETINAGATE_DESTINATIONS", json.dumps([live.destination, down.destination, secret]))

    assert main(["deliveries", "check", "--json"]) == 1
    report = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert report[live.destination] == {
        "name": live.destination, "protocol": "C-STORE", "address": live.destination, "tls": "off", "answers": True
    }  # fmt: skip
    assert report[down.destination]["answers"] is False and "problem" not in report[down.destination]
    assert report["archive"]["protocol"] == "STOW-RS" and report["archive"]["answers"] is False
    assert "token_file /nowhere/token cannot be read" in report["archive"]["problem"]

    monkeypatch.setenv("RETINAGATE_DESTINATIONS", live.destination)
    assert main(["deliveries", "check"]) == 0
    assert capsys.readouterr().out.strip() == f"{live.destination}: C-STORE {live.destination}, TLS off: answers"
    monkeypatch.setenv("RETINAGATE_DESTINATIONS", "")
    assert main(["deliveries", "check"]) == 2
