"""`make demo` (``retinagate demo``): synthetic studies in, heatmaps back in the PACS, previews on disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.interop]


def test_demo_sends_studies_through_the_running_system_and_writes_heatmap_previews(tmp_path: Path) -> None:
    for tool in ("storescu", "Orthanc"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin") is None:
            if os.environ.get("CI"):
                pytest.fail(f"{tool} is not installed; CI installs it")
            pytest.skip(f"{tool} is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAGATE_")}
    env["RETINAGATE_DATA_DIR"] = str(tmp_path / "var")
    # A small run of the same recipe: three studies (six photographs), one epoch on 120 images.
    argv = [sys.executable, "-m", "retinagate", "demo", "--studies", "3", "--epochs", "1", "--train-images", "120"]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all 6 photographs scored and returned" in result.stdout
    assert "Orthanc listening" in result.stdout
    previews = sorted((tmp_path / "var" / "demo" / "previews").glob("*.png"))
    assert len(previews) == 6
    assert all(p.stat().st_size > 10_000 for p in previews)
    assert (tmp_path / "var" / "demo" / "model" / "model.onnx").is_file()
    # What a newcomer reads: the model's quality said plainly, and a short console that ends with the
    # results and the previews. The default run has 10 studies (3 table lines each) instead of these 3.
    assert "demo model: test macro AUROC" in result.stdout
    lines = result.stdout.splitlines()
    table = [line for line in lines if line.startswith("study ") or line.startswith("  2.25.")]
    assert len(table) == 3 * 3
    assert len(lines) - len(table) + 3 * 10 <= 60, result.stdout
    assert lines[-1].startswith("heatmap previews:") and "retinagate results" in lines[-2]
    assert "Traceback" not in result.stdout + result.stderr and "ERROR" not in result.stdout + result.stderr
    # `retinagate results` right after the demo, with nothing else set, shows the demo's results.
    shown = subprocess.run([sys.executable, "-m", "retinagate", "results"], env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert len([line for line in shown.stdout.splitlines() if line.startswith("study ")]) == 3, shown.stdout
    assert lines[-2].endswith("these results again: retinagate results")

    # A second run reuses the cached model instead of training again.
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing the model trained by an earlier run" in again.stdout


def test_the_demo_leaves_a_data_folder_with_a_database_it_did_not_make_alone(tmp_path: Path) -> None:
    from retinagate.demo import _system_dir

    site = tmp_path / "var"
    site.mkdir()
    (site / "retinagate.db").write_bytes(b"someone's own")
    assert _system_dir(site, site / "demo") == site / "demo" / "system"
    assert (site / "retinagate.db").read_bytes() == b"someone's own"

    mine = tmp_path / "mine"
    (mine / "demo").mkdir(parents=True)
    assert _system_dir(mine, mine / "demo") == mine  # a fresh folder: the demo runs in it, and marks it
    (mine / "retinagate.db").write_bytes(b"the demo's last run")
    (mine / "storage").mkdir()
    assert _system_dir(mine, mine / "demo") == mine and not (mine / "retinagate.db").exists()
    assert not (mine / "storage").exists() and (mine / "demo").is_dir()
