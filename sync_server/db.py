"""One SQLAlchemy engine + session factory per app, and migrations to head.

The app keeps a ``Database`` in ``app.extensions["pocketrec_db"]``; views open explicit,
short sessions (``with db.session() as s, s.begin(): ...``). No module-level engine."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from flask import current_app
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL (readers never block the writer) and a
    busy timeout, since several gunicorn workers share the file."""
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: object, _record: object) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def alembic_config() -> Config:
    """An Alembic config built in code (no alembic.ini): the migrations ship in the package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade(url: str | Engine, lock_path: str | Path | None = None) -> None:
    """``alembic upgrade head`` on ``url``. With ``lock_path`` an exclusive file lock is held
    meanwhile, so workers starting together on one host migrate one after the other."""
    engine = make_engine(url) if isinstance(url, str) else url
    try:
        with contextlib.ExitStack() as stack:
            if lock_path is not None:
                lock = stack.enter_context(open(lock_path, "a+b"))  # noqa: SIM115
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
            with engine.begin() as connection:
                config = alembic_config()
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
    finally:
        if isinstance(url, str):
            engine.dispose()


class Database:
    """The app's engine and session factory."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def session(self) -> Session:
        return self._sessions()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session inside one transaction: committed on success, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    def ping(self) -> None:
        """Raise unless the database answers."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))


def get_db() -> Database:
    """The current app's Database."""
    return current_app.extensions["pocketrec_db"]
