"""The federated simulation end to end: a small synthetic fleet of virtual devices (the real
device SDK, one SQLite log each) in real worker processes (or Ray actors) against the real
sync server subprocess over HTTP, with SecAgg+ and central DP; the report; Ctrl-C."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom

from tests.support.fleet import MODEL, ROUNDS, SPEC, fleet_population, pretrained_fleet
from trainer.simulation.devices import device_dir_name
from trainer.simulation.experiment import simulate_one, train_central
from trainer.simulation.report import write_report
from trainer.simulation.run import SimulationConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """The population and its pretrained, exported starting model."""
    return pretrained_fleet(tmp_path_factory.mktemp("base"))


def test_a_device_worker_process_loads_no_trainer_stack():
    """Workers run thousands of devices: they import the device SDK, not pandas or torch."""
    code = ("import sys, trainer.simulation.devices, trainer.simulation.worker; "
            "print(sorted(m for m in ('torch', 'pandas', 'jax', 'flask', 'sqlalchemy', "
            "'tensorflow', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_population_splits_users_and_never_replays_held_out_events(fleet):
    population, _ = fleet
    devices = set(population.devices)
    assert devices.isdisjoint(population.public_users)
    assert set(population.pretrain.train) == set(population.public_users)
    assert set(population.test.users) <= devices
    assert len(population.clock) == ROUNDS and np.all(np.diff(population.clock) > 0)
    df = SPEC.load()
    for user in population.test.users[:40]:
        stream = population.devices[user]
        rows = df[df["user"] == user]
        # The replayed stream is a prefix of the user's events; the held-out target comes
        # after it and is never among the replayed items' positions.
        assert 0 < len(stream) < len(rows)
        assert stream.items == rows["item"].tolist()[: len(stream)]
        row = population.test.users.index(user)
        target_key = population.vocab.keys[population.test.target[row]]
        assert target_key in rows["item"].tolist()[len(stream):]


@pytest.fixture(scope="module")
def dp_run(fleet, tmp_path_factory):
    population, bundle = fleet
    root = tmp_path_factory.mktemp("sim")
    config = SimulationConfig(rounds=ROUNDS, clients_per_round=24, noise_multiplier=0.8,
                              dropout=0.1, stragglers=0.1, workers=2, seed=1,
                              label="federated+DP")
    records, interrupted = simulate_one(population, bundle, root, config, progress=False)
    return population, root, config, records, interrupted


@pytest.mark.slow
def test_dp_rounds_with_secagg_publish_and_record_every_metric(dp_run):
    population, root, config, records, interrupted = dp_run
    assert not interrupted
    assert [r.round for r in records] == list(range(ROUNDS + 1))
    start, rounds = records[0], records[1:]
    assert start.version == 1 and start.epsilon == 0 and start.hr10 is not None
    versions = [r.version for r in rounds]
    assert all(r.state == "published" for r in rounds), [(r.state, r.reason) for r in rounds]
    assert versions == list(range(2, ROUNDS + 2))
    epsilons = [r.epsilon for r in rounds]
    assert epsilons[0] > 0 and bool(np.all(np.diff(epsilons) > 0))
    for r in rounds:
        # The server selected each eligible device with q = clients / eligible: a Poisson
        # cohort, inside Binomial(eligible, q)'s two-sided 1e-6 interval (false alarm 1e-6).
        q = config.clients_per_round / r.population
        low, high = binom.ppf(0.5e-6, r.population, q), binom.isf(0.5e-6, r.population, q)
        assert low <= r.sampled <= high, (r.sampled, low, high)
        assert r.completed + r.dropped == r.sampled
        # A device that fails after sending its masked input stays in the sum; earlier
        # failures (and stragglers, who are refused) do not.
        assert r.dropped <= r.planned_dropouts + r.planned_stragglers
        # min_clients of a Poisson round: half the expected cohort
        assert r.completed >= math.ceil(config.clients_per_round / 2)
        assert 0 <= r.hr10 <= 1 and 0 <= r.ndcg10 <= r.hr10
        assert r.online_n > 0 and 0 <= r.online_hr10 <= 1
        assert r.bytes_up_per_device > 1000 and r.bytes_down_per_device > 1000
        assert r.wall_s > 0 and {"begin", "share_keys", "aggregate"} <= set(r.phases)
    assert sum(r.planned_dropouts + r.planned_stragglers for r in rounds) > 0


@pytest.mark.slow
def test_each_device_logged_its_own_events_up_to_the_round_clock(dp_run):
    population, root, _, records, _ = dp_run
    checked = 0
    for path in sorted((root / "devices").iterdir())[:30]:
        user = next(u for u in population.devices if device_dir_name(u) == path.name)
        stream = population.devices[user]
        with sqlite3.connect(path / "events.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            logged = [r[0] for r in db.execute("SELECT item FROM events ORDER BY id")]
        # The log is exactly the user's events before the clock of the last round this
        # device took part in: a prefix of its stream, never a held-out event.
        assert 0 < len(logged) <= len(stream)
        assert logged == stream.items[: len(logged)]
        now_at = {int(np.searchsorted(stream.times, t)) for t in population.clock}
        assert len(logged) in now_at
        checked += 1
    assert checked > 0


@pytest.mark.slow
def test_the_server_learned_only_what_secagg_and_dp_released(dp_run):
    population, root, config, records, _ = dp_run
    with sqlite3.connect(root / "server" / "pocketrec.db") as db:
        ledger = db.execute("SELECT COUNT(*) FROM privacy_ledger").fetchone()[0]
        modes = {r[0] for r in db.execute("SELECT mode FROM privacy_ledger")}
    assert ledger == ROUNDS and modes == {"central"}
    # No masked input or share outlives its round.
    blobs = root / "server" / "blobs"
    assert not [p for p in blobs.rglob("*") if p.is_file() and p.read_bytes()[:4] == b"PRT1"]


@pytest.mark.slow
def test_report_files_cover_every_round(dp_run, tmp_path):
    population, root, config, records, _ = dp_run
    no_dp = [replace(r, label="federated", epsilon=0.0) for r in records]
    index = write_report(tmp_path, {"federated+DP": records, "federated": no_dp},
                         {"hr@10": 0.3, "ndcg@10": 0.1}, {"data": "synthetic"})
    data = json.loads((tmp_path / "rounds.json").read_text())
    assert [r["round"] for r in data["runs"]["federated+DP"]] == list(range(ROUNDS + 1))
    assert data["summary"][0]["final_hr10"] == records[-1].hr10
    with open(tmp_path / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (ROUNDS + 1) and float(rows[1]["epsilon"]) == records[1].epsilon
    for png in ("hr10.png", "online.png", "epsilon.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{png}"' in index.read_text()


@pytest.mark.slow
def test_ray_backend_runs_the_same_device_code(fleet, tmp_path):
    population, bundle = fleet
    config = SimulationConfig(rounds=2, clients_per_round=12, workers=2, backend="ray",
                              seed=2, label="ray")
    records, interrupted = simulate_one(population, bundle, tmp_path, config, progress=False)
    assert not interrupted
    assert [r.state for r in records[1:]] == ["published", "published"]
    # The server's seeded coins chose the cohort (no dropouts); only the cohort's devices
    # checked in (the simulator knows their coins came up), so only they have a directory.
    assert all(r.completed == r.sampled > 0 and r.online_n > 0 for r in records[1:])
    made = len(list((tmp_path / "devices").iterdir()))
    assert max(r.sampled for r in records[1:]) <= made <= sum(r.sampled for r in records[1:])


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_report_covers_the_rounds_completed(fleet, tmp_path):
    population, bundle = fleet
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "trainer.cli", "simulate", "--synthetic-users", "240",
           "--synthetic-items", "120", "--seed", "3", "--max-len", "20", "--dim", "16",
           "--hidden", "32", "--public-fraction", "0.15", "--base-bundle", str(bundle),
           "--rounds", "40", "--clients-per-round", "10", "--out", str(out),
           "--run", str(tmp_path / "run"), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    rounds_json = out / "rounds.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if rounds_json.exists():
            runs = json.loads(rounds_json.read_text())["runs"]
            if len(runs.get("federated", [])) >= 3:  # the start and two rounds
                break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    data = json.loads(rounds_json.read_text())
    assert data["meta"]["interrupted"] is True
    done = data["runs"]["federated"]
    assert 3 <= len(done) < 41 and all(r["state"] == "published" for r in done[1:])
    assert "report:" in output and "interrupted" in output
    # Nothing is left running: no server, no worker of this simulation (a child the
    # simulator has signalled may take a moment to be reaped: wait for it, with a guard).
    guard = time.monotonic() + 60
    while True:
        leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True,
                                  text=True).stdout.strip()
        if not leftover or time.monotonic() > guard:
            break
        time.sleep(0.2)
    assert leftover == ""


def _published(root: Path, version: int) -> tuple[dict[str, np.ndarray], float]:
    """Version ``version``'s float weights as the server published them, and the SecAgg+
    quantization error bound of the mean its round released (bound on the sum / updates)."""
    with sqlite3.connect(root / "server" / "pocketrec.db") as db:
        digest = db.execute("SELECT blob_sha256 FROM model_versions WHERE version = ?",
                            (version,)).fetchone()[0]
        measured = json.loads(db.execute("SELECT measurements FROM rounds WHERE "
                                         "published_version = ?", (version,)).fetchone()[0])
    data = (root / "server" / "blobs" / digest[:2] / digest).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf, \
            np.load(io.BytesIO(zf.read("weights.npz"))) as npz:
        weights = {k: npz[k] for k in npz.files}
    return weights, measured["quantization_error_bound"] / measured["updates"]


@pytest.mark.slow
def test_one_seed_decides_the_public_slice_the_starting_model_and_the_rounds(fleet, tmp_path):
    """The same seed twice: the same public slice, bit-identical pretrained weights and
    starting-model metrics, the same devices training bit-identical updates; the published
    round then differs only by SecAgg+'s stochastic rounding, which is drawn from the OS on
    purpose (at most the round's quantization bound, twice over). Another seed: another
    public slice."""
    population, bundle = fleet
    again = fleet_population()
    other = fleet_population(seed=4)
    assert again.public_users == population.public_users
    assert other.public_users != population.public_users
    first, first_best = train_central(population, "pretrain", MODEL, progress=False)
    second, second_best = train_central(again, "pretrain", MODEL, progress=False)
    assert first.params.keys() == second.params.keys()
    assert all(np.array_equal(first.params[k], second.params[k]) for k in first.params)
    assert first_best == second_best
    reseeded, _ = train_central(population, "pretrain", replace(MODEL, seed=1), progress=False)
    assert not np.array_equal(reseeded.params["item_emb.weight"],
                              first.params["item_emb.weight"])

    # Deadlines far off (guards): every selected device is in, however busy the machine.
    # The seed gives the devices' keys and the server's coins: the same devices both times.
    config = SimulationConfig(rounds=1, clients_per_round=16, workers=2, seed=5,
                              deadline_s=600.0, stage_timeout_s=600.0, label="federated")
    runs = []
    for n in range(2):
        records, interrupted = simulate_one(population, bundle, tmp_path / f"run{n}", config,
                                            progress=False)
        assert not interrupted and [r.state for r in records[1:]] == ["published"]
        runs.append(records)
    start = [(r[0].hr10, r[0].ndcg10, r[0].online_hr10) for r in runs]
    assert start[0] == start[1] and start[0][0] is not None
    assert runs[0][1].sampled == runs[1][1].sampled > 0
    (w0, bound0), (w1, bound1) = (_published(tmp_path / f"run{n}", 2) for n in range(2))
    with np.load(bundle / "weights.npz") as npz:
        base = {k: npz[k] for k in npz.files}
    moved = max(float(np.abs(w0[k] - base[k]).max()) for k in base)
    for k in base:
        assert np.abs(w0[k].astype(np.float64) - w1[k]).max() <= bound0 + bound1 + 1e-6, k
    assert moved > 10 * (bound0 + bound1)  # the round really moved the model
    # A rerun into the first run's directory starts over on a fresh server: it publishes
    # version 2 again, within the same bound of the first run's.
    records, interrupted = simulate_one(population, bundle, tmp_path / "run0", config,
                                        progress=False)
    assert not interrupted and [r.state for r in records[1:]] == ["published"]
    assert (records[0].hr10, records[0].ndcg10, records[0].online_hr10) == start[0]
    w2, bound2 = _published(tmp_path / "run0", 2)
    for k in base:
        assert np.abs(w2[k].astype(np.float64) - w0[k]).max() <= bound0 + bound2 + 1e-6, k


def test_simulate_central_exports_the_central_model_and_rounds_can_start_from_it(tmp_path):
    """`simulate --central` exports the central model as it exports the start (int8 bundle,
    OUT/central/bundle): its manifest says it was trained on every user's data, and a run
    with it as --base-bundle starts from it: round 0's float HR@10 is the central figure the
    first run printed (torch there, the numpy twin here, on the same held-out events)."""
    import torch

    from device_sdk.bundle import load_bundle
    from trainer.cli import main

    flags = ["--mode", "fast", "--synthetic-users", "80", "--synthetic-items", "60",
             "--epochs", "2", "--dim", "8", "--hidden", "16", "--max-len", "8",
             "--rounds", "1", "--clients-per-round", "5", "--workers", "1", "--no-progress"]
    assert main(["simulate", "--run", str(tmp_path / "a"), "--central", *flags]) == 0
    report = tmp_path / "a" / "report"
    central = load_bundle(report / "central" / "bundle")
    start = load_bundle(report / "base" / "bundle")
    assert central.manifest["provenance"]["data"]["slice"] == "central"
    assert start.manifest["provenance"]["data"]["slice"] == "pretrain"
    assert any(not np.array_equal(central.weights()[k], start.weights()[k])
               for k in start.weights())
    first = json.loads((report / "rounds.json").read_text())
    figure = first["central"]["hr@10"]
    # The report says how the central model was trained, torch's thread count included.
    training = first["meta"]["central_training"]
    assert training["threads"] == torch.get_num_threads() >= 1
    assert 1 <= training["best_epoch"] <= training["epochs_run"] <= 2
    assert main(["simulate", "--run", str(tmp_path / "b"), "--base-bundle",
                 str(report / "central" / "bundle"), *flags]) == 0
    second = json.loads((tmp_path / "b" / "report" / "rounds.json").read_text())
    # Float arithmetic differs between torch and numpy: a near-tie may flip one user.
    one_user = 1 / second["meta"]["data_held_out_devices"]
    assert second["runs"]["federated"][0]["float_hr10"] == pytest.approx(figure,
                                                                         abs=1.01 * one_user)
