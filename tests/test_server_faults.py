"""kill -9 the real sync server at each round state, restart it on the same DATA_DIR, database
(SQLite and PostgreSQL) and port, and check what a round keeps.

The rule, state by state (a restart = kill -9, then the same DATA_DIR, database and port):

- ``collecting`` (sealed uploads, or SecAgg+ key advertisements): RESUMES. Every upload or
  advertisement answered 202 was committed (its blob fsynced) before the answer, so the
  restarted server has it; the round keeps collecting until it is full or its deadline, then
  goes on with exactly the accepted ones. A round whose deadline passed while the server was
  down closes at the first request after the restart, as at any deadline: it publishes if it
  holds ``min_clients``, else FAILS (``min_clients``).
- ``share_keys`` / ``masked_input`` / ``unmasking`` (SecAgg+): RESUMES. Answers are committed
  before their 202 and the stage sets are re-read from the database; devices keep their
  SecAgg+ sessions (in memory, on the device) and carry on at the same address. A stage
  whose deadline passed while the server was down closes at the first request after the
  restart with the answers it got: the round goes on, or FAILS when too few answered (below
  ``min_clients``, or a device left with fewer than t share holders), before anything is
  unmasked.
- ``aggregating`` / ``publishing`` (the claimed aggregation, running after the completing
  request's response, killed before or after the publisher wrote its bundle): RESUMES. The
  round stays ``aggregating`` under a dead claim; the first request after the lease
  (``AGGREGATION_LEASE_S``) ran out takes it over and aggregates again from the stored
  updates (sealed) or masked inputs and revealed shares (SecAgg+), then publishes once. The
  killed attempt left nothing visible: version row, ledger entry and round outcome are
  written in one transaction; its scratch files are never served.

For every case: published weights = base + the mean of exactly the accepted updates (within
the SecAgg+ quantization bound and the DP noise, which is tiny here: z = 1e-3 keeps the ledger
in play while a lost or double-counted update would stand out 10x above the noise), one
``privacy_ledger`` row per published round and none for a failed one, model versions exactly
{1, 2} (or {1}) with the current one verified by the SDK (signature, files), and no update
frame or masked input left in the blob store."""

import math
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from device_sdk import secagg
from device_sdk.bundle import extract_bundle_zip, load_bundle
from device_sdk.protocol import SEALED_SCHEME
from device_sdk.sync_client import SyncError
from device_sdk.uploads import SealedUpload, SecAggUpload
from tests.support.bundles import zip_bundle
from tests.support.server import (
    ADMIN,
    GATED_PUBLISHER,
    SECAGG_ORDER,
    ServerProcess,
    drive,
    masked_frames_left,
    open_round,
    pass_deadline,
    publish,
    random_update,
    settled,
    signing_key_of,
    sync_client,
    weights_of,
)

LEASE_S = 2
Z = 1e-3  # DP on (the ledger is exercised); noise far below one update's share
CLIP = 1.0
# Every round here: FedAvg with a little DP noise, unless a test says otherwise.
open_round = partial(open_round, strategy="fedavg", server_lr=1.0, clip_norm=CLIP,
                     noise_multiplier=Z, deadline_s=600.0)


class Harness:
    """One server (gated publisher, short lease) that a test kills and restarts in place."""

    def __init__(self, root: Path, db_settings, monkeypatch, hold: str | None) -> None:
        self.gate = root / "publish-gate"
        self.reached = root / "publish-gate.reached"
        monkeypatch.setenv("TEST_PUBLISH_GATE", str(self.gate))
        monkeypatch.setenv("TEST_PUBLISH_HOLD", hold or "before")
        if hold is None:
            self.gate.touch()  # nothing held
        self.data_dir = root / "server"
        self.settings = {"ADMIN_TOKEN": ADMIN, "PUBLISHER": GATED_PUBLISHER,
                         "RATE_LIMIT": 100_000, "AGGREGATION_LEASE_S": LEASE_S,
                         **db_settings}
        self.database_url = db_settings.get("DATABASE_URL") or (
            f"sqlite:///{self.data_dir / 'pocketrec.db'}")
        self.server = ServerProcess(self.data_dir, **self.settings)
        self.port = int(self.server.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        self.server.process.kill()  # SIGKILL: no shutdown code runs
        self.server.process.wait()
        self.server.close()

    def restart(self) -> None:
        self.gate.touch()  # the restarted server's publisher is not held
        self.server = ServerProcess(self.data_dir, port=self.port, **self.settings)

    def query(self, sql: str, **params):
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return [tuple(r) for r in connection.execute(text(sql), params)]
        finally:
            engine.dispose()

    def wait_reached(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.reached.exists():
            assert time.monotonic() < deadline, "the publisher was never reached"
            time.sleep(0.05)


@pytest.fixture
def harness_for(tmp_path, tiny_export, db_settings, monkeypatch):
    made = []

    def make(hold=None):
        harness = Harness(tmp_path, db_settings, monkeypatch, hold)
        made.append(harness)
        assert publish(harness.server, zip_bundle(tiny_export.bundle_dir)).status == 201
        return harness

    yield make
    for harness in made:
        harness.gate.touch()
        harness.server.close()


def state_of(harness, round_id):
    return harness.server.round(round_id, settled=False)["state"]


def check_published(harness, client, round_id, updates, *, tolerance_per_coord=0.0):
    """The round published version 2 = base + the mean of ``updates`` (nothing lost or
    counted twice), one ledger row, versions {1, 2}, the served bundle verifies, and no
    update frame or masked input is left."""
    view = settled(harness.server, round_id)
    assert (view["state"], view["published_version"]) == ("published", 2), view["reason"]
    n = len(updates)
    assert view["measurements"]["updates"] == n
    base, new = weights_of(client, 1), verified_weights(client, harness, 2)
    d = sum(v.size for v in base.values())
    # Central DP noise on the mean: N(0, (z C / n)^2) per coordinate, a tail bound in L2;
    # SecAgg+ adds at most clients / scale per coordinate of the sum (tolerance_per_coord).
    bound = Z * CLIP * (math.sqrt(d) + 10) / n + tolerance_per_coord * math.sqrt(d) + 1e-5
    smallest = min(u.norm for u in updates) / n  # what one update lost or doubled moves
    assert bound < smallest / 5
    error = math.sqrt(sum(float(np.sum(np.square(
        new[k].astype(np.float64) - base[k] - sum(u.delta[k].astype(np.float64)
                                                   for u in updates) / n))) for k in base))
    assert error <= bound, (error, bound)
    assert harness.query("SELECT round_id FROM privacy_ledger") == [(round_id,)]
    assert harness.query("SELECT version FROM model_versions ORDER BY version") == [(1,), (2,)]
    assert client.fetch_manifest().version == 2  # GET /v1/models/current, signature checked
    assert_round_blobs_gone(harness, round_id)


def check_failed(harness, client, round_id, reason):
    view = settled(harness.server, round_id)
    assert (view["state"], view["published_version"]) == ("failed", None)
    assert reason in view["reason"]
    assert harness.query("SELECT round_id FROM privacy_ledger") == []
    assert harness.query("SELECT version FROM model_versions") == [(1,)]
    assert client.fetch_manifest().version == 1
    assert_round_blobs_gone(harness, round_id)


def assert_round_blobs_gone(harness, round_id):
    blobs = harness.data_dir / "blobs"
    for (digest,) in harness.query("SELECT blob_sha256 FROM updates WHERE round_id = :r",
                                   r=round_id):
        assert not (blobs / digest[:2] / digest).exists()
    members = harness.query("SELECT masked_sha256, reveal FROM secagg_members WHERE "
                            "round_id = :r", r=round_id)
    assert all(masked is None and reveal in (None, "null") for masked, reveal in members)
    assert harness.query("SELECT count(*) FROM secagg_shares WHERE round_id = :r",
                         r=round_id) == [(0,)]
    assert masked_frames_left(harness.server) == []


def verified_weights(client, harness, version):
    """Bundle ``version`` as a device gets it, verified with the pinned key."""
    directory = harness.data_dir.parent / f"check-v{version}"
    directory.mkdir(exist_ok=True)
    data = client.download_bundle(version)
    extract_bundle_zip(data, directory, 1000 * len(data))
    return load_bundle(directory, public_key=signing_key_of(harness.server)).weights()


def make_updates(client, n, seed):
    shapes = {k: v.shape for k, v in weights_of(client, 1).items()}
    rng = np.random.default_rng(seed)
    return [random_update(shapes, rng, clip=CLIP) for _ in range(n)]


@pytest.mark.parametrize("kill_at", ["collecting", "aggregating", "publishing",
                                     "collecting_past_deadline"])
def test_kill_9_in_a_sealed_round(harness_for, tmp_path, kill_at):
    """Sealed rounds (3 devices): killed with 2 of 3 uploads accepted, or inside the deferred
    aggregation before / after the publisher wrote its bundle, or killed while collecting and
    kept down past the deadline (min_clients 3: the round fails at the first request)."""
    hold = {"aggregating": "before", "publishing": "after"}.get(kill_at)
    harness = harness_for(hold)
    clients = [sync_client(harness.server, tmp_path, f"d{n}") for n in range(3)]
    updates = make_updates(clients[0], 3, seed=1)
    past_deadline = kill_at == "collecting_past_deadline"
    opened = open_round(harness.server, target_clients=3, upload_scheme=SEALED_SCHEME)
    round_id = opened["round_id"]
    tasks = [client.checkin(1, 10) for client in clients]
    uploading = 3 if hold else 2
    for client, task, update in zip(clients[:uploading], tasks, updates, strict=False):
        assert SealedUpload().submit(client, task, update)["accepted"]
    if hold:
        harness.wait_reached()  # the completing upload was answered; aggregation is held
        assert state_of(harness, round_id) == "aggregating"
    else:
        view = harness.server.round(round_id, settled=False)
        assert (view["state"], view["received"]) == ("collecting", 2)
    harness.kill()
    if past_deadline:  # the clock runs past the deadline while the server is down
        pass_deadline(harness.database_url, round_id)
    harness.restart()

    if past_deadline:
        late = clients[2].request("POST", f"/v1/rounds/{round_id}/update", body=b"PRS1")
        assert late.status == 409
        check_failed(harness, clients[0], round_id, "min_clients is 3")
        return
    if not hold:
        view = harness.server.round(round_id, settled=False)
        assert (view["state"], view["selected"], view["received"]) == ("collecting", 3, 2)
        assert SealedUpload().submit(clients[2], tasks[2], updates[2])["accepted"]
    check_published(harness, clients[0], round_id, updates)


@pytest.mark.parametrize("kill_at", ["collecting", "share_keys", "masked_input", "unmasking",
                                     "aggregating", "publishing", "masked_input_past_deadline"])
def test_kill_9_in_a_secagg_round(harness_for, tmp_path, kill_at):
    """SecAgg+ rounds (4 devices, min_clients 3): killed with 2 of 4 answers in at each
    stage, or inside the deferred aggregation before / after the publisher wrote its bundle;
    the devices' sessions live on in this process and carry on against the restarted server
    on the same port. ``masked_input_past_deadline``: the server stays down past the stage
    deadline with 2 masked inputs (< min_clients 3): the round fails, nothing is unmasked."""
    hold = {"aggregating": "before", "publishing": "after"}.get(kill_at)
    harness = harness_for(hold)
    clients = [sync_client(harness.server, tmp_path, f"d{n}") for n in range(4)]
    updates = make_updates(clients[0], 4, seed=2)
    past_deadline = kill_at == "masked_input_past_deadline"
    opened = open_round(harness.server, target_clients=4, min_clients=3, secagg_poll_s=0.05,
                        secagg_stage_timeout_s=600.0)
    round_id = opened["round_id"]
    tasks = [client.checkin(1, 10) for client in clients]
    sessions = [SecAggUpload().session(client, task, secagg_vector(update))
                for client, task, update in zip(clients, tasks, updates, strict=True)]
    answering = {"collecting": "advertise", "share_keys": "share_keys",
                 "masked_input": "masked_input", "masked_input_past_deadline": "masked_input",
                 "unmasking": "unmask"}
    if hold:
        for session in sessions:
            session.start()
        drive(sessions, "unmask")
        harness.wait_reached()
        assert state_of(harness, round_id) == "aggregating"
    else:
        stage = answering[kill_at]
        first, rest = sessions[:2], sessions[2:]
        for session in first if stage == "advertise" else sessions:
            session.start()
        if stage != "advertise":
            drive(sessions, SECAGG_ORDER[SECAGG_ORDER.index(stage) - 1])
            drive(first, stage)
        view = harness.server.round(round_id, settled=False)
        assert view["state"] == kill_at.removesuffix("_past_deadline")
        assert view["received"] == 2
    harness.kill()
    if past_deadline:  # the clock runs past the stage deadline while the server is down
        pass_deadline(harness.database_url, round_id, "stage_deadline")
    harness.restart()

    if past_deadline:
        check_failed(harness, clients[0], round_id, "2 device(s) sent masked inputs")
        for session in rest:
            with pytest.raises(SyncError) as dropped:
                session.step()
            assert dropped.value.code == "secagg_dropped"
        return
    if not hold:
        if stage == "advertise":
            for session in rest:
                session.start()
        drive(sessions, "unmask")
    scale = float(tasks[0].secagg["scale"])
    check_published(harness, clients[0], round_id, updates, tolerance_per_coord=1 / scale)
    assert opened["config"]["upload_scheme"] == secagg.SCHEME


def test_update_blobs_left_by_a_kill_after_the_publish_commit_are_deleted_at_restart(
        harness_for, tmp_path):
    """The publish commit comes before the update blobs are deleted (a crash before the
    commit must keep them for the retry). A kill between the two leaves plaintext updates of
    a published round on disk: exactly the files copied here while the aggregation was held
    (the database then is the same as after the commit, the deletion touches files only). The
    restarted server deletes them at its first request."""
    harness = harness_for("before")
    clients = [sync_client(harness.server, tmp_path, f"d{n}") for n in range(3)]
    updates = make_updates(clients[0], 3, seed=3)
    round_id = open_round(harness.server, target_clients=3,
                          upload_scheme=SEALED_SCHEME)["round_id"]
    for client, update in zip(clients, updates, strict=True):
        assert SealedUpload().submit(client, client.checkin(1, 10), update)["accepted"]
    harness.wait_reached()
    frames = {path: path.read_bytes() for path in (harness.data_dir / "blobs").rglob("*")
              if path.is_file() and path.read_bytes()[:4] == b"PRT1"}
    assert len(frames) == 3
    harness.gate.touch()
    check_published(harness, clients[0], round_id, updates)
    harness.kill()
    for path, data in frames.items():
        path.write_bytes(data)
    harness.restart()
    assert harness.server.round(round_id)["state"] == "published"  # any request sweeps
    check_published(harness, clients[0], round_id, updates)


def secagg_vector(update):
    return np.concatenate([np.asarray(update.delta[k], np.float64).ravel()
                           for k in sorted(update.delta)])
