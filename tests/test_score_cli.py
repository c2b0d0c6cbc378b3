"""Tests for ``retinagate score`` (retinagate.scoring_cli)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from retinagate.cli import EXIT_FAILED, EXIT_MISSING, EXIT_OK, EXIT_USAGE, main
from retinagate.scoring_cli import collect_inputs
from retinagate.synth import DicomIdentity, render_fundus, write_dicom


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings come from the environment in ``main``: keep the caller's RETINAGATE_* out."""
    import os

    for key in [k for k in os.environ if k.startswith("RETINAGATE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """A folder with two DICOM photographs (one in a subfolder), a PNG, an unreadable file and a note."""
    folder = tmp_path / "in"
    rng = np.random.default_rng(31)
    write_dicom(render_fundus(rng, 320, 240, ["DR"]).image, folder / "eye1.dcm", DicomIdentity.synthetic(0))
    write_dicom(render_fundus(rng, 320, 240, []).image, folder / "sub" / "eye2.dcm", DicomIdentity.synthetic(1))
    cv2.imwrite(str(folder / "photo.png"), cv2.cvtColor(render_fundus(rng, 320, 240, ["MH"]).image, cv2.COLOR_RGB2BGR))
    (folder / "broken.dcm").write_bytes(b"DICM" * 100)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.filterwarnings("ignore:Expected implicit VR:UserWarning")  # broken.dcm is not a dataset
def test_json_lines_report_every_input_and_the_outputs_are_written(
    inputs: Path, random_onnx_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"

    code = main(["score", str(inputs), "--model", str(random_onnx_model_path), "--out", str(out), "--json"])

    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert code == EXIT_FAILED  # broken.dcm
    assert sorted(Path(line["source"]).name for line in lines) == ["broken.dcm", "eye1.dcm", "eye2.dcm", "photo.png"]
    scored = [line for line in lines if line["status"] == "scored"]
    assert len(scored) == 3
    for line in scored:
        assert len(line["probabilities"]) == 29 and isinstance(line["findings"], list)
        for path in line["files"].values():
            assert pydicom.dcmread(path).SOPInstanceUID in line["outputs"].values()
        sr = pydicom.dcmread(line["files"]["sr"])
        (group,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
        said = [i.TextValue for g in group.ContentSequence for i in g.ContentSequence
                if i.ConceptNameCodeSequence[0].CodeValue == "121111"]  # fmt: skip
        assert said == [line["result"]]  # the CLI's result line is the SR's Summary (and the SC's legend)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}.{kind}.dcm" for stem in ("eye1", "eye2", "photo") for kind in ("sc", "sr")
    )
    (failure,) = [line for line in lines if line["status"] == "failed"]
    assert failure["permanent"] is True
    assert "broken.dcm" in captured.err


@pytest.mark.filterwarnings("ignore:Expected implicit VR:UserWarning")
def test_an_unreadable_file_is_reported_by_name_and_the_batch_goes_on(
    inputs: Path, random_onnx_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken, good = inputs / "broken.dcm", inputs / "eye1.dcm"

    code = main(["score", str(broken), str(good), "--model", str(random_onnx_model_path), "--out", str(tmp_path / "o")])

    captured = capsys.readouterr()
    assert code == EXIT_FAILED
    assert f"retinagate score: {broken}:" in captured.err
    assert "1 scored, 0 not graded, 1 failed" in captured.out and "eye1.dcm" in captured.out
    assert (tmp_path / "o" / "eye1.sc.dcm").is_file()


def test_all_scored_exits_zero_and_pm_is_written_on_request(
    inputs: Path, random_onnx_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["score", str(inputs / "eye1.dcm"), "--model", str(random_onnx_model_path), "--out", str(out)]

    assert main([*argv, "--outputs", "sc,sr,pm"]) == EXIT_OK
    names = sorted(p.name for p in out.iterdir())
    assert names[-2:] == ["eye1.sc.dcm", "eye1.sr.dcm"]
    assert names[:-2] and all(re.fullmatch(r"eye1\.pm\.[A-Za-z_]+\.dcm", name) for name in names[:-2])
    assert main([*argv, "--outputs", "xray"]) == EXIT_USAGE
    capsys.readouterr()


def test_a_png_input_with_pm_chosen_is_told_it_gets_no_parametric_map(
    inputs: Path, random_onnx_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    both = [str(inputs / "photo.png"), str(inputs / "eye1.dcm")]

    code = main(["score", *both, "--model", str(random_onnx_model_path), "--out", str(out), "--outputs", "sc,sr,pm"])

    captured = capsys.readouterr()
    assert code == EXIT_OK
    assert "note: pm is made for DICOM inputs only; 1 PNG/JPEG input gets sc, sr" in captured.err
    assert not list(out.glob("photo.pm.*")) and list(out.glob("eye1.pm.*"))
    main(["score", both[1], "--model", str(random_onnx_model_path), "--out", str(out), "--outputs", "pm"])
    assert "note:" not in capsys.readouterr().err  # DICOM only: nothing to say


def test_a_missing_model_exits_three(inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["score", str(inputs), "--model", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "out")])

    assert code == EXIT_MISSING
    assert "model file not found" in capsys.readouterr().err
    assert main(["score", str(inputs), "--out", str(tmp_path / "out")]) == EXIT_MISSING  # none configured
    assert "--model" in capsys.readouterr().err


def test_a_pytorch_checkpoint_as_the_model_is_refused_with_a_hint_to_export_it(
    inputs: Path, tmp_path: Path, random_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["score", str(inputs), "--model", str(random_checkpoint), "--out", str(tmp_path / "out")])
    assert code == EXIT_FAILED
    err = capsys.readouterr().err
    assert "PyTorch checkpoint" in err and "retinagate export --checkpoint" in err
    assert "protobuf" not in err.lower()


def test_folders_are_searched_recursively_for_images(inputs: Path) -> None:
    found = collect_inputs([inputs])

    assert [p.relative_to(inputs).as_posix() for p in found] == ["broken.dcm", "eye1.dcm", "photo.png", "sub/eye2.dcm"]


def test_a_photograph_the_gate_refuses_is_reported_as_not_graded_with_its_reasons(
    random_onnx_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    colour = render_fundus(np.random.default_rng(4), 640, 480, ["DR"]).image
    grey = cv2.cvtColor(cv2.cvtColor(colour, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2BGR)
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    argv = ["score", str(tmp_path / "grey.png"), "--model", str(random_onnx_model_path), "--out", str(tmp_path / "o")]

    assert main([*argv, "--json"]) == EXIT_OK  # read and reported: not a failure
    (line,) = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert line["status"] == "ungradable" and line["reasons"] == ["not a colour photograph"]
    assert line["findings"] == [] and line["probabilities"] == {} and "chroma" in line["quality"]
    assert sorted(Path(p).name for p in line["files"].values()) == ["grey.sc.dcm", "grey.sr.dcm"]

    assert main(argv) == EXIT_OK
    out = capsys.readouterr().out
    assert "Not graded: not a colour photograph" in out and "0 scored, 1 not graded, 0 failed" in out


def test_a_file_nested_too_deep_is_a_clear_error_not_a_crash(
    inputs: Path,
    random_onnx_model_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    nested_sequences: Callable[[int], bytes],
) -> None:
    """Issue 14 defect 7: ``retinagate score`` died with an uncaught RecursionError."""
    good = inputs / "eye1.dcm"
    data = good.read_bytes()
    start = 144 + int.from_bytes(data[140:144], "little")
    nested = tmp_path / "nested.dcm"
    nested.write_bytes(data[:start] + nested_sequences(600) + data[start:])

    code = main(["score", str(nested), str(good), "--model", str(random_onnx_model_path), "--out", str(tmp_path / "o")])

    captured = capsys.readouterr()
    assert code == EXIT_FAILED
    assert f"retinagate score: {nested}:" in captured.err and "nested more than 32 levels deep" in captured.err
    assert "1 scored, 0 not graded, 1 failed" in captured.out
