"""Alembic migrations: an empty database upgrades to head, twice is a no-op, and head
matches the models exactly (a model change without a revision fails here)."""

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from sync_server.db import alembic_config, upgrade
from sync_server.models import Base

TABLES = {"alembic_version", "devices", "nonces", "model_versions", "rounds", "updates",
          "selections", "privacy_ledger", "secagg_members", "secagg_shares", "model_metrics"}


def _state(url):
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            inspector = inspect(connection)
            tables = {t: [c["name"] for c in inspector.get_columns(t)]
                      for t in inspector.get_table_names()}
            version = MigrationContext.configure(connection).get_current_revision()
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()
    return tables, version, diff


def test_upgrade_creates_every_table_and_is_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path / 'server.db'}"
    upgrade(url)
    tables, version, diff = _state(url)
    assert set(tables) == TABLES
    assert version == ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert diff == []
    assert tables["nonces"] == ["device_id", "nonce", "seen_at"]

    upgrade(url, lock_path=tmp_path / "migrate.lock")
    assert _state(url) == (tables, version, [])


def test_one_linear_history():
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert len(heads) == 1


def test_model_metrics_revision_downgrades_and_upgrades_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'server.db'}"
    upgrade(url)
    head_tables, head, _ = _state(url)
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "0004")
    finally:
        engine.dispose()
    tables, version, _ = _state(url)
    assert version == "0004" and set(tables) == TABLES - {"model_metrics"}
    upgrade(url)
    assert _state(url) == (head_tables, head, [])
