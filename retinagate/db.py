"""Database access: engines, sessions and the schema's migrations.

SQLite is the default (one file under the data directory) and PostgreSQL the production database;
both get the same schema from the Alembic revisions under ``migrations/``. Entry points call
:func:`check_schema` at start so that a database that was never migrated fails with a message that
says what to run, instead of with a missing-table error on the first C-STORE.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

    from retinagate.settings import Settings

__all__ = [
    "SchemaError",
    "check_schema",
    "connect_failure",
    "current_revision",
    "downgrade",
    "head_revision",
    "make_engine",
    "session_factory",
    "session_scope",
    "upgrade",
]

logger = logging.getLogger(__name__)

#: Set on every new SQLite connection. busy_timeout first: switching to WAL needs a lock, and the
#: gateway and workers open connections concurrently. WAL lets readers run beside the one writer;
#: synchronous=NORMAL is durable in WAL mode except for the last commits on a power loss, never
#: corrupting; SQLite leaves foreign keys off unless asked.
_SQLITE_PRAGMAS = (
    "PRAGMA busy_timeout=30000",
    "PRAGMA journal_mode=WAL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA synchronous=NORMAL",
)

_UPGRADE_HINT = "run `retinagate db upgrade`"


class SchemaError(RuntimeError):
    """The database's schema is not the one this version of RetinaGate was built for."""


def _database_url(settings_or_url: Settings | str) -> URL:
    if isinstance(settings_or_url, str):
        return make_url(settings_or_url)
    url = make_url(settings_or_url.resolved_database_url)
    password = settings_or_url.database_password
    if password is not None and url.password is None and not url.drivername.startswith("sqlite"):
        url = url.set(password=password.get_secret_value())
    return url


def _sqlite_file(url: URL) -> Path | None:
    """The file behind a SQLite URL; None for other databases, in-memory ones and URI filenames."""
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:") or url.query.get("uri"):
        return None
    return Path(database)


def _set_sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


def make_engine(settings_or_url: Settings | str) -> Engine:
    """Creates the engine for RetinaGate's database.

    SQLite: the file's folder is created on the first connection, and every connection gets WAL
    mode, a 30 s busy timeout, foreign keys and ``synchronous=NORMAL``. PostgreSQL:
    ``postgresql://`` URLs use the psycopg 3 driver, and connections are checked before use so a
    restarted server costs no failed task.

    Args:
        settings_or_url: The settings (their database URL, plus ``database_password`` when the URL
            has none) or a SQLAlchemy URL.

    Raises:
        ValueError: When the URL cannot be parsed.
    """
    try:
        url = _database_url(settings_or_url)
    except Exception as exc:  # SQLAlchemy raises ArgumentError; name the setting instead
        raise ValueError(f"database_url: not a database URL ({exc})") from None

    if url.get_backend_name() == "sqlite":
        engine = create_engine(url)
        sqlite_file = _sqlite_file(url)
        if sqlite_file is not None:
            # At connect time, not now: a command that only reads and finds no database must not leave
            # an empty data directory behind either.
            folder = sqlite_file.parent

            def make_folder(*_args: Any) -> None:
                folder.mkdir(parents=True, exist_ok=True)

            event.listen(engine, "do_connect", make_folder)
        event.listen(engine, "connect", _set_sqlite_pragmas)
        return engine

    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return create_engine(url, pool_pre_ping=True)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (ids are passed on to tasks after it)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commits when the block ends, rolls back when it raises, always closes."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _migrations_dir() -> Path:
    return Path(str(importlib.resources.files("migrations")))


def _alembic_config(url: URL, connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_migrations_dir()))
    config.set_main_option("path_separator", "os")
    # Config is a ConfigParser: a literal % (URL-encoded passwords) must be doubled.
    config.set_main_option("sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _run_alembic(settings: Settings, command: Callable[[Config], None]) -> None:
    engine = make_engine(settings)
    try:
        with engine.connect() as connection:
            command(_alembic_config(engine.url, connection))
    finally:
        # A migration engine of its own, thrown away: env.py toggles SQLite's foreign keys on it.
        engine.dispose()


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Creates or migrates the schema to ``revision``; a database already there is left as it is.

    Raises:
        alembic.util.CommandError: When ``revision`` is unknown.
    """
    from alembic import command

    _run_alembic(settings, lambda config: command.upgrade(config, revision))
    logger.info("database schema at revision %s", current_revision(settings))


def downgrade(settings: Settings, revision: str) -> None:
    """Migrates the schema back to ``revision`` (``base`` drops every table RetinaGate made)."""
    from alembic import command

    _run_alembic(settings, lambda config: command.downgrade(config, revision))
    logger.info("database schema at revision %s", current_revision(settings))


def head_revision() -> str:
    """The newest revision this version of RetinaGate ships."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(_migrations_dir())).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise SchemaError("no migrations found in the migrations package")
    return head


def _database_heads(connection: Connection) -> tuple[str, ...]:
    from alembic.runtime.migration import MigrationContext

    return tuple(MigrationContext.configure(connection).get_current_heads())


def current_revision(settings: Settings) -> str | None:
    """The database's schema revision, or None when it has none (a SQLite file is not created)."""
    sqlite_file = _sqlite_file(_database_url(settings))
    if sqlite_file is not None and not sqlite_file.exists():
        return None
    engine = make_engine(settings)
    try:
        with engine.connect() as connection:
            heads = _database_heads(connection)
    finally:
        engine.dispose()
    return ",".join(heads) or None


def check_schema(engine: Engine) -> None:
    """Makes sure the database is at this version's head revision; entry points call it at start.

    A SQLite file that does not exist is reported as such and not created: only ``db upgrade`` (and
    ``serve``, which runs it) makes a database.

    Raises:
        SchemaError: When the database file is missing, or the schema is missing, behind, or from a
            revision this version does not know; the message says what to do.
        sqlalchemy.exc.OperationalError: When the database cannot be reached (see
            :func:`connect_failure`).
    """
    from alembic.script import ScriptDirectory

    sqlite_file = _sqlite_file(engine.url)
    if sqlite_file is not None and not sqlite_file.exists():
        raise SchemaError(
            f"there is no RetinaGate database at {sqlite_file.resolve()}: set RETINAGATE_DATA_DIR (or "
            f"RETINAGATE_DATABASE_URL) to the data directory in use, or {_UPGRADE_HINT} to create one there"
        )
    scripts = ScriptDirectory(str(_migrations_dir()))
    head = scripts.get_current_head()
    with engine.connect() as connection:
        current = _database_heads(connection)
    where = engine.url.render_as_string(hide_password=True)
    if current == (head,):
        return
    if not current:
        raise SchemaError(f"the database {where} has no RetinaGate schema; {_UPGRADE_HINT} first")
    known = {script.revision for script in scripts.walk_revisions()}
    unknown = [rev for rev in current if rev not in known]
    if unknown:
        raise SchemaError(
            f"the database {where} is at revision {', '.join(unknown)}, which this version of RetinaGate "
            f"does not know (it expects {head}): a newer RetinaGate migrated it, so run that version"
        )
    raise SchemaError(
        f"the database {where} is at revision {', '.join(current)} but this version of RetinaGate needs "
        f"{head}; {_UPGRADE_HINT}"
    )


def connect_failure(exc: BaseException, settings: Settings) -> str | None:
    """One line saying that the database could not be reached, or None when ``exc`` is something else.

    This is the rule every command shares (``retinagate.cli.main`` applies it): SQLAlchemy raises an
    ``OperationalError`` without a SQL statement when it cannot open a connection (server down, wrong
    host or port, refused login, a SQLite file it cannot open). Errors of a statement are not
    connection failures and are left to their callers. The URL is shown without its password.
    """
    from sqlalchemy.exc import InterfaceError, OperationalError

    if not isinstance(exc, OperationalError | InterfaceError) or exc.statement is not None:
        return None
    url = _database_url(settings)
    lines = [line.strip() for line in str(exc.orig).splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc.orig).__name__
    if url.password:
        reason = reason.replace(str(url.password), "***")
    where = url.render_as_string(hide_password=True)
    return f"cannot reach the database {where} ({reason}); check that it is running and RETINAGATE_DATABASE_URL"
