"""Scoring stored instances: one prediction per (instance, model), durable outputs, idempotent re-runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select

from retinagate.db import make_engine, session_factory, session_scope, upgrade
from retinagate.models import Delivery, DeliveryStatus, Instance, InstanceStatus, Model, Output, Prediction, utcnow
from retinagate.settings import Settings
from retinagate.storage import Storage, StorageError
from worker.lease import HANDOFF
from worker.scoring import ScoreOutcome, Scorer, score_instances, wants_delivery
from worker.sweep import sweep


class Bench:
    """A migrated database, its storage and a loaded scorer for one test."""

    def __init__(self, settings: Settings) -> None:
        upgrade(settings)
        self.settings = settings
        self.engine = make_engine(settings)
        self.sessions = session_factory(self.engine)
        self.storage = Storage(settings.resolved_storage_dir)
        self.scorer: Scorer | None = None

    def load(self, model: Path | None = None) -> Scorer:
        self.scorer = Scorer.load(model, self.settings, self.sessions)
        return self.scorer

    def score(self, ids: list[int]) -> ScoreOutcome:
        scorer = self.scorer or self.load()
        return score_instances(self.settings, self.sessions, self.storage, scorer, ids)

    def rows(self) -> dict[str, Any]:
        with session_scope(self.sessions) as s:
            return {
                "instances": {i.id: (i.status.value, i.attempts, i.last_error) for i in s.scalars(select(Instance))},
                "predictions": sorted((p.id, p.instance_id, p.model_id) for p in s.scalars(select(Prediction))),
                "outputs": sorted(
                    (o.id, o.prediction_id, o.kind, o.sop_instance_uid, o.storage_key)
                    for o in s.scalars(select(Output))
                ),
                "deliveries": sorted(
                    (d.id, d.output_id, d.destination, d.status.value) for d in s.scalars(select(Delivery))
                ),
            }

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
        self.engine.dispose()


@pytest.fixture
def bench(make_settings: Callable[..., Settings], random_onnx_model_path: Path) -> Iterator[Callable[..., Bench]]:
    made: list[Bench] = []

    def make(**overrides: Any) -> Bench:
        overrides.setdefault("model_path", random_onnx_model_path)
        made.append(Bench(make_settings(**overrides)))
        return made[-1]

    yield make
    for item in made:
        item.close()


@pytest.mark.slow
def test_scoring_records_a_prediction_durable_outputs_and_pending_deliveries(
    bench: Callable[..., Bench], worker_store_instance: Callable[..., int]
) -> None:
    b = bench(destinations="PACS@127.0.0.1:104,VIEW@127.0.0.1:105")
    ids = [worker_store_instance(b.settings, study=0, laterality=eye) for eye in ("R", "L")]

    outcome = b.score(ids)

    assert outcome.scored == ids and outcome.failed == [] and outcome.retry == []
    rows = b.rows()
    assert rows["instances"] == {i: ("scored", 1, None) for i in ids}
    assert len(rows["predictions"]) == 2 and len(rows["outputs"]) == 4 and len(rows["deliveries"]) == 8
    assert {d[3] for d in rows["deliveries"]} == {"pending"}
    assert sorted(outcome.deliver) == sorted(o[0] for o in rows["outputs"])
    with session_scope(b.sessions) as s:
        model = s.scalars(select(Model)).one()
        assert b.scorer is not None
        assert model.active and model.sha256 == b.scorer.engine.sha256
        for prediction in s.scalars(select(Prediction)):
            assert len(prediction.probabilities) == 29
            assert set(prediction.findings) <= set(prediction.probabilities)
            assert {"decode", "infer", "write", "total"} <= set(prediction.timings)
            assert prediction.duration_s == prediction.timings["total"] > 0
            source = s.get_one(Instance, prediction.instance_id)
            for output in prediction.outputs:
                assert output.storage_key.startswith("out/")
                ds = dcmread(b.storage.path(output.storage_key))
                assert ds.SOPInstanceUID == output.sop_instance_uid
                assert ds.StudyInstanceUID == source.study.study_uid


def test_a_worker_killed_before_queuing_its_deliveries_has_them_swept_once_their_hand_off_lease_runs_out(
    bench: Callable[..., Bench], worker_store_instance: Callable[..., int]
) -> None:
    b = bench(destinations="PACS@127.0.0.1:104", lease_seconds=60)
    ids = [worker_store_instance(b.settings, study=s) for s in range(2)]
    started = utcnow()

    outcome = b.score(ids)  # recorded and committed; the deliver message is never sent (the kill)

    assert outcome.deliver
    with session_scope(b.sessions) as s:
        leases = [(d.lease_owner, d.lease_expires_at) for d in s.scalars(select(Delivery))]
    assert leases and all(holder is not None and holder.startswith(HANDOFF) for holder, _ in leases)
    assert all(expires is not None and expires <= utcnow() + timedelta(seconds=60) for _, expires in leases)
    queued: list[list[int]] = []

    def no_probe(destination: str) -> bool:
        raise AssertionError(f"{destination} probed")

    assert sweep(b.settings, b.sessions, queued.append, queued.append, now=started, probe=no_probe).redeliver == []
    later = utcnow() + timedelta(seconds=61)  # the lease ran out: long before stuck_after (600 s)
    swept = sweep(b.settings, b.sessions, queued.append, queued.append, now=later, probe=no_probe)
    assert swept.redeliver == sorted(outcome.deliver) and queued == [sorted(outcome.deliver)]


def test_a_message_delivered_twice_finds_the_work_done_and_does_nothing(
    bench: Callable[..., Bench], worker_store_instance: Callable[..., int]
) -> None:
    b = bench(destinations="PACS@127.0.0.1:104")
    ids = [worker_store_instance(b.settings, study=s) for s in range(2)]
    b.score(ids)
    before = b.rows()
    files = {o[4]: b.storage.path(o[4]).stat().st_mtime_ns for o in before["outputs"]}

    outcome = b.score(ids)

    assert outcome.skipped == dict.fromkeys(ids, "already scored by this model")
    assert outcome.scored == outcome.deliver == []
    assert b.rows() == before
    assert {key: b.storage.path(key).stat().st_mtime_ns for key in files} == files


def test_scoring_again_after_a_lost_claim_updates_the_same_rows_and_rewrites_the_same_files(
    bench: Callable[..., Bench], worker_store_instance: Callable[..., int]
) -> None:
    b = bench(destinations="PACS@127.0.0.1:104")
    ids = [worker_store_instance(b.settings, study=s) for s in range(2)]
    b.score(ids)
    before = b.rows()
    with session_scope(b.sessions) as s:
        delivered = s.scalars(select(Delivery).order_by(Delivery.id)).first()
        assert delivered is not None
        delivered.status = DeliveryStatus.DELIVERED
        delivered_output = delivered.output_id
        first_times = sorted(s.scalars(select(Prediction.created_at)))
        # A worker that wrote everything and died before its instances' new status was seen: the
        # sweeper took them back (status queued), so they are scored again.
        for row in s.scalars(select(Instance).where(Instance.id.in_(ids))):
            row.status = InstanceStatus.QUEUED
    files = {o[4]: b.storage.path(o[4]).stat().st_mtime_ns for o in before["outputs"]}

    outcome = b.score(ids)

    after = b.rows()
    assert after["predictions"] == before["predictions"] and after["outputs"] == before["outputs"]
    assert [d[:3] for d in after["deliveries"]] == [d[:3] for d in before["deliveries"]]
    assert delivered_output not in outcome.deliver  # already delivered: not sent again
    assert len(outcome.deliver) == len(before["outputs"]) - 1
    assert all(b.storage.path(key).stat().st_mtime_ns >= mtime for key, mtime in files.items())
    assert sorted(b.storage.iter_keys("out")) == sorted(files)  # no extra files
    with session_scope(b.sessions) as s:
        assert sorted(s.scalars(select(Prediction.created_at))) > first_times


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_an_undecodable_instance_fails_at_once_and_the_rest_of_the_batch_is_scored(
    bench: Callable[..., Bench], worker_store_instance: Callable[..., int]
) -> None:
    b = bench()
    good, bad = (worker_store_instance(b.settings, study=s) for s in range(2))
    with session_scope(b.sessions) as s:
        path = b.storage.path(s.get_one(Instance, bad).storage_key)
    path.write_bytes(path.read_bytes()[:2000])  # truncated inside the pixel data

    outcome = b.score([good, bad])

    assert outcome.scored == [good] and outcome.failed == [bad] and outcome.retry == []
    status, attempts, error = b.rows()["instances"][bad]
    assert status == "failed" and attempts == 1 and error
    assert outcome.deliver == []  # no destinations configured


def test_a_missing_file_is_retried_until_the_attempts_run_out_then_failed(
    bench: Callable[..., Bench], worker_store_instance: Callable[..., int]
) -> None:
    b = bench(max_attempts=2)
    instance = worker_store_instance(b.settings)
    with session_scope(b.sessions) as s:
        b.storage.delete(s.get_one(Instance, instance).storage_key)

    first = b.score([instance])
    assert first.retry == [instance] and first.failed == []
    assert b.rows()["instances"][instance][:2] == ("queued", 1)

    second = b.score([instance])
    assert second.failed == [instance] and second.retry == []
    status, attempts, error = b.rows()["instances"][instance]
    assert status == "failed" and attempts == 2 and error is not None and "gave up after 2 attempts" in error


def test_outputs_below_the_minimum_probability_are_not_queued_for_delivery(
    bench: Callable[..., Bench], worker_store_instance: Callable[..., int]
) -> None:
    b = bench(destinations="PACS@127.0.0.1:104", deliver_min_probability=1.0)
    instance = worker_store_instance(b.settings)

    outcome = b.score([instance])

    assert outcome.scored == [instance] and outcome.deliver == []
    assert b.rows()["deliveries"] == [] and len(b.rows()["outputs"]) == 2


def test_an_ungradable_instance_is_recorded_with_its_reasons_and_its_sc_and_sr_are_delivered_all_the_same(
    bench: Callable[..., Bench], worker_store_instance: Callable[..., int]
) -> None:
    import cv2
    import numpy as np

    b = bench(destinations="PACS@127.0.0.1:104", deliver_min_probability=1.0, outputs=["sc", "sr", "pm"])
    good, blurred = (worker_store_instance(b.settings, study=s, size=(640, 480)) for s in range(2))
    with session_scope(b.sessions) as s:
        path = b.storage.path(s.get_one(Instance, blurred).storage_key)
    ds = dcmread(path)
    ds.decompress()  # now Explicit VR Little Endian
    ds.PixelData = np.asarray(cv2.GaussianBlur(ds.pixel_array, (0, 0), 9.0), dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)

    outcome = b.score([good, blurred])

    assert sorted(outcome.scored) == sorted([good, blurred]) and outcome.ungradable == [blurred]
    rows = b.rows()
    assert rows["instances"][blurred] == ("ungradable", 1, None)
    assert rows["instances"][good][0] == "scored"
    with session_scope(b.sessions) as s:
        prediction = s.scalars(select(Prediction).where(Prediction.instance_id == blurred)).one()
        assert prediction.status == "ungradable" and prediction.reasons == ["out of focus"]
        assert prediction.findings == [] and prediction.probabilities == {}
        assert prediction.quality["sharpness"] < 0.52
        kinds = sorted(o.kind for o in prediction.outputs)
        delivered = sorted(d.output.kind for o in prediction.outputs for d in o.deliveries)
    assert kinds == ["sc", "sr"] and delivered == ["sc", "sr"]  # sent whatever deliver_min_probability says
    again = b.score([blurred])  # a second message for it: the work is done, nothing changes
    assert again.skipped == {blurred: "already scored by this model"}
    assert b.rows()["instances"][blurred] == ("ungradable", 1, None)


def test_unknown_instance_ids_are_skipped(bench: Callable[..., Bench]) -> None:
    b = bench()
    outcome = b.score([12345])
    assert outcome.scored == outcome.failed == outcome.retry == []


def test_the_first_model_becomes_active_and_another_is_refused_unless_allowed(
    bench: Callable[..., Bench], random_onnx_model_path: Path, worker_model_variant: Callable[..., Path]
) -> None:
    # The defect: a worker started with another RETINAGATE_MODEL_PATH silently made its model active.
    from retinagate.errors import PermanentError

    b = bench()
    first = b.load(random_onnx_model_path)  # a fresh installation: it becomes the active model
    first.close()
    variant = worker_model_variant(random_onnx_model_path, "v2")
    with pytest.raises(PermanentError, match=r"is not the active model .*retinagate models activate"):
        b.load(variant)
    allowed = bench(serve_inactive_model=True)
    second = allowed.load(variant)
    second.close()
    again = b.load(random_onnx_model_path)
    assert again.model_id == first.model_id

    with session_scope(b.sessions) as s:
        active = {m.id: m.active for m in s.scalars(select(Model))}
    assert active == {first.model_id: True, second.model_id: False}


def test_delivery_is_wanted_only_with_destinations_and_a_probability_at_the_minimum(
    make_settings: Callable[..., Settings],
) -> None:
    assert not wants_delivery(make_settings(), {"DR": 0.9})
    some = make_settings(destinations="PACS@h:104", deliver_min_probability=0.5)
    assert wants_delivery(some, {"DR": 0.2, "ARMD": 0.5})
    assert not wants_delivery(some, {"DR": 0.2, "ARMD": 0.49})
    assert wants_delivery(make_settings(destinations="PACS@h:104"), {})
    assert wants_delivery(some, {}, gradable=False)  # the SC and SR of an ungradable photograph always go
    assert not wants_delivery(make_settings(), {}, gradable=False)


def test_two_workers_scoring_the_same_instance_at_once_leave_one_set_of_rows_and_files(
    bench: Callable[..., Bench], worker_store_instance: Callable[..., int]
) -> None:
    """A duplicate message: another worker commits the same instance's outputs while this one is
    writing its files. This one keeps the rows (and storage keys) already there and removes its own
    copies, so no file is left without a row and no row's file ever changes its key."""
    b = bench()
    instance = worker_store_instance(b.settings)
    first = b.load()
    rival = Scorer.load(None, b.settings, b.sessions)

    class RacingStorage(Storage):
        raced = False

        def write_bytes(self, key: str, data: bytes) -> tuple[str, int]:
            if not self.raced:
                self.raced = True  # the rival finishes between this worker's key lookup and its commit
                assert score_instances(b.settings, b.sessions, b.storage, rival, [instance]).scored == [instance]
            return super().write_bytes(key, data)

    racing = RacingStorage(b.settings.resolved_storage_dir)

    outcome = score_instances(b.settings, b.sessions, racing, first, [instance])

    rival.close()
    assert racing.raced and outcome.scored == [instance]
    rows = b.rows()
    assert len(rows["predictions"]) == 1 and len(rows["outputs"]) == 2
    assert sorted(b.storage.iter_keys("out")) == sorted(o[4] for o in rows["outputs"])  # no stray files
    for output in rows["outputs"]:
        assert dcmread(b.storage.path(output[4])).SOPInstanceUID == output[3]


def test_a_failed_durable_write_queues_the_instance_again_and_leaves_no_file(
    bench: Callable[..., Bench], worker_store_instance: Callable[..., int]
) -> None:
    b = bench()
    instance = worker_store_instance(b.settings)
    b.load()

    class FullDisk(Storage):
        def write_bytes(self, key: str, data: bytes) -> tuple[str, int]:
            if b"1.2.840.10008.5.1.4.1.1.88" in data[:400]:  # the SR (a Structured Report SOP class)
                raise StorageError(f"durable write of {key} failed: No space left on device")
            return super().write_bytes(key, data)

    assert b.scorer is not None
    outcome = score_instances(b.settings, b.sessions, FullDisk(b.settings.resolved_storage_dir), b.scorer, [instance])

    assert outcome.retry == [instance] and outcome.scored == []
    status, attempts, error = b.rows()["instances"][instance]
    assert (status, attempts) == ("queued", 1) and "No space left" in (error or "")
    assert list(b.storage.iter_keys("out")) == []  # the SC that did land was removed again
    assert b.rows()["predictions"] == []


def test_the_stored_sr_is_a_valid_report_of_the_recorded_probabilities(
    bench: Callable[..., Bench], worker_store_instance: Callable[..., int]
) -> None:
    import highdicom as hd

    b = bench()
    (instance_id,) = [worker_store_instance(b.settings, study=3)]

    assert b.score([instance_id]).scored == [instance_id]

    with session_scope(b.sessions) as s:
        prediction = s.scalars(select(Prediction)).one()
        stored = {o.kind: b.storage.path(o.storage_key) for o in prediction.outputs}
        probabilities = dict(prediction.probabilities)
        source_uid = s.get_one(Instance, instance_id).sop_instance_uid
    report = hd.sr.srread(stored["sr"])  # the pipeline's encoded file, written as it was handed over
    (group,) = report.content.get_image_measurement_groups()
    assert sorted(m.value for m in group.get_measurements()) == sorted(round(p, 6) for p in probabilities.values())
    assert group.source_images[0].referenced_sop_instance_uid == source_uid
    sc = dcmread(stored["sc"])
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source_uid and sc.BurnedInAnnotation == "YES"


def test_a_stale_message_never_revives_a_failed_instance_nor_resets_its_attempts(
    bench: Callable[..., Bench], worker_store_instance: Callable[..., int]
) -> None:
    # The defect: a duplicate retry chain's message reached an instance that had failed for good,
    # and the claim started a new round with attempts reset to 1.
    b = bench()
    instance = worker_store_instance(b.settings, status="failed")
    with session_scope(b.sessions) as s:
        row = s.get_one(Instance, instance)
        row.attempts, row.last_error = 5, "DecodeError: broken (gave up after 5 attempts)"

    outcome = b.score([instance])

    assert outcome.skipped == {instance: "failed for good"} and outcome.scored == []
    assert b.rows()["instances"][instance] == ("failed", 5, "DecodeError: broken (gave up after 5 attempts)")


def test_an_instance_another_live_worker_holds_is_left_to_it_and_a_dead_workers_is_taken_over(
    bench: Callable[..., Bench], worker_store_instance: Callable[..., int]
) -> None:
    from datetime import timedelta

    from retinagate.models import utcnow

    b = bench()
    held, abandoned = (worker_store_instance(b.settings, study=s, status="scoring") for s in range(2))
    now = utcnow()
    with session_scope(b.sessions) as s:
        for instance, expires in ((held, now + timedelta(seconds=50)), (abandoned, now - timedelta(seconds=1))):
            row = s.get_one(Instance, instance)
            row.attempts, row.lease_owner, row.lease_expires_at = 1, "elsewhere:42", expires

    outcome = b.score([held, abandoned])

    assert outcome.skipped == {held: "held by another worker"} and outcome.scored == [abandoned]
    rows = b.rows()["instances"]
    assert rows[held] == ("scoring", 1, None) and rows[abandoned] == ("scored", 2, None)
    with session_scope(b.sessions) as s:
        done = s.get_one(Instance, abandoned)
        assert done.lease_owner is None and done.lease_expires_at is None
        assert s.get_one(Instance, held).lease_owner == "elsewhere:42"


def test_a_photograph_retention_pruned_is_skipped_with_its_reason_and_keeps_its_status(
    bench: Callable[..., Bench], worker_store_instance: Callable[..., int]
) -> None:
    from retinagate.models import utcnow
    from worker.retention import PRUNED_REASON

    b = bench()
    instance = worker_store_instance(b.settings, status="scored")
    with session_scope(b.sessions) as s:
        row = s.get_one(Instance, instance)
        row.pruned_at = utcnow()
        b.storage.delete(row.storage_key)

    outcome = b.score([instance])

    assert outcome.skipped == {instance: PRUNED_REASON} and outcome.retry == [] and outcome.failed == []
    assert b.rows()["instances"][instance] == ("scored", 0, None)


def test_a_photograph_pruned_while_its_claim_was_made_is_given_its_status_back_not_retried(
    bench: Callable[..., Bench], worker_store_instance: Callable[..., int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race: the claim read the row before the prune committed and wrote after it.
    import worker.scoring
    from retinagate.models import utcnow
    from worker.retention import PRUNED_REASON

    b = bench()
    b.load()
    instance = worker_store_instance(b.settings, status="scored")
    with session_scope(b.sessions) as s:
        old = Model(name="old", version="0", sha256="b" * 64, card={})
        s.add(old)
        s.flush()
        s.add(Prediction(instance_id=instance, model_id=old.id, probabilities={}, findings=[], duration_s=0.0))
    claim = worker.scoring._claim

    def claim_then_prune(*args: Any) -> Any:
        claims = claim(*args)
        with session_scope(b.sessions) as s:
            row = s.get_one(Instance, instance)
            row.pruned_at = utcnow()
            b.storage.delete(row.storage_key)
        return claims

    monkeypatch.setattr(worker.scoring, "_claim", claim_then_prune)
    outcome = b.score([instance])

    assert outcome.skipped == {instance: PRUNED_REASON} and outcome.retry == [] and outcome.scored == []
    status, _, error = b.rows()["instances"][instance]
    assert status == "scored" and error is None
