"""Reduced-precision variants of an exported model: fp16 for GPUs, int8 for CPUs.

Both keep the served interface: input ``image`` stays uint8 and the outputs stay float32, so the
engine and the worker do not care which variant they load; the card's ``precision`` says which.

* fp16: every float tensor inside the network becomes half precision (ONNX Runtime's converter with
  ``keep_io_types``), which halves memory traffic on a GPU. CPUs gain nothing from it.
* int8: static quantisation in QDQ form with per-channel weights, calibrated on photographs the user
  points at (prepared exactly as in serving). The CAM head, the classifier and the feature map they
  read stay in float: the heatmaps and the logits are then as exact as the features, and the head is
  a negligible share of the work.

In int8 the preprocessing in front of the network (:func:`preprocessing_nodes`: the normalisation,
and the local contrast normalisation's blur and division on 0-255 pixel values) stays in float32: a
small share of the work, and quantised it shifts every input pixel (the logits' signal-to-noise ratio
fell below 0 dB). fp16 keeps 0-255 integers exactly and the blur to about 0.1 grey level, so it is
converted with the rest (ONNX Runtime's converter, given a block list, writes an unsorted graph).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import numpy as np
import onnx
from numpy.typing import NDArray

from export.graph import INPUT_NAME
from export.onnx_export import embed_card, save_model
from retinagate.card import CARD_METADATA_KEY, ModelCard, Preprocessing

__all__ = [
    "DEFAULT_TARGET_SNR_DB",
    "IMAGE_SUFFIXES",
    "CalibrationMethod",
    "Quantized",
    "calibration_images",
    "convert_fp16",
    "head_nodes",
    "preprocessing_nodes",
    "quantize_int8",
    "signal_to_noise_db",
    "with_float_nodes",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
CalibrationMethod = Literal["minmax", "percentile", "entropy"]
#: Default accuracy target of the int8 variant, see :func:`signal_to_noise_db`.
DEFAULT_TARGET_SNR_DB = 25.0
#: Element-wise activations (SiLU, swish, ReLU, hard-swish pieces) between the last convolution and
#: the feature map, and the view averaging of a ``tta`` rot180 graph (split the batch, turn the second
#: half back, pad the two views one cell apart when aligned, add, scale).
_FEATURE_MAP_OPS = frozenset(
    {"Mul", "Sigmoid", "Relu", "Clip", "HardSigmoid", "HardSwish", "Slice", "Split", "Pad", "Add", "Div"}
)


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
    from train.datasets import evenly_spaced

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration folder not found: {folder}")
    if limit < 1:
        raise ValueError(f"limit: {limit}; expected at least 1")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    files = [files[i] for i in evenly_spaced(len(files), limit)]
    images: list[NDArray[np.uint8]] = []
    used: list[Path] = []
    for path in files:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            logger.warning("skipping unreadable calibration image %s", path.name)
            continue
        rgb = cast("NDArray[np.uint8]", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        images.append(prepare(rgb, preprocessing))
        used.append(path)
    if not images:
        raise ValueError(f"calibration: no readable images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return np.stack(images), used


def head_nodes(model: onnx.ModelProto) -> tuple[str, list[str]]:
    """Finds the CAM layer's tensor, the activation that makes it, and every node downstream of it.

    The CAM layer is the input of the convolution that produces ``cam`` (through its ReLU); the
    classifier head (global pool, linear, sigmoid) reads the same tensor.

    Returns:
        The feature map's tensor name and the names of the nodes that make it (back to the last
        convolution) or are computed from it.

    Raises:
        ValueError: If the graph has no ``cam`` output produced by ReLU(Conv(features)).
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    relu = producers.get("cam")
    conv = producers.get(relu.input[0]) if relu is not None and relu.op_type == "Relu" else None
    if conv is None or conv.op_type != "Conv":
        raise ValueError("the graph has no 'cam' output computed as Relu(Conv(features))")
    features = conv.input[0]
    # The activation that makes the feature map (SiLU = x * sigmoid(x) after the last convolution)
    # stays in float too, with a two-view graph's averaging: quantising its output would quantise the
    # feature map the CAM reads.
    found: list[str] = []
    tail = [features]
    while tail:
        node = producers.get(tail.pop())
        if node is None or node.op_type not in _FEATURE_MAP_OPS or node.name in found:
            continue
        found.append(node.name)
        tail.extend(node.input)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
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


def preprocessing_nodes(model: onnx.ModelProto) -> list[str]:
    """Names the nodes between the ``image`` input and the network's stem: the normaliser.

    The stem is the first full convolution of the 3 colour channels (the contrast normaliser's blurs
    are depthwise convolutions); everything its input is computed from is preprocessing.

    Raises:
        ValueError: If the graph has no such convolution.
    """
    weights = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    stem = next(
        (
            node
            for node in model.graph.node
            if node.op_type == "Conv"
            and node.input[1] in weights
            and list(weights[node.input[1]].dims)[1:2] == [3]
            and all(a.i == 1 for a in node.attribute if a.name == "group")
        ),
        None,
    )
    if stem is None:
        raise ValueError("the graph has no stem: a convolution of the 3 colour channels")
    found: list[str] = []
    frontier = [stem.input[0]]
    while frontier:
        node = producers.get(frontier.pop())
        if node is None or node.name in found:
            continue
        found.append(node.name)
        frontier.extend(node.input)
    return found


class _Batches:
    """Feeds calibration images to the quantiser in small batches (ONNX Runtime's reader protocol)."""

    def __init__(self, images: NDArray[np.uint8], batch_size: int) -> None:
        self._batches: Iterator[NDArray[np.uint8]] = iter(
            [np.ascontiguousarray(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        )

    def get_next(self) -> dict[str, NDArray[np.uint8]] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def with_float_nodes(qdq: onnx.ModelProto, reference: onnx.ModelProto, names: Collection[str]) -> onnx.ModelProto:
    """A copy of a QDQ model in which the named nodes compute in float again.

    Each named node gets back the inputs it has in the float ``reference`` (the model that was
    quantised): activations by their original names (QDQ form keeps every producer's float output),
    weights and biases as float initializers. Quantise/dequantise nodes nobody reads any more are
    dropped. With every node named, the result computes what ``reference`` computes.
    """
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    graph = model.graph
    float_nodes = {node.name: node for node in reference.graph.node}
    float_weights = {init.name: init for init in reference.graph.initializer}
    present = {init.name for init in graph.initializer}
    for node in graph.node:
        if node.name not in names or node.name not in float_nodes:
            continue
        restored = []
        for tensor in float_nodes[node.name].input:
            if tensor in float_weights:
                # The quantiser reuses bias names for their dequantised outputs; keep the float copy apart.
                copy_name = f"{tensor}.float"
                if copy_name not in present:
                    weight = onnx.TensorProto()
                    weight.CopyFrom(float_weights[tensor])
                    weight.name = copy_name
                    graph.initializer.append(weight)
                    present.add(copy_name)
                tensor = copy_name
            restored.append(tensor)
        del node.input[:]
        node.input.extend(restored)
    _prune(graph)
    return model


def _prune(graph: onnx.GraphProto) -> None:
    """Drops nodes whose outputs nobody reads, then initializers nobody reads."""
    outputs = {o.name for o in graph.output}
    while True:
        read = outputs | {name for node in graph.node for name in node.input}
        dead = [node for node in graph.node if not any(o in read for o in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)


def _units(model: onnx.ModelProto, skip: Collection[str], convs_per_unit: int) -> list[list[str]]:
    """Splits the nodes in graph order into runs of about ``convs_per_unit`` convolutions each.

    Runs of consecutive nodes follow the network's stages without depending on how an exporter
    names nodes; each unit is a candidate for staying in float.
    """
    units: list[list[str]] = [[]]
    convs = 0
    for node in model.graph.node:
        if node.name in skip or not node.name:
            continue
        if node.op_type == "Conv":
            if convs == convs_per_unit:
                units.append([])
                convs = 0
            convs += 1
        units[-1].append(node.name)
    return [unit for unit in units if unit]


def _logits(model: onnx.ModelProto, images: NDArray[np.uint8]) -> NDArray[np.float64]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {INPUT_NAME: images})[0], dtype=np.float64)


def signal_to_noise_db(approximate: NDArray[np.floating], exact: NDArray[np.floating]) -> float:
    """How far a variant's logits stray, against how much the exact logits vary between images, in dB.

    ``10 log10(Σ var_images(exact) / Σ mean((approximate - exact)²))``: 20 dB means the error's
    power is 1% of the image-to-image variation that ranks the images (and decides the AUROC).
    """
    signal = float(np.var(exact, axis=0).sum())
    noise = float(np.mean((np.asarray(approximate) - exact) ** 2, axis=0).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(max(signal, 1e-30) / noise))


@dataclass(frozen=True)
class Quantized:
    """What :func:`quantize_int8` wrote.

    Attributes:
        card: The card in the int8 file.
        snr_db: :func:`signal_to_noise_db` of the int8 logits on the calibration images.
        quantized_convs: Convolutions running in int8.
        total_convs: Convolutions in the network (the CAM head's and the preprocessing's excluded).
        float_nodes: Nodes kept in float to reach the accuracy target (besides the CAM head).
    """

    card: ModelCard
    snr_db: float
    quantized_convs: int
    total_convs: int
    float_nodes: tuple[str, ...]


def quantize_int8(
    src: Path,
    dst: Path,
    calibration: NDArray[np.uint8],
    *,
    method: CalibrationMethod = "minmax",
    batch_size: int = 8,
    target_snr_db: float | None = DEFAULT_TARGET_SNR_DB,
    keep_float: Sequence[str] = (),
) -> Quantized:
    """Writes a statically quantised int8 (QDQ, per-channel weights) copy of an fp32 export.

    Compact networks like EfficientNet lose accuracy unevenly under 8-bit activations: some stages
    tolerate it, others carry the small image-to-image differences the ranking depends on. With a
    ``target_snr_db``, the logits of the int8 model are compared with the fp32 ones on the
    calibration images (:func:`signal_to_noise_db`); while they fall short, the stages whose
    quantisation hurts most go back to float, fewest first. The CAM head always stays in float.

    Args:
        src: The fp32 export.
        dst: Where the int8 model goes.
        calibration: uint8 ``[M, S, S, 3]`` prepared photographs like those served (see
            :func:`calibration_images`); a few dozen suffice.
        method: How activation ranges are chosen: ``minmax`` (default), ``percentile`` (99.999th),
            ``entropy``.
        batch_size: Calibration images per run.
        target_snr_db: Accuracy target; ``None`` quantises everything but the head regardless.
        keep_float: Further node names to leave in float.

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
    if len(calibration) < 2:
        raise ValueError(f"calibration: {len(calibration)} image(s); need at least 2")
    methods = {"minmax": OrtMethod.MinMax, "percentile": OrtMethod.Percentile, "entropy": OrtMethod.Entropy}
    if method not in methods:
        raise ValueError(f"method: {method!r} is not one of {', '.join(methods)}")

    class Reader(_Batches, CalibrationDataReader):  # type: ignore[misc]  # untyped base
        pass

    with tempfile.TemporaryDirectory(prefix="retinagate-quant-") as scratch:
        prepared_path = Path(scratch) / "prepared.onnx"
        # Shape inference and graph clean-up first, as ONNX Runtime recommends before quantising.
        quant_pre_process(str(src), str(prepared_path), skip_symbolic_shape=True)
        prepared = onnx.load(str(prepared_path))
        features, head = head_nodes(prepared)
        in_float = [*preprocessing_nodes(prepared), *head]  # never quantised, nor counted as the network's
        quantized_path = Path(scratch) / "int8.onnx"
        quantize_static(
            str(prepared_path),
            str(quantized_path),
            Reader(calibration, batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=[*in_float, *keep_float],
            calibrate_method=methods[method],
        )
        qdq = onnx.load(str(quantized_path))

    exact = _logits(prepared, calibration)
    float_nodes: list[str] = []
    result = qdq
    snr = signal_to_noise_db(_logits(qdq, calibration), exact)
    if target_snr_db is not None and snr < target_snr_db:
        fixed = set(in_float)
        float_nodes, result, _ = _keep_sensitive_in_float(qdq, prepared, fixed, calibration, exact, target_snr_db)
        snr = signal_to_noise_db(_logits(result, calibration), exact)
    convs = [n.name for n in prepared.graph.node if n.op_type == "Conv" and n.name not in in_float]
    floated = set(float_nodes) | set(keep_float)
    card = card.with_updates(precision="int8")
    embed_card(result, card)
    save_model(result, dst)
    quantized_convs = sum(1 for name in convs if name not in floated)
    logger.info(
        "wrote int8 variant %s: %d of %d convolutions in int8, logits SNR %.1f dB (head after %s in float)",
        dst,
        quantized_convs,
        len(convs),
        snr,
        features,
    )
    return Quantized(
        card=card,
        snr_db=snr,
        quantized_convs=quantized_convs,
        total_convs=len(convs),
        float_nodes=tuple(float_nodes),
    )


def _keep_sensitive_in_float(
    qdq: onnx.ModelProto,
    prepared: onnx.ModelProto,
    head: set[str],
    images: NDArray[np.uint8],
    exact: NDArray[np.float64],
    target_db: float,
) -> tuple[list[str], onnx.ModelProto, float]:
    """Returns the fewest most-sensitive units to keep in float for ``target_db``, the model and its SNR.

    Sensitivity of a unit: the SNR when only that unit is quantised (on up to 16 of the images). Units
    are floated in order of increasing SNR; the smallest count that meets the target on all the images
    is found by bisection (the SNR grows, near enough monotonically, with each unit taken out of int8).
    """
    measure = images[: min(len(images), 16)]
    total_convs = sum(1 for n in prepared.graph.node if n.op_type == "Conv" and n.name not in head)
    units = _units(prepared, head, convs_per_unit=max(1, -(-total_convs // 16)))
    everything = [name for unit in units for name in unit]
    sensitivity = []
    for unit in units:
        others = set(everything) - set(unit)
        sensitivity.append(
            signal_to_noise_db(_logits(with_float_nodes(qdq, prepared, others), measure), exact[: len(measure)])
        )
    order = [units[i] for i in np.argsort(sensitivity)]
    low, high = 1, len(order)  # floating every unit certainly meets the target: that is the fp32 model
    best: tuple[int, list[str], onnx.ModelProto, float] | None = None
    while low <= high:
        count = (low + high) // 2
        names = [name for unit in order[:count] for name in unit]
        candidate = with_float_nodes(qdq, prepared, set(names))
        snr = signal_to_noise_db(_logits(candidate, images), exact)
        if snr >= target_db:
            best, high = (count, names, candidate, snr), count - 1
        else:
            low = count + 1
    if best is None:
        candidate = with_float_nodes(qdq, prepared, set(everything))
        best = (len(order), everything, candidate, signal_to_noise_db(_logits(candidate, images), exact))
    count, names, candidate, snr = best
    logger.info("int8: %d of %d stages kept in float to reach %.1f dB (%.1f dB)", count, len(units), target_db, snr)
    return names, candidate, snr
