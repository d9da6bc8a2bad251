"""SecAgg+ rounds between real devices and the real sync server over loopback HTTP (server
subprocess, SQLite, real cryptography): the default upload path end to end, the dropout
matrix at every stage, refused protocol messages, central and distributed DP, and a round
below its threshold. Devices run in threads because SecAgg+ stages are synchronous.
The math in one process: test_secagg.py."""

import contextlib
import hashlib
import json
import threading
import time
from functools import partial

import numpy as np
import pytest
import sqlalchemy

from device_sdk import secagg
from device_sdk.bundle import load_bundle
from device_sdk.local_trainer import LocalTrainer, LocalTrainingConfig
from device_sdk.protocol import RoundTask
from device_sdk.sync_client import SyncError
from device_sdk.uploads import SecAggSession, SecAggUpload
from tests.support.bundles import zip_bundle
from tests.support.server import (
    SETTINGS,
    ServerProcess,
    bundle_member,
    make_device,
    masked_frames_left,
    open_round,
    pass_deadline,
    publish,
    random_update,
    sync_client,
    weights_of,
)

# Stage timeouts and deadlines are guards here, never waited for: a stage that some device
# drops out of is ended by ``stage_closer`` as soon as every other device has answered it.
FAST = {"secagg_poll_s": 0.1, "secagg_stage_timeout_s": 600.0, "strategy": "fedavg",
        "server_lr": 1.0, "clip_norm": 1.0}
open_round = partial(open_round, **FAST)  # a test's own config overrides FAST
# DropAt's stage (the request a device does not send) -> the round's state while that stage
# waits, the view's count of its answers, and the column holding its deadline.
STAGE_WAIT = {"advertise": ("collecting", "advertised", "deadline"),
              "shares": ("share_keys", "shared", "stage_deadline"),
              "masked": ("masked_input", "masked", "stage_deadline"),
              "unmask": ("unmasking", "unmasked", "stage_deadline")}


class Dropped(Exception):
    """A device that stops taking part (the test's fault injection)."""


class DropAt(SecAggUpload):
    """The real SecAgg+ upload, except that it stops before sending ``stage``."""

    def __init__(self, stage):
        self.stage = stage
        self.dropped = threading.Event()  # set when it has dropped out

    def session(self, client, task, vector):
        stage, dropped = self.stage, self.dropped

        class DroppingSession(SecAggSession):
            def _post(self, path, **kwargs):
                if path.endswith("/" + stage):
                    dropped.set()
                    raise Dropped(stage)
                super()._post(path, **kwargs)

        return DroppingSession(client, task, vector)


@contextlib.contextmanager
def stage_closer(server, round_id, stage, answers, droppers):
    """Once every one of ``droppers`` (DropAt schemes) has dropped out of ``stage`` and the
    other ``answers`` devices have answered it (it then still waits for the dropped ones),
    move its deadline into the past, so the round goes on with those devices at once, as at
    a deadline, however long they took to get there. Runs beside the block and is waited for
    at its end (a guard of 120 s)."""
    state, count, column = STAGE_WAIT[stage]
    done = threading.Event()
    closed = []

    def watch():
        while not done.is_set():
            view = server.round(round_id)
            if (view["state"] == state and all(d.dropped.is_set() for d in droppers)
                    and (view.get("secagg") or {}).get(count, 0) >= answers):
                pass_deadline(server.database_url, round_id, column)
                closed.append(view["secagg"][count])
                return
            if view["state"] in ("published", "failed"):
                return
            done.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield closed
        watcher.join(120)  # the devices answering unmask return before it closes
    finally:
        done.set()
        watcher.join(60)


def run_devices(clients, version, updates, schemes):
    """Check in every client and run its upload scheme in a thread; returns outcomes."""
    outcomes, tasks = {}, {}

    def one(name):
        client = clients[name]
        task = client.checkin(version, 10)
        tasks[name] = task
        try:
            outcomes[name] = schemes[name].submit(client, task, updates[name])
        except (Dropped, SyncError) as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=one, args=(name,)) for name in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    return outcomes, tasks


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_export, module_db_settings):
    """A server (version 1 published) and 10 registered device clients."""
    root = tmp_path_factory.mktemp("secagg")
    with ServerProcess(root / "server", **SETTINGS, **module_db_settings) as server:
        assert publish(server, zip_bundle(tiny_export.bundle_dir)).status == 201
        clients = {n: sync_client(server, root, f"d{n}") for n in range(10)}
        yield server, clients


def finished_view(server, round_id, wait_s=30.0):
    """The round's view once it ended. A stage some device never answered closes at its
    deadline, on the first request after it: here, the admin's GET."""
    deadline = time.monotonic() + wait_s
    view = server.round(round_id)
    while view["state"] not in ("published", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        view = server.round(round_id)
    return view


def newest_version(server):
    models = json.loads(server.admin("GET", "/v1/admin/models").data)["models"]
    return max(m["model_version"] for m in models if m["status"] == "published")


@pytest.mark.parametrize("stage,rate", [("advertise", 0.0)] + [
    (s, p) for s in ("advertise", "shares", "masked", "unmask") for p in (0.1, 0.3)])
def test_dropout_matrix_over_http_publishes_the_survivors_mean(fleet, stage, rate):
    server, clients = fleet
    base_version = newest_version(server)
    base = weights_of(clients[0], base_version)
    shapes = {k: v.shape for k, v in base.items()}
    rng = np.random.default_rng(abs(hash((stage, rate))) % 2**32)
    updates = {n: random_update(shapes, rng, version=base_version) for n in clients}
    dropping = set(rng.choice(sorted(clients), size=round(rate * len(clients)),
                              replace=False).tolist())
    schemes = {n: DropAt(stage) if n in dropping else SecAggUpload() for n in clients}
    opened = open_round(server, target_clients=10, min_clients=5)
    closer = (stage_closer(server, opened["round_id"], stage, 10 - len(dropping),
                           [schemes[n] for n in dropping])
              if dropping else contextlib.nullcontext([]))  # nobody to wait for
    with closer as closed:
        outcomes, _ = run_devices(clients, base_version, updates, schemes)
    assert closed == ([10 - len(dropping)] if dropping else [])

    view = finished_view(server, opened["round_id"])
    assert view["state"] == "published", view["reason"]
    for n in clients:
        assert isinstance(outcomes[n], Dropped) == (n in dropping), outcomes[n]
    # Devices dropping at unmask already sent their masked input: they are in the sum.
    in_sum = [n for n in clients if n not in dropping or stage == "unmask"]
    counts = view["secagg"]
    assert counts["masked"] == len(in_sum) == view["measurements"]["updates"]
    assert counts["unmasked"] == 10 - len(dropping)
    mean = {k: sum(updates[n].delta[k].astype(np.float64) for n in in_sum) / len(in_sum)
            for k in shapes}
    new = weights_of(clients[0], view["published_version"])
    bound = view["measurements"]["quantization_error_bound"] / len(in_sum)
    for k in shapes:  # FedAvg with server_lr 1: new = base + mean delta
        error = np.abs(new[k].astype(np.float64) - base[k] - mean[k])
        assert error.max() <= bound + 1e-6 * (1 + np.abs(base[k]).max())
    # Nothing per-device outlives the round (deleted right after the publish commits).
    assert masked_frames_left(server) == []


def test_real_devices_run_secagg_by_default_and_learn_the_float_mean(
        tmp_path, tiny_export, tiny_checkpoint, db_settings):
    with ServerProcess(tmp_path / "server", **SETTINGS, **db_settings) as server:
        assert publish(server, zip_bundle(tiny_export.bundle_dir)).status == 201
        devices = [make_device(server, tmp_path / f"dev{n}", tiny_checkpoint, n)
                   for n in range(4)]
        for device in devices:
            assert device.sync(train=False).model_version == 1
        opened = open_round(server, target_clients=4, learning_rate=0.3, local_epochs=1,
                            batch_size=8, max_examples=100)
        assert opened["config"]["upload_scheme"] == secagg.SCHEME  # the default
        reports = [None] * 4

        def sync(i):
            reports[i] = devices[i].sync()

        threads = [threading.Thread(target=sync, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(r is not None and r.uploaded for r in reports), reports
        view = finished_view(server, opened["round_id"])
        assert view["state"] == "published" and view["secagg"]["masked"] == 4

        # What each device trained, recomputed with the same seed: the server's new weights
        # are base + their float mean, up to the quantization bound.
        task = RoundTask.from_json({**{k: opened["config"][k] for k in (
            "clip_norm", "local_epochs", "learning_rate", "batch_size", "proximal_mu",
            "max_examples", "trainable")}, "round_id": opened["round_id"],
            "model_version": 1, "deadline": 0.0, "upload_scheme": secagg.SCHEME})
        base = load_bundle(tiny_export.bundle_dir)
        deltas = []
        for device in devices:
            seed = int.from_bytes(hashlib.sha256(
                f"{device.sync_client.identity.device_id}/{task.round_id}".encode()
            ).digest()[:8])
            deltas.append(LocalTrainer(base, device.policy).train(
                device.events.events(), LocalTrainingConfig.from_task(task), base_version=1,
                seed=seed).delta)
        new = load_bundle(devices[0].models.bundle(view["published_version"]).directory
                          ).weights() if devices[0].sync(train=False).installed else None
        assert new is not None
        old = base.weights()
        bound = view["measurements"]["quantization_error_bound"] / 4
        moved = 0.0
        for k in old:
            mean = sum(d[k].astype(np.float64) for d in deltas) / 4
            assert np.abs(new[k] - old[k] - mean).max() <= bound + 1e-6
            moved += float(np.abs(mean).sum())
        assert moved > 0  # the devices did learn something
        for device in devices:
            device.close()


@pytest.mark.parametrize("dp_mode", ["central", "distributed"])
def test_dp_rounds_with_secagg_tell_the_accountant_which_noise_ran(
        tmp_path, tiny_export, dp_mode, db_settings):
    with ServerProcess(tmp_path / "server", **SETTINGS, **db_settings) as server:
        assert publish(server, zip_bundle(tiny_export.bundle_dir)).status == 201
        clients = {n: sync_client(server, tmp_path, f"d{n}") for n in range(4)}
        shapes = {k: v.shape for k, v in weights_of(clients[0], 1).items()}
        rng = np.random.default_rng(4)
        updates = {n: random_update(shapes, rng) for n in clients}
        opened = open_round(server, target_clients=4, min_clients=3, noise_multiplier=1.0,
                            dp_mode=dp_mode)
        outcomes, tasks = run_devices(clients, 1, updates,
                                      {n: SecAggUpload() for n in clients})
        assert all(o.get("accepted") for o in outcomes.values()), outcomes
        view = finished_view(server, opened["round_id"])
        assert view["state"] == "published" and view["epsilon"] > 0
        manifest = json.loads(bundle_member(clients[0], view["published_version"],
                                            "manifest.json"))
        assert manifest["privacy"]["mode"] == dp_mode
        assert manifest["privacy"]["epsilon"] == pytest.approx(view["epsilon"])
        noise = tasks[0].secagg["noise_std"]
        if dp_mode == "central":
            assert noise == 0 and view["measurements"]["noise_std"] == pytest.approx(1.0)
        else:
            assert noise > 0 and view["measurements"]["noise_std"] == 0
            # 4 survivors of noise calibrated for 3: a bit more noise than z = 1, minus the
            # rounding slack in the sensitivity.
            assert view["epsilon"] <= opened["config"]["epsilon_projected"]


def test_a_hundred_devices_over_http_survive_thirty_percent_dropping_before_masking(
        tmp_path, tiny_export, db_settings):
    with ServerProcess(tmp_path / "server", **{**SETTINGS, "RATE_LIMIT": 100_000},
                       **db_settings) as server:
        assert publish(server, zip_bundle(tiny_export.bundle_dir)).status == 201
        clients = {n: sync_client(server, tmp_path, f"d{n}") for n in range(100)}
        base = weights_of(clients[0], 1)
        shapes = {k: v.shape for k, v in base.items()}
        rng = np.random.default_rng(100)
        updates = {n: random_update(shapes, rng) for n in clients}
        dropping = set(rng.choice(100, size=30, replace=False).tolist())
        schemes = {n: DropAt("masked") if n in dropping else SecAggUpload() for n in clients}
        opened = open_round(server, target_clients=100, min_clients=60, secagg_poll_s=0.5)
        with stage_closer(server, opened["round_id"], "masked", 70,
                          [schemes[n] for n in dropping]) as closed:
            outcomes, _ = run_devices(clients, 1, updates, schemes)
        assert closed == [70]
        view = finished_view(server, opened["round_id"], wait_s=60.0)
        assert view["state"] == "published", view["reason"]
        assert (view["secagg"]["degree"], view["secagg"]["masked"]) == (99, 70)
        survivors = [n for n in clients if n not in dropping]
        assert all(outcomes[n].get("accepted") for n in survivors)
        new = weights_of(clients[0], view["published_version"])
        bound = view["measurements"]["quantization_error_bound"] / 70
        for k in shapes:
            mean = sum(updates[n].delta[k].astype(np.float64) for n in survivors) / 70
            assert np.abs(new[k] - base[k] - mean).max() <= bound + 1e-6
        # The round's 100·99 relayed shares went in batches; none is left, nor any masked
        # input (the blobs go last, after the shares).
        assert masked_frames_left(server) == []
        engine = sqlalchemy.create_engine(server.database_url)
        with engine.connect() as connection:
            left = connection.execute(sqlalchemy.text(
                "SELECT count(*) FROM secagg_shares")).scalar_one()
        engine.dispose()
        assert left == 0
