"""PyTorch checkpoint to the served ONNX file, with the model card inside and a check against PyTorch.

The exported graph is :class:`export.graph.CamModel`: uint8 NHWC input, in-graph normalisation,
``logits``, ``probabilities`` and ``cam`` outputs (and ``ood_score`` when the card holds OOD
statistics), dynamic batch, fixed height and width (the card's input size; fixed shapes let runtimes
plan memory and TensorRT build one engine).

Like timm's ``onnx_export``, every export runs the ONNX checker (full check, with shape inference)
and compares ONNX Runtime with PyTorch on the same inputs before the file counts as written
(:func:`compare_with_torch`: against PyTorch in float64, within a bound derived from float32
rounding, :func:`parity_tolerance`).
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from numpy.typing import NDArray
from torch import nn

from export.graph import INPUT_NAME, CamModel, classifier_weight
from retinagate.card import CARD_METADATA_KEY, ModelCard

__all__ = [
    "DEFAULT_OPSET",
    "FP32_UNIT_ROUNDOFF",
    "PARITY_FACTOR",
    "REFERENCE_FACTOR",
    "Agreement",
    "Exported",
    "Exporter",
    "OodMode",
    "compare_with_torch",
    "embed_card",
    "export_checkpoint",
    "export_model",
    "parity_tolerance",
    "read_card",
    "read_checkpoint",
    "save_model",
    "software_versions",
]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
Exporter = Literal["torchscript", "dynamo"]
#: What :func:`export_checkpoint` does about ``ood_score``: ``keep`` the card's statistics (if any),
#: ``fit`` them from the checkpoint's training data when the card has none, or leave them ``off``.
OodMode = Literal["keep", "fit", "off"]
PRODUCER = "retinagate-export"


def software_versions() -> dict[str, str]:
    """Versions of the tools that make and check the file, recorded in the card."""
    versions: dict[str, str] = {}
    for package in ("retinagate", "torch", "timm", "onnx", "onnxruntime"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _model_version(version: str) -> int:
    """ONNX's integer ``model_version`` from a ``major.minor.patch`` card version (0 if not of that form)."""
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+).*", version)
    if match is None:
        return 0
    major, minor, patch = (int(g) for g in match.groups())
    return major * 1_000_000 + min(minor, 999) * 1_000 + min(patch, 999)


def embed_card(model: onnx.ModelProto, card: ModelCard) -> None:
    """Writes the card into the model's metadata and stamps producer and model version (in place)."""
    kept = [p for p in model.metadata_props if p.key != CARD_METADATA_KEY]
    del model.metadata_props[:]
    for prop in kept:
        if not prop.key.startswith("onnx."):  # drop the quantiser's and optimiser's bookkeeping
            model.metadata_props.append(prop)
    model.metadata_props.append(onnx.StringStringEntryProto(key=CARD_METADATA_KEY, value=card.to_json()))
    model.producer_name = PRODUCER
    model.producer_version = software_versions().get("retinagate", "0")
    model.model_version = _model_version(card.version)
    model.doc_string = f"{card.name} {card.version} ({card.precision}). {card.intended_use}"


def read_card(path: Path) -> ModelCard:
    """The card stored in an ONNX file's metadata.

    Raises:
        ValueError: If the file holds no card or an invalid one.
    """
    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == CARD_METADATA_KEY:
            return ModelCard.from_json(prop.value)
    raise ValueError(f"{path}: no model card in the ONNX metadata (key {CARD_METADATA_KEY!r})")


def save_model(model: onnx.ModelProto, out: Path) -> None:
    """Checks the model (full check) and writes it atomically: a temporary file, fsync, rename.

    Raises:
        onnx.checker.ValidationError: If the graph is invalid; nothing is written.
    """
    onnx.checker.check_model(model, full_check=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(model.SerializeToString())
            handle.flush()
            os.fsync(handle.fileno())
        Path(temp).replace(out)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _trace(cam_model: CamModel, sample: torch.Tensor, opset: int, exporter: Exporter, out: Path) -> None:
    names = list(cam_model.output_names)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one; it is kept because it
        # exports EfficientNet in a third of the time and has for years, and tests cover both.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*Converting a tensor to a Python.*")
        if exporter == "torchscript":
            torch.onnx.export(
                cam_model,
                (sample,),
                str(out),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *names)},
                do_constant_folding=True,
            )
        else:
            program = torch.onnx.export(
                cam_model,
                (sample,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=4096)}},
                optimize=True,
                verbose=False,
            )
            if program is None:  # pragma: no cover - dynamo=True always returns a program
                raise RuntimeError("the dynamo exporter returned nothing")
            program.save(str(out), external_data=False)


def _declare_output_shapes(model: onnx.ModelProto, shapes: list[tuple[int, ...]]) -> None:
    """Writes each output's shape into the graph as PyTorch computed it: ``batch``, then fixed sizes.

    Exporters infer output shapes symbolically, and a shape they cannot follow comes out with made-up
    names (a two-view CAM paired by receptive field, whose ``Pad`` takes its pads through a ``Cast``,
    came out ``[batch, 29, batch, ?]``); serving needs the CAM's height and width fixed.
    """
    for output, shape in zip(model.graph.output, shapes, strict=True):
        dims = output.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise ValueError(f"output {output.name!r} has rank {len(dims)} in the graph, {len(shape)} in PyTorch")
        for i, (dim, size) in enumerate(zip(dims, shape, strict=True)):
            if i == 0:
                dim.dim_param = "batch"
            else:
                dim.dim_value = size


def export_model(
    model: nn.Module,
    card: ModelCard,
    out: Path,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: Exporter = "torchscript",
    weights_sha256: str | None = None,
) -> ModelCard:
    """Exports a classifier with the CAM head to ``out`` and returns the card written into it.

    The graph has the ``ood_score`` output exactly when ``card.ood`` is set.

    Args:
        model: The trained classifier (timm EfficientNet-style head) built with the card's output
            stride; put in eval mode.
        card: The training card; precision, software versions and weights hash are updated.
        out: Destination ``.onnx`` file, replaced atomically.
        opset: ONNX opset, 17 or newer.
        exporter: ``torchscript`` (default; fast and long proven) or ``dynamo``.
        weights_sha256: sha256 of the checkpoint's weights, recorded in the card.

    Raises:
        ValueError: If the opset or exporter is unsupported, or the head is not average pool + linear.
    """
    if not 17 <= opset <= 23:
        raise ValueError(f"opset: {opset} is outside 17-23")
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter: {exporter!r} is not one of torchscript, dynamo")
    card = card.with_updates(
        precision="fp32",
        cam_layer="forward_features",
        software={**card.software, **software_versions(), "exporter": exporter},
        weights_sha256=weights_sha256 if weights_sha256 is not None else card.weights_sha256,
    )
    cam_model = CamModel(model, card).eval()
    size = card.input_size
    # Batch 2, not 1: a batch of one invites exporters to specialise the batch dimension.
    sample = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as scratch:
        traced = Path(scratch) / "traced.onnx"
        with torch.no_grad():
            _trace(cam_model, sample, opset, exporter, traced)
            shapes = [tuple(output.shape) for output in cam_model(sample)]
        proto = onnx.load(str(traced))
    _declare_output_shapes(proto, shapes)
    embed_card(proto, card)
    save_model(proto, out)
    logger.info("exported %s (%s, opset %d) to %s", card.name, exporter, opset, out)
    return card


def read_checkpoint(path: Path) -> tuple[nn.Module, ModelCard, dict[str, Any]]:
    """:func:`train.model.load_checkpoint`, with every way a damaged file fails turned into ``ValueError``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a readable RetinaGate checkpoint (names the cause).
    """
    from train.model import load_checkpoint

    try:
        return load_checkpoint(path)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as exc:  # torch.load's unpickler fails with IndexError, UnpicklingError, RuntimeError...
        raise ValueError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class Exported:
    """An export of a checkpoint.

    Attributes:
        cam_model: The PyTorch model that was exported (for checks against the file).
        card: The card written into the file.
        config: The training config stored in the checkpoint (empty if none).
        ood: How ``ood_score`` came about, one line for the user: fitted (on what), kept from the
            checkpoint's card, turned off, or why the graph has none.
        gate: How the card's gradability limits came about, one line for the user: fitted (on what,
            and which moved), kept from the checkpoint's card, or why they are the defaults.
    """

    cam_model: CamModel
    card: ModelCard
    config: dict[str, Any]
    ood: str
    gate: str = "defaults"


def _with_ood(
    model: nn.Module, card: ModelCard, config: dict[str, Any], mode: OodMode, *, progress: bool
) -> tuple[ModelCard, str]:
    """The card to export under ``mode``, and one line saying what became of ``ood_score``."""
    if mode == "off":
        return card.with_updates(ood=None), "off: no ood_score output"
    if card.ood is not None:
        return card, f"kept from the checkpoint's card (threshold {card.ood.threshold:.3f})"
    if mode == "keep":
        return card, "none: the checkpoint's card holds no OOD statistics"
    from train.ood import fit_ood_statistics, ood_images_from_config

    try:
        images = ood_images_from_config(card, config)
    except ValueError as exc:
        note = f"none: the training data named by the checkpoint is unusable ({exc})"
        logger.warning("exporting without ood_score: %s", note)
        return card, note
    if images is None:
        named = config.get("data") or config.get("labels_csv")
        if named:
            note = f"none: the training data named by the checkpoint ({named}) is not on this machine"
        else:
            note = "none: the checkpoint's training config names no training data"
        logger.warning("exporting without ood_score: %s", note)
        return card, note
    logger.info(
        "fitting ood statistics on %d training and %d validation photographs", len(images.train), len(images.val)
    )
    try:
        statistics = fit_ood_statistics(
            model, card, images.train, images.val, fitted_on={"origin": images.origin}, progress=progress
        )
    except ValueError as exc:
        note = f"none: OOD statistics could not be fitted ({exc})"
        logger.warning("exporting without ood_score: %s", note)
        return card, note
    fitted = statistics.fitted_on
    note = (
        f"fitted on {fitted['train_images']} training photographs (rank {statistics.rank}); threshold "
        f"{statistics.threshold:.3f} from {fitted['val_images']} validation photographs "
        f"({100 * fitted['val_above_threshold']:.1f}% above)"
    )
    return card.with_updates(ood=statistics.model_dump(mode="json")), note


def _with_gate(card: ModelCard, config: dict[str, Any]) -> tuple[ModelCard, str]:
    """The card with the gradability gate's limits fitted to the training photographs
    (:func:`train.ood.gate_limits_from_config`), and one line saying what became of them."""
    if card.gate is not None:
        return card, "kept from the checkpoint's card"
    from train.ood import gate_limits_from_config

    try:
        limits = gate_limits_from_config(card, config)
    except ValueError as exc:
        note = f"defaults: the training data named by the checkpoint is unusable ({exc})"
        logger.warning("gate limits: %s", note)
        return card, note
    if limits is None:
        note = "defaults: the training photographs named by the checkpoint are not on this machine"
        logger.warning("gate limits: %s", note)
        return card, note
    fitted = limits.fitted_on
    moved = ", ".join(f"{name} {m['default']:g} -> {m['fitted']:g}" for name, m in fitted["moved"].items())
    note = (
        f"fitted to {fitted['photographs']} training photographs ({fitted['flagged_by_defaults']} flagged by the "
        f"defaults); {'moved ' + moved if moved else 'the defaults kept'}"
    )
    if moved:
        logger.warning("gate limits moved to pass the training photographs: %s", moved)
    if fitted.get("still_flagged"):
        why = ", ".join(f"{reason} ({count})" for reason, count in sorted(fitted["still_reasons"].items()))
        note += f"; {fitted['still_flagged']} still flagged: {why}"
        logger.warning(
            "%d of %d training photographs are ungradable even under the fitted gate limits: %s",
            fitted["still_flagged"], fitted["photographs"], why,
        )  # fmt: skip
    return card.with_updates(gate=limits.model_dump(mode="json")), note


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: Exporter = "torchscript",
    ood: OodMode = "keep",
    progress: bool = False,
) -> Exported:
    """Exports a RetinaGate training checkpoint to ``out``.

    Args:
        checkpoint: ``best.pt`` or ``last.pt`` of a training run.
        out: Destination ``.onnx`` file, replaced atomically.
        opset: ONNX opset, 17 or newer.
        exporter: ``torchscript`` or ``dynamo``.
        ood: ``keep`` (default): the graph has ``ood_score`` if the checkpoint's card holds OOD
            statistics. ``fit``: as ``keep``, and when the card holds none they are fitted
            (:func:`train.ood.fit_ood_statistics`) on the training and validation photographs the
            training config names, if they are on this machine; otherwise the export goes on
            without ``ood_score`` and a warning says why. ``off``: never an ``ood_score`` output.
        progress: Show a progress bar on stderr while the OOD statistics are fitted.

    The gradability gate's limits are fitted to the training photographs the config names when they
    are on this machine and the card holds none (:func:`train.ood.gate_limits_from_config`).

    Raises:
        FileNotFoundError: If the checkpoint does not exist.
        ValueError: If it is not a RetinaGate checkpoint or cannot be exported.
    """
    from train.model import state_dict_sha256

    if ood not in ("keep", "fit", "off"):
        raise ValueError(f"ood: {ood!r} is not one of keep, fit, off")
    model, card, raw = read_checkpoint(checkpoint)
    raw_config = raw.get("config")
    config = dict(raw_config) if isinstance(raw_config, dict) else {}
    card, note = _with_ood(model, card, config, ood, progress=progress)
    card, gate_note = _with_gate(card, config)
    weights = state_dict_sha256(model.state_dict())
    written = export_model(model, card, out, opset=opset, exporter=exporter, weights_sha256=weights)
    return Exported(CamModel(model, written).eval(), written, config, note, gate_note)


#: float32's unit roundoff ``u = 2**-24``: the relative error of one correctly rounded operation.
FP32_UNIT_ROUNDOFF = 2.0**-24
#: Safety factor of :func:`parity_tolerance` over the random-walk estimate of float32 rounding.
PARITY_FACTOR = 8.0
#: How many times PyTorch's own float32 error an export may show (see :func:`compare_with_torch`).
REFERENCE_FACTOR = 8.0


def parity_tolerance(model: nn.Module) -> float:
    """The relative error any float32 evaluation of ``model`` may show against exact arithmetic.

    ``tolerance = PARITY_FACTOR * sqrt(K * D) * u``: a dot product of length ``n`` in float32 errs
    by about ``sqrt(n) * u`` relative to the magnitude of its terms when rounding errors behave like
    a random walk (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., sec. 2.8 and
    3.1), and the errors of ``D`` layers in sequence add up like ``D`` such walks. ``K`` (the
    classifier's input width, 1280 for EfficientNet-B0) bounds the accumulation length of every
    convolution and of the head, and ``D`` counts the convolutions and linear layers (82 for B0):
    ``8 * sqrt(1280 * 82) * 2**-24 = 1.5e-4``. The global average pools (squeeze-excitation and the
    head) sum ``h * w`` values each; up to 448 px their lengths add up to less than ``K * D`` (about
    22,000 at 224 px, 87,000 at 448 px, against 105,000), so the same bound covers them.

    This is the bound for a well-conditioned network. A trained network can amplify rounding errors
    inside (cancellation in layers whose batch-norm statistics shift large activations), which no
    formula over the shape sees; :func:`compare_with_torch` therefore also measures PyTorch's own
    float32 error on the same images and allows :data:`REFERENCE_FACTOR` times that.

    Measured (ONNX Runtime 1.32 on x86, 2 noise + 2 fundus images each): EfficientNet-B0 trained for
    10-20 steps at a strong learning rate, exported at 224-448 px with stride 16 and 32, erred by
    6e-7 to 6e-5 against float64, while PyTorch's own float32 erred by 5e-7 to 1.5e-4 (bounds
    1.5e-4 to 1.2e-3); one trained for 10 epochs on synthetic photographs, by 1.4e-7 to 5e-7 at
    224-448 px. The old check (ONNX Runtime against PyTorch float32, 1e-4 of the image's largest
    logit) rejected two of the seven few-step checkpoints (5.3e-4 and 5.8e-4), as it rejected real
    ones (CAM 1.5e-4 at 224 px, logits 3.3e-4 at 384 px). A normalisation off by half a grey level
    errs by 6e-3 to 1e-1, 40 to 700 times the bound.
    """
    layers = sum(1 for module in model.modules() if isinstance(module, nn.Conv2d | nn.Linear))
    width = classifier_weight(model).shape[1]
    return PARITY_FACTOR * math.sqrt(width * max(1, layers)) * FP32_UNIT_ROUNDOFF


@dataclass(frozen=True)
class Agreement:
    """How far ONNX Runtime (CPU, float32) strays from the exact outputs, and the bound it must keep.

    The reference is the same PyTorch model run in float64, so the errors are the export's own
    rounding, not the difference between two float32 programs. Each error is also given relative to
    the magnitude of the terms its value is a sum of, which is what float32 rounding scales with (an
    output that cancels to nearly zero errs as much as one that does not):

    * a logit ``sum_k W_ck f_k + b_c``: ``sum_k |W_ck| mean|A_k| + |b_c|`` (``A`` the final feature
      map, ``f`` its average);
    * a CAM map ``ReLU(sum_k W_ck A_k)``: the largest ``sum_k |W_ck| |A_k|`` over the map, so that
      each map's error is relative to its own scale, as a viewer normalises each map;
    * ``ood_score``: the score's sensitivity to an error of ``mean|A_k|`` in each pooled feature,
      ``sqrt(sum_k P_kk mean|A_k|**2 / K)`` with ``P`` the precision matrix of the statistics.

    The bound, :attr:`tolerance`, is the larger of :func:`parity_tolerance` (rounding in a
    well-conditioned network of this shape) and :data:`REFERENCE_FACTOR` times PyTorch's own float32
    error on the same images (:attr:`pytorch_relative`: the model's conditioning at this input size).

    Attributes:
        images: How many images were compared.
        logits: Largest absolute logit error.
        logits_relative: Largest logit error over its term magnitude.
        probabilities: Largest absolute probability error.
        cam: Largest absolute CAM error.
        cam_relative: Largest CAM error over its map's term magnitude.
        ood_score: Largest absolute ``ood_score`` error (``None``: no such output).
        ood_relative: Largest ``ood_score`` error over its sensitivity scale (``None``: no such output).
        pytorch_relative: PyTorch float32's largest relative error on the same images, any output.
        tolerance: The bound on the relative errors.
    """

    images: int
    logits: float
    logits_relative: float
    probabilities: float
    cam: float
    cam_relative: float
    ood_score: float | None
    ood_relative: float | None
    pytorch_relative: float
    tolerance: float

    @property
    def worst_relative(self) -> float:
        """The largest relative error of any output."""
        return max(self.logits_relative, self.cam_relative, self.ood_relative or 0.0)

    def within(self, tolerance: float | None = None) -> bool:
        """Whether every relative error is within ``tolerance`` (default: :attr:`tolerance`)."""
        return self.worst_relative <= (self.tolerance if tolerance is None else tolerance)


def _ood_precision_diagonal(cam_model: CamModel) -> NDArray[np.float64] | None:
    """Diagonal of the precision matrix of the card's OOD statistics (``None`` without them)."""
    statistics = cam_model.card.ood
    if statistics is None:
        return None
    components = np.asarray(statistics.components, dtype=np.float64)
    in_subspace = (components**2 / np.asarray(statistics.variances)[:, None]).sum(axis=0)
    outside = (1.0 - (components**2).sum(axis=0)) / statistics.residual_variance
    diagonal: NDArray[np.float64] = in_subspace + outside
    return diagonal


_ERRORS = ("logits", "logits_relative", "probabilities", "cam", "cam_relative", "ood_score", "ood_relative")


def _errors(
    outputs: Sequence[NDArray[np.floating]], exact: Sequence[NDArray[np.float64]], scales: Sequence[NDArray[np.float64]]
) -> dict[str, float]:
    """Absolute and relative errors of one batch of outputs against the exact ones (see :class:`Agreement`)."""
    logit_error = np.abs(outputs[0] - exact[0])
    cam_error = np.abs(outputs[2] - exact[2]).max(axis=(2, 3))
    errors = {
        "logits": float(logit_error.max()),
        "logits_relative": float((logit_error / scales[0]).max()),
        "probabilities": float(np.abs(outputs[1] - exact[1]).max()),
        "cam": float(cam_error.max()),
        "cam_relative": float((cam_error / scales[1]).max()),
        "ood_score": 0.0,
        "ood_relative": 0.0,
    }
    if len(exact) > 3:
        ood_error = np.abs(outputs[3] - exact[3])
        errors["ood_score"] = float(ood_error.max())
        errors["ood_relative"] = float((ood_error / scales[2]).max())
    return errors


def compare_with_torch(
    onnx_path: Path,
    cam_model: CamModel,
    images: NDArray[np.uint8],
    batch_size: int = 8,
) -> Agreement:
    """Runs the ONNX file on ONNX Runtime's CPU provider and ``cam_model`` in float64 on the same images.

    ``cam_model`` also runs in float32, to measure PyTorch's own rounding error on these images, which
    sets the bound together with :func:`parity_tolerance` (see :class:`Agreement`).

    Args:
        onnx_path: The exported file.
        cam_model: The PyTorch model it was exported from (left unchanged; a float64 copy runs).
        images: uint8 ``[N, S, S, 3]`` inputs.
        batch_size: Images per run (bounds memory).

    Raises:
        ValueError: If the file's outputs are not those of ``cam_model`` (with or without ``ood_score``).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    names = list(cam_model.output_names)
    found = [output.name for output in session.get_outputs()]
    if found != names:
        raise ValueError(f"{onnx_path}: outputs {found}, but the PyTorch model has {names}")
    cam_model = cam_model.eval()
    reference = copy.deepcopy(cam_model).double()
    weight = classifier_weight(reference.model).abs()
    bias = getattr(reference.model.get_classifier(), "bias", None)  # type: ignore[operator]
    bias_magnitude = bias.abs() if isinstance(bias, torch.Tensor) else torch.zeros(weight.shape[0], dtype=weight.dtype)
    precision = _ood_precision_diagonal(cam_model)
    worst = dict.fromkeys(_ERRORS, 0.0)
    pytorch = dict.fromkeys(_ERRORS, 0.0)
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start : start + batch_size])
        ours: Sequence[NDArray[np.float32]] = session.run(names, {INPUT_NAME: batch})
        with torch.no_grad():
            single = [t.numpy() for t in cam_model(torch.from_numpy(batch))]
            features = reference.features(torch.from_numpy(batch))
            exact = [t.numpy() for t in reference.head(features)]
            magnitude = features.abs()
            mean_magnitude = magnitude.mean(dim=(2, 3))
            scales = [
                (mean_magnitude @ weight.T + bias_magnitude).numpy(),
                F.conv2d(magnitude, weight[:, :, None, None]).amax(dim=(2, 3)).clamp_min(1e-300).numpy(),
            ]
        if precision is not None:
            scales.append(np.sqrt((mean_magnitude.numpy() ** 2 * precision).sum(axis=1) / len(precision)))
        for totals, errors in ((worst, _errors(ours, exact, scales)), (pytorch, _errors(single, exact, scales))):
            for key, value in errors.items():
                totals[key] = max(totals[key], value)
    pytorch_relative = max(pytorch["logits_relative"], pytorch["cam_relative"], pytorch["ood_relative"])
    has_ood = precision is not None
    return Agreement(
        images=len(images),
        logits=worst["logits"],
        logits_relative=worst["logits_relative"],
        probabilities=worst["probabilities"],
        cam=worst["cam"],
        cam_relative=worst["cam_relative"],
        ood_score=worst["ood_score"] if has_ood else None,
        ood_relative=worst["ood_relative"] if has_ood else None,
        pytorch_relative=pytorch_relative,
        tolerance=max(parity_tolerance(cam_model.model), REFERENCE_FACTOR * pytorch_relative),
    )
