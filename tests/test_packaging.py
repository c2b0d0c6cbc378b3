"""The wheel the images install (`pip install .`) holds every module and data file of the source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("retinagate", "dicom_gateway", "worker", "train", "export", "migrations")
SHIPPED = (".py", ".ini", ".mako", ".dcm", ".typed")


def test_the_wheel_holds_every_module_and_data_file_of_the_packages(tmp_path: Path) -> None:
    # Built from a copy: setuptools keeps build/ between builds, and a stale one hides what is missing.
    source = tmp_path / "source"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run([*build, str(source)], check=True, capture_output=True, timeout=300)

    (wheel,) = tmp_path.glob("retinagate-*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    wanted = {
        path.relative_to(source).as_posix()
        for package in PACKAGES
        for path in (source / package).rglob("*")
        if path.is_file() and path.suffix in SHIPPED
    }
    assert "retinagate/outputs/sc.py" in wanted and "retinagate/data/warmup.dcm" in wanted  # the check sees them
    assert sorted(wanted - held) == []
    assert not any(name.startswith(("tests/", "bench/")) for name in held)
