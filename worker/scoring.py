"""Scoring of stored instances: the pipeline around SQL rows and durable files.

:func:`score_instances` is the body of the ``score`` task and of ``retinagate rescore``. It is
idempotent: a prediction is unique per (instance, model) and the pipeline derives output UIDs from
(source SOP Instance UID, model sha256, kind), so running it again for the same instances updates the
same prediction, rewrites the same output files under the same storage keys and leaves deliveries
that already happened alone.

Order of work, and why:

1. Claim the instances (status ``scoring``, one more attempt, a lease in this process's name) in a
   short transaction, so the sweeper can tell work in progress from lost work; the lease is renewed
   while the batch runs (:mod:`worker.lease`). A claim skips what needs no work: an instance this
   model has already scored (a message delivered twice), one another live worker holds, one that
   failed for good (a stale message must not revive it with fresh attempts), and one whose
   photograph storage retention pruned (:mod:`worker.retention`; there is nothing left to score).
2. Score the files in one batch.
3. Write every output file durably before any row points at it.
4. In one transaction, a few statements for the whole batch: upsert predictions, outputs and pending
   deliveries; mark the instances scored, or ``ungradable`` when the gradability gate refused them
   (their prediction holds the reasons; their SC and SR, which say why, are delivered like any other,
   whatever ``deliver_min_probability``: a reader has to know the photograph needs retaking).
   If that transaction fails, the files it would have added are removed again. The deliveries carry
   a hand-off lease (:mod:`worker.lease`): if this process dies between the commit and sending the
   ``deliver`` message, the sweeper sends them once the lease runs out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from retinagate.db import session_scope
from retinagate.errors import PermanentError, RetryableError
from retinagate.models import (
    Instance,
    InstanceStatus,
    Output,
    Prediction,
    PredictionStatus,
    utcnow,
)
from retinagate.storage import StorageError
from worker.delivery import hand_off, pending_deliveries
from worker.lease import expiry, held_by_another, owner, renewing
from worker.registry import register_model, served_model
from worker.retention import FINISHED, PRUNED_REASON

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from retinagate.engine import Engine
    from retinagate.pipeline import Pipeline, ScoreResult
    from retinagate.settings import Settings
    from retinagate.storage import Storage

__all__ = [
    "RETRYABLE",
    "ScoreOutcome",
    "Scorer",
    "score_instances",
    "wants_delivery",
]

logger = logging.getLogger(__name__)

#: Errors after which the same work may succeed later: the task is retried with backoff. An
#: IntegrityError means another worker wrote the same prediction at the same moment: the retry finds
#: it and updates it. The soft time limit lets a batch that ran too long give its instances back.
RETRYABLE: tuple[type[BaseException], ...] = (
    RetryableError,
    OperationalError,
    IntegrityError,
    StorageError,
    SoftTimeLimitExceeded,
)

_MAX_ERROR = 2000  # characters of an error message kept in SQL


def _error_text(exc: BaseException | str) -> str:
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return text[:_MAX_ERROR]


@dataclass
class ScoreOutcome:
    """What one call of :func:`score_instances` did, by instance id."""

    scored: list[int] = field(default_factory=list)
    #: Of ``scored``, those the gradability gate refused (status ``ungradable``).
    ungradable: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    #: Instances that hit a retryable error and have attempts left; they are back in ``queued``.
    retry: list[int] = field(default_factory=list)
    #: Outputs with a delivery still to make.
    deliver: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    #: Instances not claimed, and why: already scored by this model, held by another live worker,
    #: failed for good, photograph pruned by retention, or not in the database.
    skipped: dict[int, str] = field(default_factory=dict)


class Scorer:
    """A loaded engine with its pipeline and the id of its ``models`` row.

    Args:
        engine: The ONNX Runtime engine.
        pipeline: The scoring pipeline over ``engine``.
        model_id: The engine's row in ``models``.
    """

    def __init__(self, engine: Engine, pipeline: Pipeline, model_id: int) -> None:
        self.engine = engine
        self.pipeline = pipeline
        self.model_id = model_id

    def close(self) -> None:
        """Stops the pipeline's threads."""
        self.pipeline.close()

    @classmethod
    def load(
        cls,
        model_path: Path | None,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        check_active: bool = True,
    ) -> Scorer:
        """Loads the model and registers it.

        With ``check_active`` the model must be the active one (:func:`worker.registry.served_model`:
        on a fresh installation it becomes active; another model active refuses, unless
        ``serve_inactive_model``). Without, it is only registered: ``retinagate rescore --model``
        activates it itself.

        Raises:
            PermanentError: When no model path is given or configured, or the model may not be served.
            RetryableError: When the file cannot be opened as a model (fixing the deployment fixes it).
        """
        from retinagate.engine import Engine
        from retinagate.pipeline import Pipeline

        path = model_path if model_path is not None else settings.model_path
        if path is None:
            raise PermanentError("model_path: no model configured; set RETINAGATE_MODEL_PATH")
        try:
            engine = Engine.load(path, settings)
        except (OSError, ValueError, RuntimeError) as exc:
            raise RetryableError(f"cannot load the model {path}: {_error_text(exc)}") from exc
        engine.warmup()  # the first real batch should not pay for the runtime's set-up
        model_id = _register_served(sessions, engine, settings, check_active)
        # Decode and encode threads: as many as the inference threads this process was given.
        threads = min(64, settings.intra_op_threads) if settings.intra_op_threads else 2
        return cls(engine, Pipeline(engine, settings, threads=threads), model_id)


def _register_served(sessions: sessionmaker[Session], engine: Engine, settings: Settings, check_active: bool) -> int:
    for _ in range(3):  # another process may register the same model at the same moment
        try:
            with session_scope(sessions) as session:
                if check_active:
                    model = served_model(
                        session,
                        engine.sha256,
                        engine.card,
                        engine.path,
                        allow_inactive=settings.serve_inactive_model,
                        by=f"worker {owner()}",
                    )
                else:
                    model, _ = register_model(session, engine.sha256, engine.card, engine.path)
                return model.id
        except IntegrityError:
            continue
    raise RetryableError("could not register the model: concurrent registrations kept conflicting")


def wants_delivery(settings: Settings, probabilities: dict[str, float], *, gradable: bool = True) -> bool:
    """Whether a prediction's outputs are to be sent: destinations exist and the threshold is met.

    The outputs of an ungradable image (an SC and SR saying why it was not graded) are always sent
    when there are destinations: a reader must learn that the photograph needs retaking.
    """
    if not settings.destinations:
        return False
    if settings.deliver_min_probability <= 0.0 or not gradable:
        return True
    return max(probabilities.values(), default=0.0) >= settings.deliver_min_probability


@dataclass(frozen=True)
class _Claim:
    instance_id: int
    path: Path
    attempts: int


def _claim(
    sessions: sessionmaker[Session],
    storage: Storage,
    ids: Sequence[int],
    model_id: int,
    lease_seconds: float,
    holder: str,
    skipped: dict[int, str],
) -> list[_Claim]:
    """Marks the instances ``scoring`` under a lease held by ``holder``; see the module docstring for
    what is skipped (recorded in ``skipped``).

    An instance scored by another model starts a new round of attempts (a rescore); an instance in
    ``scoring`` whose lease ran out (its worker died) is taken over with the attempt it already used.
    """
    now = utcnow()
    claims = []
    with session_scope(sessions) as session:
        rows = session.scalars(select(Instance).where(Instance.id.in_(ids)).order_by(Instance.id)).all()
        found = {row.id for row in rows}
        skipped.update({i: "not in the database" for i in ids if i not in found})
        scored_by_model = set(
            session.scalars(
                select(Prediction.instance_id).where(Prediction.instance_id.in_(ids), Prediction.model_id == model_id)
            )
        )
        for row in rows:
            done = row.status in (InstanceStatus.SCORED, InstanceStatus.UNGRADABLE)
            held = row.status == InstanceStatus.SCORING and held_by_another(
                row.lease_owner, row.lease_expires_at, holder, now
            )
            if row.pruned_at is not None and not held:
                skipped[row.id] = PRUNED_REASON
                _settle_pruned(row, now)
            elif row.status == InstanceStatus.FAILED:
                skipped[row.id] = "failed for good"
            elif done and row.id in scored_by_model:
                skipped[row.id] = "already scored by this model"
            elif held:
                skipped[row.id] = "held by another worker"
            else:
                row.attempts = 1 if done else row.attempts + 1
                row.status = InstanceStatus.SCORING
                row.status_changed_at = now
                row.lease_owner, row.lease_expires_at = holder, expiry(lease_seconds, now)
                claims.append(_Claim(row.id, storage.path(row.storage_key), row.attempts))
    if skipped:
        logger.info("score: %d instance(s) skipped (%s)", len(skipped), ", ".join(sorted(set(skipped.values()))))
    return claims


def _settle_pruned(row: Instance, now: datetime) -> None:
    """Gives a pruned instance that a claim caught in work the status its newest prediction says.

    Only a claim racing the prune (it read the row before the prune committed, and wrote after)
    leaves a pruned instance outside the finished statuses; it was scored or ungradable before.
    """
    if row.status in FINISHED:
        return
    newest = max(row.predictions, key=lambda p: p.created_at, default=None)
    if newest is None:
        row.status, row.last_error = InstanceStatus.FAILED, PRUNED_REASON
    elif newest.status == PredictionStatus.UNGRADABLE:
        row.status = InstanceStatus.UNGRADABLE
    else:
        row.status = InstanceStatus.SCORED
    row.status_changed_at = now
    row.lease_owner = row.lease_expires_at = None


def _pruned(sessions: sessionmaker[Session], ids: Sequence[int]) -> set[int]:
    """Of ``ids`` (claimed instances whose file is missing), those retention pruned, settled again."""
    now = utcnow()
    with session_scope(sessions) as session:
        rows = session.scalars(select(Instance).where(Instance.id.in_(ids), Instance.pruned_at.is_not(None))).all()
        for row in rows:
            _settle_pruned(row, now)
        return {row.id for row in rows}


def _set_status(sessions: sessionmaker[Session], errors: dict[int, str], status: InstanceStatus) -> None:
    if not errors:
        return
    now = utcnow()
    with session_scope(sessions) as session:
        for row in session.scalars(select(Instance).where(Instance.id.in_(list(errors)))):
            row.status = status
            row.status_changed_at = now
            row.last_error = errors[row.id]
            row.lease_owner = row.lease_expires_at = None


@dataclass(frozen=True)
class _Written:
    kind: str
    sop_instance_uid: str
    storage_key: str
    new_key: bool


def _timed_write(storage: Storage, key: str, data: bytes) -> float:
    started = time.perf_counter()
    storage.write_bytes(key, data)
    return time.perf_counter() - started


def _write_batch(
    sessions: sessionmaker[Session], storage: Storage, results: Sequence[tuple[int, ScoreResult]]
) -> tuple[dict[int, list[_Written]], dict[int, str], dict[int, float]]:
    """Writes every result's encoded outputs durably, reusing the storage key of an output seen before.

    The bytes are written as the pipeline encoded them (no second serialisation); the durable
    writes (fsync) release the GIL and run on two threads.

    Returns:
        The files written per instance id, the instances whose writes failed (their new files are
        removed again) with the error, and the seconds each instance's outputs took.
    """
    uids = [output.sop_instance_uid for _, result in results for output in result.built]
    known: dict[str, str] = {}
    if uids:
        with session_scope(sessions) as session:
            query = select(Output.sop_instance_uid, Output.storage_key).where(Output.sop_instance_uid.in_(uids))
            known = {uid: key for uid, key in session.execute(query)}
    seconds: dict[int, float] = {}
    pending: list[tuple[int, _Written, Future[float]]] = []
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="retinagate-write") as pool:
        try:
            for instance_id, result in results:
                started = time.perf_counter()
                for output in result.built:
                    key = known.get(output.sop_instance_uid)
                    item = _Written(output.kind, output.sop_instance_uid, key or storage.new_key("out"), key is None)
                    write = pool.submit(_timed_write, storage, item.storage_key, output.data)
                    pending.append((instance_id, item, write))
                seconds[instance_id] = time.perf_counter() - started
        except BaseException:
            wait([future for *_, future in pending])
            _remove_new(storage, [item for _, item, _ in pending])
            raise
    written: dict[int, list[_Written]] = {instance_id: [] for instance_id, _ in results}
    failed: dict[int, str] = {}
    for instance_id, item, future in pending:
        try:
            seconds[instance_id] += future.result()
        except StorageError as exc:
            failed.setdefault(instance_id, _error_text(exc))
        written[instance_id].append(item)
    for instance_id in failed:
        _remove_new(storage, written.pop(instance_id))
    return written, failed, seconds


def _remove_new(storage: Storage, written: Iterable[_Written]) -> None:
    for item in written:
        if item.new_key:
            storage.delete(item.storage_key)


def _record(
    session: Session,
    settings: Settings,
    model_id: int,
    done: Sequence[tuple[int, ScoreResult, Sequence[_Written], dict[str, float]]],
    unused: list[str],
) -> list[int]:
    """Writes the predictions, outputs and deliveries of a batch of ``(instance id, result, files
    written, timings)``; returns the outputs with deliveries to make.

    A few statements for the whole batch, not a round trip per row: each kind of row is read once
    for every instance, and the new ones are flushed together.

    An output row that already exists keeps its storage key: a file this call wrote under a new key
    for it (another worker committed the same output meanwhile) is added to ``unused``, to be removed
    after the commit. Keys never change under a row, so a delivery reading one never loses its file.
    """
    now = utcnow()
    ids = [instance_id for instance_id, *_ in done]
    predictions = {
        p.instance_id: p
        for p in session.scalars(
            select(Prediction).where(Prediction.instance_id.in_(ids), Prediction.model_id == model_id)
        )
    }
    for instance_id, result, _, timings in done:
        prediction = predictions.get(instance_id)
        if prediction is None:
            prediction = predictions[instance_id] = Prediction(instance_id=instance_id, model_id=model_id)
            session.add(prediction)
        prediction.probabilities = {name: float(p) for name, p in result.probabilities.items()}
        prediction.findings = list(result.findings)
        prediction.status = PredictionStatus(result.status)
        prediction.reasons = list(result.reasons)
        prediction.quality = {name: float(v) for name, v in result.quality.items()}
        prediction.timings = {name: round(float(s), 6) for name, s in timings.items()}
        prediction.duration_s = prediction.timings["total"]
        prediction.created_at = now
    session.flush()  # ids of the new predictions

    prediction_ids = [p.id for p in predictions.values()]
    outputs = {
        o.sop_instance_uid: o for o in session.scalars(select(Output).where(Output.prediction_id.in_(prediction_ids)))
    }
    to_deliver: list[Output] = []
    for instance_id, result, written, _ in done:
        prediction = predictions[instance_id]
        deliver = wants_delivery(settings, prediction.probabilities, gradable=result.gradable)
        for item in written:
            output = outputs.get(item.sop_instance_uid)
            if output is None:
                output = outputs[item.sop_instance_uid] = Output(
                    prediction_id=prediction.id,
                    kind=item.kind,
                    sop_instance_uid=item.sop_instance_uid,
                    storage_key=item.storage_key,
                )
                session.add(output)
            elif output.storage_key != item.storage_key and item.new_key:
                unused.append(item.storage_key)
            if deliver:
                to_deliver.append(output)
    session.flush()  # ids of the new outputs

    pending = pending_deliveries(session, to_deliver, [d.name for d in settings.destinations]) if to_deliver else []
    hand_off([row for _, row in pending], settings.lease_seconds)  # queued after the commit
    to_send = list(dict.fromkeys(output.id for output, _ in pending))  # an output once, whatever its destinations

    by_status: dict[InstanceStatus, list[int]] = {}
    for instance_id, result, _, _ in done:
        status = InstanceStatus.SCORED if result.gradable else InstanceStatus.UNGRADABLE
        by_status.setdefault(status, []).append(instance_id)
    for status, members in by_status.items():
        session.execute(
            update(Instance)
            .where(Instance.id.in_(members))
            .values(status=status, status_changed_at=now, last_error=None, lease_owner=None, lease_expires_at=None)
        )
    return to_send


def score_instances(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: Storage,
    scorer: Scorer,
    instance_ids: Sequence[int],
) -> ScoreOutcome:
    """Scores stored instances and records everything; see the module docstring for the order.

    Per-instance failures are recorded, not raised: a permanent one (undecodable image) marks the
    instance ``failed``; a retryable one puts it back to ``queued`` with its error, or marks it
    ``failed`` when it has used ``settings.max_attempts``.

    Raises:
        OperationalError: When the database cannot be reached to record anything (retry the task).
        Exception: Anything unexpected (a bug), after marking the instances ``failed`` with it.
    """
    outcome = ScoreOutcome()
    ids = list(dict.fromkeys(int(i) for i in instance_ids))
    if not ids:
        return outcome
    holder = owner()
    claims = _claim(sessions, storage, ids, scorer.model_id, settings.lease_seconds, holder, outcome.skipped)
    if not claims:
        return outcome
    with renewing(sessions, Instance, [c.instance_id for c in claims], settings.lease_seconds, holder):
        _score_claims(settings, sessions, storage, scorer, claims, outcome)
    return outcome


def _score_claims(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: Storage,
    scorer: Scorer,
    claims: list[_Claim],
    outcome: ScoreOutcome,
) -> None:
    """Scores claimed instances and records everything in ``outcome``; see :func:`score_instances`."""
    attempts = {c.instance_id: c.attempts for c in claims}

    def give_back(errors: dict[int, str]) -> None:
        """Queues retryable failures again, or fails them when out of attempts."""
        exhausted = {
            i: f"{e} (gave up after {attempts[i]} attempts)"
            for i, e in errors.items()
            if attempts[i] >= settings.max_attempts
        }
        again = {i: e for i, e in errors.items() if i not in exhausted}
        _set_status(sessions, exhausted, InstanceStatus.FAILED)
        _set_status(sessions, again, InstanceStatus.QUEUED)
        outcome.failed += list(exhausted)
        outcome.retry += list(again)
        outcome.errors.update(exhausted | again)

    # A stored file that is not there may come back (a storage volume not mounted yet): retry it,
    # bounded by the attempts, rather than fail it for good as an unreadable input. One that retention
    # pruned after the claim read its row will not come back: it is skipped, with its status restored.
    missing = {c.instance_id: "the stored file is missing from storage" for c in claims if not c.path.is_file()}
    if missing:
        gone = set(missing)
        for instance_id in _pruned(sessions, list(missing)):
            del missing[instance_id]
            outcome.skipped[instance_id] = PRUNED_REASON
        give_back(missing)
        claims = [c for c in claims if c.instance_id not in gone]
        if not claims:
            return

    started = time.perf_counter()
    try:
        results = scorer.pipeline.score_paths([c.path for c in claims])
    except PermanentError as exc:
        errors = {c.instance_id: _error_text(exc) for c in claims}
        _set_status(sessions, errors, InstanceStatus.FAILED)
        outcome.failed += list(errors)
        outcome.errors.update(errors)
        return
    except RETRYABLE as exc:
        give_back({c.instance_id: _error_text(exc) for c in claims})
        return
    except Exception as exc:
        _set_status(sessions, {c.instance_id: _error_text(exc) for c in claims}, InstanceStatus.FAILED)
        raise
    pipeline_s = time.perf_counter() - started
    if len(results) != len(claims):
        raise RuntimeError(f"the pipeline returned {len(results)} results for {len(claims)} inputs")

    from retinagate.pipeline import ScoreFailure

    permanent: dict[int, str] = {}
    retryable: dict[int, str] = {}
    done: list[tuple[_Claim, ScoreResult, list[_Written], dict[str, float]]] = []
    committed = False
    try:
        scored: list[tuple[_Claim, ScoreResult]] = []
        for claim, result in zip(claims, results, strict=True):
            if isinstance(result, ScoreFailure):
                (permanent if result.permanent else retryable)[claim.instance_id] = _error_text(result.error)
            else:
                scored.append((claim, result))
        files, write_failed, write_seconds = _write_batch(
            sessions, storage, [(claim.instance_id, result) for claim, result in scored]
        )
        retryable.update(write_failed)
        for claim, result in scored:
            if claim.instance_id in write_failed:
                continue
            timings = {name: float(s) for name, s in result.timings.items()}
            stages = sum(s for name, s in timings.items() if name != "total")
            timings["write"] = write_seconds[claim.instance_id]
            # Without the pipeline's own total, the batch's time is shared out evenly.
            total = timings.get("total", stages or pipeline_s / len(claims))
            timings["total"] = total + timings["write"]
            done.append((claim, result, files[claim.instance_id], timings))

        if done:
            unused: list[str] = []
            with session_scope(sessions) as session:
                batch = [(claim.instance_id, result, written, timings) for claim, result, written, timings in done]
                outcome.deliver += _record(session, settings, scorer.model_id, batch, unused)
            committed = True
            outcome.scored += [claim.instance_id for claim, *_ in done]
            outcome.ungradable += [claim.instance_id for claim, result, *_ in done if not result.gradable]
            for key in unused:
                storage.delete(key)
    except RETRYABLE as exc:
        # Nothing of this batch was recorded: everything not already sorted out is tried again.
        outcome.deliver.clear()
        retryable.update(
            {
                c.instance_id: _error_text(exc)
                for c in claims
                if c.instance_id not in permanent and c.instance_id not in retryable
            }
        )
    except Exception as exc:
        unrecorded = {
            c.instance_id: _error_text(exc)
            for c in claims
            if c.instance_id not in permanent and c.instance_id not in retryable
        }
        _set_status(sessions, unrecorded, InstanceStatus.FAILED)
        raise
    finally:
        if not committed:  # no row points at the files this call added: take them away again
            for _, _, written, _ in done:
                _remove_new(storage, written)

    _set_status(sessions, permanent, InstanceStatus.FAILED)
    outcome.failed += list(permanent)
    outcome.errors.update(permanent)
    give_back(retryable)
    logger.info(
        "scored %d instance(s) with model id=%s in %.3f s (%d not gradable, %d failed, %d to retry)",
        len(outcome.scored),
        scorer.model_id,
        time.perf_counter() - started,
        len(outcome.ungradable),
        len(outcome.failed),
        len(outcome.retry),
    )
