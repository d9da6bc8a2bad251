"""The database goes away under a running server: a real PostgreSQL server (its own, so the
others' tests are not disturbed) is stopped and started again while the real sync server keeps
running. Every endpoint that needs the database answers 503 ``database_unavailable`` with a
Retry-After, nothing stored before the outage is lost, and the server recovers without a
restart: the SDK's retries carry a device's sync across the outage."""

import json
import threading
import time

import pytest

from device_sdk.device_client import DeviceClient
from device_sdk.protocol import SEALED_SCHEME
from device_sdk.sync_client import SyncError
from tests.support.bundles import zip_bundle
from tests.support.postgres import REQUIRE_POSTGRES, PostgresServer, find_bindir
from tests.support.server import (
    SETTINGS,
    ServerProcess,
    make_device,
    publish,
    signing_key_of,
    sync_client,
    try_open_round,
)

pytestmark = pytest.mark.skipif(find_bindir() is None and not REQUIRE_POSTGRES,
                                reason="PostgreSQL not installed")


@pytest.fixture
def outage(tmp_path, tiny_export):
    """(PostgreSQL server, sync server on it with version 1 published)."""
    with PostgresServer() as pg, ServerProcess(tmp_path / "server", DATABASE_URL=pg
                                               .create_database(), **SETTINGS) as server:
        assert publish(server, zip_bundle(tiny_export.bundle_dir)).status == 201
        yield pg, server


def error_code(response):
    return json.loads(response.data)["error"]["code"]


def test_a_stopped_database_gives_503s_and_the_server_recovers_without_restart(
        outage, tmp_path, tiny_checkpoint):
    pg, server = outage
    client = sync_client(server, tmp_path, "early")  # registered before the outage
    status, opened = try_open_round(server, target_clients=2, min_clients=2, deadline_s=600,
                                    strategy="fedavg", upload_scheme=SEALED_SCHEME)
    assert status == 201, opened
    pid = server.process.pid

    pg.stop()
    probes = {
        "healthz": server.request("GET", "/healthz"),
        "admin rounds": server.admin("GET", "/v1/admin/rounds"),
        "admin models": server.admin("GET", "/v1/admin/models"),
        "dashboard": server.admin("GET", "/v1/admin/dashboard"),
        "open round": server.admin("POST", "/v1/admin/rounds", json={"target_clients": 3}),
    }
    for name, response in probes.items():
        assert response.status == 503, (name, response.status, response.data[:300])
        assert error_code(response) == "database_unavailable", name
        assert response.headers.get("Content-Type", "").startswith("application/json"), name
    assert probes["admin rounds"].headers["Retry-After"].isdigit()
    # Signed device requests: the signature check itself needs the database (nonces).
    with pytest.raises(SyncError) as refused:
        client.checkin(1, 10)
    assert refused.value.status == 503 and refused.value.retryable
    # Keys need no database.
    assert server.request("GET", "/v1/server-keys").status == 200

    pg.start()
    # Recovery without a restart: the same process answers, with everything it had.
    assert server.request("GET", "/healthz").status == 200
    assert server.process.poll() is None and server.process.pid == pid
    task = client.checkin(1, 10)  # the device registered before the outage is still known
    assert task is not None and task.round_id == opened["round_id"]
    models = json.loads(server.admin("GET", "/v1/admin/models").data)["models"]
    assert [m["model_version"] for m in models] == [1]
    view = server.round(opened["round_id"])
    assert view["state"] == "collecting" and view["selected"] == 1

    # A device syncing through an outage: its retries (backoff, Retry-After) carry it over.
    device = make_device(server, tmp_path / "device", tiny_checkpoint, 0)
    try:
        pg.stop()
        restart = threading.Timer(3.0, pg.start)
        restart.start()
        started = time.monotonic()
        report = device.sync(train=False)
        restart.join()
        assert time.monotonic() - started >= 2.5  # it really waited for the database
        assert report.model_version == 1
    finally:
        device.close()
    reopened = DeviceClient(tmp_path / "device", server_key=signing_key_of(server))
    try:
        assert reopened.model_version == 1
    finally:
        reopened.close()
