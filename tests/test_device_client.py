"""DeviceClient end to end: a real exported model, a real SQLite log, the real LiteRT
interpreter and real HTTP against the /v1 protocol server on loopback."""

import json
import stat
import time

import numpy as np
import pytest

from device_sdk.bundle import load_bundle
from device_sdk.device_client import DeviceClient, ModelNotReadyError
from tests.support.bundles import public_raw
from tests.support.protocol_server import ProtocolServer
from tests.support.server import shop


@pytest.fixture
def server(server_key, tiny_export):
    shapes = {k: v.shape for k, v in load_bundle(tiny_export.bundle_dir).weights().items()}
    with ProtocolServer(signing_key=server_key, expected_shapes=shapes) as srv:
        yield srv


@pytest.fixture
def device(tmp_path, server, server_key):
    client = DeviceClient(tmp_path / "device", server_key=public_raw(server_key),
                          server_url=server.url)
    yield client
    client.close()


def task_json(round_id="r1", model_version=1, **change):
    task = {"round_id": round_id, "model_version": model_version, "clip_norm": 0.5,
            "local_epochs": 2, "learning_rate": 0.3, "batch_size": 8, "proximal_mu": 0.0,
            "max_examples": 200, "trainable": None, "deadline": time.time() + 3600,
            "upload_scheme": "sealed-x25519-v1"}
    return {**task, **change}


def _bundle_gets(server):
    return [r for r in server.requests if r.path.endswith("/bundle")]


def test_first_sync_installs_then_etag_avoids_downloads(device, server, signed_bundles,
                                                        tiny_checkpoint):
    with pytest.raises(ModelNotReadyError):
        device.recommend()
    server.publish(signed_bundles[1])
    report = device.sync()
    assert (report.installed, report.model_version, report.install_error) == (1, 1, None)
    assert device.recommend(5)[0].source == "popular"  # empty history: popularity
    keys = shop(device, tiny_checkpoint)
    recs = device.recommend(10)
    assert len(recs) == 10 and recs[0].source == "model"
    device.sync()
    assert len(_bundle_gets(server)) == 1  # 304 Not Modified: nothing downloaded again
    assert device.events.count() == 3 * len(keys)

    server.publish(signed_bundles[2])
    assert device.sync().installed == 2 and device.model_version == 2
    assert len(_bundle_gets(server)) == 2


def test_a_round_trains_locally_and_the_server_opens_a_clipped_update(
    device, server, signed_bundles, tiny_checkpoint
):
    server.publish(signed_bundles[1])
    device.sync()
    shop(device, tiny_checkpoint)
    server.set_task(task_json())
    report = device.sync()
    assert report.uploaded and not report.queued and report.round_id == "r1"
    assert report.num_examples > 0 and report.update_norm == pytest.approx(0.5, rel=1e-4)
    [(device_id, round_id, tensors, meta)] = server.updates
    assert device_id == device.sync_client.identity.device_id and round_id == "r1"
    norm = np.sqrt(sum(np.sum(t.astype(np.float64) ** 2) for t in tensors.values()))
    assert norm <= 0.5 * (1 + 1e-5) and meta["num_examples"] == report.num_examples
    # the device answers a round once, even when the server offers it again
    assert device.sync().round_id is None
    server.set_task(task_json())
    assert "already answered" in device.sync().skipped and len(server.updates) == 1


def test_an_upload_the_server_cannot_take_now_is_queued_and_delivered_later(
    device, server, signed_bundles, tiny_checkpoint
):
    server.publish(signed_bundles[1])
    device.sync()
    shop(device, tiny_checkpoint)
    server.set_task(task_json("r7"))
    server.fail_next(50, status=503, path="/v1/rounds/r7/update")  # Retry-After: 0
    report = device.sync()
    assert report.queued and not report.uploaded and not server.updates
    server.clear_faults()
    report = device.sync()
    assert report.outbox_delivered == 1 and report.round_id is None  # delivered first
    assert [u[1] for u in server.updates] == ["r7"]
    assert device.sync().outbox_delivered == 0  # exactly once


def test_a_task_for_another_model_version_is_skipped(device, server, signed_bundles):
    server.publish(signed_bundles[1])
    device.sync()
    server.set_task(task_json(model_version=5))
    report = device.sync()
    assert report.skipped and "version 5" in report.skipped and not server.updates


def test_export_forget_and_private_files(device, server, signed_bundles, tiny_checkpoint,
                                         tmp_path):
    server.publish(signed_bundles[1])
    device.sync()
    keys = shop(device, tiny_checkpoint)
    out = tmp_path / "export.jsonl"
    assert device.export(out) == 3 * len(keys)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["item"] for r in rows[::3]] == keys
    server.set_task(task_json("r9"))
    server.fail_next(50, status=503, path="/v1/rounds/r9/update")
    assert device.sync().queued
    device.forget()
    assert device.events.count() == 0
    assert not any((device.data_dir / "outbox").iterdir())
    assert device.recommend(3)[0].source == "popular"  # the model itself is not personal
    key_mode = stat.S_IMODE((device.data_dir / "device_key").stat().st_mode)
    assert key_mode == 0o600


def test_no_server_configured_is_a_clear_error(tmp_path, server_key, signed_bundles):
    with DeviceClient(tmp_path / "offline", server_key=public_raw(server_key)) as offline:
        assert offline.install(signed_bundles[1]).version == 1
        assert offline.recommend(2)
        with pytest.raises(RuntimeError, match="no server_url"):
            offline.sync()
