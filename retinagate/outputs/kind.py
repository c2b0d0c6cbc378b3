"""What every output kind shares: the scored photograph it is built from, and what it hands back.

An output kind (the heatmap Secondary Capture, the SR, the Parametric Map) is a class with a
``name``, built once per model with ``(model, settings)``, whose :meth:`OutputKind.build` takes one
:class:`ScoredPhotograph` and returns a list of :class:`BuiltOutput`: Part 10 bytes that are stored
and sent as they are, with the UIDs a caller records. The kinds are listed, in build order, in
:mod:`retinagate.outputs.registry`; the pipeline, the worker and the settings go through that list
and never name a kind.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from retinagate.card import ModelCard
    from retinagate.decode import DecodedImage
    from retinagate.outputs.identity import ModelIdentity
    from retinagate.preprocess import FieldOfView, Geometry
    from retinagate.settings import Settings

__all__ = ["BuiltOutput", "FrameScores", "OutputKind", "ScoredPhotograph", "highest_probabilities"]


@dataclass(frozen=True)
class FrameScores:
    """The model's output for one frame.

    Attributes:
        probabilities: One probability per card label, in card order; empty for a frame not graded.
        frame_number: 1-based frame number in the source, or ``None`` for a single-frame source.
        not_graded: Why the gradability gate refused the frame (its reasons); empty when it was graded.
    """

    probabilities: Sequence[float]
    frame_number: int | None = None
    not_graded: Sequence[str] = ()


def highest_probabilities(frames: Sequence[FrameScores], labels: Sequence[str]) -> dict[str, float]:
    """Label to its highest probability over the graded frames (the photograph's); empty when none was graded."""
    rows = [f.probabilities for f in frames if not f.not_graded and len(f.probabilities)]
    if not rows:
        return {}
    return {name: max(float(row[i]) for row in rows) for i, name in enumerate(labels)}


@dataclass(frozen=True)
class BuiltOutput:
    """One DICOM object an output kind made.

    Attributes:
        kind: The name of the kind that made it (``sc``, ``sr``, ``pm``).
        sop_instance_uid: Its SOP Instance UID.
        series_instance_uid: Its Series Instance UID.
        sop_class_uid: Its SOP Class UID.
        data: The Part 10 file (preamble and file meta information included), written and sent as it is.
        dataset: The dataset, where the kind had it anyway; it may share elements with an encoder's
            templates, so read it, do not change it. ``None``: :meth:`read` parses ``data``.
        label: What tells it apart from other outputs of its kind for the same photograph (the
            label a Parametric Map maps); empty for a kind that makes one output per photograph.
    """

    kind: str
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    data: bytes = field(repr=False)
    dataset: Dataset | None = field(default=None, repr=False, compare=False)
    label: str = ""

    @property
    def key(self) -> str:
        """Its name among the photograph's outputs: the kind, with the label after a dot when it has one."""
        return f"{self.kind}.{self.label}" if self.label else self.kind

    def read(self) -> Dataset:
        """The dataset: the one the kind kept, or ``data`` parsed."""
        if self.dataset is not None:
            return self.dataset
        from pydicom import dcmread

        return dcmread(io.BytesIO(self.data))


@dataclass
class ScoredPhotograph:
    """One scored input as the output kinds see it: header, pixels, scores, heat and what is built so far.

    Attributes:
        header: The source's DICOM header; for a PNG or JPEG file, the synthetic one the pipeline made.
        references_source: Whether ``header`` is a real DICOM instance that outputs may reference.
        model: The model that scored it.
        settings: The settings in force (outputs, display size, top findings, SC compression).
        decoded: The decoded frames (for display), the stored image's shape and the frame count.
        geometries: Per frame, where the model's input came from in the frame.
        fovs: Per frame, the field of view found.
        frame_scores: Per frame the gate let through or refused, the model's probabilities or the
            reasons (the SR records each).
        shown_frame: Index of the frame shown (the graded one with the most probable disease label;
            the first when none is graded).
        probabilities: The shown frame's label to probability; empty when nothing was graded.
        cams: The shown frame's class activation maps ``(labels, h, w)``; ``None`` when nothing was graded.
        shown: Disease findings of the shown frame drawn on the picture, most probable first (at most
            ``settings.top_findings``).
        mapped: Labels whose heat is drawn and mapped: ``shown``, or the stand-in when it is empty.
        reasons: Why nothing could be graded (the gate's reasons); empty when graded.
        built: The outputs built so far for this photograph, in build order (the SR refers to them).
        timings: Seconds per stage; a kind that renders a picture adds its time under ``render``.
    """

    header: Dataset
    references_source: bool
    model: ModelIdentity
    settings: Settings
    decoded: DecodedImage
    geometries: Sequence[Geometry]
    fovs: Sequence[FieldOfView]
    frame_scores: Sequence[FrameScores]
    shown_frame: int = 0
    probabilities: Mapping[str, float] = field(default_factory=dict)
    cams: NDArray[np.float32] | None = None
    shown: tuple[str, ...] = ()
    mapped: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    built: list[BuiltOutput] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def gradable(self) -> bool:
        """Whether the model's scores are there (at least one frame was graded)."""
        return self.cams is not None

    @property
    def card(self) -> ModelCard:
        """The model's card."""
        return self.model.card

    @property
    def thresholds(self) -> dict[str, float]:
        """Label to calibrated threshold."""
        return dict(zip(self.card.labels, self.card.thresholds, strict=True))

    @property
    def photograph_probabilities(self) -> dict[str, float]:
        """Label to probability of the photograph: each label's highest over the graded frames.

        What its findings, ``retinagate results`` and every summary of it are of (``probabilities``
        is the shown frame's, whose heat is drawn); empty when nothing was graded.
        """
        return highest_probabilities(self.frame_scores, self.card.labels)

    @property
    def frame_number(self) -> int | None:
        """1-based number of the shown frame for a multi-frame source, else ``None``."""
        return self.shown_frame + 1 if self.decoded.number_of_frames > 1 else None

    def cam(self, label: str) -> NDArray[np.float32]:
        """The shown frame's class activation map of ``label``.

        Raises:
            ValueError: If nothing was graded.
        """
        if self.cams is None:
            raise ValueError("cams: the photograph was not graded; it has no heat")
        heat: NDArray[np.float32] = self.cams[self.card.labels.index(label)]
        return heat

    def first(self, kind: str) -> BuiltOutput | None:
        """The first output of ``kind`` built so far, or ``None``."""
        return next((output for output in self.built if output.kind == kind), None)


class OutputKind(Protocol):
    """One kind of output: made once per model, then built for each scored photograph.

    Attributes:
        name: Its name in settings and SQL (at most 16 characters).
        display_resolution: Whether it draws the photograph, so the decoder must keep
            ``settings.display_long_side`` pixels rather than only the model's input size.
        dicom_only: Whether it is made only for a DICOM source: a PNG or JPEG file has no
            geometry or identity for it to reference, and gets none.
    """

    name: ClassVar[str]
    display_resolution: ClassVar[bool]
    dicom_only: ClassVar[bool]

    def __init__(self, model: ModelIdentity, settings: Settings) -> None: ...

    @classmethod
    def requires(cls, references_source: bool) -> tuple[str, ...]:
        """Other kinds this one needs built before it, for a DICOM source or a plain image file."""
        ...

    def build(self, photo: ScoredPhotograph) -> list[BuiltOutput]:
        """The outputs of this kind for one photograph (none where the kind does not apply)."""
        ...
