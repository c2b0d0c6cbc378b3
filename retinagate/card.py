"""The model card: one object that training, export and serving share.

The card travels inside the ONNX file (``metadata_props["retinagate.card"]``) and beside each
checkpoint. Everything that must agree between training and serving lives here once: the label names,
the input size, the normalisation constants, the preprocessing recipe and the decision thresholds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from retinagate.labels import LABELS

__all__ = ["CARD_METADATA_KEY", "CamGrid", "GateLimits", "ModelCard", "OodStatistics", "Preprocessing"]

CARD_METADATA_KEY = "retinagate.card"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CamGrid:
    """Where the cells of a class activation map sit on the model input: the centre of cell ``k``
    (along either axis) lies ``origin + k * step`` model-input pixels from the input's top or left
    edge (pixel ``i`` spans ``[i, i + 1)``)."""

    origin: float
    step: float

    @classmethod
    def covering(cls, size: int, cells: int) -> CamGrid:
        """A map of ``cells`` cells stretched over the ``size``-pixel input edge to edge."""
        step = size / cells
        return cls(origin=step / 2, step=step)


class Preprocessing(BaseModel):
    """How a photograph becomes the model's input; see :mod:`retinagate.preprocess`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: int = Field(224, ge=32, le=2048, description="Square input side in pixels.")
    fov_crop: bool = Field(True, description="Crop to the circular field of view before resizing.")
    fov_threshold: int = Field(20, ge=0, le=255, description="Red-channel level that separates FOV from border.")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    contrast_sigma: float = Field(
        0.0,
        ge=0.0,
        le=0.25,
        description=(
            "Local contrast normalisation in the graph (train.augment.Normalizer): the retina's local mean, a "
            "Gaussian of this sigma (a share of input_size) over the field of view only, is subtracted and the "
            "difference amplified; 0 turns it off (cards written before it existed)."
        ),
    )
    contrast_gain: float = Field(4.0, gt=0.0, le=16.0, description="Gain on the difference from the local mean.")


class OodStatistics(BaseModel):
    """Where the training photographs' pooled features lie, for the graph's ``ood_score`` output.

    ``ood_score`` is the Mahalanobis distance of an image's globally pooled features from the training
    mean, measured in the low-rank space of the top principal components (whitened), plus the
    residual outside that space scaled by its mean variance. An image whose score exceeds
    ``threshold`` (chosen on validation photographs) is not like anything the model was trained on.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["pca-mahalanobis"] = "pca-mahalanobis"
    features: int = Field(ge=1, description="Width K of the pooled feature vector.")
    rank: int = Field(ge=1, description="Principal components kept.")
    mean: tuple[float, ...] = Field(description="Training mean of the pooled features, K values.")
    components: tuple[tuple[float, ...], ...] = Field(description="rank x K orthonormal principal directions.")
    variances: tuple[float, ...] = Field(description="Training variance along each component (rank values).")
    residual_variance: float = Field(gt=0, description="Mean variance per dimension outside the components.")
    threshold: float = Field(gt=0, description="Scores above this are out of distribution.")
    fitted_on: dict[str, Any] = Field(default_factory=dict, description="Images and split the statistics came from.")

    @model_validator(mode="after")
    def _check(self) -> OodStatistics:
        if len(self.mean) != self.features:
            raise ValueError(f"ood.mean: {len(self.mean)} values for {self.features} features")
        if len(self.components) != self.rank or any(len(c) != self.features for c in self.components):
            raise ValueError(f"ood.components: expected {self.rank} rows of {self.features} values")
        if len(self.variances) != self.rank or min(self.variances) <= 0:
            raise ValueError(f"ood.variances: expected {self.rank} positive values")
        return self


class GateLimits(BaseModel):
    """The gradability gate's limits (:mod:`retinagate.gate`; its constants are the defaults).

    Export fits them to the training photographs (:func:`retinagate.gate.fit_limits`): a limit that
    would flag more than 1 in 400 of the photographs the model learned from is moved just past them, since
    those are gradable by definition (focus no lower than 0.6 of their median sharpness); the others
    keep their defaults.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    fov_min_area: float = Field(ge=0, le=1, description="Least share of the image the field of view covers.")
    fov_min_contained: float = Field(ge=0, le=1, description="Least share of the region inside its fitted circle.")
    fov_min_filled: float = Field(ge=0, le=1, description="Least share of the fitted circle the region fills.")
    fov_max_side_cut: float = Field(ge=0, le=1, description="Largest share of the circle's width cut off at the sides.")
    fov_min_visible: float = Field(ge=0, le=1, description="Least share of the circle's area inside the image.")
    min_chroma: float = Field(ge=0, le=1, description="Least chroma inside the field of view.")
    min_red_over_green: float = Field(ge=0, description="Least mean red over mean green.")
    min_sharpness: float = Field(ge=0, description="Least finest-octave over next-octave RMS of green.")
    min_level: float = Field(ge=0, le=255, description="Least mean luma inside the field of view.")
    max_level: float = Field(ge=0, le=255, description="Largest mean luma inside the field of view.")
    fitted_on: dict[str, Any] = Field(default_factory=dict, description="Photographs measured and limits moved.")


class ModelCard(BaseModel):
    """Identity, preprocessing, labels, thresholds and provenance of one model."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    name: str = "retinagate-efficientnet-b0"
    version: str = "0.0.0"
    architecture: str = "efficientnet_b0"
    labels: tuple[str, ...] = LABELS
    thresholds: tuple[float, ...] = Field(default_factory=lambda: tuple(0.5 for _ in LABELS))
    preprocessing: Preprocessing = Preprocessing()
    cam_layer: str = Field("forward_features", description="Layer whose activations the CAM weighs.")
    output_stride: Literal[16, 32] = Field(
        32, description="Input pixels per CAM cell; 16 dilates the last stages (timm output_stride) for a finer CAM."
    )
    tta: Literal["none", "rot180"] = Field(
        "none",
        description=(
            "Test-time views: rot180 averages the feature map of the photograph and of its 180-degree turn "
            "(turned back) before pooling and CAM, so the CAM is still Grad-CAM of the served model; "
            "twice the backbone's compute."
        ),
    )
    cam_alignment: Literal["input", "receptive_field"] = Field(
        "input",
        description=(
            "How a rot180 model pairs the two views' CAM cells. input: cell k with cell k, so the map is "
            "stretched over the input edge to edge (cards before 2026-12-06). receptive_field: the cells whose "
            "receptive fields are centred on the same place, which gives the map one cell more each way, "
            "cell k centred output_stride * k pixels in. One-view maps are stretched, unless localisation says "
            "otherwise."
        ),
    )
    localisation: Literal["labels", "lesion_masks"] = Field(
        "labels",
        description=(
            "What taught the CAM where to point. labels: the classification loss alone, so a one-view map's "
            "cells sit wherever training put their effective centres, and it is read stretched. lesion_masks: "
            "a loss on lesion masks (train.losses.lesion_loss) aimed each one-view cell at the cam grid's "
            "centres (output_stride * k pixels in with receptive_field alignment), so the map is read there."
        ),
    )
    ood: OodStatistics | None = Field(None, description="Feature statistics behind the graph's ood_score output.")
    gate: GateLimits | None = Field(
        None, description="The gradability gate's limits, fitted to the training photographs; none: the defaults."
    )
    input_format: Literal["uint8_nhwc_rgb"] = "uint8_nhwc_rgb"
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    training_data: dict[str, Any] = Field(default_factory=dict, description="What the model was trained on.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Validation and test metrics.")
    weights_sha256: str | None = Field(None, description="sha256 of the training checkpoint's weights.")
    created_at: str | None = None
    software: dict[str, str] = Field(default_factory=dict, description="Versions of the tools that made it.")
    intended_use: str = (
        "Decision support for trained readers of colour fundus photographs. Unverified AI output: "
        "every result needs review by a qualified reader."
    )

    @model_validator(mode="after")
    def _check(self) -> ModelCard:
        if len(self.labels) != len(set(self.labels)):
            raise ValueError("labels: names must be unique")
        if len(self.thresholds) != len(self.labels):
            raise ValueError(
                f"thresholds: {len(self.thresholds)} values for {len(self.labels)} labels; need one per label"
            )
        bad = [f"{n}={t}" for n, t in zip(self.labels, self.thresholds, strict=True) if not 0.0 <= t <= 1.0]
        if bad:
            raise ValueError(f"thresholds must lie in [0, 1]: {', '.join(bad)}")
        if self.cam_alignment == "receptive_field" and self.tta == "rot180" and self.input_size % self.output_stride:
            raise ValueError(
                f"cam_alignment receptive_field with tta rot180 needs input_size ({self.input_size}) to be a "
                f"multiple of output_stride ({self.output_stride}): only then do the turned view's cells land "
                "one cell from the upright view's"
            )
        return self

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    def cam_grid(self, *, two_views: bool | None = None) -> CamGrid | None:
        """Where the cells of this model's CAM sit on the model input; ``None`` when the map is
        stretched over the input edge to edge.

        With symmetric padding every stride-2 convolution centres its output ``j`` on input pixel
        ``2 j``, so the geometric centre of cell ``k`` is pixel ``s k`` (``s`` the output stride), and
        the turned view's cell ``k``, turned back, is centred on pixel ``s (k + 1) - 1``.
        :class:`train.model.TurnAveraged` with ``receptive_field`` averages those pairs, so the
        two-view map has one cell more each way, and its cell ``k`` is centred ``s k`` pixels in
        whatever the network learned: the pair's centres lie symmetrically about that edge, wherever
        training moved each view's effective centre. A one-view map is stretched: a trained network's
        effective centres lie between the geometric centre and the middle of the cell (2 to 8 pixels
        from the former at stride 32, measured on two trained hard-mode models), and which is nearer is not
        a constant of the architecture; unless the lesion loss trained each cell to look at its
        geometric centre (``localisation`` ``lesion_masks``), which the two-view pairing above assumes.

        Args:
            two_views: Whether the map is the two-view average (default: as served, ``tta`` rot180);
                training's per-epoch validation reads one view.
        """
        both = self.tta == "rot180" if two_views is None else two_views
        if self.cam_alignment == "input" or not (both or self.localisation == "lesion_masks"):
            return None
        return CamGrid(origin=0.0, step=float(self.output_stride))

    def to_json(self) -> str:
        """Serialises the card (stable key order, readable)."""
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        """Parses and validates a card; raises ``ValueError`` naming the bad field."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'card'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"invalid model card: {fields}") from None

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        """Reads a ``model_card.json`` file."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def save(self, path: Path) -> None:
        """Writes the card as JSON."""
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    def with_updates(self, **changes: Any) -> ModelCard:
        """A validated copy with some fields replaced."""
        return type(self).model_validate({**json.loads(self.model_dump_json()), **changes})
