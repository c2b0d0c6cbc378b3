"""ONNX Runtime inference: one exported model, its card, and one batched call.

The engine serves the file that ``retinagate export`` writes: input ``image`` uint8 ``[N, S, S, 3]``
RGB, outputs ``probabilities [N, C]`` and ``cam [N, C, h, w]`` (plus ``logits``), optionally
``ood_score [N]`` (how far each image's features lie from the training photographs'; present when the
card carries ``ood`` statistics, absent in older models), and the model card in the file's metadata.
:meth:`Engine.infer` returns all three, the score as ``None`` for a graph without it. Nothing here
imports PyTorch: worker images hold ONNX Runtime only.

The file's sha256 is the model's identity (in SQL and, as a derived UID, in DICOM). The bytes that
are hashed are the bytes ONNX Runtime loads, so the identity always names the model that ran.

Providers (``settings.providers``): ``auto`` tries TensorRT, then CUDA, then CPU among those this
ONNX Runtime build offers, falling back when one fails to start (a TensorRT provider whose libraries
are absent, for example); a named provider that is missing or fails is an error that lists what is
available. GPU providers get fixed batch shapes (the last batch is padded) so that TensorRT engines
and cuDNN algorithm choices are built once and reused.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from retinagate.card import CARD_METADATA_KEY, ModelCard
from retinagate.errors import PermanentError

if TYPE_CHECKING:
    from retinagate.settings import Settings

__all__ = [
    "INPUT_NAME",
    "OOD_OUTPUT",
    "PROVIDERS",
    "Engine",
    "Inference",
    "ModelFileError",
    "ProviderChoice",
    "ProviderError",
    "ProviderPlan",
    "device_uid",
    "file_sha256",
    "inspect_model",
    "provider_plans",
]

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
#: The optional output: one out-of-distribution score per image (larger: further from training).
OOD_OUTPUT = "ood_score"
ProviderChoice = Literal["auto", "cpu", "cuda", "tensorrt"]
CudnnSearch = Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"]

#: ONNX Runtime's name for each provider choice, in the order ``auto`` tries them.
PROVIDERS: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_GPU_PROVIDERS = frozenset({PROVIDERS["tensorrt"], PROVIDERS["cuda"]})


class ModelFileError(PermanentError, ValueError):
    """The file is not a RetinaGate model: unreadable, no or invalid card, or a graph that disagrees with it."""


class ProviderError(RuntimeError):
    """The requested ONNX Runtime provider is not available or failed to start."""


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def device_uid(sha256: str) -> str:
    """A DICOM UID (``2.25.<int>``) derived from a model's sha256: same file, same Device UID.

    A ``2.25`` UID is a UUID written as an integer (ISO/IEC 9834-8); a name-based (version 5) UUID of
    the hash makes it deterministic. (pydicom's ``generate_uid(prefix=None, ...)`` ignores its
    entropy sources and returns a random UUID, so it cannot serve here.)

    Raises:
        ValueError: If ``sha256`` is not 64 hex digits.
    """
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256.lower()):
        raise ValueError(f"sha256: expected 64 hex digits, got {sha256!r}")
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'retinagate-model-sha256:{sha256.lower()}').int}"


@dataclass(frozen=True)
class Inference:
    """The model's outputs for a batch.

    Attributes:
        probabilities: float32 ``[N, C]``.
        cams: float32 ``[N, C, h, w]``: the raw ReLU(Σ_k W_ck A_k) maps, not normalised.
        ood_scores: float32 ``[N]`` from the graph's ``ood_score`` output, compared with the card's
            ``ood.threshold``; ``None`` when the graph has no such output.
    """

    probabilities: NDArray[np.float32]
    cams: NDArray[np.float32]
    ood_scores: NDArray[np.float32] | None = None


@dataclass(frozen=True)
class ProviderPlan:
    """One attempt at starting a session: providers in order of preference, with their options.

    Attributes:
        providers: ``(name, options)`` pairs, most preferred first; ONNX Runtime places each node on
            the first provider that can run it.
        from_path: Load the model from its file rather than from memory: TensorRT keys its engine
            cache by the model's path.
    """

    providers: tuple[tuple[str, dict[str, Any]], ...]
    from_path: bool = False

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.providers]


def provider_plans(
    choice: ProviderChoice,
    available: Sequence[str],
    *,
    input_size: int,
    batch_size: int,
    cache_dir: Path | None = None,
    cudnn_conv_algo_search: CudnnSearch = "EXHAUSTIVE",
) -> list[ProviderPlan]:
    """The sessions to try, in order, for a provider choice.

    ``auto`` gives TensorRT (falling back to CUDA, then CPU, node by node), then CUDA, then CPU, each
    only where ``available`` lists it; a named choice gives that provider's plan alone.

    Args:
        choice: ``auto``, ``cpu``, ``cuda`` or ``tensorrt``.
        available: What this ONNX Runtime offers (``onnxruntime.get_available_providers()``).
        input_size: The model's square input side (TensorRT's shape profile).
        batch_size: The largest batch (TensorRT's profile; GPU runs always use this size).
        cache_dir: TensorRT engine and timing cache folder (already made per model).
        cudnn_conv_algo_search: cuDNN's convolution algorithm search for CUDA.

    Raises:
        ProviderError: If a named provider is not in ``available``; the message lists what is.
    """
    if choice != "auto" and PROVIDERS[choice] not in available:
        raise ProviderError(
            f"providers: {choice!r} ({PROVIDERS[choice]}) is not available in this ONNX Runtime build; "
            f"available: {', '.join(available)}"
            + ("" if choice == "cpu" else " (GPU providers need the onnxruntime-gpu package and CUDA)")
        )
    cpu: tuple[str, dict[str, Any]] = (PROVIDERS["cpu"], {})
    cuda: tuple[str, dict[str, Any]] = (
        PROVIDERS["cuda"],
        {"device_id": 0, "cudnn_conv_algo_search": cudnn_conv_algo_search, "do_copy_in_default_stream": True},
    )
    plans: list[ProviderPlan] = []
    if choice in ("auto", "tensorrt") and PROVIDERS["tensorrt"] in available:
        # Height and width are fixed by the export; only the batch varies, from 1 to batch_size.
        shape = f"{INPUT_NAME}:{{}}x{input_size}x{input_size}x3"
        trt: dict[str, Any] = {
            "device_id": 0,
            "trt_fp16_enable": True,
            "trt_profile_min_shapes": shape.format(1),
            "trt_profile_opt_shapes": shape.format(batch_size),
            "trt_profile_max_shapes": shape.format(batch_size),
        }
        if cache_dir is not None:
            trt |= {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache_dir),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache_dir),
            }
        fallback = [cuda] if PROVIDERS["cuda"] in available else []
        plans.append(ProviderPlan(((PROVIDERS["tensorrt"], trt), *fallback, cpu), from_path=True))
    if choice in ("auto", "cuda") and PROVIDERS["cuda"] in available:
        plans.append(ProviderPlan((cuda, cpu)))
    if choice in ("auto", "cpu"):
        plans.append(ProviderPlan((cpu,)))
    return plans


#: Images per session run on one CPU thread. Small runs keep a run's activations in the caches:
#: measured on EfficientNet-B0 at 224 px, 13.0 ms per image in runs of 2 against 16.5 ms in runs
#: of 16 (with several threads larger runs win, as they split better).
_CPU_RUN: Final = 2


class Engine:
    """An ONNX Runtime session over one exported RetinaGate model.

    Args:
        path: The ``.onnx`` file written by ``retinagate export``.
        providers: ``auto`` (TensorRT, then CUDA, then CPU), or one of ``cpu``, ``cuda``, ``tensorrt``.
        intra_op_threads: CPU threads for ONNX Runtime; 0 lets it choose (one per core).
        batch_size: Images per session run; :meth:`predict` splits larger inputs (into runs of 2 on
            a single CPU thread, see ``_CPU_RUN``).
        cache_dir: Where TensorRT keeps engines and timing caches (one subfolder per model sha256);
            without it TensorRT rebuilds its engines in every process (minutes).
        cudnn_conv_algo_search: cuDNN convolution algorithm search for CUDA: ``EXHAUSTIVE`` benchmarks
            every algorithm once per input shape (shapes are fixed here, so once per process).
        optimized_model_path: Also write the graph as optimised for this session (CPU inspection aid).
        spin: Let ONNX Runtime's CPU threads busy-wait between operators. Off by default: a worker
            shares its cores with image decoding and other worker processes, and on a busy 2-core
            machine spinning threads made batch 16 twice as slow (26 against 12 ms per image).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ModelFileError: If the file is not an ONNX model with a valid card that matches its graph.
        ProviderError: If a named provider is missing or fails to start; names the available ones.
        ValueError: If an argument is out of range.
    """

    def __init__(
        self,
        path: Path,
        *,
        providers: ProviderChoice = "auto",
        intra_op_threads: int = 0,
        batch_size: int = 16,
        cache_dir: Path | None = None,
        cudnn_conv_algo_search: CudnnSearch = "EXHAUSTIVE",
        optimized_model_path: Path | None = None,
        spin: bool = False,
    ) -> None:
        if providers not in get_args(ProviderChoice):
            raise ValueError(f"providers: {providers!r} is not one of {', '.join(get_args(ProviderChoice))}")
        if not 0 <= intra_op_threads <= 256:
            raise ValueError(f"intra_op_threads: {intra_op_threads} is outside 0-256")
        if not 1 <= batch_size <= 1024:
            raise ValueError(f"batch_size: {batch_size} is outside 1-1024")
        if cudnn_conv_algo_search not in get_args(CudnnSearch):
            raise ValueError(
                f"cudnn_conv_algo_search: {cudnn_conv_algo_search!r} is not one of {', '.join(get_args(CudnnSearch))}"
            )
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        data = self.path.read_bytes()
        self.sha256: str = hashlib.sha256(data).hexdigest()
        self.device_uid: str = device_uid(self.sha256)
        self.batch_size = batch_size
        self._intra_op_threads = intra_op_threads
        self._optimized_model_path = optimized_model_path
        self._spin = spin

        # Card and graph are checked on a plain CPU session first: clear errors for a bad file, and
        # the input size is known before TensorRT needs it for its shape profile.
        self.card, self.cam_size, self.has_ood_score = _inspect(data, self.path)
        self._session = self._open(data, providers, cache_dir, cudnn_conv_algo_search)
        self.providers: list[str] = list(self._session.get_providers())
        self._on_gpu = self.providers[0] in _GPU_PROVIDERS
        logger.info(
            "model %s (%s %s, sha256 %s) on %s",
            self.path.name,
            self.card.name,
            self.card.version,
            self.sha256[:12],
            ", ".join(self.providers),
        )

    @classmethod
    def load(cls, path: Path | None, settings: Settings) -> Engine:
        """Opens ``path`` (or ``settings.model_path``) configured from the settings.

        TensorRT caches go to ``<data_dir>/trt-cache``.

        Raises:
            ValueError: If neither ``path`` nor ``settings.model_path`` is set.
            FileNotFoundError, ModelFileError, ProviderError: As for the constructor.
        """
        model_path = path if path is not None else settings.model_path
        if model_path is None:
            raise ValueError("model_path: no model given; set RETINAGATE_MODEL_PATH or pass the .onnx file")
        return cls(
            model_path,
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads,
            batch_size=settings.batch_size,
            cache_dir=settings.data_dir / "trt-cache",
        )

    @property
    def input_size(self) -> int:
        """Side ``S`` of the square uint8 input the model takes."""
        return self.card.input_size

    @property
    def labels(self) -> tuple[str, ...]:
        """Label names in output order."""
        return self.card.labels

    @property
    def ood_threshold(self) -> float | None:
        """The card's threshold for ``ood_score``; ``None`` when the graph has no such output."""
        return self.card.ood.threshold if self.has_ood_score and self.card.ood is not None else None

    # Session set-up.

    def _session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self._intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only: node placement notes are routine
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self._spin else "0")
        if self._optimized_model_path is not None:
            options.optimized_model_filepath = str(self._optimized_model_path)
        return options

    def _open(
        self, data: bytes, choice: ProviderChoice, cache_dir: Path | None, cudnn_search: CudnnSearch
    ) -> ort.InferenceSession:
        available = ort.get_available_providers()
        # One cache folder per model: TensorRT names cached engines after the model path, so a file
        # replaced in place must not pick up the old model's engine.
        trt_cache = Path(cache_dir) / self.sha256 if cache_dir is not None else None
        plans = provider_plans(
            choice,
            available,
            input_size=self.card.input_size,
            batch_size=self.batch_size,
            cache_dir=trt_cache,
            cudnn_conv_algo_search=cudnn_search,
        )
        failures: list[str] = []
        for plan in plans:
            if plan.from_path and trt_cache is not None:
                trt_cache.mkdir(parents=True, exist_ok=True)
            try:
                session = ort.InferenceSession(
                    str(self.path) if plan.from_path else data,
                    sess_options=self._session_options(),
                    providers=plan.names,
                    provider_options=[options for _, options in plan.providers],
                    enable_fallback=0,  # we fall back ourselves, and log instead of printing
                )
            except Exception as exc:  # onnxruntime raises its own Fail/EPFail/... classes
                failures.append(f"{plan.names[0]}: {_first_line(exc)}")
                logger.warning("provider %s failed to start: %s", plan.names[0], _first_line(exc))
                continue
            active = session.get_providers()
            if active[0] != plan.names[0]:
                failures.append(f"{plan.names[0]}: not active after start (active: {', '.join(active)})")
                logger.warning("provider %s is not active after start", plan.names[0])
                continue
            return session
        raise ProviderError(
            f"providers: could not start {choice!r}: {'; '.join(failures) or 'nothing to try'}; "
            f"available: {', '.join(available)}"
        )

    # Inference.

    def predict(self, images: NDArray[np.uint8]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Scores a batch of prepared images: :meth:`infer`'s probabilities and CAMs.

        Returns:
            ``probabilities`` float32 ``[N, C]`` and ``cams`` float32 ``[N, C, h, w]``.

        Raises:
            TypeError, ValueError: As for :meth:`infer`.
        """
        result = self.infer(images)
        return result.probabilities, result.cams

    def infer(self, images: NDArray[np.uint8]) -> Inference:
        """Scores a batch of prepared images, with the out-of-distribution score when the graph has one.

        Args:
            images: uint8 ``[N, S, S, 3]`` RGB, ``S`` = the card's input size (see
                :func:`retinagate.preprocess.prepare`). Split into runs of ``batch_size``.

        Returns:
            The :class:`Inference`: probabilities, raw CAMs and ``ood_scores`` (``None`` for a graph
            without an ``ood_score`` output).

        Raises:
            TypeError: If ``images`` is not a numpy array.
            ValueError: If its dtype or shape is not uint8 ``[N, S, S, 3]``.
        """
        size = self.card.input_size
        if not isinstance(images, np.ndarray):
            raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(
                f"images: got {images.dtype} {list(images.shape)}; expected uint8 [N, {size}, {size}, 3] "
                "(RGB, prepared to the model card's input size)"
            )
        count = images.shape[0]
        probabilities = np.empty((count, self.card.num_labels), dtype=np.float32)
        cams = np.empty((count, self.card.num_labels, *self.cam_size), dtype=np.float32)
        ood = np.empty((count,), dtype=np.float32) if self.has_ood_score else None
        step = self.batch_size if self._on_gpu or self._intra_op_threads != 1 else min(self.batch_size, _CPU_RUN)
        for start in range(0, count, step):
            stop = min(start + step, count)
            outputs = self._run(images[start:stop])
            probabilities[start:stop], cams[start:stop] = outputs[0], outputs[1]
            if ood is not None:
                ood[start:stop] = outputs[2]
        return Inference(probabilities, cams, ood)

    def _run(self, batch: NDArray[np.uint8]) -> list[NDArray[np.float32]]:
        """One session run: probabilities, CAMs and (when the graph has it) the ood score, unpadded."""
        count = batch.shape[0]
        if self._on_gpu and count < self.batch_size:
            # One fixed shape on the GPU: TensorRT and cuDNN tune once, not per leftover size.
            padded = np.zeros((self.batch_size, *batch.shape[1:]), dtype=np.uint8)
            padded[:count] = batch
            batch = padded
        batch = np.ascontiguousarray(batch)
        names = ["probabilities", "cam", OOD_OUTPUT] if self.has_ood_score else ["probabilities", "cam"]
        if self._on_gpu:
            # IO binding: the uint8 batch goes to the device once, outputs stay there until copied back.
            binding = self._session.io_binding()
            binding.bind_cpu_input(INPUT_NAME, batch)
            for name in names:
                binding.bind_output(name, "cuda")
            self._session.run_with_iobinding(binding)
            outputs = binding.copy_outputs_to_cpu()
        else:
            outputs = self._session.run(names, {INPUT_NAME: batch})
        return [np.asarray(output, dtype=np.float32)[:count] for output in outputs]

    def warmup(self, runs: int = 1) -> float:
        """Runs the model on black images so the first real request does not pay for set-up.

        GPU providers build TensorRT engines and choose cuDNN algorithms on the first run.

        Returns:
            Seconds the last warm-up run took.
        """
        size = self.card.input_size
        batch = np.zeros((self.batch_size if self._on_gpu else 1, size, size, 3), dtype=np.uint8)
        elapsed = 0.0
        for _ in range(max(1, runs)):
            started = time.perf_counter()
            self._run(batch)
            elapsed = time.perf_counter() - started
        return elapsed

    def describe(self) -> dict[str, Any]:
        """What is loaded, for logs and ``--json`` output (no patient data)."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "device_uid": self.device_uid,
            "name": self.card.name,
            "version": self.card.version,
            "precision": self.card.precision,
            "input_size": self.card.input_size,
            "labels": len(self.card.labels),
            "cam_size": list(self.cam_size),
            "ood_score": self.has_ood_score,
            "providers": list(self.providers),
            "batch_size": self.batch_size,
        }


def _parse_card(text: str | None, path: Path) -> ModelCard:
    if not text:
        raise ModelFileError(
            f"{path}: no model card in the ONNX metadata (key {CARD_METADATA_KEY!r}); export the model with "
            "`retinagate export`"
        )
    try:
        return ModelCard.from_json(text)
    except ValueError as exc:
        raise ModelFileError(f"{path}: {exc}") from None


def inspect_model(path: Path) -> tuple[str, ModelCard]:
    """The sha256 and the card of an exported model file, checked as the engine checks them, without
    an inference session (``retinagate models register``, a worker's start-up check).

    Raises:
        FileNotFoundError: When the file does not exist.
        ModelFileError: When it is not an exported RetinaGate model (a ``.pt`` checkpoint, say).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    data = path.read_bytes()
    card, _, _ = _inspect(data, path)
    return hashlib.sha256(data).hexdigest(), card


def _inspect(data: bytes, path: Path) -> tuple[ModelCard, tuple[int, int], bool]:
    """Reads the card and checks the graph against it.

    Returns:
        The card, the CAM's ``(h, w)`` and whether the graph has the ``ood_score`` output.
    """
    export_hint = f"make the ONNX model from it with `retinagate export --checkpoint {path} --out model.onnx`"
    if _is_pytorch_checkpoint(data):
        raise ModelFileError(f"{path}: a PyTorch checkpoint, not an exported model; {export_hint}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=[PROVIDERS["cpu"]], enable_fallback=0)
    except Exception as exc:  # InvalidProtobuf, InvalidArgument, InvalidGraph, Fail...
        hint = f"; if it is a PyTorch checkpoint, {export_hint}" if path.suffix.lower() in (".pt", ".pth") else ""
        raise ModelFileError(f"{path}: not a loadable ONNX model ({_first_line(exc)}){hint}") from None
    card = _parse_card(session.get_modelmeta().custom_metadata_map.get(CARD_METADATA_KEY), path)
    size, count = card.input_size, card.num_labels
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or inputs[0].type != "tensor(uint8)":
        found = ", ".join(f"{i.name} {i.type}" for i in inputs)
        raise ModelFileError(f"{path}: expected one input '{INPUT_NAME}' tensor(uint8), found {found}")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1:] != [size, size, 3]:
        raise ModelFileError(f"{path}: input '{INPUT_NAME}' has shape {shape}; the card needs [N, {size}, {size}, 3]")
    outputs = {o.name: list(o.shape) for o in session.get_outputs()}
    for name in ("probabilities", "cam"):
        if name not in outputs:
            raise ModelFileError(f"{path}: the graph has no output '{name}' (outputs: {', '.join(outputs)})")
    probabilities, cam = outputs["probabilities"], outputs["cam"]
    if len(probabilities) != 2 or probabilities[1] != count:
        raise ModelFileError(f"{path}: output 'probabilities' has shape {probabilities}; the card names {count} labels")
    if len(cam) != 4 or cam[1] != count or not all(isinstance(d, int) and d > 0 for d in cam[2:]):
        raise ModelFileError(f"{path}: output 'cam' has shape {cam}; expected [N, {count}, h, w] with fixed h, w")
    has_ood = OOD_OUTPUT in outputs
    if has_ood and len(outputs[OOD_OUTPUT]) != 1:
        raise ModelFileError(f"{path}: output '{OOD_OUTPUT}' has shape {outputs[OOD_OUTPUT]}; expected [N]")
    # The score means nothing without the card's threshold, and a card with statistics promises it.
    if has_ood and card.ood is None:
        raise ModelFileError(f"{path}: the graph has an '{OOD_OUTPUT}' output but the card has no 'ood' statistics")
    if card.ood is not None and not has_ood:
        raise ModelFileError(f"{path}: the card has 'ood' statistics but the graph has no '{OOD_OUTPUT}' output")
    return card, (int(cam[2]), int(cam[3])), has_ood


def _is_pytorch_checkpoint(data: bytes) -> bool:
    """``torch.save`` output: a zip archive (its format since PyTorch 1.6) or a bare pickle (protocol 2
    and up). A serialised ONNX model starts with neither: its first byte is the tag of a field
    numbered below 16."""
    return data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
