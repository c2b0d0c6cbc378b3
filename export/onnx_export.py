"""PyTorch checkpoint to the served ONNX file, with the model card inside and a check against PyTorch.

The exported graph is :class:`export.graph.CamModel`: uint8 NHWC input, in-graph normalisation,
``logits``, ``probabilities`` and ``cam`` outputs, dynamic batch, fixed height and width (the card's
input size; fixed shapes let runtimes plan memory and TensorRT build one engine).

Like timm's ``onnx_export``, every export runs the ONNX checker (full check, with shape inference)
and compares ONNX Runtime with PyTorch on the same inputs before the file counts as written.
"""

from __future__ import annotations

import importlib.metadata
import logging
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
from numpy.typing import NDArray
from torch import nn

from export.graph import INPUT_NAME, OUTPUT_NAMES, CamModel
from retinagate.card import CARD_METADATA_KEY, ModelCard

__all__ = [
    "DEFAULT_OPSET",
    "Agreement",
    "Exported",
    "Exporter",
    "compare_with_torch",
    "embed_card",
    "export_checkpoint",
    "export_model",
    "read_card",
    "read_checkpoint",
    "save_model",
    "software_versions",
]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
Exporter = Literal["torchscript", "dynamo"]
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
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
                do_constant_folding=True,
            )
        else:
            program = torch.onnx.export(
                cam_model,
                (sample,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=4096)}},
                optimize=True,
                verbose=False,
            )
            if program is None:  # pragma: no cover - dynamo=True always returns a program
                raise RuntimeError("the dynamo exporter returned nothing")
            program.save(str(out), external_data=False)


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

    Args:
        model: The trained classifier (timm EfficientNet-style head); put in eval mode.
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
        proto = onnx.load(str(traced))
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
    """

    cam_model: CamModel
    card: ModelCard
    config: dict[str, Any]


def export_checkpoint(
    checkpoint: Path, out: Path, *, opset: int = DEFAULT_OPSET, exporter: Exporter = "torchscript"
) -> Exported:
    """Exports a RetinaGate training checkpoint to ``out``.

    Raises:
        FileNotFoundError: If the checkpoint does not exist.
        ValueError: If it is not a RetinaGate checkpoint or cannot be exported.
    """
    from train.model import state_dict_sha256

    model, card, raw = read_checkpoint(checkpoint)
    weights = state_dict_sha256(model.state_dict())
    written = export_model(model, card, out, opset=opset, exporter=exporter, weights_sha256=weights)
    config = raw.get("config")
    return Exported(CamModel(model, written).eval(), written, dict(config) if isinstance(config, dict) else {})


@dataclass(frozen=True)
class Agreement:
    """How far ONNX Runtime (CPU) strays from PyTorch over some images.

    fp32 arithmetic carries about 7 significant digits, so the differences are also given relative
    to the magnitude they occur at: where an image drives logits to 1000 (noise far outside the
    training data), two correct fp32 implementations differ by ~1e-3 in every logit of that image;
    where the largest logit is 5, by ~1e-6.

    Attributes:
        images: How many images were compared.
        logits: Largest absolute logit difference.
        logits_scaled: Largest ``|diff| / max(1, largest |logit| of the same image)``.
        probabilities: Largest absolute probability difference.
        cam: Largest absolute CAM difference.
        cam_scaled: Largest CAM difference over ``max(1, largest |cam| of the same image)``.
    """

    images: int
    logits: float
    logits_scaled: float
    probabilities: float
    cam: float
    cam_scaled: float

    def within(self, tolerance: float) -> bool:
        """Whether logits and CAMs agree within ``tolerance`` (absolute below 1, relative above)."""
        return self.logits_scaled <= tolerance and self.cam_scaled <= tolerance


def compare_with_torch(
    onnx_path: Path, cam_model: CamModel, images: NDArray[np.uint8], batch_size: int = 8
) -> Agreement:
    """Runs the ONNX file on ONNX Runtime's CPU provider and ``cam_model`` in PyTorch on the same images.

    Args:
        onnx_path: The exported file.
        cam_model: The PyTorch model it was exported from.
        images: uint8 ``[N, S, S, 3]`` inputs.
        batch_size: Images per run (bounds memory).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    worst = dict.fromkeys(("logits", "logits_scaled", "probabilities", "cam", "cam_scaled"), 0.0)
    cam_model = cam_model.eval()
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start : start + batch_size])
        ours: Sequence[NDArray[np.float32]] = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        with torch.no_grad():
            logits, probabilities, cam = (t.numpy().astype(np.float64) for t in cam_model(torch.from_numpy(batch)))
        # Per image: the largest logit / CAM value sets the scale of the sums that produced them.
        logit_diff = np.abs(ours[0] - logits).max(axis=1)
        logit_scale = np.maximum(1.0, np.abs(logits).max(axis=1))
        cam_diff = np.abs(ours[2] - cam).max(axis=(1, 2, 3))
        cam_scale = np.maximum(1.0, np.abs(cam).max(axis=(1, 2, 3)))
        worst["logits"] = max(worst["logits"], float(logit_diff.max()))
        worst["logits_scaled"] = max(worst["logits_scaled"], float((logit_diff / logit_scale).max()))
        worst["probabilities"] = max(worst["probabilities"], float(np.abs(ours[1] - probabilities).max()))
        worst["cam"] = max(worst["cam"], float(cam_diff.max()))
        worst["cam_scaled"] = max(worst["cam_scaled"], float((cam_diff / cam_scale).max()))
    return Agreement(images=len(images), **worst)
