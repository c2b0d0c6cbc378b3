"""`retinagate results`: findings, model, stage latencies and delivery status per study and image."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from retinagate.cli import main
from retinagate.db import make_engine, session_factory, session_scope, upgrade
from retinagate.models import (
    Delivery,
    DeliveryStatus,
    Instance,
    InstanceStatus,
    Model,
    Output,
    Prediction,
    PredictionStatus,
    Study,
    utcnow,
)
from retinagate.settings import Settings
from worker.results import format_results, query_results, to_jsonable

T0 = utcnow().replace(microsecond=0) - timedelta(days=1)


def _populate(settings: Settings) -> dict[str, Any]:
    upgrade(settings)
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as s:
        old = Model(name="retina", version="1.0", sha256="1" * 64, card={}, active=False, activated_at=T0)
        new = Model(name="retina", version="2.0", sha256="2" * 64, card={}, active=True,
                    activated_at=T0 + timedelta(hours=1))
        study = Study(study_uid="1.2.3", accession="ACC1")
        other = Study(study_uid="1.2.4")
        s.add_all([old, new, study, other])
        s.flush()

        def instance(uid: str, study_id: int, status: InstanceStatus, received: Any, **extra: Any) -> Instance:
            row = Instance(sop_instance_uid=uid, study_id=study_id, series_uid=uid + ".0", sop_class_uid="1.2",
                           transfer_syntax_uid="1.2.840.10008.1.2.4.50", storage_key=f"in/{uid}.dcm",
                           sha256="0" * 64, size_bytes=1, received_at=received, status=status, laterality="R",
                           **extra)
            s.add(row)
            s.flush()
            return row

        right = instance("1.2.3.1", study.id, InstanceStatus.SCORED, T0)
        left = instance("1.2.3.2", study.id, InstanceStatus.FAILED, T0 + timedelta(seconds=5), attempts=5,
                        last_error="InputError: Pixel Data is shorter than Rows x Columns")
        later = instance("1.2.4.1", other.id, InstanceStatus.SCORED, T0 + timedelta(hours=5))

        def prediction(instance_id: int, model_id: int, findings: list[str], probabilities: dict[str, float],
                       created: Any) -> Prediction:
            row = Prediction(instance_id=instance_id, model_id=model_id, findings=findings,
                             probabilities=probabilities, duration_s=0.1, created_at=created)
            s.add(row)
            s.flush()
            return row

        prediction(right.id, old.id, ["ARMD"], {"DR": 0.2, "ARMD": 0.7}, T0 + timedelta(seconds=1))
        current = prediction(right.id, new.id, ["DR", "Disease_Risk"], {"DR": 0.91, "Disease_Risk": 0.8, "ARMD": 0.1},
                             T0 + timedelta(seconds=2))
        prediction(later.id, new.id, [], {"DR": 0.05, "ARMD": 0.3}, T0 + timedelta(hours=5, seconds=1))
        for n, kind in enumerate(("sc", "sr")):
            output = Output(prediction_id=current.id, kind=kind, sop_instance_uid=f"9.{n}", storage_key=f"out/{n}")
            s.add(output)
            s.flush()
            s.add(Delivery(output_id=output.id, destination="PACS@10.0.0.1:104", status=DeliveryStatus.DELIVERED,
                           attempts=1, delivered_at=T0 + timedelta(seconds=3 + n)))
            s.add(Delivery(output_id=output.id, destination="VIEW@10.0.0.2:104",
                           status=DeliveryStatus.DELIVERED if n == 0 else DeliveryStatus.RETRYING,
                           attempts=1 + 2 * n, last_error=None if n == 0 else "C-STORE answered 0xA700",
                           delivered_at=T0 + timedelta(seconds=3) if n == 0 else None))
    engine.dispose()
    return {"right": right.id, "left": left.id, "later": later.id}


def _query(settings: Settings, **kwargs: Any) -> list[Any]:
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as s:
        found = query_results(s, **kwargs)
    engine.dispose()
    return found


def test_a_study_shows_each_image_with_the_active_models_findings_latency_and_deliveries(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    ids = _populate(settings)

    (study,) = _query(settings, study_uid="1.2.3")

    assert study.study_uid == "1.2.3" and study.accession == "ACC1"
    right, left = study.images
    assert right.instance_id == ids["right"] and right.status == "scored"
    assert right.model == "retina 2.0"
    assert right.findings == [("DR", 0.91), ("Disease_Risk", 0.8)]
    assert right.scored_after_s == 2.0
    assert right.delivered_after_s is None  # the viewer has not got the SR yet
    by_destination = {d.destination: d for d in right.deliveries}
    assert by_destination["PACS@10.0.0.1:104"].status == "delivered"
    assert by_destination["PACS@10.0.0.1:104"].delivered_at == T0 + timedelta(seconds=4)
    assert by_destination["VIEW@10.0.0.2:104"].status == "retrying"
    assert by_destination["VIEW@10.0.0.2:104"].attempts == 3
    assert by_destination["VIEW@10.0.0.2:104"].last_error == "C-STORE answered 0xA700"
    assert left.status == "failed" and left.findings == [] and left.model is None
    assert left.last_error is not None and "Pixel Data" in left.last_error


def test_latency_to_delivery_counts_once_every_destination_has_every_output(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    _populate(settings)
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as s:
        for row in s.query(Delivery).filter(Delivery.status == DeliveryStatus.RETRYING):
            row.status, row.delivered_at = DeliveryStatus.DELIVERED, T0 + timedelta(seconds=9)
    engine.dispose()

    (study,) = _query(settings, study_uid="1.2.3")

    assert study.images[0].delivered_after_s == 9.0


def test_since_keeps_only_images_received_from_then_on(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    ids = _populate(settings)

    found = _query(settings, since=T0 + timedelta(hours=1))

    assert [s.study_uid for s in found] == ["1.2.4"]
    (image,) = found[0].images
    assert image.instance_id == ids["later"] and image.findings == [] and image.top_probability == ("ARMD", 0.3)
    assert [s.study_uid for s in _query(settings)] == ["1.2.3", "1.2.4"]


def test_the_text_and_json_forms_carry_the_same_facts(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    _populate(settings)
    found = _query(settings)

    text = format_results(found)
    data = to_jsonable(found)

    assert "study 1.2.3 (accession ACC1): 2 image(s)" in text
    assert "DR 0.91, Disease_Risk 0.80" in text and "model retina 2.0" in text
    assert "scored +2.0s, not delivered |" in text and "VIEW@10.0.0.2:104 retrying" in text
    assert "+-" not in text  # a stage not reached reads as such, not as a signed dash
    assert "No finding above threshold (top ARMD 0.30)" in text
    image = data[0]["images"][0]
    assert image["findings"] == [{"label": "DR", "probability": 0.91}, {"label": "Disease_Risk", "probability": 0.8}]
    assert image["latency_s"] == {"scored": 2.0, "delivered": None}
    assert image["received_at"] == T0.isoformat()
    json.dumps(data)  # serialisable as is


def test_an_ungradable_image_shows_its_status_and_reasons_instead_of_findings(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    _populate(settings)
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as s:
        model = s.query(Model).filter(Model.active.is_(True)).one()
        study = Study(study_uid="1.2.5")
        s.add(study)
        s.flush()
        blurred = Instance(
            sop_instance_uid="1.2.5.1",
            study_id=study.id,
            series_uid="1.2.5.0",
            sop_class_uid="1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.4.50",
            storage_key="in/1.2.5.1.dcm",
            sha256="0" * 64,
            size_bytes=1,
            received_at=T0,
            status=InstanceStatus.UNGRADABLE,
        )
        s.add(blurred)
        s.flush()
        s.add(
            Prediction(
                instance_id=blurred.id,
                model_id=model.id,
                findings=[],
                probabilities={},
                duration_s=0.1,
                created_at=T0 + timedelta(seconds=1),
                status=PredictionStatus.UNGRADABLE,
                reasons=["out of focus", "under-exposed"],
                quality={"sharpness": 0.31},
            )
        )
    engine.dispose()

    (study,) = _query(settings, study_uid="1.2.5")
    text = format_results([study])
    (image,) = to_jsonable([study])[0]["images"]

    assert study.images[0].status == "ungradable" and study.images[0].findings == []
    assert "1.2.5.1 - ungradable | not graded: out of focus; under-exposed | model retina 2.0" in text
    assert image["status"] == "ungradable" and image["reasons"] == ["out of focus", "under-exposed"]
    assert image["findings"] == [] and image["top_probability"] is None


def test_a_finding_just_over_its_threshold_is_never_printed_under_it(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    _populate(settings)
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as s:
        model = s.query(Model).filter(Model.active.is_(True)).one()
        model.card = {"labels": ["DR", "TSLN"], "thresholds": [0.5, 0.0501]}
        prediction = s.query(Prediction).filter(Prediction.model_id == model.id, Prediction.findings != []).first()
        assert prediction is not None
        prediction.findings = ["TSLN"]
        prediction.probabilities = {"DR": 0.2, "TSLN": 0.0504}
    engine.dispose()

    text = format_results(_query(settings, study_uid="1.2.3"))

    assert "Tessellation (TSLN) 0.0504, threshold 0.0501" in text  # "0.05" would read as under 0.0501


def test_the_results_command_prints_json_and_an_unknown_study_or_an_empty_range_is_an_answer(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    settings = make_settings()
    _populate(settings)
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(settings.data_dir))

    assert main(["results", "--study", "1.2.3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [i["sop_instance_uid"] for i in data[0]["images"]] == ["1.2.3.1", "1.2.3.2"]

    assert main(["results", "--since", (T0 + timedelta(hours=1)).date().isoformat()]) == 0
    assert "study 1.2.4" in capsys.readouterr().out

    # Nothing found is an answer for every filter, not a missing resource (exit 0 in both cases).
    assert main(["results", "--study", "9.9.9"]) == 0
    assert capsys.readouterr().out.strip() == "no study with UID 9.9.9"
    assert main(["results", "--study", "9.9.9", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["results", "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out.strip() == "no results"


def test_an_image_whose_photograph_retention_pruned_shows_when_and_keeps_its_findings(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    ids = _populate(settings)
    pruned = T0 + timedelta(days=1)
    engine = make_engine(settings)
    with session_scope(session_factory(engine)) as s:
        s.get_one(Instance, ids["right"]).pruned_at = pruned
    engine.dispose()

    (study,) = _query(settings, study_uid="1.2.3")
    text = format_results([study])
    data = to_jsonable([study])

    right, left = study.images
    assert right.pruned_at == pruned and right.findings == [("DR", 0.91), ("Disease_Risk", 0.8)]
    assert left.pruned_at is None
    assert f"scored, photograph pruned {pruned.date().isoformat()} | DR 0.91" in text
    assert text.count("photograph pruned") == 1
    assert data[0]["images"][0]["pruned_at"] == pruned.isoformat() and data[0]["images"][1]["pruned_at"] is None
