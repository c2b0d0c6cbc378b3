"""The output kinds, registered in one place, in the order they are built.

Each entry names a kind and the class that builds it (:class:`retinagate.outputs.kind.OutputKind`).
The Secondary Capture and the Parametric Map come before the SR, which references what was built
before it. The classes are imported on first use: the gateway validates ``RETINAGATE_OUTPUTS``
with :func:`check` and must not load OpenCV or highdicom for it. Adding a kind means adding its
module and one line here.

A study report (:mod:`retinagate.outputs.study`) is an output kind of another shape: built once
per study from the predictions of all its photographs, not per photograph, so it is not chosen in
``outputs``; :data:`STUDY_KINDS` names it for output rows (:func:`stored_names`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from retinagate.outputs.identity import ModelIdentity
    from retinagate.outputs.kind import OutputKind
    from retinagate.settings import Settings

__all__ = ["STUDY_KINDS", "check", "create", "kind_class", "names", "plan", "stored_names"]

#: Name, module and class of each kind, in build order.
_KINDS: Final = (
    ("sc", "retinagate.outputs.sc", "ScOutput"),
    ("pm", "retinagate.outputs.pm", "PmOutput"),
    ("sr", "retinagate.outputs.sr", "SrOutput"),
)


#: Kinds built once per study rather than per photograph.
STUDY_KINDS: Final = ("study",)


def names() -> tuple[str, ...]:
    """Every per-photograph kind's name, in build order."""
    return tuple(name for name, _, _ in _KINDS)


def stored_names() -> tuple[str, ...]:
    """Every kind an output row may hold: the per-photograph kinds, then the per-study ones."""
    return (*names(), *STUDY_KINDS)


def check(kinds: Iterable[str], field: str = "outputs", known: Sequence[str] | None = None) -> list[str]:
    """The kinds named, each once, in the order given.

    Args:
        known: The kinds to accept; default the per-photograph ones (:func:`names`).

    Raises:
        ValueError: If none is named or one is not a known kind; the message names ``field``.
    """
    chosen = list(dict.fromkeys(kinds))
    known = names() if known is None else tuple(known)
    unknown = [kind for kind in chosen if kind not in known]
    if unknown or not chosen:
        got = f"{', '.join(map(repr, unknown))} is not a kind" if unknown else "nothing chosen"
        raise ValueError(f"{field}: {got}; choose one or more of {', '.join(known)}")
    return chosen


@cache
def kind_class(name: str) -> type[OutputKind]:
    """The class that builds the kind ``name``.

    Raises:
        KeyError: If no kind has that name.
    """
    for kind, module, attribute in _KINDS:
        if kind == name:
            cls: type[OutputKind] = getattr(importlib.import_module(module), attribute)
            return cls
    raise KeyError(name)


def plan(requested: Iterable[str], references_source: bool) -> list[str]:
    """The kinds to build for one photograph, in build order: those requested and those they require."""
    wanted: set[str] = set()
    pending = list(requested)
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending.extend(kind_class(name).requires(references_source))
    return [name for name in names() if name in wanted]


def create(model: ModelIdentity, settings: Settings) -> dict[str, OutputKind]:
    """One instance of every kind the settings' outputs may need (for DICOM sources and plain files alike)."""
    needed = set(plan(settings.outputs, True)) | set(plan(settings.outputs, False))
    return {name: kind_class(name)(model, settings) for name in names() if name in needed}
