"""The ``score`` subcommand: the scoring pipeline on files, with no queue and no database.

Only the standard library is imported at module level; the pipeline, ONNX Runtime and highdicom load
when the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retinagate.settings import Settings

__all__ = ["collect_inputs", "register"]

#: Suffixes picked up when walking a folder (plus any file that starts like DICOM).
IMAGE_SUFFIXES = frozenset({".dcm", ".dicom", ".png", ".jpg", ".jpeg"})


def register(subparsers: Any) -> None:
    """Adds ``retinagate score``."""
    from retinagate.outputs import registry  # the kinds' names only: no writer is loaded

    score = subparsers.add_parser(
        "score",
        help="score DICOM, PNG or JPEG files and write heatmap SC, SR (and PM) files",
        description=(
            "Scores fundus photographs with an exported RetinaGate model: DICOM files (any transfer "
            "syntax the gateway accepts) and plain PNG/JPEG files, or folders of them (searched "
            "recursively). For each input it writes a heatmap Secondary Capture and a Structured "
            "Report (and a Parametric Map with --outputs sc,sr,pm) into --out, named after the input. "
            "Unreadable inputs are reported by name and the batch goes on. A photograph the gradability "
            "gate refuses (no circular field of view, not colour, out of focus, badly exposed, unlike the "
            "training photographs; RETINAGATE_GATE=off turns it off) is reported as not graded, with the "
            "reasons, and its SC and SR say so. RetinaGate's own outputs (heatmap SC, SR, Parametric "
            "Map, such as the .sc.dcm files this command writes) are skipped with a message, never "
            "scored: scoring a heatmap would only make a heatmap of a heatmap.\n\n"
            "Exit status: 0 all read (scored, not graded or skipped), 1 some inputs failed, 2 bad usage, "
            "3 model file missing."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders to score")
    score.add_argument("--model", type=Path, default=None, help="exported .onnx model (default: RETINAGATE_MODEL_PATH)")
    score.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the DICOM outputs")
    score.add_argument(
        "--outputs",
        default=None,
        metavar="KINDS",
        help=f"comma list of {', '.join(registry.names())} (default: the outputs setting)",
    )
    score.add_argument("--json", action="store_true", help="print one JSON line per input instead of a table")
    score.set_defaults(handler=_score)


def collect_inputs(paths: Sequence[Path]) -> list[Path]:
    """Expands folders (recursively, sorted) into image files; files given by name are kept as given.

    In folders, files with a DICOM, PNG or JPEG suffix are taken, and files without one when their
    first bytes are DICOM's; hidden files and folders are skipped.
    """
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            found.append(path)
            continue
        for root, folders, files in os.walk(path):
            folders[:] = sorted(f for f in folders if not f.startswith("."))
            for name in sorted(files):
                candidate = Path(root) / name
                if name.startswith("."):
                    continue
                if candidate.suffix.lower() in IMAGE_SUFFIXES or _looks_like_dicom(candidate):
                    found.append(candidate)
    return found


def _looks_like_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


class _Names:
    """A unique file stem per input: its own stem, with a counter when two inputs share one."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def __call__(self, source: str) -> str:
        stem = Path(source).stem or "input"
        count = self._seen.get(stem, 0) + 1
        self._seen[stem] = count
        return stem if count == 1 else f"{stem}-{count}"


def _write(data: bytes, path: Path) -> None:
    """Writes an encoded file through a temporary name, so a crash never leaves half a file under the name."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    temporary.replace(path)


def _score(args: argparse.Namespace, settings: Settings) -> int:
    from retinagate.cli import EXIT_FAILED, EXIT_MISSING, EXIT_OK, EXIT_USAGE, CommandError

    model_path = args.model if args.model is not None else settings.model_path
    if model_path is None:
        raise CommandError("no model: pass --model FILE.onnx or set RETINAGATE_MODEL_PATH", EXIT_MISSING)
    if not Path(model_path).is_file():
        raise CommandError(f"model file not found: {model_path}", EXIT_MISSING)
    if args.outputs is not None:
        from retinagate.outputs import registry

        try:
            kinds = registry.check((k.strip() for k in args.outputs.split(",") if k.strip()), "--outputs")
        except ValueError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
        settings = settings.model_copy(update={"outputs": kinds})
    inputs = collect_inputs(args.paths)
    if not inputs:
        raise CommandError("no DICOM, PNG or JPEG files found in the given paths", EXIT_USAGE)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"--out: cannot create {args.out}: {exc.strerror or exc}", EXIT_USAGE) from None

    import logging

    from tqdm import tqdm

    from retinagate.decode import is_dicom_file, own_output_of_file
    from retinagate.engine import Engine, ModelFileError, ProviderError
    from retinagate.outputs.findings import summary_text
    from retinagate.pipeline import Pipeline, ScoreResult

    try:
        engine = Engine.load(Path(model_path), settings)
    except FileNotFoundError as exc:
        raise CommandError(str(exc), EXIT_MISSING) from None
    except (ModelFileError, ProviderError, ValueError) as exc:
        raise CommandError(f"cannot load the model: {exc}", EXIT_FAILED) from None

    _note_dicom_only(settings.outputs, inputs)
    # highdicom narrates every object it builds at INFO; a batch run wants its own lines only.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    show_progress = any(p.is_dir() for p in args.paths)
    names = _Names()
    thresholds = dict(zip(engine.card.labels, engine.card.thresholds, strict=True))
    rows: list[tuple[str, str, str]] = []
    scored = ungradable = skipped = failed = 0

    def scorable(paths: Sequence[Path]) -> Iterator[Path]:
        """The inputs to score, in order; RetinaGate's own outputs are reported as skipped instead."""
        nonlocal skipped
        for path in paths:
            reason = own_output_of_file(path) if path.is_file() and is_dicom_file(path) else None
            if reason is None:
                yield path
                continue
            skipped += 1
            progress.update(1)
            progress.write(f"retinagate score: {path}: skipped: {reason}", file=sys.stderr)
            if args.json:
                print(json.dumps({"source": str(path), "status": "skipped", "reason": reason}), flush=True)

    with (
        Pipeline(engine, settings) as pipeline,
        tqdm(
            total=len(inputs), unit="image", disable=not show_progress or None, file=sys.stderr, leave=False
        ) as progress,
    ):
        for result in pipeline.iter_score(scorable(inputs)):
            progress.update(1)
            if not isinstance(result, ScoreResult):
                failed += 1
                progress.write(f"retinagate score: {result.source}: {result.error}", file=sys.stderr)
                if args.json:
                    print(json.dumps(result.summary()), flush=True)
                continue
            stem = names(result.source)
            written: dict[str, str] = {}
            # The pipeline hands over each output already encoded (Part 10); write those bytes as they are.
            for kind, data in result.encoded.items():
                target = args.out / f"{stem}.{kind}.dcm"
                try:
                    _write(data, target)
                except OSError as exc:
                    raise CommandError(f"cannot write {target}: {exc.strerror or exc}", EXIT_FAILED) from None
                written[kind] = str(target)
            if result.gradable:
                scored += 1
                # The SC's legend, SR and results say the same (retinagate.outputs.findings.summary_lines).
                shown = summary_text(result.probabilities, thresholds)
            else:
                ungradable += 1
                shown = "Not graded: " + "; ".join(result.reasons)
            if args.json:
                print(json.dumps({**result.summary(), "result": shown, "files": written}), flush=True)
            else:
                rows.append((result.source, shown, ", ".join(Path(p).name for p in written.values())))
    if not args.json:
        if rows:
            _print_table(rows)
        own = f"{skipped} skipped (RetinaGate's own outputs), " if skipped else ""
        print(f"{scored} scored, {ungradable} not graded, {own}{failed} failed; outputs in {args.out}")
    return EXIT_FAILED if failed else EXIT_OK


def _note_dicom_only(kinds: Sequence[str], inputs: Sequence[Path]) -> None:
    """Says on stderr, once, which chosen kinds the PNG and JPEG inputs will not get (a Parametric
    Map references a DICOM source's geometry, which a plain file does not have)."""
    from retinagate.decode import is_dicom_file
    from retinagate.outputs import registry

    dicom_only = [kind for kind in kinds if registry.kind_class(kind).dicom_only]
    if not dicom_only:
        return  # the usual case: no input's header read twice
    plain = sum(1 for path in inputs if path.is_file() and not is_dicom_file(path))
    if not plain:
        return
    rest = [kind for kind in registry.plan(kinds, references_source=False) if kind not in dicom_only]
    inputs_word = "input gets" if plain == 1 else "inputs get"
    print(
        f"retinagate score: note: {', '.join(dicom_only)} is made for DICOM inputs only; "
        f"{plain} PNG/JPEG {inputs_word} {', '.join(rest) or 'no outputs'}",
        file=sys.stderr,
    )


def _print_table(rows: Sequence[tuple[str, str, str]]) -> None:
    headers = ("input", "result (probability, threshold)", "outputs")
    widths = [min(60, max(len(headers[i]), *(len(r[i]) for r in rows))) for i in range(2)]
    print(f"{headers[0]:<{widths[0]}}  {headers[1]:<{widths[1]}}  {headers[2]}")
    for source, findings, outputs in rows:
        print(f"{source:<{widths[0]}}  {findings:<{widths[1]}}  {outputs}")
