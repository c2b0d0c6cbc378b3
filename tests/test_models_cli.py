"""`retinagate models`: register, list, show and activate (audited); a worker refuses a model that is
not the active one, and the first worker serving a newly activated model queues the re-scoring once."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from retinagate.cli import main
from retinagate.db import make_engine, session_factory, session_scope, upgrade
from retinagate.errors import PermanentError
from retinagate.models import Model, ModelActivation
from retinagate.settings import Settings, load_settings
from worker.registry import start_serving


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Settings]]:
    """A migrated database under the test's data dir; ``site(**overrides)`` gives settings for it (the
    CLI reads the same through the environment)."""
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))
    for name in [n for n in os.environ if n.startswith("RETINAGATE_") and n != "RETINAGATE_DATA_DIR"]:
        monkeypatch.delenv(name)

    def settings(**overrides: Any) -> Settings:
        return load_settings(environ={"RETINAGATE_DATA_DIR": str(tmp_path / "var")}, **overrides)

    upgrade(settings())
    yield settings


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    code = main(["models", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if code == 0 else out


def test_models_are_registered_inactive_activated_explicitly_and_each_activation_is_audited(
    site: Callable[..., Settings],
    random_onnx_model_path: Path,
    worker_model_variant: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    variant = worker_model_variant(random_onnx_model_path, "v2")
    code, first = _cli(capsys, "register", str(random_onnx_model_path))
    assert code == 0 and first["added"] and not first["active"]
    assert _cli(capsys, "register", str(random_onnx_model_path))[1]["added"] is False  # a second time: known
    _, second = _cli(capsys, "register", str(variant))

    code, activated = _cli(capsys, "activate", first["sha256"][:12])
    assert code == 0 and activated["active"] and activated["previous"] is None and activated["changed"]
    code, activated = _cli(capsys, "activate", f"{second['name']} {second['version']}")
    assert activated["previous"].startswith(f"{first['name']} {first['version']} (id {first['id']}")
    _, rolled_back = _cli(capsys, "activate", str(first["id"]))  # roll back by id

    assert rolled_back["active"] and rolled_back["previous"].startswith(f"{second['name']} {second['version']}")
    _, listed = _cli(capsys, "list")
    assert [(m["id"], m["active"]) for m in listed] == [(first["id"], True), (second["id"], False)]
    _, shown = _cli(capsys, "show", first["sha256"][:8])
    assert [a["previous"] for a in shown["activations"]] == [None, f"{second['name']} {second['version']}"]
    assert all("@" in a["activated_by"] for a in shown["activations"])  # who: user@host


def test_a_model_named_ambiguously_or_not_at_all_and_a_checkpoint_are_refused_with_the_reason(
    site: Callable[..., Settings],
    random_onnx_model_path: Path,
    worker_model_variant: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["models", "register", str(random_onnx_model_path)]) == 0
    assert main(["models", "register", str(worker_model_variant(random_onnx_model_path, "v2"))]) == 0
    capsys.readouterr()
    engine = make_engine(site())
    with session_scope(session_factory(engine)) as session:
        model_name = session.scalars(select(Model.name)).first()
    engine.dispose()

    assert main(["models", "activate", str(model_name)]) == 3  # two versions share the name
    assert "matches 2 models" in capsys.readouterr().err
    assert main(["models", "show", "0123456789ab"]) == 3
    assert "no registered model matches '0123456789ab'" in capsys.readouterr().err
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"\x80\x02not an onnx file")
    assert main(["models", "register", str(checkpoint)]) == 3
    assert "retinagate export" in capsys.readouterr().err


def test_a_scoring_worker_refuses_a_model_that_is_not_active_and_queues_one_rescore_per_activation(
    site: Callable[..., Settings],
    random_onnx_model_path: Path,
    worker_model_variant: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    variant = worker_model_variant(random_onnx_model_path, "v2")
    rescores: list[Path] = []
    settings = site(model_path=random_onnx_model_path)
    engine = make_engine(settings)
    sessions = session_factory(engine)
    try:
        first = start_serving(settings, sessions, rescores.append)  # fresh installation: becomes active
        assert first.active and rescores == [random_onnx_model_path]
        start_serving(settings, sessions, rescores.append)  # a second worker: no second re-scoring
        assert rescores == [random_onnx_model_path]

        other = site(model_path=variant)
        with pytest.raises(PermanentError, match=r"not the active model .*models activate [0-9a-f]{12}"):
            start_serving(other, sessions, rescores.append)
        assert not start_serving(site(model_path=variant, serve_inactive_model=True), sessions, rescores.append).active
        assert rescores == [random_onnx_model_path]

        assert main(["models", "activate", str(variant)]) == 0
        start_serving(site(model_path=variant, rescore_on_activate=False), sessions, rescores.append)
        assert rescores == [random_onnx_model_path]  # the setting turns it off
        start_serving(other, sessions, rescores.append)
        start_serving(other, sessions, rescores.append)
        assert rescores == [random_onnx_model_path, variant]  # once for the new activation
        with session_scope(sessions) as session:
            assert len(session.scalars(select(ModelActivation)).all()) == 2
    finally:
        engine.dispose()
    capsys.readouterr()


def test_retinagate_worker_exits_at_start_naming_the_active_model(
    site: Callable[..., Settings],
    random_onnx_model_path: Path,
    worker_model_variant: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["models", "register", str(random_onnx_model_path)]) == 0
    assert main(["models", "activate", str(random_onnx_model_path)]) == 0
    monkeypatch.setenv("RETINAGATE_MODEL_PATH", str(worker_model_variant(random_onnx_model_path, "v2")))
    monkeypatch.setenv("RETINAGATE_BROKER_URL", "redis://127.0.0.1:1/0")  # never reached: it stops first
    capsys.readouterr()

    assert main(["worker", "--queues", "score"]) == 2

    error = capsys.readouterr().err
    assert "is not the active model" in error and "RETINAGATE_SERVE_INACTIVE_MODEL" in error
