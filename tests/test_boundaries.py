"""The serving side never loads PyTorch: a worker image holds ONNX Runtime, not torch."""

from __future__ import annotations

import subprocess
import sys


def _modules_after_import(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return set(out.split())


def test_gateway_and_worker_do_not_import_torch() -> None:
    modules = _modules_after_import(
        "import dicom_gateway, worker\n"
        "import pkgutil, importlib\n"
        "for pkg in (dicom_gateway, worker):\n"
        "    for info in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(f'{pkg.__name__}.{info.name}')\n"
    )
    assert "dicom_gateway" in modules
    assert "worker" in modules
    assert "torch" not in modules
    assert "timm" not in modules
    assert "train" not in modules


def test_core_modules_do_not_import_torch() -> None:
    modules = _modules_after_import(
        "import pkgutil, importlib, retinagate\n"
        "for info in pkgutil.walk_packages(retinagate.__path__, 'retinagate.'):\n"
        "    if info.name != 'retinagate.__main__':\n"
        "        importlib.import_module(info.name)\n"
    )
    assert "retinagate.settings" in modules
    assert "torch" not in modules


def test_cli_help_does_not_import_torch() -> None:
    modules = _modules_after_import(
        "from retinagate.cli import build_parser\nbuild_parser()\n"
    )
    assert "torch" not in modules
