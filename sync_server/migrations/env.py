"""Alembic environment: the schema is ``sync_server.models.Base.metadata``.

``sync_server.db.upgrade`` hands in an open connection (``config.attributes["connection"]``);
run from the ``alembic`` command line instead, ``sqlalchemy.url`` names the database."""

from alembic import context
from sqlalchemy import Connection, create_engine

from sync_server.models import Base


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.begin() as connection:
        _run(connection)
    engine.dispose()


def _run(connection: Connection) -> None:
    # render_as_batch: SQLite can only ALTER TABLE by copying, which batch mode does.
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run them online")
run_migrations()
