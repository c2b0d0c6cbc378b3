"""The scoring pipeline: files in, probabilities, findings and DICOM outputs out.

Each input goes through the same stages, timed separately: **decode** (:mod:`retinagate.decode`,
DCT-scaled for JPEG), **preprocess** (the field of view found once per frame, the gradability gate's
checks on it, :func:`retinagate.gate.assess`, and :func:`retinagate.preprocess.prepare_with_geometry`,
the function training uses), **infer** (one batched :meth:`Engine.infer` call per chunk of inputs),
**render** (the heatmap picture) and **encode** (the Secondary Capture, SR and Parametric Map,
encoded once as Part 10 bytes that the caller writes as they are). Decoding and rendering run on a
small thread pool: libjpeg-turbo, OpenCV and NumPy release the GIL, so two threads keep both cores
of a small machine busy; ONNX Runtime has its own threads.

Results come back in input order, one per input: a :class:`ScoreResult`, or a :class:`ScoreFailure`
naming the input and the reason (an unreadable file never stops the batch). The caller writes the
encoded outputs (the worker durably into storage, the CLI into ``--out``).

Decisions worth knowing:

* **Gradability.** With ``settings.gate`` on (the default), a frame that fails the gate
  (:mod:`retinagate.gate`: no circular field of view, not colour, out of focus, badly exposed, or an
  ``ood_score`` over the card's threshold) is not graded. An input none of whose frames can be graded
  gets the status ``ungradable`` with the reasons: no probabilities, no findings, an SC that shows the
  photograph with "Not graded: <reason>" and no heat, an SR that says "not graded" and why, no
  Parametric Map. Frames that fail the decode checks are not even run through the model.
* **Findings** are the labels whose probability reaches the card's threshold (compared unrounded),
  most probable first. ``Disease_Risk`` counts as a finding like any other label (it is one of the
  model's decisions and readers triage on it), but the markers of the Secondary Capture and the map of
  the Parametric Map go to disease findings: "any abnormality" has no single place to point at. When no
  disease label is a finding, both show the Disease_Risk map instead (on the SC unmarked, under "No
  finding above threshold"). Probabilities are printed so that they never read on the other side of
  the threshold (:func:`retinagate.outputs.findings.probability_text`). Heat is drawn on the retina
  only (:func:`retinagate.outputs.render.retina_heat`).
* **Multi-frame** instances are scored frame by frame; the instance's probability for a label is its
  highest over the gradable frames, the SR records every gradable frame, and the Secondary Capture
  shows the gradable frame with the most probable disease label. Frames left out are named in
  ``reasons`` (``frame 2: out of focus``) while the instance is still ``scored``.
* **Plain PNG/JPEG files** have no patient or study. They get a synthetic, anonymous identity derived
  from the file's content (patient ID ``RG-<sha256 prefix>``, study and source UIDs from the sha256),
  so a re-run gives the same UIDs. The Secondary Capture then holds the only DICOM copy of the
  photograph, so the SR's measurements refer to it; no Parametric Map is made (it must share the
  geometry of a DICOM source image).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from retinagate import gate
from retinagate.decode import DecodedImage, decode_path
from retinagate.errors import InputError, PermanentError
from retinagate.labels import DISEASE_RISK
from retinagate.outputs import registry
from retinagate.outputs.findings import findings_of
from retinagate.outputs.identity import ModelIdentity, derived_uid
from retinagate.outputs.kind import BuiltOutput, FrameScores, ScoredPhotograph
from retinagate.preprocess import FieldOfView, Geometry, find_fov, prepare_with_geometry

if TYPE_CHECKING:
    from retinagate.card import ModelCard
    from retinagate.engine import Inference
    from retinagate.settings import Settings

__all__ = ["Pipeline", "ScoreFailure", "ScoreResult", "Scorer", "findings_of"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Stages timed for every input, in order.
STAGES = ("decode", "preprocess", "infer", "render", "encode")


class Scorer(Protocol):
    """What the pipeline needs from an engine (:class:`retinagate.engine.Engine` provides it)."""

    card: ModelCard
    sha256: str
    device_uid: str

    @property
    def ood_threshold(self) -> float | None: ...

    def infer(self, images: NDArray[np.uint8]) -> Inference: ...


@dataclass(frozen=True)
class ScoreResult:
    """One scored input.

    Attributes:
        source: The input, as given.
        sop_instance_uid: The source's SOP Instance UID; ``None`` for a PNG or JPEG file.
        probabilities: Label to probability (for multi-frame input, the highest over the gradable
            frames); empty when ``ungradable``.
        findings: Labels at or over their threshold, most probable first; empty when ``ungradable``.
        timings: Seconds per stage (``decode``, ``preprocess``, ``infer``, ``render``, ``encode``)
            and ``total``.
        built: The outputs, in build order (:class:`retinagate.outputs.BuiltOutput`): Part 10 bytes to
            be written as they are, with their UIDs. SOP Instance UIDs derive from (source SOP
            Instance UID, model sha256, kind, and a Parametric Map's label).
        frame_probabilities: Per frame, label to probability (one entry for single-frame input).
        model_sha256: sha256 of the model file that scored it.
        status: ``scored``, or ``ungradable`` when the gradability gate refused every frame.
        reasons: Why it was not graded (:mod:`retinagate.gate`'s reasons, in check order); for a
            scored multi-frame input, the frames left out (``frame 2: out of focus``). Empty otherwise.
        quality: The gate's measures of the frame shown (or, ungradable, of the first frame):
            field of view, colour, sharpness, exposure and ``ood_score``; empty with the gate off.
    """

    source: str
    sop_instance_uid: str | None
    probabilities: dict[str, float]
    findings: list[str]
    timings: dict[str, float]
    built: tuple[BuiltOutput, ...] = ()
    frame_probabilities: list[dict[str, float]] = field(default_factory=list)
    model_sha256: str = ""
    status: gate.Status = "scored"
    reasons: list[str] = field(default_factory=list)
    quality: dict[str, float] = field(default_factory=dict)

    @property
    def gradable(self) -> bool:
        """Whether it was graded (``status == "scored"``)."""
        return self.status == "scored"

    @cached_property
    def outputs(self) -> Mapping[str, Dataset]:
        """Output datasets by key (the kind, and for a Parametric Map its label: ``pm.DR``), in build
        order; one built only as bytes (the SR) is read on first look-up. They may share elements
        with the encoders' templates: read them, do not change them."""
        return _Outputs(self.built)

    @property
    def encoded(self) -> dict[str, bytes]:
        """Part 10 bytes of each output, by key."""
        return {output.key: output.data for output in self.built}

    @property
    def output_uids(self) -> dict[str, str]:
        """SOP Instance UID of each output, by key."""
        return {output.key: output.sop_instance_uid for output in self.built}

    def summary(self) -> dict[str, Any]:
        """Plain data for JSON output: no datasets, no patient data."""
        return {
            "source": self.source,
            "status": self.status,
            "reasons": list(self.reasons),
            "quality": dict(self.quality),
            "sop_instance_uid": self.sop_instance_uid,
            "model_sha256": self.model_sha256,
            "findings": list(self.findings),
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
            "frames": len(self.frame_probabilities),
            "outputs": self.output_uids,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
        }


@dataclass(frozen=True)
class ScoreFailure:
    """An input that could not be scored.

    Attributes:
        source: The input, as given.
        error: What went wrong, for a person to read (no patient data).
        permanent: True when retrying cannot help (bad or unsupported input).
    """

    source: str
    error: str
    permanent: bool

    def summary(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {"source": self.source, "status": "failed", "error": self.error, "permanent": self.permanent}


@dataclass
class _Prepared:
    """An input after decode and preprocess, waiting for the model."""

    source: str
    decoded: DecodedImage
    #: Model inputs of the frames to run through the model (``frames``), in that order.
    inputs: NDArray[np.uint8]
    geometries: list[Geometry]
    header: Dataset
    references_source: bool
    timings: dict[str, float]
    #: Per frame: its field of view and the gate's verdict on the decode checks (``None``: gate off).
    fovs: list[FieldOfView]
    verdicts: list[gate.Verdict | None]
    #: Indices of the frames in ``inputs``: all of them, less those the decode checks refused.
    frames: list[int]


def _synthetic_header(content_sha256: str) -> Dataset:
    """An anonymous patient and study for a PNG or JPEG file, derived from its content."""
    header = Dataset()
    header.PatientName = "ANONYMOUS^RETINAGATE"
    header.PatientID = f"RG-{content_sha256[:16]}"
    header.PatientBirthDate = ""
    header.PatientSex = "O"
    header.StudyInstanceUID = derived_uid("plain-study", content_sha256)
    header.SOPInstanceUID = derived_uid("plain-image", content_sha256)
    header.StudyID = "RG"
    header.AccessionNumber = ""
    header.StudyDate = ""
    header.StudyTime = ""
    header.ReferringPhysicianName = ""
    return header


class Pipeline:
    """Scores files with one engine and writes nothing itself.

    Args:
        engine: The model (an :class:`retinagate.engine.Engine` or anything with the same surface).
        settings: Gives ``outputs``, ``display_long_side``, ``top_findings``, ``max_pixels``,
            ``batch_size`` (inputs per inference call) and ``gate`` (the gradability gate, on or off).
        threads: Threads for decoding and rendering (default 2: both cores of a small machine).

    Raises:
        ValueError: If ``threads`` is not 1 to 64.
    """

    def __init__(self, engine: Scorer, settings: Settings, *, threads: int = 2) -> None:
        if not 1 <= threads <= 64:
            raise ValueError(f"threads is {threads}; expected 1 to 64")
        self.engine = engine
        self.settings = settings
        self.model = ModelIdentity.of(engine)
        self._outputs = tuple(settings.outputs)
        self._gate = settings.gate == "on"
        self._kinds = registry.create(self.model, settings)
        self._display = any(registry.kind_class(name).display_resolution for name in self._outputs)
        # Two pools, so that rendering and encoding one chunk (mostly Python, holding the GIL) runs
        # while the next chunk is decoded (libjpeg-turbo, OpenCV: no GIL) and inferred.
        self._loaders = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="retinagate-decode")
        self._finishers = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="retinagate-encode")

    def warmup(self) -> float:
        """Scores one small synthetic photograph, so that the first real one does not pay for set-up.

        The first image of a process otherwise waits for the runtime's first run and for the SC and
        SR templates (built with highdicom once per kind of source, about a second). The photograph
        is a 512 x 384 Ophthalmic Photography file shipped with the package (``retinagate/data/
        warmup.dcm``, drawn once by the development generator under a synthetic identity), so the
        serving path never loads the generator. Nothing is kept or written. Returns the seconds it took.

        Raises:
            RuntimeError: If the photograph could not be scored (a broken model or setup).
        """
        from importlib.resources import as_file, files

        started = time.perf_counter()
        with as_file(files("retinagate") / "data" / "warmup.dcm") as path:
            (result,) = self.score_paths([path])
        if isinstance(result, ScoreFailure):
            raise RuntimeError(f"the warm-up photograph could not be scored: {result.error}")
        return time.perf_counter() - started

    def close(self) -> None:
        """Stops the thread pools."""
        self._loaders.shutdown(wait=True)
        self._finishers.shutdown(wait=True)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Public entry points.

    def score_paths(self, paths: Sequence[Path | str]) -> list[ScoreResult | ScoreFailure]:
        """Scores DICOM, PNG and JPEG files; one result per path, in order."""
        return list(self.iter_score(paths))

    def iter_score(self, paths: Iterable[Path | str]) -> Iterator[ScoreResult | ScoreFailure]:
        """Like :meth:`score_paths`, yielding results in order as their chunk of inputs is done.

        Chunks of ``batch_size`` inputs are pipelined: while one chunk's outputs are rendered and
        encoded, the next chunk is decoded and scored.
        """
        pending: list[Future[ScoreResult | ScoreFailure]] = []
        chunk: list[str] = []
        for path in paths:
            chunk.append(str(path))
            if len(chunk) >= self.settings.batch_size:
                started = self._start_chunk(chunk, self._load_path)
                yield from (future.result() for future in pending)
                pending, chunk = started, []
        if chunk:
            started = self._start_chunk(chunk, self._load_path)
            yield from (future.result() for future in pending)
            pending = started
        yield from (future.result() for future in pending)

    def score_arrays(self, images: Sequence[tuple[str, NDArray[np.uint8]]]) -> list[ScoreResult | ScoreFailure]:
        """Scores in-memory RGB photographs ``(name, (H, W, 3) uint8)`` like plain image files."""
        names = [name for name, _ in images]
        arrays = dict(images)
        futures = self._start_chunk(names, lambda name: self._load_array(name, arrays[name]))
        return [future.result() for future in futures]

    # Stages.

    def _load_path(self, source: str) -> _Prepared:
        size = self.engine.card.input_size
        if self._gate:
            size = max(size, gate.MIN_DECODE_SIDE)  # the gate measures focus at a fixed resolution
        long_side = self.settings.display_long_side if self._display else 0
        decoded = decode_path(source, min_side=size, max_pixels=self.settings.max_pixels, min_long_side=long_side)
        return self._prepare(source, decoded)

    def _load_array(self, name: str, image: NDArray[np.uint8]) -> _Prepared:
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"{name}: expected an (H, W, 3) uint8 RGB array")
        decoded = DecodedImage(
            frames=[np.ascontiguousarray(image)],
            source_shape=(image.shape[0], image.shape[1]),
            scale=1,
            header=None,
            source=name,
            timings={"decode": 0.0},
            content_sha256=hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest(),
        )
        return self._prepare(name, decoded)

    def _prepare(self, source: str, decoded: DecodedImage) -> _Prepared:
        started = time.perf_counter()
        preprocessing = self.engine.card.preprocessing
        fovs = [find_fov(frame, preprocessing.fov_threshold) for frame in decoded.frames]
        verdicts: list[gate.Verdict | None] = [
            gate.assess(frame, threshold=preprocessing.fov_threshold, fov=fov, limits=self.engine.card.gate)
            if self._gate
            else None
            for frame, fov in zip(decoded.frames, fovs, strict=True)
        ]
        frames = [i for i, verdict in enumerate(verdicts) if verdict is None or verdict.gradable]
        geometries, inputs = [], []
        cam = self.engine.card.cam_grid()  # where the served CAM's cells sit
        for frame, fov in zip(decoded.frames, fovs, strict=True):
            array, geometry = prepare_with_geometry(frame, preprocessing, fov=fov)
            geometries.append(geometry.with_cam(cam))
            inputs.append(array)
        size = preprocessing.input_size
        batch = np.stack([inputs[i] for i in frames]) if frames else np.empty((0, size, size, 3), dtype=np.uint8)
        timings = {
            "decode": decoded.timings.get("decode", 0.0) + decoded.timings.get("read", 0.0),
            "preprocess": time.perf_counter() - started,
        }
        if decoded.header is not None:
            header, references = decoded.header, True
        else:
            content = decoded.content_sha256 or hashlib.sha256(source.encode()).hexdigest()
            header, references = _synthetic_header(content), False
        return _Prepared(source, decoded, batch, geometries, header, references, timings, fovs, verdicts, frames)

    def _start_chunk(
        self, sources: list[str], load: Callable[[str], _Prepared]
    ) -> list[Future[ScoreResult | ScoreFailure]]:
        """Decodes and scores one chunk now; returns futures of its results, in order, still encoding."""
        loaded = list(self._loaders.map(lambda source: _guard(source, partial(load, source)), sources))
        ready = [item for item in loaded if isinstance(item, _Prepared)]
        size, count = self.engine.card.input_size, self.engine.card.num_labels
        probabilities: NDArray[np.float32] = np.empty((0, count), dtype=np.float32)
        cams: NDArray[np.float32] = np.empty((0,), dtype=np.float32)
        ood: NDArray[np.float32] | None = None
        infer_s = 0.0
        batch = np.concatenate([item.inputs for item in ready]) if ready else np.empty((0, size, size, 3), np.uint8)
        if len(batch):
            started = time.perf_counter()
            inference = self.engine.infer(batch)
            probabilities, cams, ood = inference.probabilities, inference.cams, inference.ood_scores
            infer_s = time.perf_counter() - started
        total_frames = max(1, len(batch))
        futures: list[Future[ScoreResult | ScoreFailure]] = []
        offset = 0
        for item in loaded:
            if not isinstance(item, _Prepared):
                done: Future[ScoreResult | ScoreFailure] = Future()
                done.set_result(item)
                futures.append(done)
                continue
            rows = slice(offset, offset + len(item.inputs))
            work = partial(self._finish, item, probabilities[rows], cams[rows], None if ood is None else ood[rows],
                           infer_s * len(item.inputs) / total_frames)  # fmt: skip
            futures.append(self._finishers.submit(_guard, item.source, work))
            offset += len(item.inputs)
        return futures

    def _verdicts(self, item: _Prepared, ood: NDArray[np.float32] | None) -> list[gate.Verdict | None]:
        """Each frame's verdict with the model's ``ood_score`` added for the frames it ran on."""
        verdicts = list(item.verdicts)
        threshold = self.engine.ood_threshold
        if ood is None or threshold is None or not self._gate:
            return verdicts
        for row, frame in enumerate(item.frames):
            verdict = verdicts[frame]
            if verdict is not None:
                verdicts[frame] = gate.with_ood(verdict, float(ood[row]), threshold)
        return verdicts

    def _finish(
        self,
        item: _Prepared,
        probabilities: NDArray[np.float32],
        cams: NDArray[np.float32],
        ood: NDArray[np.float32] | None,
        infer_s: float,
    ) -> ScoreResult:
        verdicts = self._verdicts(item, ood)
        # Rows of the model's outputs for the frames that are graded.
        graded = [(row, frame) for row, frame in enumerate(item.frames)
                  if (verdict := verdicts[frame]) is None or verdict.gradable]  # fmt: skip
        timings = dict(item.timings)
        timings["infer"] = infer_s
        if not graded:
            return self._finish_ungradable(item, verdicts, timings)

        card = self.engine.card
        labels, thresholds = card.labels, card.thresholds
        frame_probs = [
            {name: float(p) for name, p in zip(labels, probabilities[row], strict=True)} for row, _ in graded
        ]
        instance = {name: max(frame[name] for frame in frame_probs) for name in labels}
        findings = findings_of(instance, labels, thresholds)
        disease = [i for i, name in enumerate(labels) if name != DISEASE_RISK]
        # The frame shown: the graded one with the most probable disease label.
        pick = int(np.argmax([probabilities[row, disease].max() for row, _ in graded])) if disease else 0
        key_row, key = graded[pick]
        multi = item.decoded.number_of_frames > 1
        key_probs = frame_probs[pick]
        ranked = sorted(disease, key=lambda i: (-float(probabilities[key_row, i]), i))
        shown = [i for i in ranked if key_probs[labels[i]] >= thresholds[i]][: self.settings.top_findings]
        # With no disease finding, the Disease_Risk map stands in (unmarked unless it is a finding itself).
        mapped = shown or ([labels.index(DISEASE_RISK)] if DISEASE_RISK in labels else ranked[:1])
        left_out = [f"frame {frame + 1}: {'; '.join(verdict.reasons)}" for frame, verdict in enumerate(verdicts)
                    if verdict is not None and not verdict.gradable]  # fmt: skip
        key_verdict = verdicts[key]
        rows = {frame: row for row, frame in graded}
        frame_scores = []
        for index, verdict in enumerate(verdicts):
            number = (index + 1) if multi else None
            if index in rows:
                frame_scores.append(FrameScores(probabilities[rows[index]].tolist(), number))
            elif verdict is not None:
                frame_scores.append(FrameScores((), number, not_graded=tuple(verdict.reasons)))
        photo = self._photograph(item, frame_scores, timings)
        photo.shown_frame, photo.probabilities, photo.cams = key, key_probs, cams[key_row]
        photo.shown, photo.mapped = tuple(labels[i] for i in shown), tuple(labels[i] for i in mapped)
        built = self._build(photo)
        timings["total"] = sum(timings[stage] for stage in STAGES)
        return ScoreResult(
            source=item.source,
            sop_instance_uid=str(item.header.SOPInstanceUID) if item.references_source else None,
            probabilities=instance,
            findings=findings,
            timings=timings,
            built=built,
            frame_probabilities=frame_probs,
            model_sha256=self.model.sha256,
            status="scored",
            reasons=left_out,
            quality=dict(key_verdict.measures) if key_verdict is not None else {},
        )

    def _finish_ungradable(
        self, item: _Prepared, verdicts: list[gate.Verdict | None], timings: dict[str, float]
    ) -> ScoreResult:
        """The result of an input none of whose frames the gate let through: reasons, no findings."""
        reasons = list(
            dict.fromkeys(reason for verdict in verdicts if verdict is not None for reason in verdict.reasons)
        )
        first = verdicts[0]
        multi = item.decoded.number_of_frames > 1
        frame_scores = [
            FrameScores((), (index + 1) if multi else None, not_graded=tuple(verdict.reasons))
            for index, verdict in enumerate(verdicts)
            if verdict is not None
        ]
        photo = self._photograph(item, frame_scores, timings)
        photo.reasons = tuple(reasons)
        built = self._build(photo)
        timings["total"] = sum(timings.get(stage, 0.0) for stage in STAGES)
        logger.info("input %s not graded: %s", _tag(item.source), "; ".join(reasons))
        return ScoreResult(
            source=item.source,
            sop_instance_uid=str(item.header.SOPInstanceUID) if item.references_source else None,
            probabilities={},
            findings=[],
            timings=timings,
            built=built,
            model_sha256=self.model.sha256,
            status="ungradable",
            reasons=reasons,
            quality=dict(first.measures) if first is not None else {},
        )

    def _photograph(
        self, item: _Prepared, frame_scores: list[FrameScores], timings: dict[str, float]
    ) -> ScoredPhotograph:
        """What the output kinds are built from; the caller adds the scores and heat, or the reasons."""
        return ScoredPhotograph(
            header=item.header,
            references_source=item.references_source,
            model=self.model,
            settings=self.settings,
            decoded=item.decoded,
            geometries=item.geometries,
            fovs=item.fovs,
            frame_scores=frame_scores,
            timings=timings,
        )

    def _build(self, photo: ScoredPhotograph) -> tuple[BuiltOutput, ...]:
        """Builds the kinds the settings ask for (and those they require), in the registry's order.

        The time goes to ``encode``, less what the kinds spent drawing, which they add to ``render``.
        """
        started = time.perf_counter()
        photo.timings["render"] = 0.0
        for name in registry.plan(self._outputs, photo.references_source):
            photo.built.extend(self._kinds[name].build(photo))
        photo.timings["encode"] = time.perf_counter() - started - photo.timings["render"]
        return tuple(photo.built)


class _Outputs(Mapping[str, Dataset]):
    """Output datasets by key (:attr:`BuiltOutput.key`), in build order; one held as bytes only is read on first use."""

    def __init__(self, built: Sequence[BuiltOutput]) -> None:
        self._built = {output.key: output for output in built}
        self._datasets: dict[str, Dataset] = {}

    def __getitem__(self, key: str) -> Dataset:
        if key not in self._datasets:
            self._datasets[key] = self._built[key].read()
        return self._datasets[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built)

    def __len__(self) -> int:
        return len(self._built)


def _guard(source: str, work: Callable[[], _T]) -> _T | ScoreFailure:
    """Runs one input's stage, turning its errors into a :class:`ScoreFailure` for that input."""
    try:
        return work()
    except PermanentError as exc:
        logger.info("input %s refused: %s", _tag(source), exc)
        return ScoreFailure(source, str(exc), permanent=True)
    except (ValueError, TypeError) as exc:
        logger.info("input %s refused: %s", _tag(source), exc)
        return ScoreFailure(source, f"{type(exc).__name__}: {exc}", permanent=True)
    except MemoryError:
        logger.warning("input %s: out of memory", _tag(source))
        return ScoreFailure(source, "out of memory while scoring", permanent=False)
    except OSError as exc:
        logger.warning("input %s: %s", _tag(source), type(exc).__name__)
        return ScoreFailure(source, f"{type(exc).__name__}: {exc}", permanent=False)


def _tag(source: str) -> str:
    """A short internal id for an input in logs: paths and file names may carry patient data."""
    return hashlib.sha256(source.encode("utf-8", "replace")).hexdigest()[:12]
