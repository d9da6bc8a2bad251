"""Alembic migrations, on SQLite and on a real PostgreSQL: an empty database upgrades to head,
twice is a no-op, head matches the models exactly (a model change without a revision fails
here), and every revision downgrades to the empty database and upgrades again."""

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from sync_server.db import alembic_config, upgrade
from sync_server.models import Base

TABLES = {"alembic_version", "devices", "nonces", "model_versions", "rounds", "updates",
          "selections", "privacy_ledger", "secagg_members", "secagg_shares", "model_metrics",
          "selection_coins", "enrollment_tokens", "rate_limits"}


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


@pytest.fixture
def url(tmp_path, db_settings):
    return db_settings.get("DATABASE_URL", f"sqlite:///{tmp_path / 'server.db'}")


def _migrate(url, direction, revision):
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            getattr(command, direction)(config, revision)
    finally:
        engine.dispose()


def test_upgrade_creates_every_table_and_is_idempotent(url, tmp_path):
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


def test_model_metrics_revision_downgrades_and_upgrades_again(url):
    upgrade(url)
    head_tables, head, _ = _state(url)
    _migrate(url, "downgrade", "0004")
    tables, version, _ = _state(url)
    assert version == "0004" and set(tables) == TABLES - {"model_metrics", "selection_coins",
                                                          "enrollment_tokens", "rate_limits"}
    upgrade(url)
    assert _state(url) == (head_tables, head, [])


def test_selection_coins_revision_downgrades_and_upgrades_again(url):
    upgrade(url)
    head_tables, head, _ = _state(url)
    _migrate(url, "downgrade", "0005")
    tables, version, _ = _state(url)
    assert version == "0005" and set(tables) == TABLES - {"selection_coins",
                                                          "enrollment_tokens", "rate_limits"}
    upgrade(url)
    assert _state(url) == (head_tables, head, [])


def test_device_model_version_revision_downgrades_and_upgrades_again(url):
    upgrade(url)
    head_tables, head, _ = _state(url)
    _migrate(url, "downgrade", "0007")
    tables, version, _ = _state(url)
    assert version == "0007" and "model_version" not in tables["devices"]
    assert "enrollment_tokens" not in tables and "rate_limits" not in tables
    upgrade(url)
    assert _state(url) == (head_tables, head, [])


def test_rate_limits_revision_downgrades_and_upgrades_again(url):
    upgrade(url)
    head_tables, head, _ = _state(url)
    _migrate(url, "downgrade", "0009")
    tables, version, _ = _state(url)
    assert version == "0009" and set(tables) == TABLES - {"rate_limits"}
    upgrade(url)
    assert _state(url) == (head_tables, head, [])


def test_every_revision_downgrades_to_empty_and_upgrades_again(url):
    upgrade(url)
    head_state = _state(url)
    _migrate(url, "downgrade", "base")
    tables, version, _ = _state(url)
    assert version is None and set(tables) <= {"alembic_version"}
    upgrade(url)
    assert _state(url) == head_state
