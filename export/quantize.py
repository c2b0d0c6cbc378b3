"""Reduced-precision variants of an exported model: fp16 for GPUs, int8 for CPUs.

Both keep the served interface: input ``image`` stays uint8 and the outputs stay float32, so the
engine and the worker do not care which variant they load; the card's ``precision`` says which.

* fp16: every float tensor inside the graph becomes half precision (ONNX Runtime's converter with
  ``keep_io_types``), which halves memory traffic on a GPU. CPUs gain nothing from it.
* int8: static quantisation in QDQ form with per-channel weights, calibrated on photographs the user
  points at (prepared exactly as in serving). The CAM head, the classifier and the feature map they
  read stay in float: the heatmaps and the logits are then as exact as the features, and the head is
  a negligible share of the work.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from numpy.typing import NDArray

from export.graph import INPUT_NAME
from export.onnx_export import embed_card, save_model
from retinagate.card import CARD_METADATA_KEY, ModelCard, Preprocessing

__all__ = [
    "IMAGE_SUFFIXES",
    "CalibrationMethod",
    "calibration_images",
    "convert_fp16",
    "head_nodes",
    "quantize_int8",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
CalibrationMethod = Literal["minmax", "percentile", "entropy"]


def _card_of(model: onnx.ModelProto) -> ModelCard:
    for prop in model.metadata_props:
        if prop.key == CARD_METADATA_KEY:
            return ModelCard.from_json(prop.value)
    raise ValueError(f"the model holds no card (metadata key {CARD_METADATA_KEY!r}); export it with retinagate export")


def convert_fp16(src: Path, dst: Path) -> ModelCard:
    """Writes a half-precision copy of an fp32 export; input stays uint8, outputs float32.

    Returns:
        The card written into ``dst`` (``precision="fp16"``).

    Raises:
        ValueError: If ``src`` holds no card or is not fp32.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    card = _card_of(model)
    if card.precision != "fp32":
        raise ValueError(f"{src}: precision is {card.precision}; convert the fp32 export")
    half = convert_float_to_float16(model, keep_io_types=True)
    card = card.with_updates(precision="fp16")
    embed_card(half, card)
    save_model(half, dst)
    logger.info("wrote fp16 variant %s", dst)
    return card


def calibration_images(
    folder: Path, preprocessing: Preprocessing, *, limit: int = 64
) -> tuple[NDArray[np.uint8], list[Path]]:
    """Reads and prepares photographs under ``folder`` (recursively) as calibration input.

    When there are more than ``limit``, an evenly spaced selection of the sorted file list is used,
    so the same folder always gives the same calibration.

    Returns:
        uint8 ``[M, S, S, 3]`` prepared images and the files they came from.

    Raises:
        FileNotFoundError: If ``folder`` is not a directory.
        ValueError: If ``limit`` is below 1 or no readable image is found.
    """
    import cv2

    from retinagate.preprocess import prepare

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration folder not found: {folder}")
    if limit < 1:
        raise ValueError(f"limit: {limit}; expected at least 1")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) > limit:
        picks = np.linspace(0, len(files) - 1, limit).round().astype(int)
        files = [files[i] for i in sorted(set(picks.tolist()))]
    images: list[NDArray[np.uint8]] = []
    used: list[Path] = []
    for path in files:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            logger.warning("skipping unreadable calibration image %s", path.name)
            continue
        images.append(prepare(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), preprocessing))
        used.append(path)
    if not images:
        raise ValueError(
            f"calibration: no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}"
        )
    return np.stack(images), used


def head_nodes(model: onnx.ModelProto) -> tuple[str, list[str]]:
    """Finds the CAM layer's tensor and every node that reads it, directly or downstream.

    The CAM layer is the input of the convolution that produces ``cam`` (through its ReLU); the
    classifier head (global pool, linear, sigmoid) reads the same tensor.

    Returns:
        The feature map's tensor name and the names of the nodes computed from it.

    Raises:
        ValueError: If the graph has no ``cam`` output produced by ReLU(Conv(features)).
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    relu = producers.get("cam")
    conv = producers.get(relu.input[0]) if relu is not None and relu.op_type == "Relu" else None
    if conv is None or conv.op_type != "Conv":
        raise ValueError("the graph has no 'cam' output computed as Relu(Conv(features))")
    features = conv.input[0]
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: list[str] = []
    frontier = [features]
    seen: set[str] = set()
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.name in seen:
                continue
            seen.add(node.name)
            found.append(node.name)
            frontier.extend(node.output)
    return features, found


class _Batches:
    """Feeds calibration images to the quantiser in small batches (ONNX Runtime's reader protocol)."""

    def __init__(self, images: NDArray[np.uint8], batch_size: int) -> None:
        self._batches: Iterator[NDArray[np.uint8]] = iter(
            [np.ascontiguousarray(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        )

    def get_next(self) -> dict[str, NDArray[np.uint8]] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(
    src: Path,
    dst: Path,
    calibration: NDArray[np.uint8],
    *,
    method: CalibrationMethod = "minmax",
    batch_size: int = 8,
    keep_float: Sequence[str] = (),
) -> ModelCard:
    """Writes a statically quantised int8 (QDQ, per-channel weights) copy of an fp32 export.

    Args:
        src: The fp32 export.
        dst: Where the int8 model goes.
        calibration: uint8 ``[M, S, S, 3]`` prepared photographs like those served (see
            :func:`calibration_images`); a few dozen suffice.
        method: How activation ranges are chosen: ``minmax`` (default), ``percentile`` (99.999th),
            ``entropy``.
        batch_size: Calibration images per run.
        keep_float: Further node names to leave in float.

    Returns:
        The card written into ``dst`` (``precision="int8"``).

    Raises:
        ValueError: If the calibration images do not fit the model, or ``src`` is no fp32 export.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization import CalibrationMethod as OrtMethod
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(src))
    card = _card_of(model)
    if card.precision != "fp32":
        raise ValueError(f"{src}: precision is {card.precision}; quantise the fp32 export")
    size = card.input_size
    if calibration.dtype != np.uint8 or calibration.ndim != 4 or calibration.shape[1:] != (size, size, 3):
        raise ValueError(
            f"calibration: got {calibration.dtype} {list(calibration.shape)}; expected uint8 [M, {size}, {size}, 3]"
        )
    if len(calibration) == 0:
        raise ValueError("calibration: no images")
    methods = {"minmax": OrtMethod.MinMax, "percentile": OrtMethod.Percentile, "entropy": OrtMethod.Entropy}
    if method not in methods:
        raise ValueError(f"method: {method!r} is not one of {', '.join(methods)}")

    class Reader(_Batches, CalibrationDataReader):  # type: ignore[misc]  # untyped base
        pass

    with tempfile.TemporaryDirectory(prefix="retinagate-quant-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # Shape inference and graph clean-up first, as ONNX Runtime recommends before quantising.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        features, head = head_nodes(onnx.load(str(prepared)))
        excluded = [*head, *keep_float]
        quantized = Path(scratch) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(quantized),
            Reader(calibration, batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=methods[method],
            extra_options={"CalibTensorRangeSymmetric": False},
        )
        result = onnx.load(str(quantized))
    card = card.with_updates(precision="int8")
    embed_card(result, card)
    save_model(result, dst)
    logger.info("wrote int8 variant %s (%d head nodes after %s kept in float)", dst, len(head), features)
    return card
