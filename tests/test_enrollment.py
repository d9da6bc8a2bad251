"""One-time enrollment tokens on the real server (HTTP on loopback, SQLite and PostgreSQL):
the admin mints them, each registers exactly one device key, only digests are stored, and
a server in one-time mode refuses registration without one. No mocks."""

import hashlib
import json
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, text

from device_sdk.device_identity import DeviceIdentity
from device_sdk.sync_client import SyncClient, SyncError
from tests.support.server import ADMIN, ServerProcess, signing_key_of


@pytest.fixture
def server(tmp_path, db_settings):
    with ServerProcess(tmp_path / "server", ADMIN_TOKEN=ADMIN, ENROLLMENT_MODE="one-time",
                       **db_settings) as srv:
        yield srv


def client(server, token=None) -> SyncClient:
    return SyncClient(server.url, DeviceIdentity(Ed25519PrivateKey.generate()),
                      server_signing_key=signing_key_of(server),
                      outbox_dir=Path(tempfile.mkdtemp()), enrollment_token=token,
                      retries=0)


def mint(server, count):
    response = server.admin("POST", "/v1/admin/enrollment-tokens", json={"count": count})
    return response.status, json.loads(response.data)


def test_each_token_registers_exactly_one_device(server):
    status, minted = mint(server, 3)
    assert status == 201 and minted["mode"] == "one-time" and len(set(minted["tokens"])) == 3
    with pytest.raises(SyncError) as refused:
        client(server).register()  # no token
    assert (refused.value.status, refused.value.code) == (403, "enrollment_refused")
    with pytest.raises(SyncError):
        client(server, "not-a-minted-token").register()

    first = client(server, minted["tokens"][0])
    device_id = first.register()
    assert first.register() == device_id  # a retry with its own token: still that device
    with pytest.raises(SyncError) as reused:
        client(server, minted["tokens"][0]).register()  # another key, a used token
    assert reused.value.code == "enrollment_refused"
    assert all(client(server, t).register() for t in minted["tokens"][1:])

    engine = create_engine(server.database_url)
    try:
        with engine.connect() as db:
            rows = db.execute(text("SELECT token_sha256, device_id FROM enrollment_tokens "
                                   "WHERE used_at IS NOT NULL")).all()
            devices = db.execute(text("SELECT COUNT(*) FROM devices")).scalar_one()
    finally:
        engine.dispose()
    assert len(rows) == 3 == devices
    # Digests only: no minted token appears in the database.
    assert {hashlib.sha256(t.encode()).hexdigest() for t in minted["tokens"]} == {
        r.token_sha256 for r in rows}
    assert device_id in {r.device_id for r in rows}


def test_minting_needs_the_admin_and_a_sane_count(server):
    response = server.request("POST", "/v1/admin/enrollment-tokens", json={"count": 1})
    assert response.status == 401
    for count in (0, 1001, "3", None, 2.0):
        status, body = mint(server, count)
        assert (status, body["error"]["code"]) == (400, "bad_request"), count
