"""``retinagate models``: list, show, register and activate the models the workers serve.

Rotation, step by step (README, "Models"): copy the exported ``.onnx`` file to every scoring node (or
a shared volume), ``retinagate models register PATH``, ``retinagate models activate NAME_OR_SHA``,
then restart the scoring workers with ``RETINAGATE_MODEL_PATH`` pointing at it. A worker serving a
model that is not the active one refuses to start; the first worker serving the new one queues the
re-scoring of stored studies (``RETINAGATE_RESCORE_ON_ACTIVATE``). Rolling back is activating the
previous model the same way.

Standard library only at module level (see :mod:`retinagate.cli`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retinagate.models import Model
    from retinagate.settings import Settings

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Adds ``models list|show|register|activate``."""
    parser = subparsers.add_parser(
        "models",
        help="list, show, register and activate models",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="registered models, the active one marked")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_list)

    show = actions.add_parser("show", help="one model: its card summary and its activations")
    show.add_argument("model", metavar="NAME_OR_SHA", help="id, sha256 prefix, name, 'name version' or path")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_show)

    add = actions.add_parser("register", help="register an exported .onnx file (not active until activated)")
    add.add_argument("path", type=Path, metavar="PATH", help="the exported model (retinagate export)")
    add.add_argument("--json", action="store_true", help="print JSON")
    add.set_defaults(handler=_register)

    activate = actions.add_parser("activate", help="make a registered model the active one (audited)")
    activate.add_argument("model", metavar="NAME_OR_SHA", help="id, sha256 prefix, name, 'name version' or path")
    activate.add_argument("--json", action="store_true", help="print JSON")
    activate.set_defaults(handler=_activate)


def _sessions(settings: Settings) -> Any:
    from worker.cli import _sessions as sessions

    return sessions(settings)


def _summary(model: Model) -> dict[str, Any]:
    return {
        "id": model.id,
        "name": model.name,
        "version": model.version,
        "sha256": model.sha256,
        "active": model.active,
        "path": model.path,
        "registered_at": model.registered_at.isoformat(),
        "activated_at": model.activated_at.isoformat() if model.activated_at else None,
    }


def _list(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select

    from retinagate.db import session_scope
    from retinagate.models import Model

    engine, sessions = _sessions(settings)
    try:
        with session_scope(sessions) as session:
            rows = [_summary(m) for m in session.scalars(select(Model).order_by(Model.id))]
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no models registered; `retinagate models register PATH` adds one")
        return 0
    for row in rows:
        mark = "*" if row["active"] else " "
        print(
            f"{mark} {row['id']:>3}  {row['name']} {row['version']}  sha256 {row['sha256'][:12]}  "
            f"registered {row['registered_at'][:19]}  {row['path'] or ''}"
        )
    print("(* active)")
    return 0


def _find(session: Any, ref: str) -> Model:
    from retinagate.cli import EXIT_MISSING, CommandError
    from worker.registry import ModelNotFoundError, find_model

    try:
        return find_model(session, ref)
    except ModelNotFoundError as exc:
        raise CommandError(str(exc), EXIT_MISSING) from None


def _show(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select

    from retinagate.db import session_scope
    from retinagate.models import Model, ModelActivation

    engine, sessions = _sessions(settings)
    try:
        with session_scope(sessions) as session:
            model = _find(session, args.model)
            card = model.card
            names = {m.id: f"{m.name} {m.version}" for m in session.scalars(select(Model))}
            history: list[dict[str, Any]] = [
                {
                    "activated_at": a.activated_at.isoformat(),
                    "activated_by": a.activated_by,
                    "previous": names.get(a.previous_model_id) if a.previous_model_id is not None else None,
                    "rescore_queued_at": a.rescore_queued_at.isoformat() if a.rescore_queued_at else None,
                }
                for a in session.scalars(
                    select(ModelActivation).where(ModelActivation.model_id == model.id).order_by(ModelActivation.id)
                )
            ]
            shown = {
                **_summary(model),
                "labels": len(card.get("labels", [])),
                "input_size": card.get("preprocessing", {}).get("input_size"),
                "precision": card.get("precision"),
                "metrics": card.get("metrics", {}),
                "activations": history,
            }
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(shown, indent=2, default=str))
        return 0
    state = "active" if shown["active"] else "not active"
    print(f"{shown['name']} {shown['version']} (id {shown['id']}, {state})")
    print(f"  sha256     {shown['sha256']}")
    print(f"  path       {shown['path'] or '-'}")
    print(f"  input      {shown['input_size']} px, {shown['labels']} labels, {shown['precision'] or 'fp32'}")
    metrics = shown["metrics"]
    if isinstance(metrics, dict) and metrics:
        flat = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, int | float))
        if flat:
            print(f"  metrics    {flat}")
    for entry in history:
        after = f", replacing {entry['previous']}" if entry["previous"] else ""
        print(f"  activated  {entry['activated_at'][:19]} by {entry['activated_by']}{after}")
    return 0


def _register(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.cli import EXIT_MISSING, CommandError
    from retinagate.db import session_scope
    from retinagate.engine import ModelFileError, inspect_model
    from worker.registry import describe, register_model

    path = args.path.resolve()
    try:
        sha256, card = inspect_model(path)
    except FileNotFoundError as exc:
        raise CommandError(str(exc), EXIT_MISSING) from None
    except ModelFileError as exc:
        hint = "; a training checkpoint (.pt) must first go through `retinagate export`" if path.suffix == ".pt" else ""
        raise CommandError(f"{exc}{hint}", EXIT_MISSING) from None
    engine, sessions = _sessions(settings)
    try:
        with session_scope(sessions) as session:
            model, added = register_model(session, sha256, card, path)
            summary, described = _summary(model), describe(model)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps({**summary, "added": added}, indent=2))
    elif added:
        print(f"registered {described}; `retinagate models activate {sha256[:12]}` makes it the active model")
    else:
        print(f"already registered: {described}")
    return 0


def _activate(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.db import session_scope
    from worker.registry import activate_model, actor, describe

    engine, sessions = _sessions(settings)
    try:
        with session_scope(sessions) as session:
            model = _find(session, args.model)
            was_active = model.active
            previous = activate_model(session, model, by=actor())
            summary, described = _summary(model), describe(model)
            replaced = describe(previous) if previous is not None else None
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps({**summary, "previous": replaced, "changed": not was_active}, indent=2))
        return 0
    if was_active:
        print(f"{described} is already the active model")
        return 0
    print(f"{described} is now the active model" + (f" (was {replaced})" if replaced else ""))
    rescore = (
        "the first of them re-scores the stored studies under it"
        if settings.rescore_on_activate
        else "run `retinagate rescore` to re-score stored studies under it"
    )
    print(
        f"next: restart the scoring workers with RETINAGATE_MODEL_PATH={summary['path'] or '<its file>'} "
        f"on every node; {rescore}"
    )
    return 0
