"""The attestation hook on the real server over HTTP (SQLite and PostgreSQL): the verifier
named by ATTESTATION_VERIFIER sees each new key's evidence at registration; it accepts,
refuses (403 ``attestation_failed``, nothing stored, no token spent) or fails (503
``attestation_unavailable`` with Retry-After).

The verifier is a real module the server imports: a stand-in for a platform service that
vouches for a key with an HMAC over it (a real platform signs a statement whose nonce binds
the key the same way)."""

import base64
import hashlib
import hmac
import json
import os
import tempfile
import textwrap

import pytest
import urllib3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_sdk.device_identity import DeviceIdentity
from device_sdk.sync_client import SyncClient, SyncError
from tests.support.server import ServerProcess

PLATFORM_SECRET = b"platform-secret"
VERIFIER = textwrap.dedent('''
    import hashlib
    import hmac

    from sync_server.attestation import AttestationFailed

    def verify(request):
        if request.evidence == "platform-down":
            raise ConnectionError("the platform's attestation service did not answer")
        if not isinstance(request.evidence, str):
            raise AttestationFailed("no attestation evidence")
        expected = hmac.new(PLATFORM_SECRET, request.public_key, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.evidence, expected):
            raise AttestationFailed("the evidence does not vouch for this key")
        return True
''').replace("PLATFORM_SECRET", repr(PLATFORM_SECRET))


def vouch(public_key: bytes) -> str:
    return hmac.new(PLATFORM_SECRET, public_key, hashlib.sha256).hexdigest()


@pytest.fixture
def verifier_path(tmp_path, monkeypatch):
    """The verifier module in a directory on the server's path (PYTHONPATH, inherited)."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "platform_attestation.py").write_text(VERIFIER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path / "plugins"), os.environ.get("PYTHONPATH", "")]))
    return "platform_attestation:verify"


def new_client(server, attestation=None, token=None) -> SyncClient:
    keys = json.loads(server.request("GET", "/v1/server-keys").data)
    return SyncClient(server.url, DeviceIdentity(Ed25519PrivateKey.generate()),
                      server_signing_key=base64.b64decode(keys["signing_key"]),
                      outbox_dir=tempfile.mkdtemp(), attestation=attestation,
                      enrollment_token=token, retries=0, pool=urllib3.PoolManager(maxsize=1))


def registered(server) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(server.database_url)
    try:
        with engine.connect() as db:
            return db.execute(text("SELECT COUNT(*) FROM devices")).scalar_one()
    finally:
        engine.dispose()


def test_the_verifier_accepts_refuses_or_is_unavailable(tmp_path, verifier_path, db_settings):
    with ServerProcess(tmp_path / "server", ATTESTATION_VERIFIER=verifier_path,
                       **db_settings) as server:
        genuine = new_client(server, attestation=vouch)
        assert genuine.register() == genuine.identity.device_id
        assert genuine.checkin(None, 0) is None  # a registered device like any other
        assert genuine.register() == genuine.identity.device_id  # known: not asked again

        refusals = {  # the verifier's reason reaches the device
            "no attestation evidence": new_client(server),
            "does not vouch for this key": new_client(
                server, attestation=lambda _key: vouch(b"x" * 32)),  # another key's
        }
        for reason, client in refusals.items():
            with pytest.raises(SyncError) as refused:
                client.register()
            assert (refused.value.status, refused.value.code) == (403, "attestation_failed")
            assert reason in refused.value.message

        down = new_client(server, attestation=lambda _key: "platform-down")
        response = down.request("POST", "/v1/devices", json={
            "public_key": base64.b64encode(down.identity.public_key_raw).decode(),
            "attestation": "platform-down"})
        assert response.status == 503
        assert json.loads(response.data)["error"]["code"] == "attestation_unavailable"
        assert int(response.headers["Retry-After"]) > 0
        assert registered(server) == 1  # only the genuine device was stored


def test_a_refused_attestation_spends_no_enrollment_token(tmp_path, verifier_path,
                                                         db_settings):
    with ServerProcess(tmp_path / "server", ATTESTATION_VERIFIER=verifier_path,
                       ENROLLMENT_MODE="one-time", ADMIN_TOKEN="a", **db_settings) as server:
        token = json.loads(server.admin("POST", "/v1/admin/enrollment-tokens",
                                        json={"count": 1}).data)["tokens"][0]
        with pytest.raises(SyncError) as refused:
            new_client(server, token=token).register()
        assert refused.value.code == "attestation_failed"
        genuine = new_client(server, attestation=vouch, token=token)
        assert genuine.register() == genuine.identity.device_id
        assert registered(server) == 1


def test_a_verifier_that_cannot_be_imported_stops_the_server(tmp_path):
    with pytest.raises(RuntimeError) as failed:
        ServerProcess(tmp_path / "server", ATTESTATION_VERIFIER="no_such_module:verify")
    assert "ATTESTATION_VERIFIER" in str(failed.value)
