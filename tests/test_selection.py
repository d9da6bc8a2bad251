"""Selection at check-in on the real server (subprocess, HTTP on loopback, SQLite and
PostgreSQL): one stored coin of probability q per (device, round), a selection rate that
matches q, no coin for a device without the round's model version, and an epsilon that
registrations cannot move. Devices are real SyncClients (signed requests); no mocks, no
timing assertions. The binomial tests have a false-alarm rate of 1e-6 each, computed from
the binomial distribution."""

import json
import tempfile
from functools import partial
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import urllib3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dp_accounting import pld
from scipy.stats import binom
from sqlalchemy import create_engine, text

from device_sdk.bundle import load_bundle
from device_sdk.device_identity import DeviceIdentity
from device_sdk.model_update import ModelUpdate
from device_sdk.protocol import SEALED_SCHEME
from device_sdk.sync_client import SyncClient
from sync_server.privacy import PLD_DISCRETIZATION
from tests.support.bundles import zip_bundle
from tests.support.server import (
    REPUBLISH_SETTINGS,
    ServerProcess,
    open_round,
    publish,
    signing_key_of,
)

FALSE_ALARM = 1e-6
open_round = partial(open_round, upload_scheme=SEALED_SCHEME)  # unless a test says otherwise


@pytest.fixture
def server(tmp_path, tiny_export, db_settings):
    with ServerProcess(tmp_path / "server", **REPUBLISH_SETTINGS, **db_settings) as srv:
        assert publish(srv, zip_bundle(tiny_export.bundle_dir)).status == 201  # version 1
        yield srv


class Fleet:
    """Registered SyncClients sharing one connection pool (fresh Ed25519 keys each)."""

    def __init__(self, server) -> None:
        self.server, self.signing_key = server, signing_key_of(server)
        self.pool = urllib3.PoolManager(maxsize=2)
        self.outbox = Path(tempfile.mkdtemp())

    def register(self, n: int) -> list[SyncClient]:
        clients = []
        for _ in range(n):
            client = SyncClient(self.server.url, DeviceIdentity(Ed25519PrivateKey.generate()),
                                server_signing_key=self.signing_key, outbox_dir=self.outbox,
                                retries=0, timeout=30.0, pool=self.pool)
            client.register()
            clients.append(client)
        return clients


def acceptance(n: int, q: float) -> tuple[int, int]:
    """The two-sided interval holding Binomial(n, q) with probability >= 1 - FALSE_ALARM."""
    return int(binom.ppf(FALSE_ALARM / 2, n, q)), int(binom.isf(FALSE_ALARM / 2, n, q))


def test_one_coin_per_device_and_round_at_rate_q(server):
    q, n = 0.3, 300
    opened = open_round(server, sampling_rate=q, target_clients=90, deadline_s=3600)
    assert (opened["sampling_rate"], opened["config"]["selection"]) == (q, "csprng")
    clients = Fleet(server).register(n)
    first = [c.checkin(1, 5) for c in clients]
    # Checking in again, any number of times, gives the same answer: the coin is stored.
    again = [c.checkin(1, 5) for c in clients]
    assert [t is None for t in first] == [t is None for t in again]
    repeated = next(c for c, t in zip(clients, first, strict=True) if t is None)
    assert all(repeated.checkin(1, 5) is None for _ in range(20))
    chosen = sum(t is not None for t in first)
    low, high = acceptance(n, q)
    assert low <= chosen <= high, (chosen, low, high)
    view = server.round(opened["round_id"])
    assert (view["checked_in"], view["selected"], view["state"]) == (n, chosen, "collecting")


def test_repeated_checkins_give_a_selected_device_its_task_again(server):
    opened = open_round(server, sampling_rate=0.5, target_clients=10)
    clients = Fleet(server).register(40)
    tasks = [c.checkin(1, 5) for c in clients]
    chosen = [(c, t) for c, t in zip(clients, tasks, strict=True) if t is not None]
    assert chosen  # P(none of 40 at q 0.5) = 2^-40
    client, task = chosen[0]
    for _ in range(10):
        assert client.checkin(1, 5).round_id == task.round_id == opened["round_id"]
    view = server.round(opened["round_id"])
    assert (view["checked_in"], view["selected"]) == (40, len(chosen))


def test_devices_without_the_round_model_version_get_no_coin(server):
    opened = open_round(server, target_clients=3)  # q = 1: any coin would select
    assert opened["sampling_rate"] == 1.0
    fakes = Fleet(server).register(10)
    for n, fake in enumerate(fakes):
        assert fake.checkin([None, 0, 2, 7][n % 4], 50) is None
    view = server.round(opened["round_id"])
    assert (view["checked_in"], view["selected"]) == (0, 0)
    honest = Fleet(server).register(3)
    assert all(c.checkin(1, 5) is not None for c in honest)  # the slots were all still free
    assert server.round(opened["round_id"])["selected"] == 3
    # The fleet view: what each device reported at its latest check-in.
    metrics = server.request("GET", "/metrics").data.decode()
    for version, count in {"none": 3, "0": 3, "1": 3, "2": 2, "7": 2}.items():
        assert f'pocketrec_devices_by_version{{version="{version}"}} {count}.0' in metrics
    assert "pocketrec_devices_registered 13.0" in metrics
    assert "pocketrec_devices_seen_last_day 13.0" in metrics


def _zero_update(tiny_export, trainable, clip):
    weights = load_bundle(tiny_export.bundle_dir).weights()
    names = sorted(weights) if trainable is None else trainable
    return ModelUpdate(base_version=1, delta={k: np.zeros_like(weights[k]) for k in names},
                       num_examples=1, clip_norm=clip, norm=0.0, norm_before_clip=0.0)


def test_registering_many_devices_leaves_projected_and_final_epsilon_unchanged(
    server, tiny_export
):
    dp = {"sampling_rate": 0.5, "population": 60, "target_clients": 30, "min_clients": 1,
          "noise_multiplier": 1.0, "clip_norm": 0.5, "delta": 1e-5}
    before = open_round(server, **dp)
    projected = before["config"]["epsilon_projected"]
    # No device checks in: the round fails at close, nothing released, nothing accounted.
    closed = json.loads(server.admin(
        "POST", f"/v1/admin/rounds/{before['round_id']}/close-stage").data)
    assert server.round(closed["round_id"])["state"] == "failed"

    fleet = Fleet(server)
    fleet.register(1000)  # keys nobody uses: they must not move the privacy figure
    opened = open_round(server, **dp)
    assert opened["config"]["epsilon_projected"] == projected
    clients = fleet.register(30)
    update = _zero_update(tiny_export, opened["config"]["trainable"], 0.5)
    tasks = [(c, c.checkin(1, 5)) for c in clients]
    uploads = [c.upload(t, update) for c, t in tasks if t is not None]
    assert uploads and all(u["accepted"] for u in uploads)  # P(no selection) = 2^-30
    server.admin("POST", f"/v1/admin/rounds/{opened['round_id']}/close-stage")
    view = server.round(opened["round_id"])
    assert view["state"] == "published", view["reason"]
    assert view["received"] == len(uploads)
    assert view["epsilon"] == pytest.approx(projected, rel=1e-12)

    # The ledger row says what was composed and by which accountant; its epsilon is
    # dp_accounting's own for that step; the manifest and /metrics say the same.
    engine = create_engine(server.database_url)
    try:
        with engine.connect() as db:
            row = db.execute(text("SELECT noise_multiplier, sampling_rate, epsilon, delta, "
                                  "mechanism, accountant FROM privacy_ledger")).one()
            manifest = json.loads(db.execute(text(
                "SELECT manifest FROM model_versions WHERE version = :v"),
                {"v": view["published_version"]}).scalar_one())
    finally:
        engine.dispose()
    assert (row.noise_multiplier, row.sampling_rate, row.delta) == (1.0, 0.5, 1e-5)
    assert (row.mechanism, row.accountant) == ("poisson_sampled_gaussian", "pld")
    reference = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    reference.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(
        1.0)))
    assert row.epsilon == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    privacy = manifest["privacy"]
    assert (privacy["epsilon"], privacy["delta"], privacy["mechanism"],
            privacy["sampling_rate"], privacy["selection"]) == (
        pytest.approx(row.epsilon), 1e-5, "poisson_sampled_gaussian", 0.5, "csprng")
    assert privacy["accountant"].startswith("pld")
    metrics = server.request("GET", "/metrics").data.decode()
    assert "pocketrec_epsilon_delta 1e-05" in metrics
    assert ('pocketrec_epsilon_accountant{accountant="pld",mechanism='
            '"poisson_sampled_gaussian"} 1.0') in metrics


def test_delta_defaults_below_one_tenth_of_one_over_n_and_above_one_over_n_is_refused(server):
    dp = {"population": 60, "target_clients": 6, "noise_multiplier": 1.0}
    response = server.admin("POST", "/v1/admin/rounds",
                            json={**dp, "delta": 0.02, "upload_scheme": SEALED_SCHEME})
    body = json.loads(response.data)
    assert (response.status, body["error"]["code"]) == (400, "delta_too_large")
    assert "1/N" in body["error"]["message"] and "N = 60" in body["error"]["message"]
    assert json.loads(server.admin("GET", "/v1/admin/rounds").data)["rounds"] == []

    opened = open_round(server, **dp)  # no delta: the default
    assert opened["delta"] == 1e-3 <= 1 / (10 * 60)
    assert opened["config"]["delta_basis"].startswith("default")
    server.admin("POST", f"/v1/admin/rounds/{opened['round_id']}/close-stage")
    # Nobody checked in: the round fails (in a thread after the close answered); the next
    # round may open only once it has.
    assert server.round(opened["round_id"])["state"] == "failed"
    # Without a population, N is what the config implies: target_clients / q.
    implied = open_round(server, sampling_rate=0.25, target_clients=50,
                         noise_multiplier=1.0)
    assert implied["delta"] == 1e-4 <= 1 / (10 * 200)


def _seeded_run(root: Path, tiny_export, seed: str | None) -> tuple[list[bool], dict]:
    """One DP round (q 0.5 over 20 devices with fixed keys, zero updates) on a fresh SQLite
    server: which devices were selected, and the published weights."""
    import hashlib
    import io
    import zipfile

    settings = {**REPUBLISH_SETTINGS, **({"DETERMINISTIC_SEED": seed} if seed else {})}
    with ServerProcess(root / "server", **settings) as server:
        assert server.admin("POST", "/v1/admin/models", body=zip_bundle(tiny_export.bundle_dir),
                            headers={"Content-Type": "application/zip"}).status == 201
        opened = open_round(server, sampling_rate=0.5, population=20, target_clients=10,
                            min_clients=1, noise_multiplier=1.0, clip_norm=0.5)
        assert opened["config"]["selection"] == ("seeded" if seed else "csprng")
        fleet = Fleet(server)
        clients = []
        for n in range(20):
            key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"%d" % n).digest())
            client = SyncClient(server.url, DeviceIdentity(key), outbox_dir=fleet.outbox,
                                server_signing_key=fleet.signing_key, retries=0,
                                timeout=30.0, pool=fleet.pool)
            client.register()
            clients.append(client)
        update = _zero_update(tiny_export, opened["config"]["trainable"], 0.5)
        tasks = [c.checkin(1, 5) for c in clients]
        for client, task in zip(clients, tasks, strict=True):
            if task is not None:
                client.upload(task, update)
        server.admin("POST", f"/v1/admin/rounds/{opened['round_id']}/close-stage")
        view = server.round(opened["round_id"])
        assert view["state"] == "published", view["reason"]
        engine = create_engine(server.database_url)
        try:
            with engine.connect() as db:
                digest = db.execute(text("SELECT blob_sha256 FROM model_versions WHERE "
                                         "version = 2")).scalar_one()
        finally:
            engine.dispose()
        data = (server.data_dir / "blobs" / digest[:2] / digest).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf, \
            np.load(io.BytesIO(zf.read("weights.npz"))) as npz:
        weights = {k: npz[k] for k in npz.files}
    return [t is not None for t in tasks], weights


def test_only_a_configured_seed_makes_coins_and_noise_reproducible(tmp_path, tiny_export):
    """SQLite only: this is about the random streams, not the database."""
    first = _seeded_run(tmp_path / "a", tiny_export, "test-seed")
    again = _seeded_run(tmp_path / "b", tiny_export, "test-seed")
    fresh = _seeded_run(tmp_path / "c", tiny_export, None)
    assert first[0] == again[0] and any(first[0])
    assert all(np.array_equal(first[1][k], again[1][k]) for k in first[1])
    # Without the seed: the OS-keyed CSPRNG, another noise draw (the coins may or may not
    # coincide: 2^-20 for all 20 to agree; the weights differ almost surely).
    assert not all(np.array_equal(first[1][k], fresh[1][k]) for k in first[1])


def test_coin_and_rate_without_a_server():
    from sync_server import selection

    assert selection.coin(1.0, "r", "d", None) is True
    seeded = [selection.coin(0.5, "round-1", f"dev{n}", "seed") for n in range(64)]
    assert seeded == [selection.coin(0.5, "round-1", f"dev{n}", "seed") for n in range(64)]
    assert seeded != [selection.coin(0.5, "round-2", f"dev{n}", "seed") for n in range(64)]
    # A round opened before selection coins existed keeps its first-come selection.
    assert selection.rate({"target_clients": 3}) == 1.0
    assert selection.capped({"target_clients": 3})
