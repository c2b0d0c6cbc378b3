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


def _set_sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


def make_engine(settings_or_url: Settings | str) -> Engine:
    """Creates the engine for RetinaGate's database.

    SQLite: the file's folder is created, and every connection gets WAL mode, a 30 s busy timeout,
    foreign keys and ``synchronous=NORMAL``. PostgreSQL: ``postgresql://`` URLs use the psycopg 3
    driver, and connections are checked before use so a restarted server costs no failed task.

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
        database = url.database
        if database and database != ":memory:" and not database.startswith("file:") and not url.query.get("uri"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url)
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
    url = _database_url(settings)
    sqlite_file = url.database if url.get_backend_name() == "sqlite" and url.database != ":memory:" else None
    if sqlite_file and not Path(sqlite_file).exists():
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

    Raises:
        SchemaError: When the schema is missing, behind, or from a revision this version does not
            know; the message says what to do.
    """
    from alembic.script import ScriptDirectory

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
