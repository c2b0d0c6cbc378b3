"""worker.study_reports: one study report per complete study and model, stored and delivered once."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select, update

from retinagate.card import ModelCard
from retinagate.db import make_engine, session_factory, session_scope, upgrade
from retinagate.labels import DISEASE_RISK, LABELS
from retinagate.models import (
    Instance,
    InstanceStatus,
    Model,
    Output,
    Prediction,
    PredictionStatus,
    Study,
    StudyConclusion,
    StudyReport,
    utcnow,
)
from retinagate.outputs.study import report_uid
from retinagate.settings import Settings
from retinagate.storage import Storage
from worker.delivery import deliver_outputs
from worker.results import format_results, query_results, to_jsonable
from worker.study_reports import active_model_id, write_study_reports

LATER = timedelta(seconds=400)  # past the default quiet period of 300 s


class Site:
    """A database with one model and a store of photographs, as the gateway and scoring leave them."""

    def __init__(self, settings: Settings, store: Callable[..., int]) -> None:
        upgrade(settings)
        self.settings = settings
        self.store = store
        self.engine = make_engine(settings)
        self.sessions = session_factory(self.engine)
        self.storage = Storage(settings.resolved_storage_dir)
        self.models = [self.add_model("a"), self.add_model("b", active=False)]

    def add_model(self, digit: str, active: bool = True) -> int:
        card = ModelCard(name="fundus-net", version=f"1.{digit}", thresholds=tuple(0.5 for _ in LABELS))
        with session_scope(self.sessions) as session:
            model = Model(name=card.name, version=card.version, sha256=digit * 64,
                          card=card.model_dump(mode="json"), active=active)  # fmt: skip
            session.add(model)
            session.flush()
            return model.id

    def photograph(self, eye: str, instance: int, status: str = "queued", study: int = 0) -> int:
        return self.store(self.settings, study=study, laterality=eye, instance=instance, size=(256, 192), status=status)

    def score(self, instance_id: int, model: int, gradable: bool = True, **over: float) -> None:
        probabilities = {name: over.get(name, 0.1) for name in LABELS}
        with session_scope(self.sessions) as session:
            session.add(
                Prediction(
                    instance_id=instance_id,
                    model_id=self.models[model],
                    probabilities=probabilities if gradable else {},
                    findings=[n for n in LABELS if probabilities[n] >= 0.5] if gradable else [],
                    status=PredictionStatus.SCORED if gradable else PredictionStatus.UNGRADABLE,
                    reasons=[] if gradable else ["out of focus"],
                    duration_s=0.1,
                )
            )
            status = InstanceStatus.SCORED if gradable else InstanceStatus.UNGRADABLE
            session.execute(update(Instance).where(Instance.id == instance_id).values(status=status))

    def set_status(self, instance_id: int, status: InstanceStatus) -> None:
        with session_scope(self.sessions) as session:
            session.execute(update(Instance).where(Instance.id == instance_id).values(status=status))

    def arrived(self) -> None:
        """The study's last instance arrived now (as the gateway records each one)."""
        with session_scope(self.sessions) as session:
            session.execute(update(Study).values(last_received_at=utcnow()))

    def write(self, model: int = 0, after: timedelta = LATER) -> Any:
        return write_study_reports(
            self.settings, self.sessions, self.storage, self.models[model], now=utcnow() + after
        )

    def reports(self) -> list[tuple[int, int, int, str]]:
        with session_scope(self.sessions) as session:
            rows = session.scalars(select(StudyReport).order_by(StudyReport.id))
            return [(r.model_id, r.revision, r.instances, r.conclusion.value) for r in rows]


@pytest.fixture
def site(make_settings: Callable[..., Settings], worker_store_instance: Callable[..., int]) -> Any:
    made = Site(make_settings(), worker_store_instance)
    yield made
    made.engine.dispose()


def test_a_complete_study_gets_one_report_stored_as_an_output_and_a_second_run_writes_nothing(site: Site) -> None:
    right, left = site.photograph("R", 0), site.photograph("L", 0)
    site.score(right, 0, DR=0.8, **{DISEASE_RISK: 0.9})
    site.score(left, 0, gradable=False)

    outcome = site.write()

    assert site.reports() == [(site.models[0], 1, 2, "refer")]
    with session_scope(site.sessions) as session:
        report = session.scalars(select(StudyReport)).one()
        assert report.eyes["R"]["findings"] == [[DISEASE_RISK, 0.9], ["DR", 0.8]]
        assert report.eyes["L"] == {"photographs": 1, "gradable": False, "disease_risk": None, "findings": []}
        (output,) = report.outputs
        assert (output.kind, output.prediction_id) == ("study", None)
        study_uid = report.study.study_uid
        written = dcmread(site.storage.path(output.storage_key))
    assert written.SOPInstanceUID == output.sop_instance_uid == report_uid(study_uid, "a" * 64, 1)
    assert outcome.deliver == []  # no destination configured
    assert site.write().written == []
    assert site.reports() == [(site.models[0], 1, 2, "refer")]


def test_with_study_reports_off_a_complete_study_gets_none_until_they_are_on_again(site: Site) -> None:
    site.score(site.photograph("R", 0), 0)
    site.settings = site.settings.model_copy(update={"study_reports": False})

    assert site.write().written == [] and site.reports() == []
    site.settings = site.settings.model_copy(update={"study_reports": True})
    assert len(site.write().written) == 1


def test_no_report_before_the_quiet_period_or_while_a_photograph_is_still_being_scored(site: Site) -> None:
    right, left = site.photograph("R", 0), site.photograph("L", 0)
    site.score(right, 0)
    assert site.write().written == []  # the left eye is still queued
    site.score(left, 0)
    assert site.write(after=timedelta(seconds=10)).written == []  # not quiet for 300 s yet
    assert site.write(model=1).written == []  # the other model has scored nothing
    assert len(site.write().written) == 1
    assert site.reports()[0][3] == StudyConclusion.NO_REFERABLE.value


def test_a_failed_photograph_does_not_hold_the_report_back(site: Site) -> None:
    right, left = site.photograph("R", 0), site.photograph("L", 0)
    site.score(right, 0)
    site.set_status(left, InstanceStatus.FAILED)
    site.write()
    assert site.reports() == [(site.models[0], 1, 2, "no_referable")]
    with session_scope(site.sessions) as session:
        assert set(session.scalars(select(StudyReport)).one().eyes) == {"R"}


def test_photographs_arriving_after_the_report_make_a_second_revision_once_settled(site: Site) -> None:
    site.score(site.photograph("R", 0), 0)
    site.write()
    late = site.photograph("L", 0)  # a photograph after the quiet period
    site.arrived()
    assert site.write().written == []  # not scored yet
    site.score(late, 0, gradable=False)
    assert len(site.write().written) == 1
    assert site.write().written == []
    assert site.reports() == [(site.models[0], 1, 1, "no_referable"), (site.models[0], 2, 2, "no_referable")]


def test_our_own_outputs_stored_back_in_the_study_neither_hold_back_nor_revise_its_report(site: Site) -> None:
    site.score(site.photograph("R", 0), 0)
    site.photograph("L", 0, status="skipped")  # e.g. the study report itself, sent back to the gateway
    site.write()
    site.photograph("L", 1, status="skipped")
    site.arrived()
    assert site.write().written == []
    assert site.reports() == [(site.models[0], 1, 1, "no_referable")]


def test_a_report_another_worker_recorded_first_is_not_written_twice_and_leaves_no_file(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    import retinagate.outputs.study as study

    site.score(site.photograph("R", 0), 0)
    build = study.build_study_report
    raced: list[Any] = []

    def build_while_another_worker_writes(*args: Any, **kwargs: Any) -> Any:
        if not raced:  # the other worker reads, builds and commits while this one builds
            raced.append(None)
            raced[0] = site.write()
        return build(*args, **kwargs)

    monkeypatch.setattr(study, "build_study_report", build_while_another_worker_writes)
    outcome = site.write()

    assert len(raced[0].written) == 1 and outcome.written == []
    assert list(outcome.skipped.values()) == ["another worker wrote this report first"]
    assert site.reports() == [(site.models[0], 1, 1, "no_referable")]
    with session_scope(site.sessions) as session:
        keys = session.scalars(select(Output.storage_key).where(Output.kind == "study"))
        kept = {site.storage.path(key) for key in keys}
    written = {p for p in site.storage.path("out").rglob("*") if p.is_file()}
    assert written == kept


def test_a_study_whose_report_cannot_be_built_does_not_hold_back_the_others(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    import retinagate.outputs.study as study

    site.score(site.photograph("R", 0, study=0), 0)
    site.score(site.photograph("R", 0, study=1), 0)
    build = study.build_study_report
    refused: list[Any] = []

    def refuse_the_first(sources: Any, *args: Any, **kwargs: Any) -> Any:
        if not refused:  # the oldest study's photographs, refused by highdicom
            refused.append(sources)
            raise ValueError("two patients in one study")
        return build(sources, *args, **kwargs)

    monkeypatch.setattr(study, "build_study_report", refuse_the_first)
    outcome = site.write()

    assert len(outcome.written) == 1
    assert list(outcome.skipped.values()) == ["the report could not be built: two patients in one study"]
    assert len(site.write().written) == 1  # tried again next run (here it builds)


def test_a_new_model_writes_its_own_report_once_it_has_rescored_the_study(site: Site) -> None:
    right, left = site.photograph("R", 0), site.photograph("L", 0)
    for instance in (right, left):
        site.score(instance, 0)
    site.write()
    site.score(right, 1, DR=0.7)
    assert site.write(model=1).written == []  # the left eye has no prediction of model b yet
    site.score(left, 1)
    assert len(site.write(model=1).written) == 1
    assert site.reports() == [(site.models[0], 1, 2, "no_referable"), (site.models[1], 1, 2, "refer")]
    with session_scope(site.sessions) as session:
        uids = set(session.scalars(select(Output.sop_instance_uid).where(Output.kind == "study")))
        assert active_model_id(session) == site.models[0]
    assert len(uids) == 2


def test_the_report_is_delivered_once_and_results_show_it(
    make_settings: Callable[..., Settings], worker_store_instance: Callable[..., int], worker_receiver: Any
) -> None:
    receiver = worker_receiver()
    site = Site(make_settings(destinations=receiver.destination), worker_store_instance)
    right, left = site.photograph("R", 0), site.photograph("L", 0)
    site.score(right, 0, DR=0.8)
    site.score(left, 0)

    outcome = site.write()
    assert len(outcome.deliver) == 1
    sent = deliver_outputs(site.settings, site.sessions, site.storage, outcome.deliver)
    again = deliver_outputs(site.settings, site.sessions, site.storage, outcome.deliver)

    assert len(sent.delivered) == 1 and again.delivered == []
    (uid,) = receiver.received
    assert receiver.datasets[uid].SeriesNumber == 9904
    with session_scope(site.sessions) as session:
        (study,) = query_results(session)
    text = format_results([study])
    assert (
        "study report (model fundus-net 1.a, revision 1): refer | R: Finding: Diabetic retinopathy (DR) 0.80,"
        " threshold 0.50; Disease risk (any abnormality) 0.10, under threshold 0.50 | L: No finding above threshold;"
        " Disease risk (any abnormality) 0.10, under threshold 0.50 | "
    ) in text
    assert f"{receiver.destination} delivered" in text.splitlines()[1]
    assert to_jsonable([study])[0]["reports"][0]["conclusion"] == "refer"
    site.engine.dispose()
