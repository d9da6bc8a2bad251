"""SyncClient against a real /v1 HTTP server on loopback (tests/support/protocol_server.py): signed
requests, pinned keys, manifests and bundles, round tasks, sealed uploads, retries and the
outbox. No mocks; no timing assertions (backoff is tiny so the suite stays quick)."""

import io
import os
import stat
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import urllib3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_sdk.bundle import load_bundle, save_weights, write_bundle
from device_sdk.device_identity import DeviceIdentity
from device_sdk.item_vocab import ItemVocab
from device_sdk.model_update import ModelUpdate
from device_sdk.protocol import HEADER_NONCE, HEADER_SIGNATURE, RoundTask
from device_sdk.sync_client import SyncClient, SyncError
from tests.support.protocol_server import ProtocolServer

SHAPES = {"out.weight": (5, 3), "out.bias": (5,)}
UPDATE_PATH = "/v1/rounds/r1/update"


@pytest.fixture
def server():
    with ProtocolServer(expected_shapes=SHAPES) as srv:
        yield srv


@pytest.fixture
def make_client(server, tmp_path):
    def make(key_name="device.key", retries=4, **kwargs):
        kwargs.setdefault("server_signing_key", server.signing_public_key)
        identity = DeviceIdentity.load_or_create(tmp_path / key_name)
        return SyncClient(server.url, identity, outbox_dir=tmp_path / f"{key_name}.outbox",
                          retries=retries, backoff_factor=0.001, timeout=60.0, **kwargs)

    return make


@pytest.fixture
def client(make_client):
    c = make_client()
    c.register()
    return c


def task_json(round_id="r1", **change):
    task = {"round_id": round_id, "model_version": 1, "clip_norm": 1.0, "local_epochs": 1,
            "learning_rate": 0.1, "batch_size": 8, "proximal_mu": 0.0, "max_examples": 100,
            "trainable": None, "deadline": time.time() + 3600,
            "upload_scheme": "sealed-x25519-v1"}
    return {**task, **change}


def make_update(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    delta = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    norm = float(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in delta.values())))
    delta = {k: (v * (0.9 / norm)).astype(np.float32) for k, v in delta.items()}
    return ModelUpdate(base_version=1, delta=delta, num_examples=12, clip_norm=1.0, norm=0.9,
                       norm_before_clip=norm)


def make_bundle(directory, signer, version=1):
    vocab = ItemVocab(["", "a", "b", "c"], popular=[1, 2])
    files = {
        "model.tflite": b"transport test: not a real model",
        "weights.npz": save_weights({"out.weight": np.zeros((4, 2))}),
        "items.json": vocab.to_json(),
    }
    manifest = {"model_version": version, "parent_version": None,
                "architecture": {"name": "dual_encoder", "config": {}},
                "items_digest": vocab.digest(), "golden": {}, "privacy": {}, "provenance": {},
                "created": "2026-01-01T00:00:00Z"}
    return write_bundle(directory, files, manifest, signer=signer)


def posts_to(server, path):
    return [r for r in server.requests if r.method == "POST" and r.path == path]


# --- identity and registration -----------------------------------------------------------


def test_register_creates_a_private_key_and_is_idempotent(make_client, server, tmp_path):
    client = make_client()
    key_file = tmp_path / "device.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32
    assert client.register() == client.identity.device_id
    assert client.register() == client.identity.device_id
    assert server.devices == {client.identity.device_id: client.identity.public_key_raw}
    assert [r.status for r in posts_to(server, "/v1/devices")] == [201, 200]
    assert DeviceIdentity.load_or_create(key_file).device_id == client.identity.device_id


def test_group_readable_key_file_is_refused(tmp_path):
    key_file = tmp_path / "device.key"
    DeviceIdentity.load_or_create(key_file)
    os.chmod(key_file, 0o640)
    with pytest.raises(PermissionError, match=f"{key_file}.*chmod 600 {key_file}"):
        DeviceIdentity.load_or_create(key_file)


def test_concurrent_first_runs_agree_on_one_identity(tmp_path):
    key_file = tmp_path / "keys" / "device.key"
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: DeviceIdentity.load_or_create(key_file).device_id, range(8)))
    assert len(ids) == 1
    assert [p.name for p in key_file.parent.iterdir()] == ["device.key"]  # no temp files left


def test_corrupt_key_file_is_refused(tmp_path):
    key_file = tmp_path / "device.key"
    DeviceIdentity.load_or_create(key_file)
    key_file.write_bytes(b"short")
    with pytest.raises(ValueError, match="not a raw 32-byte"):
        DeviceIdentity.load_or_create(key_file)


def test_enrollment_token_is_required_when_the_server_sets_one(tmp_path):
    with ProtocolServer(enrollment_token="s3cret") as server:
        identity = DeviceIdentity.load_or_create(tmp_path / "k")
        for token, outcome in [(None, "enrollment_refused"), ("wrong", "enrollment_refused")]:
            client = SyncClient(server.url, identity, server_signing_key=server.signing_public_key,
                                outbox_dir=tmp_path / "o", enrollment_token=token)
            with pytest.raises(SyncError) as info:
                client.register()
            assert (info.value.code, info.value.status) == (outcome, 403)
        client = SyncClient(server.url, identity, server_signing_key=server.signing_public_key,
                            outbox_dir=tmp_path / "o", enrollment_token="s3cret")
        assert client.register() == identity.device_id


def test_unregistered_device_is_refused(make_client):
    with pytest.raises(SyncError) as info:
        make_client().checkin(None, 3)
    assert (info.value.code, info.value.status, info.value.retryable) == (
        "unknown_device", 401, False)


def test_replayed_request_is_refused_by_the_server(client, server):
    client.checkin(None, 1)
    original = posts_to(server, "/v1/rounds/checkin")[-1]
    replay = urllib3.request("POST", server.url + original.path, body=original.body,
                             headers=original.headers, retries=False)
    assert replay.status == 401 and replay.json()["error"]["code"] == "replayed_request"


# --- server keys, manifests, bundles -----------------------------------------------------


def test_server_keys_are_verified_against_the_pinned_key(client, server, make_client):
    keys = client.server_keys()
    assert keys.signing_key == server.signing_public_key
    assert keys.transport_key == server.transport_public_key
    assert client.known_server_keys == keys
    impostor = make_client(key_name="other.key", server_signing_key=bytes(
        Ed25519PrivateKey.generate().public_key().public_bytes_raw()))
    with pytest.raises(SyncError, match="server_key_mismatch"):
        impostor.server_keys()


def test_a_server_with_another_signing_key_is_refused(client, server, tmp_path):
    with ProtocolServer() as other:
        pinned_elsewhere = SyncClient(other.url, client.identity,
                                      server_signing_key=server.signing_public_key,
                                      outbox_dir=tmp_path / "o2")
        with pytest.raises(SyncError) as info:
            pinned_elsewhere.server_keys()
        assert info.value.code == "server_key_mismatch"


def test_manifest_fetch_and_etag(client, server, tmp_path):
    with pytest.raises(SyncError) as info:
        client.fetch_manifest()
    assert (info.value.code, info.value.status) == ("no_model", 404)
    bundle_dir = make_bundle(tmp_path / "b1", server.signer)
    server.publish(bundle_dir)
    first = client.fetch_manifest()
    assert first.manifest_bytes == (bundle_dir / "manifest.json").read_bytes()
    assert first.signature == (bundle_dir / "manifest.sig").read_bytes()
    assert first.version == 1 and first.manifest["model_version"] == 1 and first.etag
    assert client.fetch_manifest(etag=first.etag) is None
    assert [r.status for r in server.requests if r.path == "/v1/models/current"][-1] == 304
    server.publish(make_bundle(tmp_path / "b2", server.signer, version=2))
    second = client.fetch_manifest(etag=first.etag)
    assert second.version == 2 and second.etag != first.etag


def test_manifest_signed_by_another_key_is_refused(client, server, tmp_path):
    rogue = Ed25519PrivateKey.generate()
    server.publish(make_bundle(tmp_path / "b", rogue.sign))
    with pytest.raises(SyncError, match="bad_manifest_signature"):
        client.fetch_manifest()


def test_bundle_download_verifies_after_extraction(client, server, tmp_path):
    bundle_dir = make_bundle(tmp_path / "b", server.signer)
    server.publish(bundle_dir)
    data = client.download_bundle(1)
    out = tmp_path / "downloaded"
    out.mkdir()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(zf.namelist()) == sorted(p.name for p in bundle_dir.iterdir())
        for name in zf.namelist():
            (out / name).write_bytes(zf.read(name))
    bundle = load_bundle(out, public_key=server.signing_public_key)
    assert bundle.version == 1
    with pytest.raises(SyncError, match="body_too_large"):
        client.download_bundle(1, max_bytes=100)
    with pytest.raises(SyncError) as info:
        client.download_bundle(9)
    assert info.value.code == "no_model"


# --- check-in and uploads ----------------------------------------------------------------


def test_checkin_with_and_without_a_task(client, server):
    assert client.checkin(None, 5) is None
    assert client.checkin_retry_after == 60
    server.set_task(task_json())
    task = client.checkin(1, 5)
    assert task == RoundTask.from_json(task_json(deadline=task.deadline))
    server.set_task(task_json(), selected=["someone-else"])
    assert client.checkin(1, 5) is None


def test_upload_is_sealed_and_decrypted_to_the_exact_delta(client, server):
    server.set_task(task_json())
    update = make_update()
    result = client.upload(client.checkin(1, 12), update)
    assert result == {"accepted": True, "round_id": "r1"}
    (device_id, round_id, tensors, meta), = server.updates
    assert (device_id, round_id) == (client.identity.device_id, "r1")
    for name, value in update.delta.items():
        np.testing.assert_array_equal(tensors[name], value)
    assert meta["num_examples"] == 12 and meta["base_version"] == 1
    body = posts_to(server, UPDATE_PATH)[0].body
    assert body.startswith(b"PRS1") and b"out.weight" not in body
    assert update.delta["out.weight"].tobytes()[:16] not in body


def test_duplicate_upload_is_refused(client, server):
    server.set_task(task_json())
    task = client.checkin(1, 12)
    client.upload(task, make_update())
    with pytest.raises(SyncError) as info:
        client.upload(task, make_update(seed=1))
    assert (info.value.code, info.value.status, info.value.retryable) == (
        "duplicate_update", 409, False)
    assert len(server.updates) == 1


def test_final_refusals_carry_the_server_code(client, server):
    server.set_task(task_json(), selected=["someone-else"])
    task = RoundTask.from_json(task_json())
    with pytest.raises(SyncError, match="not_selected"):
        client.upload(task, make_update())
    server.set_task(task_json())
    with pytest.raises(SyncError) as info:
        client.upload(task, make_update(shapes={"out.weight": (5, 3)}))
    assert (info.value.code, info.value.status) == ("update_rejected", 422)
    server.close_round("r1")
    with pytest.raises(SyncError, match="round_closed"):
        client.upload(task, make_update())
    with pytest.raises(SyncError, match="unsupported_scheme"):
        client.upload(RoundTask.from_json(task_json(upload_scheme="secagg-v9")), make_update())
    with pytest.raises(ValueError, match="does not fit"):
        client.upload(RoundTask.from_json(task_json(model_version=2)), make_update())
    assert server.updates == [] and client.outbox() == []


def test_retries_after_503_use_fresh_signatures(client, server):
    server.set_task(task_json())
    task = client.checkin(1, 12)
    server.fail_next(3, status=503, path=UPDATE_PATH)
    assert client.upload(task, make_update())["accepted"] is True
    attempts = posts_to(server, UPDATE_PATH)
    assert [r.status for r in attempts] == [503, 503, 503, 202]
    assert len({r.headers[HEADER_NONCE] for r in attempts}) == 4
    assert len({r.headers[HEADER_SIGNATURE] for r in attempts}) == 4
    assert len(server.updates) == 1


def test_429_with_retry_after_is_retried_for_gets(client, server):
    server.fail_next(2, status=429, retry_after="0", path="/v1/server-keys")
    assert client.server_keys().transport_key == server.transport_public_key
    statuses = [r.status for r in server.requests if r.path == "/v1/server-keys"]
    assert statuses == [429, 429, 200]


def test_other_4xx_are_not_retried(client, server):
    server.fail_next(1, status=400, path="/v1/rounds/checkin")
    with pytest.raises(SyncError) as info:
        client.checkin(None, 1)
    assert info.value.status == 400 and not info.value.retryable
    assert len(posts_to(server, "/v1/rounds/checkin")) == 1


def test_exhausted_retries_queue_the_sealed_update(make_client, server):
    client = make_client(retries=2)
    client.register()
    server.set_task(task_json())
    task = client.checkin(1, 12)
    server.fail_next(3, status=503, path=UPDATE_PATH)
    result = client.upload(task, make_update())
    assert result == {"accepted": False, "queued": True, "round_id": "r1",
                      "error": "unavailable"}
    assert [p.name for p in client.outbox()] == ["r1.upload"]
    assert client.flush_outbox() == 1
    assert client.outbox() == [] and len(server.updates) == 1


def test_server_down_queues_then_flush_delivers_exactly_once(client, server):
    server.set_task(task_json())
    task = client.checkin(1, 12)
    client.server_keys()
    update = make_update()
    server.stop()
    result = client.upload(task, update)
    assert result["queued"] is True and result["error"] == "unreachable"
    (entry,) = client.outbox()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert b"PRS1" in entry.read_bytes() and b"out.weight" not in entry.read_bytes()
    assert client.flush_outbox() == 0  # still down: kept
    assert client.outbox() == [entry]
    server.start()
    assert client.flush_outbox() == 1
    assert client.flush_outbox() == 0 and client.outbox() == []
    (_, round_id, tensors, _), = server.updates
    assert round_id == "r1"
    np.testing.assert_array_equal(tensors["out.bias"], update.delta["out.bias"])


def test_unreachable_without_known_keys_raises_retryable(client, server):
    server.set_task(task_json())
    task = client.checkin(1, 12)
    server.stop()
    with pytest.raises(SyncError) as info:
        client.upload(task, make_update())
    assert info.value.code == "unreachable" and info.value.retryable
    assert client.outbox() == []


def test_queued_upload_for_a_closed_round_is_dropped(client, server):
    server.set_task(task_json())
    task = client.checkin(1, 12)
    client.server_keys()
    server.stop()
    assert client.upload(task, make_update())["queued"] is True
    server.start()
    server.close_round("r1")
    assert client.flush_outbox() == 0
    assert client.outbox() == [] and server.updates == []
    assert [r.status for r in posts_to(server, UPDATE_PATH)] == [409]


def test_queued_upload_past_its_deadline_is_dropped_unsent(client, server):
    server.set_task(task_json())
    task = client.checkin(1, 12)
    client.server_keys()
    server.stop()
    assert client.upload(task, make_update())["queued"] is True
    server.start()
    assert client.flush_outbox(now=task.deadline + 1) == 0
    assert client.outbox() == [] and posts_to(server, UPDATE_PATH) == []
