"""retinagate.provenance: RetinaGate's own outputs are recognised wherever they come back, and nothing
else is (issue 15 item 2: a PACS routing rule that forwards studies to RetinaGate must not loop).

The outputs checked are the real ones, written by ``retinagate score`` with every output kind."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select

from retinagate.cli import EXIT_OK, main
from retinagate.db import make_engine, session_factory, session_scope
from retinagate.decode import OwnOutputError, decode_instance, own_output_of_file
from retinagate.models import Instance, InstanceStatus, Study
from retinagate.provenance import own_output
from retinagate.settings import Settings
from retinagate.storage import Storage
from retinagate.synth import DicomIdentity, render_fundus, write_dicom
from worker.scoring import Scorer, score_instances

SC = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory, random_onnx_model_path: Path) -> Iterator[dict[str, Path]]:
    """A camera photograph and the SC, SR and Parametric Map ``retinagate score`` wrote for it."""
    folder = tmp_path_factory.mktemp("own")
    photo = folder / "eye.dcm"
    write_dicom(render_fundus(np.random.default_rng(3), 320, 240, ["DR"]).image, photo, DicomIdentity.synthetic(0))
    saved = {k: v for k, v in os.environ.items() if k.startswith("RETINAGATE_")}
    for key in saved:
        del os.environ[key]
    os.environ["RETINAGATE_DATA_DIR"] = str(folder / "var")
    try:
        code = main(["score", str(photo), "--model", str(random_onnx_model_path), "--out", str(folder / "out"),
                     "--outputs", "sc,sr,pm"])  # fmt: skip
    finally:
        del os.environ["RETINAGATE_DATA_DIR"]
        os.environ.update(saved)
    assert code == EXIT_OK
    (pm, *_) = sorted((folder / "out").glob("eye.pm.*.dcm"))  # a map per finding, named by its label
    yield {"photo": photo, "pm": pm, **{kind: folder / "out" / f"eye.{kind}.dcm" for kind in ("sc", "sr")}}


@pytest.mark.parametrize("kind", ["sc", "sr", "pm"])
def test_every_output_kind_is_recognised_as_our_own(outputs: dict[str, Path], kind: str) -> None:
    ds = pydicom.dcmread(outputs[kind], stop_before_pixels=True)
    reason = own_output(ds)
    assert reason is not None and "Contributing Equipment" in reason
    assert own_output_of_file(outputs[kind]) == reason


def test_an_output_whose_contributing_equipment_was_dropped_is_still_recognised_by_its_manufacturer(
    outputs: dict[str, Path],
) -> None:
    ds = pydicom.dcmread(outputs["sc"], stop_before_pixels=True)
    del ds.ContributingEquipmentSequence
    assert own_output(ds) == "RetinaGate's own output (Manufacturer is RetinaGate)"


def test_camera_photographs_are_not_our_own_even_from_the_synthetic_camera(outputs: dict[str, Path]) -> None:
    ds = pydicom.dcmread(outputs["photo"])
    assert ds.Manufacturer == "RetinaGate synthetic"  # close to ours on purpose: the match is exact
    assert own_output(ds) is None
    assert own_output_of_file(outputs["photo"]) is None


def test_another_vendors_processing_equipment_is_not_ours(outputs: dict[str, Path]) -> None:
    ds = pydicom.dcmread(outputs["sc"], stop_before_pixels=True)
    ds.Manufacturer = "Other AI"
    for item in ds.ContributingEquipmentSequence:
        item.Manufacturer = "Other AI"
    assert own_output(ds) is None


def test_the_decoder_refuses_our_own_output_so_no_worker_scores_it(outputs: dict[str, Path]) -> None:
    with pytest.raises(OwnOutputError, match="not scored, so that a routing loop cannot form"):
        decode_instance(outputs["sc"], min_side=64, max_pixels=10**8)


def test_score_skips_our_own_outputs_with_a_message_and_exits_zero(
    outputs: dict[str, Path],
    random_onnx_model_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``retinagate score`` turned ``x.sc.dcm`` into ``x.sc.sc.dcm``."""
    for key in [k for k in os.environ if k.startswith("RETINAGATE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))
    folder = outputs["sc"].parent
    capsys.readouterr()

    code = main(["score", str(folder), str(outputs["photo"]), "--model", str(random_onnx_model_path),
                 "--out", str(tmp_path / "again"), "--json"])  # fmt: skip

    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert code == EXIT_OK
    skipped = sorted(Path(line["source"]).name for line in lines if line["status"] == "skipped")
    assert skipped == sorted(p.name for p in folder.iterdir()) and {"eye.sc.dcm", outputs["pm"].name} < set(skipped)
    assert all("RetinaGate's own output" in line["reason"] for line in lines if line["status"] == "skipped")
    assert [Path(line["source"]).name for line in lines if line["status"] == "scored"] == ["eye.dcm"]
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["eye.sc.dcm", "eye.sr.dcm"]
    assert "eye.sc.dcm: skipped: RetinaGate's own output" in captured.err

    code = main(["score", str(outputs["sc"]), "--model", str(random_onnx_model_path), "--out", str(tmp_path / "t")])
    assert code == EXIT_OK
    assert "0 scored, 0 not graded, 1 skipped (RetinaGate's own outputs), 0 failed" in capsys.readouterr().out


def test_the_gateway_acknowledges_our_own_sc_and_neither_stores_nor_queues_it(
    outputs: dict[str, Path],
    start_gateway: Callable[..., Any],
    camera_files: Callable[..., list[Path]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    queued: list[int] = []
    gateway = start_gateway(send=queued.extend)
    sc = pydicom.dcmread(outputs["sc"])
    ae = AE(ae_title="PACS")
    ae.add_requested_context(SC, [str(sc.file_meta.TransferSyntaxUID)])
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.77.1.5.1", ["1.2.840.10008.1.2.4.50"])
    host, port = gateway.address
    assoc = ae.associate(host, port, ae_title=gateway.settings.gateway_ae_title)
    assert assoc.is_established
    caplog.set_level("INFO", logger="dicom_gateway")
    try:
        statuses = [int(assoc.send_c_store(item).Status) for item in (outputs["sc"], outputs["sc"], *camera_files(1))]
    finally:
        assoc.release()

    assert statuses == [0x0000, 0x0000, 0x0000]  # a forwarding rule never retries it
    rows = _instances(gateway.settings)
    assert [r.sop_instance_uid for r in rows] == [pydicom.dcmread(camera_files(1)[0]).SOPInstanceUID]
    stored = sorted(p for p in gateway.settings.resolved_storage_dir.rglob("*") if p.is_file())
    assert stored == [gateway.storage.path(rows[0].storage_key)]
    assert "not stored or scored: RetinaGate's own output" in caplog.text
    assert str(sc.PatientName) not in caplog.text and str(sc.SOPInstanceUID) not in caplog.text


def test_asked_to_store_them_the_gateway_keeps_our_own_sc_as_skipped_and_never_queues_it(
    outputs: dict[str, Path], start_gateway: Callable[..., Any]
) -> None:
    queued: list[int] = []
    gateway = start_gateway(send=queued.extend, gateway_store_own_outputs=True)
    sc = pydicom.dcmread(outputs["sc"])
    ae = AE(ae_title="PACS")
    ae.add_requested_context(SC, [str(sc.file_meta.TransferSyntaxUID)])
    host, port = gateway.address
    assoc = ae.associate(host, port, ae_title=gateway.settings.gateway_ae_title)
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(outputs["sc"]).Status) for _ in range(2)]
    finally:
        assoc.release()

    assert statuses == [0x0000, 0x0000]
    (row,) = _instances(gateway.settings)
    assert row.sop_instance_uid == str(sc.SOPInstanceUID) and row.status == "skipped"
    assert row.last_error is not None and row.last_error.startswith("not scored: RetinaGate's own output")
    assert gateway.storage.path(row.storage_key).is_file()
    time.sleep(0.3)  # a task would be sent within milliseconds
    assert queued == []


def test_an_own_output_stored_before_the_rule_fails_with_its_reason_and_is_not_retried(
    outputs: dict[str, Path], make_settings: Callable[..., Settings], random_onnx_model_path: Path
) -> None:
    """Rows an older gateway stored: the worker (and a nightly rescore) fails them, never scores them."""
    from retinagate.db import upgrade

    settings = make_settings(model_path=random_onnx_model_path)
    upgrade(settings)
    storage = Storage(settings.resolved_storage_dir)
    key = storage.new_key("in")
    sha256, size = storage.write_bytes(key, outputs["sc"].read_bytes())
    sc = pydicom.dcmread(outputs["sc"], stop_before_pixels=True)
    engine = make_engine(settings)
    sessions = session_factory(engine)
    try:
        with session_scope(sessions) as session:
            study = Study(study_uid=str(sc.StudyInstanceUID))
            session.add(study)
            session.flush()
            row = Instance(
                sop_instance_uid=str(sc.SOPInstanceUID),
                study_id=study.id,
                series_uid=str(sc.SeriesInstanceUID),
                sop_class_uid=SC,
                transfer_syntax_uid=str(sc.file_meta.TransferSyntaxUID),
                storage_key=key,
                sha256=sha256,
                size_bytes=size,
                status=InstanceStatus.QUEUED,
            )
            session.add(row)
            session.flush()
            instance_id = row.id
        scorer = Scorer.load(None, settings, sessions)
        try:
            outcome = score_instances(settings, sessions, storage, scorer, [instance_id])
            score_instances(settings, sessions, storage, scorer, [instance_id])
        finally:
            scorer.close()
        with session_scope(sessions) as session:
            final = session.get_one(Instance, instance_id)
            status, attempts, error = final.status, final.attempts, final.last_error
    finally:
        engine.dispose()
    assert outcome.failed == [instance_id] and outcome.scored == []
    assert (status, attempts) == (InstanceStatus.FAILED, 1)
    assert error is not None and "RetinaGate's own output" in error


def _instances(settings: Settings) -> list[Instance]:
    engine = make_engine(settings)
    try:
        with session_factory(engine)() as session:
            return list(session.scalars(select(Instance).order_by(Instance.id)))
    finally:
        engine.dispose()
