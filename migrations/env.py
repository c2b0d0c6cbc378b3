"""Alembic environment for RetinaGate's schema.

Run by :func:`retinagate.db.upgrade`, which hands over an open connection in
``config.attributes["connection"]``, or by the ``alembic`` command with ``migrations/alembic.ini``,
where the URL comes from ``-x url=...`` or from the ``RETINAGATE_*`` settings.

Logging is left alone on purpose: the entry point that runs the migrations has already set it up,
and Alembic's usual ``fileConfig`` call would replace its handlers.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.engine import Connection

from retinagate.models import Base, UTCDateTime
from retinagate.settings import Settings

config = context.config
target_metadata = Base.metadata


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Renders the models' UTC column type as the plain type it stores, so revisions import only sa."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _target() -> Settings | str:
    """The database to migrate: ``-x url=...``, else ``sqlalchemy.url``, else the settings."""
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from retinagate.settings import load_settings

    return load_settings()


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        render_item=_render_item,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Writes the SQL of the migrations instead of running it (``alembic ... --sql``)."""
    target = _target()
    url = target if isinstance(target, str) else target.resolved_database_url
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # Batch migrations rebuild a table by copying it and dropping the original; with foreign
        # keys enforced that drop would cascade or fail. The pragma only works outside a transaction.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
    try:
        _configure(connection=connection, render_as_batch=sqlite)
        with context.begin_transaction():
            context.run_migrations()
        if connection.in_transaction():
            connection.commit()
    finally:
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()


def run_migrations_online() -> None:
    """Runs the migrations on the connection given by the caller, or on one of our own."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from retinagate.db import make_engine

    engine = make_engine(_target())
    try:
        with engine.connect() as own:
            _run(own)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
