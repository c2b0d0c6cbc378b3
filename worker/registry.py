"""The model registry: which models are known, which one is active, and who made it so.

A model is known by its file's sha256 (the bytes ONNX Runtime loads) and carries its card. Exactly
one model is active: the one whose findings ``results`` shows and whose predictions the nightly
re-scoring completes. Activation is explicit and audited (``model_activations``: the model, the one
it replaced, who and when):

- ``retinagate models activate NAME_OR_SHA``;
- ``retinagate rescore --model PATH``, which scores the archive under the model it activates;
- the first worker of a fresh installation, when no model is active at all (it logs that it did).

A worker whose model is not the active one refuses to start (:func:`served_model`), unless
``serve_inactive_model`` says otherwise: before, a worker started with another
``RETINAGATE_MODEL_PATH`` silently made its model the active one.

How a model reaches the workers, and the rotation steps, are in the README ("Models").
"""

from __future__ import annotations

import getpass
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import or_, select, update

from retinagate.errors import PermanentError
from retinagate.models import Model, ModelActivation, utcnow

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from retinagate.card import ModelCard
    from retinagate.settings import Settings

__all__ = [
    "ModelNotFoundError",
    "activate_model",
    "actor",
    "claim_rescore",
    "describe",
    "find_model",
    "register_model",
    "served_model",
    "start_serving",
]

logger = logging.getLogger(__name__)

#: The shortest sha256 prefix accepted to name a model.
MIN_SHA_PREFIX = 8


class ModelNotFoundError(LookupError):
    """No registered model, or more than one, matches what the operator named."""


def actor() -> str:
    """Who acts, for the audit: the operating-system user and host (no patient data)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:128]


def describe(model: Model) -> str:
    """``name version (id N, sha256 0123456789ab)``, as messages name a model."""
    return f"{model.name} {model.version} (id {model.id}, sha256 {model.sha256[:12]})"


def register_model(session: Session, sha256: str, card: ModelCard, path: Path | None) -> tuple[Model, bool]:
    """Finds or adds the ``models`` row for a model file; a new one is not active.

    Returns:
        The row and whether it was added now.
    """
    import json

    found = session.scalar(select(Model).where(Model.sha256 == sha256))
    if found is not None:
        if path is not None and found.path != str(path):
            found.path = str(path)  # where it was last seen, for `models list`
        return found, False
    model = Model(
        name=card.name[:128],
        version=card.version[:64],
        sha256=sha256,
        path=str(path) if path is not None else None,
        card=json.loads(card.to_json()),
        active=False,
    )
    session.add(model)
    session.flush()
    logger.info("registered model %s", describe(model))
    return model, True


def activate_model(session: Session, model: Model, by: str | None = None) -> Model | None:
    """Makes ``model`` the one active model and audits it.

    Args:
        session: The open session.
        model: The model to activate.
        by: Who activates it (default: :func:`actor`).

    Returns:
        The model that was active before, or None (none was, or it was ``model`` itself, in which
        case nothing changes and nothing is audited).
    """
    previous = session.scalar(select(Model).where(Model.active.is_(True), Model.id != model.id))
    if model.active and previous is None:
        return None
    session.execute(update(Model).where(Model.id != model.id, Model.active.is_(True)).values(active=False))
    now = utcnow()
    model.active = True
    model.activated_at = now
    session.add(
        ModelActivation(
            model_id=model.id,
            previous_model_id=previous.id if previous is not None else None,
            activated_by=(by or actor())[:128],
            activated_at=now,
        )
    )
    session.flush()
    replaced = f", replacing {describe(previous)}" if previous is not None else ""
    logger.info("model %s is now the active model%s", describe(model), replaced)
    return previous


def find_model(session: Session, ref: str) -> Model:
    """The registered model ``ref`` names: its id, a sha256 prefix (at least 8 hex digits), its
    name (when one version is registered), ``name version``, or the path it was registered from.

    Raises:
        ModelNotFoundError: When nothing, or more than one model, matches; the message lists them.
    """
    text = ref.strip()
    clauses = [Model.name == text, (Model.name + " " + Model.version) == text, Model.path == text]
    if text.isdigit():
        clauses.append(Model.id == int(text))
    lowered = text.lower()
    if len(lowered) >= MIN_SHA_PREFIX and all(c in "0123456789abcdef" for c in lowered):
        clauses.append(Model.sha256.startswith(lowered))
    if Path(text).suffix == ".onnx":
        clauses.append(Model.path == str(Path(text).resolve()))
    found = session.scalars(select(Model).where(or_(*clauses)).order_by(Model.id)).all()
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelNotFoundError(
            f"no registered model matches {ref!r}; `retinagate models list` shows them, "
            "`retinagate models register PATH` adds one"
        )
    names = "; ".join(describe(m) for m in found)
    raise ModelNotFoundError(f"{ref!r} matches {len(found)} models ({names}); name one by its id or sha256")


def served_model(
    session: Session, sha256: str, card: ModelCard, path: Path | None, *, allow_inactive: bool, by: str
) -> Model:
    """Registers the model a worker is about to serve and checks that it may (see the module docstring).

    Raises:
        PermanentError: When another model is active and ``allow_inactive`` is false.
    """
    model, _ = register_model(session, sha256, card, path)
    active = session.scalar(select(Model).where(Model.active.is_(True)))
    if active is None:
        logger.info("no model is active yet: %s becomes the active model", describe(model))
        activate_model(session, model, by=f"{by} (first model of this installation)")
    elif active.id != model.id:
        if not allow_inactive:
            raise PermanentError(
                f"this worker's model {describe(model)} is not the active model {describe(active)}; "
                f"run `retinagate models activate {model.sha256[:12]}` to make it active, or set "
                "RETINAGATE_SERVE_INACTIVE_MODEL=true to serve it anyway"
            )
        logger.warning("serving %s, which is not the active model %s", describe(model), describe(active))
    logger.info("serving model %s", describe(model))
    return model


def claim_rescore(session: Session, model_id: int) -> bool:
    """Whether this caller should queue the re-scoring for ``model_id``'s latest activation: true
    for exactly one caller per activation (an atomic update of ``rescore_queued_at``)."""
    latest = session.scalar(
        select(ModelActivation.id)
        .where(ModelActivation.model_id == model_id)
        .order_by(ModelActivation.activated_at.desc(), ModelActivation.id.desc())
        .limit(1)
    )
    if latest is None:
        return False
    result = session.execute(
        update(ModelActivation)
        .where(ModelActivation.id == latest, ModelActivation.rescore_queued_at.is_(None))
        .values(rescore_queued_at=utcnow())
    )
    return bool(getattr(result, "rowcount", 0))


def start_serving(settings: Settings, sessions: sessionmaker[Session], send_rescore: Callable[[Path], None]) -> Model:
    """What a scoring worker does before it takes work: registers its model file, checks that it may
    serve it (:func:`served_model`), and, when the model was activated since the last worker start and
    ``rescore_on_activate`` is on, queues the re-scoring of stored studies under it (once per
    activation, whichever worker starts first).

    Raises:
        PermanentError: When no model is configured, the file is not an exported model, or it may not
            be served.
    """
    from retinagate.db import session_scope
    from retinagate.engine import ModelFileError, inspect_model
    from worker.lease import owner

    path = settings.model_path
    if path is None:
        raise PermanentError("model_path: no model configured; set RETINAGATE_MODEL_PATH")
    try:
        sha256, card = inspect_model(path)
    except (FileNotFoundError, ModelFileError) as exc:
        raise PermanentError(str(exc)) from None
    with session_scope(sessions) as session:
        model = served_model(
            session, sha256, card, path, allow_inactive=settings.serve_inactive_model, by=f"worker {owner()}"
        )
        rescore = settings.rescore_on_activate and model.active and claim_rescore(session, model.id)
        described = describe(model)
    if rescore:
        send_rescore(path)
        logger.info("queued the re-scoring of stored studies under the newly active model %s", described)
    return model
