"""The server under gunicorn with several workers, loaded by concurrent real devices.

``test_concurrent_devices_on_gunicorn``: a bounded run of the load driver that
``bench/load.py`` runs at larger sizes (``trainer/simulation/load.py``): 16 devices (the real
SDK, an Ed25519 identity and a keep-alive connection each, in 2 client processes) x 5
iterations against 3 gunicorn gthread workers started together on a fresh DATA_DIR and a
fresh database, SQLite and PostgreSQL. The workers race on the start path (migrations under
the DATA_DIR lock, keys created atomically): every device pins the signing key it was given
once and verifies every manifest with it, and every sealed upload is opened by whichever
worker gets it, so a worker with other keys would show as refused requests. Checked: no 5xx,
no connection error, no refusal at all, every request accounted for by type, the round
published with received == selected == target, and afterwards every device holds the new
version. The numbers it measures are printed, never asserted.

``test_a_gthread_worker_outlives_an_aggregation_longer_than_its_timeout``: the aggregation
runs after the response, in the worker (``response.call_on_close``); a sync worker's
heartbeat stops meanwhile and gunicorn kills it after ``--timeout`` (default 30 s, shorter
than a real export), leaving the round ``aggregating`` until its lease passes. A gthread
worker keeps its heartbeat: the same round publishes and no worker is replaced."""

import json
import time

import numpy as np

from tests.support.bundles import zip_bundle
from tests.support.server import GATED_PUBLISHER, REPUBLISH, signing_key_of
from trainer.simulation.load import (
    bundle_shapes,
    format_table,
    publish_and_open_round,
    random_update,
    run_load,
    summarize,
)
from trainer.simulation.server import GunicornServer

ADMIN = "load-admin"
DEVICES, ITERATIONS, WORKERS = 16, 5, 3
# Per device per minute (counted in the database, shared by the workers): raised so the run
# measures the server, not the limiter.
SETTINGS = {"ADMIN_TOKEN": ADMIN, "RATE_LIMIT": 100_000,
            "PUBLISHER": REPUBLISH}
EXPECTED_STATUS = {"register": {201}, "manifest": {200}, "manifest-conditional": {200, 304},
                   "bundle": {200}, "checkin": {200}, "server-keys": {200}, "upload": {202}}


def test_concurrent_devices_on_gunicorn(tmp_path, tiny_export, db_settings):
    with GunicornServer(tmp_path / "server", workers=WORKERS, threads=4,
                        **SETTINGS, **db_settings) as server:
        assert len(server.worker_pids()) == WORKERS
        round_id, base = publish_and_open_round(server, zip_bundle(tiny_export.bundle_dir),
                                                DEVICES)
        result = run_load(server, round_id, devices=DEVICES, iterations=ITERATIONS,
                          processes=2)
        served = json.loads(server.admin("GET", "/v1/admin/models").data)
    summary = summarize(result)
    print("\n" + format_table(summary))

    assert summary["errors"] == []
    samples = result["samples"]
    # No response other than the protocol's success answers: no 5xx, no 4xx (no 429), no
    # connection error or timeout (status 0).
    unexpected = [s for s in samples if s[1] not in EXPECTED_STATUS.get(s[0], set())]
    assert unexpected == []
    # Every request accounted for: each device made exactly its script's requests.
    counts = {kind: row["count"] for kind, row in summary["rows"].items() if kind != "all"}
    new_bundles = counts.pop("bundle") - DEVICES  # devices that saw the new version in time
    assert 0 <= new_bundles <= DEVICES
    assert counts == {"register": DEVICES, "manifest": DEVICES,
                      "manifest-conditional": DEVICES * (1 + ITERATIONS),
                      "checkin": DEVICES * ITERATIONS, "server-keys": DEVICES,
                      "upload": DEVICES}
    assert summary["rows"]["all"]["count"] == len(samples) == sum(counts.values()) + (
        DEVICES + new_bundles)
    assert all(np.isfinite(s[2]) and s[2] >= 0 for s in samples)

    rnd = summary["round"]
    assert (rnd["state"], rnd["reason"]) == ("published", None)
    assert rnd["selected"] == rnd["received"] == rnd["target"] == DEVICES == result["uploaded"]
    assert rnd["published_version"] == base + 1
    # Served afterwards: every device's conditional fetch gave it the new version.
    assert summary["final_versions"] == [(base + 1, DEVICES)]
    assert all(s[1] in (200, 304) for s in result["final_samples"])
    assert [m["model_version"] for m in served["models"]] == [base, base + 1]


def test_a_gthread_worker_outlives_an_aggregation_longer_than_its_timeout(
    tmp_path, tiny_export, db_settings, monkeypatch
):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from device_sdk.device_identity import DeviceIdentity
    from device_sdk.sync_client import SyncClient

    gate = tmp_path / "gate"
    monkeypatch.setenv("TEST_PUBLISH_GATE", str(gate))
    timeout_s = 2
    settings = {**SETTINGS, "PUBLISHER": GATED_PUBLISHER}
    with GunicornServer(tmp_path / "server", workers=2, options=("--timeout", str(timeout_s)),
                        **settings, **db_settings) as server:
        workers = sorted(server.worker_pids())
        round_id, base = publish_and_open_round(server, zip_bundle(tiny_export.bundle_dir), 1)
        client = SyncClient(server.url, DeviceIdentity(Ed25519PrivateKey.generate()),
                            server_signing_key=signing_key_of(server),
                            outbox_dir=tmp_path / "outbox", retries=0, timeout=30.0)
        client.register()
        manifest = client.fetch_manifest()
        shapes = bundle_shapes(client.download_bundle(manifest.version), manifest.manifest_bytes)
        task = client.checkin(manifest.version, num_examples=20)
        assert task is not None and task.round_id == round_id
        result = client.upload(task, random_update(task, shapes, np.random.default_rng(0)))
        assert result["accepted"] is True  # answered; the aggregation is now held by the gate

        time.sleep(2 * timeout_s + 2)  # well past the timeout (gunicorn checks each second)
        assert server.round(round_id, settled=False)["state"] == "aggregating"
        assert sorted(server.worker_pids()) == workers  # nobody was killed
        gate.touch()
        view = server.round(round_id)
        assert (view["state"], view["published_version"]) == ("published", base + 1)
        assert sorted(server.worker_pids()) == workers
        assert "WORKER TIMEOUT" not in server.log_path.read_text()
