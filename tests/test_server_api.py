"""The real sync server (subprocess, real HTTP on loopback, SQLite, keys on disk) driven by
the device SDK's SyncClient and DeviceClient. No mocks; no timing assertions."""

import io
import json
import stat
import zipfile
from functools import partial

import numpy as np
import pytest

from device_sdk.bundle import extract_bundle_zip, load_bundle, save_weights, write_bundle
from device_sdk.device_client import DeviceClient
from device_sdk.item_vocab import ItemVocab
from device_sdk.protocol import b64
from device_sdk.sync_client import SyncError
from tests.support.bundles import zip_bundle
from tests.support.server import (
    ADMIN,
    ServerProcess,
    error_of,
    publish,
    signing_key_of,
    sync_client,
)

MAX_BODY = 64 * 1024
# Unregistered (a test registers when it means to), short timeouts and backoff.
sync_client = partial(sync_client, register=False, timeout=10.0, backoff_factor=0.001)
error_of = partial(error_of, check_shape=True)  # the error document's shape checked too


@pytest.fixture
def server(tmp_path, db_settings):
    with ServerProcess(tmp_path / "server", ADMIN_TOKEN=ADMIN, MAX_BODY_BYTES=MAX_BODY,
                       **db_settings) as srv:
        yield srv


@pytest.fixture
def client(server, tmp_path):
    c = sync_client(server, tmp_path)
    c.register()
    return c


def make_bundle_zip(directory, version, parent=None, extra_files=None) -> bytes:
    """A small unsigned bundle (not a real tflite: transport tests only), zipped."""
    vocab = ItemVocab(["", "a", "b", "c"], popular=[1, 2])
    files = {
        "model.tflite": b"transport test: not a real model",
        "weights.npz": save_weights({"out.weight": np.full((4, 2), version, np.float32)}),
        "items.json": vocab.to_json(),
    }
    manifest = {"model_version": version, "parent_version": parent,
                "architecture": {"name": "dual_encoder", "config": {}},
                "items_digest": vocab.digest(), "golden": {}, "privacy": {}, "provenance": {},
                "created": "2026-01-01T00:00:00Z"}
    bundle_dir = write_bundle(directory / f"bundle-v{version}", files, manifest)
    for name, data in (extra_files or {}).items():
        (bundle_dir / name).write_bytes(data)
    return zip_bundle(bundle_dir)


# --- keys and registration ------------------------------------------------------------------


def test_server_keys_are_the_key_files_and_the_transport_key_is_endorsed(server, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key_file = server.data_dir / "keys" / "signing.key"
    for name in ("signing.key", "transport.key"):
        path = server.data_dir / "keys" / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    expected = Ed25519PrivateKey.from_private_bytes(key_file.read_bytes()).public_key()
    assert signing_key_of(server) == expected.public_bytes(Encoding.Raw, PublicFormat.Raw)
    keys = sync_client(server, tmp_path).server_keys()  # raises unless the endorsement verifies
    assert keys.signing_key == signing_key_of(server)
    admin_view = json.loads(server.admin("GET", "/v1/admin/server-keys").data)
    assert admin_view == json.loads(server.request("GET", "/v1/server-keys").data)


def test_registration_is_idempotent(server, tmp_path):
    client = sync_client(server, tmp_path)
    body = {"public_key": b64(client.identity.public_key_raw), "enrollment_token": None}
    statuses = [client.request("POST", "/v1/devices", json=body).status for _ in range(2)]
    assert statuses == [201, 200]
    assert client.register() == client.identity.device_id


def test_enrollment_token_is_enforced_when_configured(tmp_path):
    with ServerProcess(tmp_path / "server", ENROLLMENT_TOKEN="join-me") as srv:
        with pytest.raises(SyncError) as refused:
            sync_client(srv, tmp_path, "a").register()
        assert (refused.value.status, refused.value.code) == (403, "enrollment_refused")
        wrong = sync_client(srv, tmp_path, "b", enrollment_token="guess")
        with pytest.raises(SyncError, match="enrollment_refused"):
            wrong.register()
        ok = sync_client(srv, tmp_path, "c", enrollment_token="join-me")
        assert ok.register() == ok.identity.device_id


def test_unregistered_device_is_refused(server, tmp_path):
    with pytest.raises(SyncError) as refused:
        sync_client(server, tmp_path).fetch_manifest()
    assert (refused.value.status, refused.value.code) == (401, "unknown_device")


# --- models -------------------------------------------------------------------------------


def test_no_model_yet_is_404_no_model(client):
    with pytest.raises(SyncError) as missing:
        client.fetch_manifest()
    assert (missing.value.status, missing.value.code) == (404, "no_model")


def test_publish_fetch_etag_and_download_a_signed_bundle(server, client, tmp_path):
    response = publish(server, make_bundle_zip(tmp_path, 1))
    assert response.status == 201
    assert json.loads(response.data)["model_version"] == 1

    manifest = client.fetch_manifest()  # verifies the signature with the pinned key
    assert manifest.version == 1 and manifest.etag
    assert client.fetch_manifest(etag=manifest.etag) is None  # 304
    raw = client.request("GET", "/v1/models/current", headers={"If-None-Match": manifest.etag})
    assert (raw.status, raw.headers["ETag"], raw.data) == (304, manifest.etag, b"")

    data = client.download_bundle(1)
    assert sorted(zipfile.ZipFile(io.BytesIO(data)).namelist()) == [
        "items.json", "manifest.json", "manifest.sig", "model.tflite", "weights.npz"]
    got = tmp_path / "got"
    got.mkdir()
    extract_bundle_zip(data, got, 2**20)
    bundle = load_bundle(got, public_key=signing_key_of(server))
    assert bundle.version == 1 and bundle.manifest_bytes == manifest.manifest_bytes
    assert np.array_equal(bundle.weights()["out.weight"], np.ones((4, 2), np.float32))

    assert publish(server, make_bundle_zip(tmp_path, 2, parent=1)).status == 201
    assert client.fetch_manifest(etag=manifest.etag).version == 2
    listed = json.loads(server.admin("GET", "/v1/admin/models").data)["models"]
    assert [(m["model_version"], m["parent_version"], m["status"]) for m in listed] == [
        (1, None, "published"), (2, 1, "published")]
    blob = server.data_dir / "blobs" / listed[0]["blob_sha256"][:2] / listed[0]["blob_sha256"]
    assert blob.read_bytes() == data  # content-addressed on disk


def test_publishing_the_real_export_lets_a_device_install_and_recommend(
    server, tmp_path, tiny_export
):
    assert publish(server, zip_bundle(tiny_export.bundle_dir)).status == 201
    device = DeviceClient(tmp_path / "device", server_key=signing_key_of(server),
                          server_url=server.url)
    try:
        report = device.sync()
        assert (report.installed, report.model_version, report.install_error) == (1, 1, None)
        assert report.round_id is None  # no rounds yet: check-in offers no task
        recs = device.recommend(5)
        assert len(recs) == 5 and recs[0].source == "popular"
        assert device.sync().installed is None  # ETag: nothing downloaded again
    finally:
        device.close()


# --- refusals -----------------------------------------------------------------------------


def test_admin_api_is_disabled_without_a_configured_token(tmp_path):
    with ServerProcess(tmp_path / "server") as srv:
        response = srv.request("GET", "/v1/admin/models", headers={"Authorization": "Bearer "})
        assert error_of(response) == (403, "admin_disabled")


def test_signature_covers_the_raw_query_string(server, client, tmp_path):
    assert publish(server, make_bundle_zip(tmp_path, 1)).status == 201
    assert client.request("GET", "/v1/models/current?channel=beta&x=1").status == 200
    assert client.request("GET", "/v1/models/current").status == 200


def test_rate_limit_answers_429_with_retry_after(tmp_path):
    with ServerProcess(tmp_path / "server", RATE_LIMIT=3) as srv:
        client = sync_client(srv, tmp_path)
        client.register()  # request 1 of 3
        responses = [client.request("GET", "/v1/models/current") for _ in range(3)]
        # A one-minute window, started by the registration: the third request is refused
        # until it ends.
        assert [r.status for r in responses[:2]] == [404, 404]
        assert error_of(responses[2]) == (429, "rate_limited")
        assert 1 <= int(responses[2].headers["Retry-After"]) <= 60


# --- operations ---------------------------------------------------------------------------


def test_healthz_metrics_and_openapi(server, client):
    health = server.request("GET", "/healthz")
    assert (health.status, json.loads(health.data)) == (200, {"status": "ok"})
    metrics = server.request("GET", "/metrics").data.decode()
    assert 'pocketrec_http_requests_total{endpoint="devices.register",method="POST",' \
           'status="201"} 1.0' in metrics
    assert "pocketrec_http_received_bytes_total" in metrics
    document = json.loads(server.request("GET", "/v1/openapi.json").data)
    assert document["openapi"] == "3.1.0" and "/v1/devices" in document["paths"]


def test_openapi_lists_exactly_the_v1_routes(tmp_path):
    import re

    from sync_server import create_app
    from sync_server.openapi import openapi_document

    app = create_app({"DATA_DIR": str(tmp_path)})
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/v1/"):
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            routes.setdefault(path, set()).update(rule.methods - {"HEAD", "OPTIONS"})
    documented = {path: {m.upper() for m in ops}
                  for path, ops in openapi_document()["paths"].items()}
    assert routes == documented


def test_restart_keeps_keys_devices_and_models(tmp_path, db_settings):
    data_dir = tmp_path / "server"
    with ServerProcess(data_dir, ADMIN_TOKEN=ADMIN, **db_settings) as first:
        key = signing_key_of(first)
        client = sync_client(first, tmp_path)
        client.register()
        assert publish(first, make_bundle_zip(tmp_path, 4)).status == 201
    with ServerProcess(data_dir, ADMIN_TOKEN=ADMIN, **db_settings) as second:
        assert signing_key_of(second) == key
        again = sync_client(second, tmp_path)  # same key file: the same device
        assert again.fetch_manifest().version == 4
