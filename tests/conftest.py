"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from retinagate.settings import Settings, load_settings


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Builds settings rooted in the test's temporary folder, ignoring the process environment."""

    def build(**overrides: Any) -> Settings:
        overrides.setdefault("data_dir", tmp_path / "var")
        return load_settings(environ={}, **overrides)

    return build


# PostgreSQL: one throwaway cluster per test session, for the tests marked `postgres`.
# This block is appended to the shared file, hence its imports here and inside the functions.

from collections.abc import Iterator  # noqa: E402
from typing import NoReturn  # noqa: E402


def _postgres_unavailable(reason: str) -> NoReturn:
    """Skips, except under CI, where a missing PostgreSQL must fail the run instead of hiding tests."""
    import os

    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the PostgreSQL tests fail instead of being skipped")
    pytest.skip(reason)


def _postgres_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: PATH first, then /usr/lib/postgresql/<newest>."""
    import shutil

    candidates = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)

    def version(folder: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in folder.parent.name.split(".") if p.isdigit())

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """Starts a PostgreSQL cluster on a free loopback port; yields its URL without a database name.

    PostgreSQL refuses to run as root, so under root the cluster runs as the ``postgres`` user (or
    ``nobody``) and its folder belongs to that user. Trust authentication on 127.0.0.1 only; fsync off,
    since the cluster is thrown away.
    """
    import os
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = _postgres_bindir()
    if bindir is None:
        _postgres_unavailable("PostgreSQL binaries (initdb, pg_ctl, postgres) not found")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _postgres_unavailable("the psycopg driver is not installed")

    root = Path(tempfile.mkdtemp(prefix="retinagate-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        for user in ("postgres", "nobody"):
            try:
                account = pwd.getpwnam(user)
            except KeyError:
                continue
            break
        else:
            _postgres_unavailable("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL")
        os.chown(root, account.pw_uid, account.pw_gid)
        prefix = ["runuser", "-u", account.pw_name, "--"]
    data, log = root / "data", root / "server.log"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def run(*args: str) -> None:
        done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            server_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            shutil.rmtree(root, ignore_errors=True)
            pytest.fail(f"{Path(args[0]).name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{server_log}")

    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync",
        "--encoding=UTF8", "--locale=C", "--no-instructions")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)


def _create_database(server: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')  # name made here, never from input
    return f"{server}/{name}"


@pytest.fixture(scope="session")
def postgres_url(postgres_server: str) -> str:
    """URL of the database ``retinagate_test`` on the session's throwaway cluster (shared by tests)."""
    return _create_database(postgres_server, "retinagate_test")


@pytest.fixture
def fresh_postgres_url(postgres_server: str) -> Iterator[str]:
    """URL of a new, empty database for this test alone; dropped afterwards."""
    import uuid

    import psycopg

    name = f"retinagate_{uuid.uuid4().hex[:12]}"
    url = _create_database(postgres_server, name)
    yield url
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database, once as a SQLite file (in a folder not yet made) and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'retinagate.db'}"
    url: str = request.getfixturevalue("fresh_postgres_url")
    return url
