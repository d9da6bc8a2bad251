"""Staged rollout, pause and rollback on the real sync server (subprocess, real HTTP), seen
by real DeviceClients: a percentage of devices chosen by a stable hash of the device id,
anti-rollback on the devices, and a rollback that republishes the parent under a new
version. No mocks; no timed assertions."""

import json

import numpy as np
import pytest

from device_sdk.bundle import load_bundle
from device_sdk.device_client import DeviceClient
from device_sdk.protocol import SEALED_SCHEME
from sync_server.registry import in_rollout, republish_weights
from tests.support.bundles import copy_bundle, zip_bundle
from tests.support.server import (
    REPUBLISH_SETTINGS,
    ServerProcess,
    answer_of,
    publish,
    signing_key_of,
)

N_DEVICES = 20


def publish_answer(server, zip_bytes, percent=None):
    return answer_of(publish(server, zip_bytes, rollout_percent=percent))


def admin_post(server, path, **kwargs):
    return answer_of(server.admin("POST", path, **kwargs))


@pytest.fixture
def server(tmp_path, db_settings):
    with ServerProcess(tmp_path / "server", **REPUBLISH_SETTINGS, **db_settings) as srv:
        yield srv


@pytest.fixture
def v2_zip(tiny_export, tmp_path):
    """Version 2: version 1 with every weight shifted (the tflite is unchanged)."""
    base = copy_bundle(tiny_export.bundle_dir, tmp_path / "v1" / "bundle")
    weights = {k: v + np.float32(0.01) for k, v in load_bundle(base).weights().items()}
    return zip_bundle(republish_weights(weights, base, 2, {"note": "v2"}))


def new_devices(server, tmp_path, prefix, n):
    key = signing_key_of(server)
    return [DeviceClient(tmp_path / f"{prefix}{i}", server_key=key, server_url=server.url)
            for i in range(n)]


def close_all(devices):
    for device in devices:
        device.close()


def test_staged_rollout_pause_and_rollback(server, tmp_path, tiny_export, v2_zip):
    status, v1 = publish_answer(server, zip_bundle(tiny_export.bundle_dir))
    assert (status, v1["model_version"], v1["rollout_percent"]) == (201, 1, 100)
    devices = new_devices(server, tmp_path, "device", N_DEVICES)
    try:
        assert all(d.sync(train=False).model_version == 1 for d in devices)

        status, v2 = publish_answer(server, v2_zip, percent=50)
        assert (status, v2["model_version"], v2["rollout_percent"]) == (201, 2, 50)
        first = [d.sync(train=False).model_version for d in devices]
        assert set(first) == {1, 2}
        assert 0.2 <= first.count(2) / N_DEVICES <= 0.8
        # the server's choice is the documented hash, and stable across syncs
        ids = [d.sync_client.identity.device_id for d in devices]
        assert first == [2 if in_rollout(2, i, 50) else 1 for i in ids]
        assert [d.sync(train=False).model_version for d in devices] == first
        assert [d.sync(train=False).install_error for d in devices] == [None] * N_DEVICES

        # rounds train the newest fully rolled-out version, not one still in rollout
        response = server.admin("POST", "/v1/admin/rounds", json={"target_clients": 2,
                                                                    "upload_scheme": SEALED_SCHEME})
        opened = json.loads(response.data)
        assert (response.status, opened["model_version"]) == (201, 1)

        assert admin_post(server, "/v1/admin/models/2/rollout", json={"percent": 101})[0] == 400
        status, raised = admin_post(server, "/v1/admin/models/2/rollout", json={"percent": 100})
        assert (status, raised["rollout_percent"]) == (200, 100)
        assert [d.sync(train=False).model_version for d in devices] == [2] * N_DEVICES

        status, paused = admin_post(server, "/v1/admin/models/2/pause")
        assert (status, paused["status"]) == (200, "paused")
        for device in devices:  # offered version 1 again, which they refuse (anti-rollback)
            report = device.sync(train=False)
            assert report.model_version == 2 and report.installed is None
        [fresh] = new_devices(server, tmp_path, "fresh", 1)
        try:
            assert fresh.sync(train=False).model_version == 1
        finally:
            fresh.close()
        assert admin_post(server, "/v1/admin/models/2/resume")[1]["status"] == "published"

        status, rolled = admin_post(server, "/v1/admin/models/2/rollback")
        assert status == 201
        assert (rolled["paused"]["model_version"], rolled["paused"]["status"]) == (2, "paused")
        assert rolled["published"]["model_version"] == 3
        assert rolled["published"]["parent_version"] == 2
        for device in devices:
            report = device.sync(train=False)
            assert (report.installed, report.model_version, report.install_error) == (3, 3, None)
        v3 = devices[0].models.bundle(3)
        assert load_bundle(v3.directory, public_key=signing_key_of(server)).version == 3
        assert v3.manifest["parent_version"] == 2
        assert v3.manifest["provenance"]["rollback_of"] == 2
        original = load_bundle(tiny_export.bundle_dir)
        assert v3.weights().keys() == original.weights().keys()
        assert all(np.array_equal(v3.weights()[k], w) for k, w in original.weights().items())
        assert v3.read("model.tflite") == original.read("model.tflite")
        [late] = new_devices(server, tmp_path, "late", 1)
        try:
            assert late.sync(train=False).model_version == 3
        finally:
            late.close()
    finally:
        close_all(devices)

    models = json.loads(server.admin("GET", "/v1/admin/models").data)["models"]
    assert [(m["model_version"], m["status"]) for m in models] == [
        (1, "published"), (2, "paused"), (3, "published")]


def test_rollout_admin_errors(server, tiny_export):
    assert publish_answer(server, zip_bundle(tiny_export.bundle_dir), percent="half")[0] == 400
    assert publish_answer(server, zip_bundle(tiny_export.bundle_dir), percent=0)[0] == 201
    status, body = admin_post(server, "/v1/admin/models/9/pause")
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = admin_post(server, "/v1/admin/models/1/rollback")
    assert (status, body["error"]["code"]) == (409, "no_parent")
    status, body = admin_post(server, "/v1/admin/models/1/rollout", json={"pct": 5})
    assert (status, body["error"]["code"]) == (400, "bad_rollout")


def test_in_rollout_is_stable_monotonic_and_independent_across_versions():
    ids = [f"{n:032x}" for n in range(2000)]
    at = {p: {i for i in ids if in_rollout(5, i, p)} for p in (0, 10, 50, 100)}
    assert at[0] == set() and at[100] == set(ids)
    assert at[10] <= at[50]  # raising the percentage only adds devices
    assert 0.4 < len(at[50]) / len(ids) < 0.6
    other = {i for i in ids if in_rollout(6, i, 50)}
    assert 0.15 < len(at[50] & other) / len(ids) < 0.35  # about a quarter: independent


def test_a_rollback_that_loses_the_race_for_its_version_leaves_no_blob(tiny_export, tmp_path):
    """The race of ``test_simultaneous_publishes_of_one_version_store_exactly_one``, made
    deterministic: while a rollback of version 2 is storing its zip as version 3, another
    bundle is published as version 3 first. The rollback is refused (409
    ``version_not_newer``) and its zip, whose bytes differ from the winner's, is gone: every
    blob left is a stored version's."""
    from sync_server.blobs import BlobStore
    from sync_server.db import Database, upgrade
    from sync_server.errors import ApiError
    from sync_server.keys import ServerKeyPairs
    from sync_server.models import ModelVersion
    from sync_server.registry import publish_bundle, rollback_version

    url = f"sqlite:///{tmp_path / 'server.db'}"
    upgrade(url)
    db, keys = Database(url), ServerKeyPairs.load_or_create(tmp_path / "keys")
    store = BlobStore(tmp_path / "blobs")
    base = copy_bundle(tiny_export.bundle_dir, tmp_path / "v1" / "bundle")
    common = dict(db=db, keys=keys, scratch_dir=tmp_path / "scratch", max_bytes=1 << 26)
    publish_bundle(zip_bundle(base), blobs=store, **common)
    publish_bundle(zip_bundle(republish_weights({}, base, 2, {})), blobs=store, **common)
    rival = zip_bundle(republish_weights({}, base, 3, {"rival": True}))

    class RivalPublishesFirst(BlobStore):
        def put(self, data: bytes) -> str:
            publish_bundle(rival, blobs=store, **common)
            return super().put(data)

    with pytest.raises(ApiError) as refused:
        rollback_version(2, db=db, blobs=RivalPublishesFirst(store.root), keys=keys,
                         scratch_dir=tmp_path / "scratch")
    assert (refused.value.code, refused.value.status) == ("version_not_newer", 409)
    with db.session() as session:
        rows = session.query(ModelVersion).all()
    assert sorted(r.version for r in rows) == [1, 2, 3]
    assert all(r.status == "published" for r in rows)  # the refused rollback paused nothing
    assert {p.name for p in store.root.rglob("*") if p.is_file()} == {
        r.blob_sha256 for r in rows}
