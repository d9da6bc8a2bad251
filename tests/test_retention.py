"""Retention on the real server over HTTP (SQLite and PostgreSQL): the sweep deletes
per-device rows of rounds that ended past ROUND_RECORD_RETENTION_DAYS and devices silent
past DEVICE_RETENTION_DAYS that no kept round row names, and nothing else; a pruned device
is refused with ``unknown_device`` until it registers again.

Time passes by construction: the test moves a device's ``last_seen_at`` (or a round's
``finished_at``) into the past in the server's database, as if the clock had run on, and
asks the server to sweep (``POST /v1/admin/retention/sweep``)."""

import base64
import json
import tempfile
import time
from datetime import UTC, datetime, timedelta

import pytest
import urllib3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import DateTime, bindparam, create_engine, text

from device_sdk.bundle import zip_bundle_dir
from device_sdk.device_client import DeviceClient
from device_sdk.device_identity import DeviceIdentity
from device_sdk.protocol import SEALED_SCHEME
from device_sdk.sync_client import SyncClient, SyncError
from tests.support.server import ServerProcess

ADMIN = "retention-admin"
SETTINGS = {"ADMIN_TOKEN": ADMIN, "DEVICE_RETENTION_DAYS": 30,
            "ROUND_RECORD_RETENTION_DAYS": 7}
ROUND_TABLES = ("selection_coins", "selections", "updates", "secagg_members", "secagg_shares")


@pytest.fixture
def server(tmp_path, tiny_export, db_settings):
    with ServerProcess(tmp_path / "server", **SETTINGS, **db_settings) as srv:
        response = srv.admin("POST", "/v1/admin/models",
                             body=zip_bundle_dir(tiny_export.bundle_dir),
                             headers={"Content-Type": "application/zip"})
        assert response.status == 201  # version 1
        yield srv


def new_client(server, token: str | None = None, identity: DeviceIdentity | None = None
               ) -> SyncClient:
    keys = json.loads(server.request("GET", "/v1/server-keys").data)
    return SyncClient(server.url, identity or DeviceIdentity(Ed25519PrivateKey.generate()),
                      server_signing_key=base64.b64decode(keys["signing_key"]),
                      outbox_dir=tempfile.mkdtemp(), enrollment_token=token, retries=0,
                      pool=urllib3.PoolManager(maxsize=1))


def age(server, table: str, column: str, key: str, value: str, days: float) -> None:
    """Set ``column`` of the row whose ``key`` is ``value`` to ``days`` ago."""
    past = datetime.now(UTC) - timedelta(days=days)
    engine = create_engine(server.database_url)
    try:
        with engine.begin() as db:
            changed = db.execute(text(f"UPDATE {table} SET {column} = :past WHERE {key} = :v")
                                 .bindparams(bindparam("past", type_=DateTime(timezone=True))),
                                 {"past": past, "v": value}).rowcount
    finally:
        engine.dispose()
    assert changed == 1


def counts(server) -> dict[str, int]:
    engine = create_engine(server.database_url)
    try:
        with engine.connect() as db:
            return {t: db.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one()
                    for t in ("devices", "rounds", "model_versions", *ROUND_TABLES)}
    finally:
        engine.dispose()


def device_ids(server) -> set[str]:
    engine = create_engine(server.database_url)
    try:
        with engine.connect() as db:
            return set(db.execute(text("SELECT id FROM devices")).scalars())
    finally:
        engine.dispose()


def sweep(server) -> dict:
    response = server.admin("POST", "/v1/admin/retention/sweep")
    assert response.status == 200, response.data
    return json.loads(response.data)


def failed_round(server, clients) -> str:
    """A round the given devices were selected into (q = 1), closed with no upload: it
    fails, keeping one coin and one selection per device."""
    response = server.admin("POST", "/v1/admin/rounds", json={
        "upload_scheme": SEALED_SCHEME, "target_clients": len(clients)})
    assert response.status == 201, response.data
    round_id = json.loads(response.data)["round_id"]
    assert all(c.checkin(1, 5) is not None for c in clients)
    server.admin("POST", f"/v1/admin/rounds/{round_id}/close-stage")
    assert server.round(round_id)["state"] == "failed"
    return round_id


def test_only_silent_unnamed_devices_and_old_round_rows_are_pruned(server):
    silent, recent, in_recent_round, in_old_round = (new_client(server) for _ in range(4))
    for client in (silent, recent, in_recent_round, in_old_round):
        client.register()
    old_round = failed_round(server, [in_old_round])
    failed_round(server, [in_recent_round])
    age(server, "rounds", "finished_at", "id", old_round, days=8)
    for client in (silent, in_recent_round, in_old_round):
        age(server, "devices", "last_seen_at", "id", client.identity.device_id, days=31)
    before = counts(server)
    assert (before["selection_coins"], before["selections"], before["devices"]) == (2, 2, 4)

    result = sweep(server)
    assert result["policy"] == {"device_retention_days": 30,
                                "round_record_retention_days": 7}
    assert result["pruned"] == {"selection_coins": 1, "selections": 1, "updates": 0,
                                "secagg_members": 0, "secagg_shares": 0, "devices": 2}
    # Gone: the silent device, and the one whose only round row aged out with it. Kept: the
    # device seen lately, and the silent one a kept round row still names.
    assert device_ids(server) == {recent.identity.device_id,
                                  in_recent_round.identity.device_id}
    after = counts(server)
    assert (after["rounds"], after["model_versions"]) == (before["rounds"],
                                                          before["model_versions"])
    assert (after["selection_coins"], after["selections"]) == (1, 1)
    assert server.round(old_round)["state"] == "failed"  # the round itself stays

    # A pruned device is refused until it registers again; then it is a device like any.
    with pytest.raises(SyncError) as refused:
        silent.checkin(1, 5)
    assert (refused.value.status, refused.value.code) == (401, "unknown_device")
    assert "not registered" in refused.value.message
    silent.register()
    assert silent.checkin(1, 5) is None  # no round open, but a known device again
    assert recent.checkin(1, 5) is None

    again = sweep(server)["pruned"]
    assert set(again.values()) == {0}


def test_every_worker_sweeps_by_itself_after_its_first_response(tmp_path, db_settings):
    """No admin call: a restarted server (a new worker) sweeps after its first response."""
    with ServerProcess(tmp_path / "server", **SETTINGS, **db_settings) as server:
        kept, silent = new_client(server), new_client(server)
        kept.register()
        silent.register()
        age(server, "devices", "last_seen_at", "id", silent.identity.device_id, days=31)
    with ServerProcess(tmp_path / "server", **SETTINGS, **db_settings) as server:
        deadline = time.monotonic() + 60  # the sweep runs in a thread after the response
        while silent.identity.device_id in device_ids(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert device_ids(server) == {kept.identity.device_id}


def test_a_pruned_device_client_registers_again_by_itself(server, tmp_path):
    keys = json.loads(server.request("GET", "/v1/server-keys").data)
    device = DeviceClient(tmp_path / "device", server_key=base64.b64decode(keys["signing_key"]),
                          server_url=server.url)
    try:
        assert device.sync(train=False).model_version == 1
        device_id = device.sync_client.identity.device_id
        age(server, "devices", "last_seen_at", "id", device_id, days=31)
        assert sweep(server)["pruned"]["devices"] == 1
        assert device_id not in device_ids(server)
        report = device.sync(train=False)
        assert report.model_version == 1
        assert device_id in device_ids(server)
    finally:
        device.close()


def test_a_one_time_token_registers_its_own_pruned_key_again(tmp_path, db_settings):
    with ServerProcess(tmp_path / "server", ENROLLMENT_MODE="one-time", **SETTINGS,
                       **db_settings) as server:
        token = json.loads(server.admin("POST", "/v1/admin/enrollment-tokens",
                                        json={"count": 1}).data)["tokens"][0]
        client = new_client(server, token)
        client.register()
        age(server, "devices", "last_seen_at", "id", client.identity.device_id, days=31)
        assert sweep(server)["pruned"]["devices"] == 1
        assert client.request("GET", "/v1/models/current").status == 401
        assert client.register() == client.identity.device_id
        assert client.request("GET", "/v1/models/current").status == 404  # known again
        with pytest.raises(SyncError) as refused:
            new_client(server, token).register()  # the token vouches for that key alone
        assert refused.value.code == "enrollment_refused"


def test_retention_settings_refuse_negative_days():
    from sync_server.config import ConfigError, load_config

    assert load_config({"DEVICE_RETENTION_DAYS": 0}, environ={})["DEVICE_RETENTION_DAYS"] == 0
    for key in ("DEVICE_RETENTION_DAYS", "ROUND_RECORD_RETENTION_DAYS"):
        with pytest.raises(ConfigError, match=key):
            load_config({key: -1}, environ={})
