"""`retinagate retrieve`: archived photographs brought in from a real Orthanc by C-FIND and C-MOVE to
the real gateway on loopback, where they take the normal path; bounded, and resumable by series."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from retinagate.cli import main
from retinagate.db import make_engine, session_factory, session_scope
from retinagate.destinations import Connection, Timeouts
from retinagate.destinations.dimse import DimseDestination
from retinagate.models import Instance
from retinagate.pacs import Orthanc
from retinagate.settings import Settings

pytestmark = pytest.mark.interop

FAST = Connection("RG", timeouts=Timeouts(connect=2, acse=5, dimse=20, network=20))


def _held(settings: Settings) -> dict[str, int]:
    """Instances the gateway stored, per series."""
    engine = make_engine(settings)
    try:
        with session_scope(session_factory(engine)) as session:
            rows = session.execute(select(Instance.series_uid, func.count()).group_by(Instance.series_uid)).all()
    finally:
        engine.dispose()
    return {series: count for series, count in rows}


@pytest.fixture
def archive(
    tmp_path: Path,
    start_gateway: Callable[..., Any],
    make_settings: Callable[..., Settings],
    camera_files: Callable[..., list[Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Settings, Orthanc, dict[str, int]]]:
    """A gateway, and an Orthanc that knows it as a DICOM node and holds two camera studies (two OP
    series each: one per eye) and a CT study; the CLI reads the gateway's settings."""
    settings = make_settings()
    gateway = start_gateway(settings)
    node = [settings.gateway_ae_title, "127.0.0.1", gateway.address[1]]
    orthanc = Orthanc(
        tmp_path / "orthanc",
        extra={"DicomModalities": {"gateway": node}, "DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True},
    ).start()
    try:
        photographs = camera_files(4, study=0) + camera_files(2, study=1)
        ct = Path(get_testdata_file("CT_small.dcm"))
        pacs = DimseDestination(ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.port)
        sent = pacs.send(list(enumerate([*photographs, ct])), FAST)
        assert {r.verdict for r in sent.values()} == {"delivered"}, sent
        per_series: dict[str, int] = {}
        for path in photographs:
            series = str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
            per_series[series] = per_series.get(series, 0) + 1
        monkeypatch.setenv("RETINAGATE_DATA_DIR", str(settings.data_dir))
        yield settings, orthanc, per_series
    finally:
        orthanc.kill()


def _retrieve(orthanc: Orthanc, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, Any]]:
    code = main(["retrieve", "--from", f"{orthanc.ae_title}@127.0.0.1:{orthanc.port}", "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_photographs_come_in_by_series_and_a_second_run_moves_nothing(
    archive: tuple[Settings, Orthanc, dict[str, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, orthanc, per_series = archive

    code, dry = _retrieve(orthanc, capsys, "--dry-run")
    assert code == 0 and (dry["studies"], dry["series"], dry["skipped"], dry["moved"]) == (2, 4, 0, 0)
    assert _held(settings) == {}

    code, first = _retrieve(orthanc, capsys)
    assert code == 0, first
    assert (first["moved"], first["instances_moved"], first["instances_failed"]) == (4, 6, 0)
    assert _held(settings) == per_series  # every photograph, and nothing of the CT study

    code, again = _retrieve(orthanc, capsys)
    assert code == 0 and (again["series"], again["skipped"], again["moved"]) == (4, 4, 0)
    assert main(["retrieve", "--from", f"{orthanc.ae_title}@127.0.0.1:{orthanc.port}"]) == 0
    assert capsys.readouterr().out.strip() == (
        "2 study(ies), 4 OP series; 4 already held; moved 0 series (0 instance(s) sent, 0 failed)"
    )


def test_from_takes_the_name_of_a_configured_destination_and_bad_arguments_are_named(
    archive: tuple[Settings, Orthanc, dict[str, int]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, orthanc, _ = archive
    table = {"address": f"{orthanc.ae_title}@127.0.0.1:{orthanc.port}", "name": "archive"}
    monkeypatch.setenv("RETINAGATE_DESTINATIONS", json.dumps([table]))
    assert main(["retrieve", "--from", "archive", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["series"] == 4
    assert main(["retrieve", "--from", "archive", "--since", "2026-02-01", "--until", "2026-01-01"]) == 2
    assert "--since 2026-02-01 is after --until 2026-01-01" in capsys.readouterr().err
    assert main(["retrieve", "--from", "nowhere"]) == 2
    assert "--from: destination 'nowhere' is neither AE@host:port" in capsys.readouterr().err


def test_a_run_moves_at_most_limit_studies_and_the_next_goes_on_where_it_stopped(
    archive: tuple[Settings, Orthanc, dict[str, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    settings, orthanc, per_series = archive

    code, first = _retrieve(orthanc, capsys, "--limit", "1")
    assert code == 0 and first["left"] == 1 and first["moved"] in (1, 2)
    code, second = _retrieve(orthanc, capsys, "--limit", "1")
    assert code == 0 and second["left"] == 0 and second["skipped"] == first["moved"]
    assert first["moved"] + second["moved"] == 4 and _held(settings) == per_series


def test_the_date_range_and_modality_choose_what_is_found(
    archive: tuple[Settings, Orthanc, dict[str, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    _, orthanc, _ = archive
    ct_date = str(dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True).StudyDate)

    code, ct = _retrieve(orthanc, capsys, "--modality", "CT", "--dry-run")
    assert code == 0 and (ct["studies"], ct["series"]) == (1, 1)
    day = f"{ct_date[:4]}-{ct_date[4:6]}-{ct_date[6:]}"
    code, that_day = _retrieve(orthanc, capsys, "--modality", "CT", "--since", day, "--until", day, "--dry-run")
    assert code == 0 and that_day["series"] == 1
    code, none = _retrieve(orthanc, capsys, "--modality", "CT", "--until", "1990-01-01", "--dry-run")
    assert code == 0 and none["series"] == 0


def test_a_pacs_that_does_not_know_the_gateway_or_does_not_answer_is_named(
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    camera_files: Callable[..., list[Path]],
) -> None:
    from retinagate.db import upgrade
    from retinagate.pacs import free_port

    settings = make_settings()
    upgrade(settings)
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(settings.data_dir))
    orthanc = Orthanc(tmp_path / "stranger", extra={"DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True})
    orthanc.start()
    try:
        pacs = DimseDestination(ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.port)
        assert {r.verdict for r in pacs.send(list(enumerate(camera_files(2))), FAST).values()} == {"delivered"}
        assert main(["retrieve", "--from", f"ORTHANC@127.0.0.1:{orthanc.port}"]) == 1
        assert "sent nothing: does it know the move destination 'RETINAGATE'" in capsys.readouterr().err
    finally:
        orthanc.kill()
    assert main(["retrieve", "--from", f"ORTHANC@127.0.0.1:{free_port()}"]) == 3
    assert "no association with ORTHANC@127.0.0.1" in capsys.readouterr().err
    assert main(["retrieve", "--from", "https://pacs.example/dicom-web"]) == 2
    assert "a PACS to retrieve from is AE@host:port" in capsys.readouterr().err
