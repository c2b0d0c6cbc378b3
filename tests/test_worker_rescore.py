"""Re-scoring under a new model: old predictions kept, and a change report that is exactly right."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from retinagate.cli import main
from retinagate.db import make_engine, session_factory, session_scope, upgrade
from retinagate.models import Instance, InstanceStatus, Model, Prediction, Study, StudyReport, utcnow
from retinagate.settings import Settings
from retinagate.storage import Storage
from worker.rescore import change_report, find_unscored, previous_model
from worker.scoring import Scorer, score_instances
from worker.study_reports import write_study_reports

T0 = utcnow() - timedelta(days=2)


def _predictions(session: Session, model_id: int) -> dict[int, tuple[Any, ...]]:
    rows = session.scalars(select(Prediction).where(Prediction.model_id == model_id))
    return {p.instance_id: (p.id, p.probabilities, p.findings, p.created_at, p.duration_s) for p in rows}


@pytest.mark.slow
def test_rescore_scores_everything_under_the_new_model_keeps_the_old_and_reports_exactly_the_changes(
    make_settings: Callable[..., Settings],
    worker_store_instance: Callable[..., int],
    random_onnx_model_path: Path,
    worker_model_variant: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    settings = make_settings(model_path=random_onnx_model_path, rescore_batch_size=3, study_quiet_seconds=0)
    upgrade(settings)
    ids = [worker_store_instance(settings, study=s, laterality=eye, columns=cols)
           for s, cols in enumerate([(), ("DR",), ("ARMD",)]) for eye in ("R", "L")]
    worker_store_instance(settings, study=9, status="queued")  # not scored yet: left to the worker
    engine = make_engine(settings)
    sessions = session_factory(engine)
    old = Scorer.load(None, settings, sessions)
    storage = Storage(settings.resolved_storage_dir)
    assert score_instances(settings, sessions, storage, old, ids).scored == ids
    old.close()
    # The old model's study reports (beat's task writes them): studies 0-2; study 9 is still being scored.
    assert len(write_study_reports(settings, sessions, storage, old.model_id).written) == 3

    # Move DR's threshold between the old model's DR probabilities: some findings change, some do not.
    with session_scope(sessions) as s:
        before = _predictions(s, old.model_id)
    dr = sorted(p[1]["DR"] for p in before.values())
    new_path = worker_model_variant(random_onnx_model_path, "recalibrated", {"DR": (dr[2] + dr[3]) / 2})
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("RETINAGATE_RESCORE_BATCH_SIZE", "4")
    monkeypatch.setenv("RETINAGATE_STUDY_QUIET_SECONDS", "0")
    reports = tmp_path / "reports"

    assert main(["rescore", "--model", str(new_path), "--report-dir", str(reports), "--json"]) == 0

    summary = json.loads(capsys.readouterr().out)
    with session_scope(sessions) as s:
        new_id = s.scalar(select(Model.id).where(Model.active.is_(True)))
        assert new_id is not None and new_id != old.model_id
        assert _predictions(s, old.model_id) == before  # the old predictions, untouched
        after = _predictions(s, new_id)
        assert sorted(after) == sorted(ids)
        uids = {i.id: (i.sop_instance_uid, i.study.study_uid) for i in s.scalars(select(Instance))}
    changed = {i for i in ids if set(before[i][2]) != set(after[i][2])}
    assert 0 < len(changed) < len(ids)  # the threshold split the instances
    assert summary["candidates"] == summary["scored"] == len(ids) and summary["failed"] == 0
    assert summary["compared"] == len(ids) and summary["changed"] == len(changed)
    assert summary["previous_model"]["id"] == old.model_id and summary["model"]["id"] == new_id

    report = json.loads(Path(summary["report_json"]).read_text())
    assert {c["instance_id"] for c in report["changed"]} == changed
    for change in report["changed"]:
        i = change["instance_id"]
        assert (change["sop_instance_uid"], change["study_uid"]) == uids[i]
        assert [label["label"] for label in change["labels"]] == ["DR"]
        (label,) = change["labels"]
        assert label["old_probability"] == pytest.approx(before[i][1]["DR"])
        assert label["new_probability"] == pytest.approx(after[i][1]["DR"])
        assert label["old_present"] == ("DR" in before[i][2]) != label["new_present"]
    with Path(summary["report_csv"]).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {int(r["instance_id"]) for r in rows} == changed and {r["label"] for r in rows} == {"DR"}

    # Run again: nothing left to score, the same report.
    assert main(["rescore", "--model", str(new_path), "--report-dir", str(reports)]) == 0
    line = capsys.readouterr().out
    assert line.startswith("rescored 0 of 0 instance(s)") and f"findings changed for {len(changed)} of 6" in line
    # A study report per model and study, each written once.
    with session_scope(sessions) as s:
        written = sorted((r.model_id, r.study_id, r.revision) for r in s.scalars(select(StudyReport)))
    studies = sorted({uids[i][1] for i in ids})
    assert len(studies) == 3
    assert [(m, r) for m, _, r in written] == [(old.model_id, 1)] * 3 + [(new_id, 1)] * 3
    engine.dispose()


def _add(session: Session, n: int, status: InstanceStatus = InstanceStatus.SCORED, days: float = 0) -> int:
    study = Study(study_uid=f"1.9.{n}")
    session.add(study)
    session.flush()
    row = Instance(sop_instance_uid=f"1.9.{n}.1", study_id=study.id, series_uid="1.9.0", sop_class_uid="1.2",
                   transfer_syntax_uid="1.2.840.10008.1.2.1", storage_key=f"in/{n}.dcm", sha256="0" * 64,
                   size_bytes=1, status=status, received_at=T0 + timedelta(days=days))
    session.add(row)
    session.flush()
    return row.id


def _predict(session: Session, instance: int, model: Model, findings: list[str], probs: dict[str, float]) -> None:
    session.add(Prediction(instance_id=instance, model_id=model.id, findings=findings, probabilities=probs,
                           duration_s=0.1))


def test_the_change_report_compares_findings_label_by_label_within_the_range(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    upgrade(settings)
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as s:
        old = Model(name="r", version="1", sha256="1" * 64, card={}, activated_at=T0)
        new = Model(name="r", version="2", sha256="2" * 64, card={}, active=True, activated_at=T0 + timedelta(1))
        s.add_all([old, new])
        s.flush()
        same, gained, swapped, only_old, early = (_add(s, n, days=n) for n in range(5))
        _predict(s, same, old, ["DR"], {"DR": 0.8, "MH": 0.1})
        _predict(s, same, new, ["DR"], {"DR": 0.6, "MH": 0.2})
        _predict(s, gained, old, [], {"DR": 0.4, "MH": 0.1})
        _predict(s, gained, new, ["DR"], {"DR": 0.7, "MH": 0.1})
        _predict(s, swapped, old, ["MH", "DR"], {"DR": 0.6, "MH": 0.9, "ODC": 0.2})
        _predict(s, swapped, new, ["ODC", "DR"], {"DR": 0.55, "MH": 0.3, "ODC": 0.8})
        _predict(s, only_old, old, ["DR"], {"DR": 0.9})
        _predict(s, early, old, [], {"DR": 0.1})
        _predict(s, early, new, ["DR"], {"DR": 0.9})
        s.flush()

        report = change_report(s, old, new, since=T0, until=T0 + timedelta(days=3, hours=12))
        assert previous_model(s, new) is old and previous_model(s, old) is new

    assert report.compared == 3
    assert [c.instance_id for c in report.changed] == [gained, swapped]
    (dr,) = report.changed[0].labels
    assert (dr.label, dr.old_probability, dr.new_probability, dr.old_present, dr.new_present) == (
        "DR", 0.4, 0.7, False, True)
    labels = {label.label: label for label in report.changed[1].labels}
    assert set(labels) == {"MH", "ODC"}
    assert (labels["MH"].old_probability, labels["MH"].new_probability) == (0.9, 0.3)
    assert labels["ODC"].new_present and not labels["ODC"].old_present

    csv_path, json_path = report.write(tmp_path / "out", "report")
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["instance_id"]), r["label"]) for r in rows] == [(gained, "DR"), (swapped, "ODC"), (swapped, "MH")]
    assert rows[0]["old_probability"] == "0.400000" and rows[0]["new_present"] == "1"
    data = json.loads(json_path.read_text())
    assert data["changed_count"] == 2 and data["old_model"]["version"] == "1" and data["compared"] == 3
    engine.dispose()


def test_only_scored_instances_in_range_without_a_prediction_from_the_model_are_rescored(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    upgrade(settings)
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as s:
        model = Model(name="r", version="1", sha256="1" * 64, card={})
        s.add(model)
        s.flush()
        done = _add(s, 0)
        _predict(s, done, model, [], {})
        waiting = _add(s, 1)
        _add(s, 2, status=InstanceStatus.QUEUED)
        _add(s, 3, status=InstanceStatus.FAILED)
        late = _add(s, 4, days=10)
        refused = _add(s, 5, status=InstanceStatus.UNGRADABLE)  # a new model gates it again
        s.flush()

        assert find_unscored(s, model.id) == [waiting, late, refused]
        assert find_unscored(s, model.id, until=T0 + timedelta(days=5)) == [waiting, refused]
        assert find_unscored(s, model.id, since=T0 + timedelta(days=5)) == [late]
        assert find_unscored(s, None) == [done, waiting, late, refused]
    engine.dispose()


def test_instances_whose_photograph_retention_pruned_are_not_rescored(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    upgrade(settings)
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as s:
        model = Model(name="r", version="1", sha256="1" * 64, card={})
        s.add(model)
        s.flush()
        kept = _add(s, 0)
        pruned = _add(s, 1)
        s.get_one(Instance, pruned).pruned_at = utcnow()
        s.flush()

        assert find_unscored(s, model.id) == [kept]
        assert find_unscored(s, None) == [kept]
    engine.dispose()
