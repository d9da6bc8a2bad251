"""Fast mode (``trainer.simulation.fast``) against the full simulator it shortcuts.

- The ring sum: for the same seeds, the devices' real SecAgg+ path (events replayed into a
  SQLite EventLog, LocalTrainer, masked inputs with pairwise and self masks, dropouts, the
  server's unmasking) gives the very ring sum fast mode's workers add up, bit for bit.
- Parity: a seeded 3-round configuration runs in full mode (the real sync server over HTTP,
  real devices) and in fast mode; they sample the same cohorts, drop the same devices,
  spend the same epsilon, and publish weights that differ by no more than SecAgg+'s
  stochastic rounding allows. With central DP noise too (the same seeded noise stream).
- Fast mode is deterministic: the same seed twice gives bit-identical results."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import select

from device_sdk import secagg
from device_sdk.bundle import load_bundle
from device_sdk.csprng import CryptoRandom
from device_sdk.event_log import EventLog
from device_sdk.local_trainer import LocalTrainer, LocalTrainingConfig, round_seed
from device_sdk.protocol import b64, b64decode, device_id_for
from device_sdk.recommender import HistoryPolicy
from device_sdk.uploads import flatten_update
from sync_server.blobs import BlobStore
from sync_server.db import Database
from sync_server.models import ModelVersion
from sync_server.privacy import LedgerEntry, PrivacyLedger
from sync_server.publisher import patch_bundle, served_average
from sync_server.registry import extract_version
from tests.support.fleet import ROUNDS, pretrained_fleet
from trainer.simulation.experiment import simulate_one
from trainer.simulation.fast import FastDeviceWorker, decode_ring, quantize_seed
from trainer.simulation.report import write_report
from trainer.simulation.run import SimulationConfig, planned_rates

REPO = Path(__file__).resolve().parents[1]
# The embedded synthetic shop, small: 240 users, 120 items.
ROUND = "round-7"
SEED = 4


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    return pretrained_fleet(tmp_path_factory.mktemp("base"))


def _secagg_round(vectors: dict[str, np.ndarray], identities: dict[str, Ed25519PrivateKey],
                  params: secagg.TaskParams, drop_at_masked: str, drop_at_unmask: str
                  ) -> tuple[np.ndarray, set[str]]:
    """Every device's side of a SecAgg+ round (device_sdk.secagg.SecAggDevice) and the
    server's unmasking; one device drops before its masked input, one after it. Each
    device's stochastic rounding is drawn from fast mode's seed for it. Returns the
    unmasked ring sum and U3."""
    devices = {u: secagg.SecAggDevice(ROUND, u, identities[u], params) for u in vectors}
    adverts = {u: d.advertise() for u, d in devices.items()}
    u1 = sorted(adverts)
    degree = secagg.default_degree(len(u1))
    threshold = secagg.default_threshold(degree)
    graph_seed = bytes(range(32))
    graph = secagg.neighbour_graph(u1, degree, graph_seed)
    raw = {u: k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
           for u, k in identities.items()}
    shares = {u: devices[u].share_keys({
        "participants": u1, "degree": degree, "threshold": threshold,
        "graph_seed": b64(graph_seed),
        "adverts": {v: {"identity": b64(raw[v]), "advert": adverts[v]}
                    for v in (*graph[u], u)}})["shares"] for u in u1}
    u2 = set(shares)
    masked = {}
    for u in sorted(u2 - {drop_at_masked}):
        inbox = {"u2": sorted(u2), "shares": {s: shares[s][u] for s in u2 if u in shares[s]}}
        rng = CryptoRandom.from_seed(quantize_seed(SEED, ROUND, USERS[u]))
        masked[u] = devices[u].masked_input(inbox, vectors[u], rng=rng)
    u3 = set(masked)
    reveals = {}
    for u in sorted(u3 - {drop_at_unmask}):
        mine = set(graph[u]) & u2
        reveals[u] = secagg.parse_reveal(devices[u].unmask({"u3": sorted(u3)}), mine & u3,
                                         mine - u3)
    total = np.zeros(params.vector_length, dtype=np.uint32)
    for u in u3:
        total += masked[u]
    parsed = {u: {k: b64decode(a[k]) for k in ("c_pk", "e_pk", "b_commit")}
              for u, a in adverts.items()}
    return secagg.unmask_sum(round_id=ROUND, masked_sum=total, graph=graph, adverts=parsed,
                             u2=u2, u3=u3, reveals=reveals, threshold=threshold), u3


USERS: dict[str, str] = {}  # device id -> user, for the ring-sum test


def test_the_full_paths_unmasked_ring_sum_is_fast_modes_bit_for_bit(fleet, tmp_path):
    population, bundle_dir = fleet
    bundle = load_bundle(bundle_dir)
    now = int(population.clock[-1])
    users = [u for u in sorted(population.devices)
             if np.searchsorted(population.devices[u].times, now) >= 4][:10]
    assert len(users) == 10
    config = LocalTrainingConfig(local_epochs=2, learning_rate=0.3, batch_size=4,
                                 clip_norm=0.3)
    policy = HistoryPolicy(exclude_kinds=("dismiss",))
    scale = secagg.quantization_scale(config.clip_norm, len(users))
    length = sum(v.size for v in bundle.weights().values())
    params = secagg.TaskParams(scale, length, 3)
    # The full path: each device's events replayed into its own SQLite log, trained on.
    vectors, identities = {}, {}
    for user in users:
        stream = population.devices[user]
        upto = int(np.searchsorted(stream.times, now))
        log = EventLog(tmp_path / f"{len(vectors)}.db")
        log.log_many([(stream.items[i], stream.kinds[i], float(stream.times[i]))
                      for i in range(upto)])
        update = LocalTrainer(bundle, policy).train(
            log.events(), config, base_version=1, seed=round_seed(f"{SEED}/{user}", ROUND))
        log.close()
        key = Ed25519PrivateKey.generate()
        device = device_id_for(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
        USERS[device] = user
        identities[device], vectors[device] = key, flatten_update(update)
    ids = sorted(vectors)
    full, u3 = _secagg_round(vectors, identities, params, drop_at_masked=ids[0],
                             drop_at_unmask=ids[1])
    assert ids[1] in u3 and ids[0] not in u3 and len(u3) == len(users) - 1
    # Fast mode: two workers holding the devices' streams, each summing its own devices.
    workers = [FastDeviceWorker({"base_bundle": str(bundle_dir), "seed": SEED})
               for _ in range(2)]
    weights = tmp_path / "weights.npz"
    np.savez(weights, **bundle.weights())
    contributing = [USERS[u] for u in sorted(u3)]
    task = {"local_epochs": 2, "learning_rate": 0.3, "batch_size": 4, "clip_norm": 0.3,
            "proximal_mu": 0.0, "max_examples": 1000, "trainable": None}
    total = np.zeros(length, dtype=np.uint32)
    for n, worker in enumerate(workers):
        mine = contributing[n::2]
        worker.add([population.devices[u].to_json() for u in mine])
        worker.round(users=mine, round_id=ROUND, version=1, weights=str(weights), now=now,
                     task=task, params=params.to_json(), train={u: True for u in mine})
        part = worker.collect()
        assert part["clients"] == len(mine)
        total += decode_ring(part["ring"])
    assert total.dtype == full.dtype == np.uint32
    assert np.array_equal(total, full)
    assert np.any(secagg.centered(full) != 0)


def _final_weights(root: Path, version: int, mode: str) -> dict[str, np.ndarray]:
    if mode == "fast":
        bundle = load_bundle(root / "fast" / "bundle")
    else:  # what the full simulator's evaluator downloaded and verified, like a device
        bundle = load_bundle(root / "evaluator" / "models" / "versions" / str(version))
    assert bundle.version == version
    return bundle.weights()


def _both_modes(fleet, tmp_path, config):
    population, bundle = fleet
    out = {}
    for mode in ("full", "fast"):
        root = tmp_path / mode
        records, interrupted = simulate_one(population, bundle, root,
                                            replace(config, mode=mode), progress=False)
        assert not interrupted
        out[mode] = (root, records)
    out["population"] = population
    out["base"] = load_bundle(Path(bundle)).weights()
    return out


def _check_parity(runs, config, *, linear=True):
    """``linear``: the strategy's step is server_lr x the mean, so the quantization's bound
    on the mean bounds the weights; an adaptive step (FedAdam, FedYogi) divides by the
    moments, and only the served lists are compared."""
    (full_root, full), (fast_root, fast) = runs["full"], runs["fast"]
    assert [r.round for r in fast] == [r.round for r in full] == list(range(ROUNDS + 1))
    bound = 0.0
    for f, s in zip(full[1:], fast[1:], strict=True):
        assert f.state == s.state == "published", (f.reason, s.reason)
        # The same seeded coins and fate draws: the same cohort, the same survivors.
        assert (s.population, s.sampled, s.completed, s.planned_dropouts) == (
            f.population, f.sampled, f.completed, f.planned_dropouts)
        assert s.version == f.version
        assert s.epsilon == f.epsilon  # the same ledger over the same (z, q), exactly
        # The clip devices were given: fixed, or adaptive clipping's estimate from the sum
        # the server unmasked (which the quantization moves by < clients / scale).
        assert s.clip_norm == pytest.approx(f.clip_norm, rel=1e-6)
        # Stochastic rounding moves each coordinate of each input by < 1 / scale, so the
        # mean the strategy applies (sum / target_clients) by < clients / (scale target).
        scale = secagg.quantization_scale(
            s.clip_norm, config.clients_per_round + math.ceil(
                6 * math.sqrt(config.clients_per_round)) + 3)
        bound += config.server_lr * s.completed / (scale * config.clients_per_round)
    assert fast[-1].epsilon > 0 if config.noise_multiplier else fast[-1].epsilon == 0
    version = full[-1].version
    a = _final_weights(full_root, version, "full")
    b = _final_weights(fast_root, version, "fast")
    assert sorted(a) == sorted(b)
    assert any(not np.array_equal(a[k], runs["base"][k]) for k in a)  # the rounds moved it
    if linear:
        _check_weight_bound(a, b, bound)
    _check_served_lists(runs, full_root, fast_root, full, fast, version)


def _check_weight_bound(a, b, bound):
    worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    # Each later round trains from weights that differ by the earlier rounds' rounding, so
    # the differences carry on (twice the direct bound covers that), plus one float32
    # rounding of the published weights per round.
    ulp = max(float(np.max(np.spacing(np.abs(a[k])))) for k in a)
    assert worst <= 2 * bound + ROUNDS * ulp, (worst, bound, ulp)


def _check_served_lists(runs, full_root, fast_root, full, fast, version):
    # The int8 models devices would serve: weights this close quantize alike but for
    # coordinates sitting on a rounding edge, so the top-10 lists agree for all but a few
    # held-out users (at most 1 %), and HR@10 differs by no more than those users can move.
    population = runs["population"]
    tops = []
    for bundle in (load_bundle(full_root / "evaluator" / "models" / "versions" / str(version)),
                   load_bundle(fast_root / "fast" / "bundle")):
        tops.append(bundle.model().topk_many(population.test.history)[0][:, :10])
    differ = int(np.sum(np.any(tops[0] != tops[1], axis=1)))
    assert differ <= max(1, len(population.test) // 100), differ
    assert abs(full[-1].hr10 - fast[-1].hr10) <= differ / len(population.test) + 1e-12


CONFIG = SimulationConfig(rounds=ROUNDS, clients_per_round=24, dropout=0.1, clip_norm=0.3,
                          learning_rate=0.3, workers=2, seed=SEED, label="parity")


def test_fast_and_full_mode_publish_the_same_model_within_the_quantization_bound(
        fleet, tmp_path):
    runs = _both_modes(fleet, tmp_path, CONFIG)
    _check_parity(runs, CONFIG)


def test_parity_holds_with_central_dp_noise(fleet, tmp_path):
    config = replace(CONFIG, noise_multiplier=0.8, strategy="fedavgm", server_lr=0.5,
                     momentum=0.5)
    runs = _both_modes(fleet, tmp_path, config)
    _check_parity(runs, config)


def test_parity_holds_under_fedyogi(fleet, tmp_path):
    """The real server builds FedYogi from the round config and carries its moments from
    round to round; fast mode runs the same strategy on its ring sum."""
    config = replace(CONFIG, strategy="fedyogi", server_lr=0.05, tau=1e-3)
    runs = _both_modes(fleet, tmp_path, config)
    _check_parity(runs, config, linear=False)


# A DP run with adaptive clipping: the parity test and bench/fidelity.py's test read it.
ADAPTIVE = replace(CONFIG, noise_multiplier=0.8, strategy="fedavgm", server_lr=0.5,
                   momentum=0.5, clip_quantile=0.5, clip_lr=0.5)


@pytest.fixture(scope="module")
def adaptive_runs(fleet, tmp_path_factory):
    return _both_modes(fleet, tmp_path_factory.mktemp("adaptive"), ADAPTIVE)


def test_adaptive_clipping_moves_the_clip_alike_in_both_modes(adaptive_runs):
    """Devices append their under-the-clip bit to the SecAgg+ vector, the real server
    unmasks the sum, noises the count and gives the next round the new clip; fast mode runs
    the same code on its ring sum. The clip moves, the same way in both, and the ledger
    charges the round's z (the update and the count together)."""
    config, runs = ADAPTIVE, adaptive_runs
    _check_parity(runs, config)
    fast = runs["fast"][1]
    clips = [r.clip_norm for r in fast[1:]]
    assert clips[0] == config.clip_norm and len(set(clips)) == len(clips)
    # Each step is at most lr x (the fraction's range plus the count noise's) in the log.
    steps = [abs(math.log(b / a)) for a, b in zip(clips, clips[1:], strict=False)]
    assert all(0 < step < config.clip_lr * 2 for step in steps), steps
    planned = [LedgerEntry(f"r{i}", 0.8, q) for i, q in
               enumerate(planned_rates(runs["population"], config))]
    assert fast[-1].epsilon == pytest.approx(
        PrivacyLedger(fast[-1].delta, entries=planned, prefixes=None).epsilon(), rel=1e-9)


def test_the_fidelity_script_finds_the_two_modes_alike_and_names_a_round_that_parts(
        adaptive_runs, tmp_path):
    """bench/fidelity.py, the README's full-against-fast comparison, on the reports of a DP
    run with adaptive clipping in both modes: every round alike (cohort, survivors, epsilon;
    the clip within the quantization's reach); a round whose cohort differs is named and
    fails the script."""
    config, runs = ADAPTIVE, adaptive_runs
    reports = {mode: write_report(tmp_path / f"report-{mode}", {config.label: runs[mode][1]}
                                  ).parent for mode in ("full", "fast")}
    script = REPO / "bench" / "fidelity.py"

    def compare(fast_report: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(reports["full"]),
                               str(fast_report)], capture_output=True, text=True, timeout=120)

    alike = compare(reports["fast"])
    assert alike.returncode == 0, alike.stdout + alike.stderr
    assert f"and epsilon alike in {ROUNDS + 1} of {ROUNDS + 1} rounds" in alike.stdout
    assert f"clip within 1e-06 relative in {ROUNDS + 1} of {ROUNDS + 1} rounds" in alike.stdout
    assert alike.stdout.count("| yes |") >= 3  # rounds 0, 1 and the last at least
    parted = [replace(r, sampled=r.sampled + 1) if r.round == 2 else r
              for r in runs["fast"][1]]
    other = write_report(tmp_path / "report-parted", {config.label: parted}).parent
    differs = compare(other)
    assert differs.returncode == 1, differs.stdout + differs.stderr
    assert "| 2 |" in differs.stdout and "NO: sampled" in differs.stdout
    assert f"and epsilon alike in {ROUNDS} of {ROUNDS + 1} rounds" in differs.stdout


def test_a_served_average_serves_the_ema_of_the_published_weights_in_both_modes(
        fleet, tmp_path):
    """With serve_ema the real server's published model file serves the exponential moving
    average of the published weights, patched in place round after round (each version's
    served tensors found in its round's state), while weights.npz, what the next round's
    devices train from, carries the weights themselves; fast mode keeps the same average."""
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"serve_ema .* \(0, 1\), got"):
            replace(CONFIG, serve_ema=bad)
    config = replace(CONFIG, serve_ema=0.5)
    runs = _both_modes(fleet, tmp_path, config)
    _check_parity(runs, config)
    full_root, full = runs["full"]
    # Every version the real server published, from its own database and blob store.
    db, blobs = Database(f"sqlite:///{full_root / 'server' / 'pocketrec.db'}"), BlobStore(
        full_root / "server" / "blobs")
    with db.session() as session:
        rows = session.scalars(select(ModelVersion).order_by(ModelVersion.version)).all()
        stored = {r.version: blobs.get(r.blob_sha256) for r in rows}
    assert sorted(stored) == list(range(1, full[-1].version + 1))
    base_dir = Path(fleet[1])  # the start: its model file serves its weights
    histories = runs["population"].test.history
    served = None
    for version, data in sorted(stored.items()):
        bundle = extract_version(data, tmp_path / "versions" / str(version))
        weights = bundle.weights()
        if version == 1:
            served = weights
            continue
        assert bundle.manifest["provenance"]["serve_ema"] == 0.5
        # Patched in place (the base's served tensors found in its round's state), not
        # re-exported: the full export would hide a lost served state.
        assert bundle.manifest["quantization"]["written_by"] == "tensor_map"
        served = served_average(0.5, served, weights)
        assert any(not np.array_equal(served[k], weights[k]) for k in weights)
        # The model file serves exactly the average: the same top-10 lists as a model file
        # patched from it; the weights themselves serve other lists.
        expected = load_bundle(patch_bundle(weights, base_dir, version, {}, served=served))
        assert expected.weights().keys() == weights.keys()
        assert all(np.array_equal(expected.weights()[k], weights[k]) for k in weights)
        got = bundle.model().topk_many(histories)[0]
        assert np.array_equal(got, expected.model().topk_many(histories)[0])
        plain = load_bundle(patch_bundle(weights, base_dir, version, {}))
        assert not np.array_equal(got, plain.model().topk_many(histories)[0])


def test_a_target_epsilon_sets_the_noise_the_rounds_ledger_spends_it_to(fleet, tmp_path):
    population, bundle = fleet
    config = replace(CONFIG, mode="fast", dropout=0.0, target_epsilon=3.0,
                     strategy="fedavgm", server_lr=0.5, momentum=0.5)
    rates = planned_rates(population, config)
    records, interrupted = simulate_one(population, bundle, tmp_path, config, progress=False)
    assert not interrupted and config.noise_multiplier is not None
    assert [r.state for r in records[1:]] == ["published"] * ROUNDS == ["published"] * len(rates)
    # Every round published, so the run's epsilon is the plan's, at most the target.
    planned = [LedgerEntry(f"r{i}", config.noise_multiplier, q) for i, q in enumerate(rates)]
    epsilon = PrivacyLedger(records[-1].delta, entries=planned, prefixes=None).epsilon()
    assert records[-1].epsilon == pytest.approx(epsilon, rel=1e-9)
    assert 0.9 * 3.0 < records[-1].epsilon <= 3.0
    assert all(0 < q < 1 for q in rates)  # a sampled fleet: the rates are the server's q


TIMINGS = ("wall_s", "phases", "device_seconds_median")


def test_fast_mode_twice_with_the_same_seed_is_bit_identical(fleet, tmp_path):
    population, bundle = fleet
    config = replace(CONFIG, mode="fast", noise_multiplier=0.8, export_every=2)
    results = []
    for n in range(2):
        root = tmp_path / f"run{n}"
        records, _ = simulate_one(population, bundle, root, config, progress=False)
        # Timings aside, every field of every round.
        rows = [{k: v for k, v in r.to_json().items() if k not in TIMINGS} for r in records]
        weights = load_bundle(root / "fast" / "bundle").weights()
        results.append((json.dumps(rows), {k: v.tobytes() for k, v in weights.items()}))
    assert results[0] == results[1]
    rows = json.loads(results[0][0])
    assert [r["state"] for r in rows[1:]] == ["published"] * ROUNDS
    # float metrics every round; int8 at the start, at round 2 (export_every) and the end
    assert all(r["float_hr10"] is not None for r in rows)
    assert [r["hr10"] is not None for r in rows] == [True, False, True, True]


def test_fast_mode_on_ray_actors_gives_what_local_processes_give(fleet, tmp_path):
    pytest.importorskip("ray")
    population, bundle = fleet
    config = replace(CONFIG, mode="fast", rounds=2, workers=2)
    rows = []
    for backend in ("local", "ray"):
        records, interrupted = simulate_one(population, bundle, tmp_path / backend,
                                            replace(config, backend=backend), progress=False)
        assert not interrupted
        rows.append([{k: v for k, v in r.to_json().items() if k not in TIMINGS}
                     for r in records])
    assert rows[0] == rows[1]
    assert all(r["state"] == "published" for r in rows[1])

def fleet_grid(*, rounds: int, grid: str) -> str:
    """A sweep grid over the test fleet (the same data and model as ``fleet``)."""
    return f"""
[base]
synthetic_users = 240
synthetic_items = 120
seed = 3
max_len = 20
public_fraction = 0.15
rounds = {rounds}
clients_per_round = 24
workers = 1

[grid]
{grid}
"""


def test_a_sweep_runs_every_configuration_and_writes_the_table_and_plot(fleet, tmp_path):
    from trainer.cli import main

    _, bundle = fleet
    grid = tmp_path / "grid.toml"
    grid.write_text(fleet_grid(rounds=3, grid="noise_multiplier = [0, 0.8]"))
    out = tmp_path / "sweep"
    assert main(["sweep", str(grid), "--base-bundle", str(bundle), "--out", str(out),
                 "--run", str(tmp_path / "run"), "--no-progress"]) == 0
    rows = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["run"] for r in rows] == ["noise_multiplier=0", "noise_multiplier=0.8"]
    no_dp, dp = rows
    assert no_dp["epsilon"] == 0 and dp["epsilon"] > 0
    for row in rows:
        assert row["rounds"] == row["published"] == ROUNDS and row["device_updates"] > 0
        assert 0 < row["final_hr10"] <= 1 and row["best_hr10"] >= 0 and row["wall_s"] > 0
        assert (out / "runs" / row["run"] / "rounds.json").exists()
    with open(out / "sweep.csv") as f:
        assert len(f.read().strip().splitlines()) == 1 + len(rows)
    with open(out / "sweep_configs.csv") as f:  # no seed in the grid: a config per run
        assert len(f.read().strip().splitlines()) == 1 + len(rows)
    assert (out / "privacy_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "noise_multiplier=0.8" in (out / "index.html").read_text()


def test_the_sweep_summarises_each_configuration_over_its_seeds():
    """Runs that differ only in ``seed`` form one configuration row: the mean and the
    sample standard deviation of each metric over the seeds that finished."""
    import statistics

    from trainer.simulation.sweep import SEED_METRICS, over_seeds

    rng = np.random.default_rng(0)
    rows = [{"params": {"clip_norm": clip, "seed": seed},
             **{m: float(rng.random()) for m in SEED_METRICS}}
            for clip in (0.1, 0.3) for seed in (0, 1, 2)][:-1]  # clip 0.3 lost seed 2
    configs = {c["config"]: c for c in over_seeds(rows)}
    assert sorted(configs) == ["clip_norm=0.1", "clip_norm=0.3"]
    assert configs["clip_norm=0.1"]["seeds"] == [0, 1, 2]
    assert configs["clip_norm=0.3"]["seeds"] == [0, 1]
    for name, clip in (("clip_norm=0.1", 0.1), ("clip_norm=0.3", 0.3)):
        for metric in SEED_METRICS:
            values = [r[metric] for r in rows if r["params"]["clip_norm"] == clip]
            assert configs[name][f"{metric}_mean"] == pytest.approx(statistics.mean(values))
            assert configs[name][f"{metric}_sd"] == pytest.approx(statistics.stdev(values))
    single = over_seeds([{"params": {"seed": 4}, **{m: 0.5 for m in SEED_METRICS}}])
    assert single[0]["config"] == "base" and single[0]["final_hr10_sd"] is None


def test_a_grid_may_not_vary_what_every_run_shares(tmp_path):
    from trainer.simulation.sweep import load_grid

    grid = tmp_path / "grid.toml"
    grid.write_text("[base]\nrounds = 3\n[grid]\ndim = [16, 32]\n")
    with pytest.raises(ValueError, match="cannot vary"):
        load_grid(grid)
    grid.write_text("[grid]\nclip_norm = [0.1, 0.3]\nseed = [0, 1, 2]\n[sample]\nn = 4\n")
    base, runs = load_grid(grid)
    assert base == {} and len(runs) == 4 and len({json.dumps(r) for r in runs}) == 4


def test_every_grid_in_bench_loads_as_written():
    """The README's sweep commands name the grids in bench/: each loads, with its runs."""
    from trainer.simulation.sweep import load_grid

    grids = sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.toml"))
    assert grids
    for path in grids:
        base, runs = load_grid(path)
        assert runs, path


def test_run_tables_name_recipes_and_combine_with_the_grid(tmp_path):
    """Each [[run]] is one recipe, crossed with every [grid] combination; a recipe that
    sets what every run shares, what the grid varies, a list, or repeats a run is refused
    with the reason."""
    from trainer.simulation.sweep import load_grid, run_name

    grid = tmp_path / "grid.toml"
    grid.write_text('[base]\nrounds = 3\n[grid]\nseed = [0, 1]\n'
                    '[[run]]\nstrategy = "fedadam"\nlocal-lr = 0.2\n'
                    '[[run]]\nstrategy = "fedavg"\nlocal_epochs = 3\nlocal_batch_size = 8\n')
    base, runs = load_grid(grid)
    assert base == {"rounds": 3}
    assert runs == [{"seed": 0, "strategy": "fedadam", "local_lr": 0.2},
                    {"seed": 1, "strategy": "fedadam", "local_lr": 0.2},
                    {"seed": 0, "strategy": "fedavg", "local_epochs": 3, "local_batch_size": 8},
                    {"seed": 1, "strategy": "fedavg", "local_epochs": 3, "local_batch_size": 8}]
    assert len({run_name(r) for r in runs}) == 4
    grid.write_text('[[run]]\nclip_norm = 0.5\n')
    assert load_grid(grid)[1] == [{"clip_norm": 0.5}]
    for body, reason in (('[[run]]\ndim = 16\n', "cannot set"),
                         ('[grid]\nseed = [0]\n[[run]]\nseed = 1\n', "which \\[grid\\] varies"),
                         ('[[run]]\nlocal_lr = [0.1, 0.2]\n', "single values"),
                         ('[[run]]\nseed = 1\n[[run]]\nseed = 1\n', "repeats a run"),
                         ('run = 3\n', "array of tables"),
                         ('[runs]\nseed = 1\n', "unknown table")):
        grid.write_text(body)
        with pytest.raises(ValueError, match=reason):
            load_grid(grid)


def test_ctrl_c_during_a_sweep_keeps_the_finished_runs(fleet, tmp_path):
    _, bundle = fleet
    grid = tmp_path / "grid.toml"
    grid.write_text(fleet_grid(rounds=40, grid="seed = [0, 1, 2]"))
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", "sweep", str(grid), "--base-bundle",
         str(bundle), "--out", str(out), "--run", str(tmp_path / "run"), "--parallel", "1",
         "--no-progress"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    table = out / "sweep.json"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if table.exists() and json.loads(table.read_text())["runs"]:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    data = json.loads(table.read_text())
    assert data["meta"]["interrupted"] is True
    # One run at a time and the first had finished: it is there, whole; the one under way
    # when Ctrl-C came is not.
    assert 1 <= len(data["runs"]) < 3
    assert all(r["rounds"] == r["published"] == 40 for r in data["runs"])


def test_a_round_over_a_subset_leaves_the_frozen_tensors_as_they_were_in_both_modes(
        fleet, tmp_path):
    """``trainable`` federates only the MLP and the output bias: both modes publish the
    same model within the quantization bound, and the item tables are the base bundle's
    bit for bit."""
    _, bundle = fleet
    federated = ("mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight", "out.bias")
    config = replace(CONFIG, strategy="fedavgm", server_lr=2.0, momentum=0.5,
                     trainable=federated)
    runs = _both_modes(fleet, tmp_path, config)
    _check_parity(runs, config)
    base = load_bundle(bundle).weights()
    version = runs["fast"][1][-1].version
    for mode in ("full", "fast"):
        weights = _final_weights(runs[mode][0], version, mode)
        for name in base:
            if name in federated:
                assert not np.array_equal(weights[name], base[name]), (mode, name)
            else:
                assert np.array_equal(weights[name], base[name]), (mode, name)


def test_the_simulators_round_config_carries_the_optimizers_settings_and_the_subset():
    import model_zoo
    from sync_server import round_config
    from trainer.cli import (
        DP_STRATEGY_DEFAULTS,
        RECIPE_CLIP_QUANTILE,
        RECIPE_STRATEGY,
        STRATEGY_DEFAULTS,
        _clip_quantile,
        _recipe,
        _trainable,
        build_parser,
    )

    def args(*flags):
        return build_parser().parse_args(["simulate", *flags])

    assert _trainable(args()) is None
    assert _trainable(args("--model", "dual_encoder", "--trainable", "mlp, out.bias")) == (
        "mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight", "out.bias")
    assert _trainable(args("--model", "dual_encoder", "--trainable", "all")) == tuple(sorted(
        model_zoo.get("dual_encoder").config(n_items=2).param_shapes()))
    with pytest.raises(ValueError, match="'mlp.1' matches no parameter"):
        _trainable(args("--model", "dual_encoder", "--trainable", "mlp.1"))
    # No strategy flag: the recipe's strategy for the run (with DP or not), its settings,
    # with DP its DP settings over them; a flag wins over both.
    for dp in (False, True):
        strategy = RECIPE_STRATEGY[dp]
        dp_settings = DP_STRATEGY_DEFAULTS.get(strategy, {}) if dp else {}
        assert _recipe(args(), dp) == {
            "strategy": strategy, **STRATEGY_DEFAULTS[strategy], **dp_settings}
    assert _recipe(args(), True) != _recipe(args(), False)
    assert _recipe(args("--tau", "0.5"), True)["tau"] == 0.5
    assert _recipe(args("--strategy", "fedavgm"), True) == {
        "strategy": "fedavgm", **STRATEGY_DEFAULTS["fedavgm"],
        **DP_STRATEGY_DEFAULTS.get("fedavgm", {})}
    # demo's --dp-strategy picks the DP run's optimizer alone, over --strategy.
    demo = build_parser().parse_args(["demo", "--strategy", "fedavg", "--dp-strategy", "fedavgm"])
    assert _recipe(demo, True)["strategy"] == "fedavgm"
    assert _recipe(demo, False) == {"strategy": "fedavg", **STRATEGY_DEFAULTS["fedavg"]}
    # With DP the clip adapts where the protocol carries the bits; a flag or 'off' wins.
    assert _clip_quantile(args(), True) == RECIPE_CLIP_QUANTILE
    assert _clip_quantile(args(), False) is None
    assert _clip_quantile(args("--clip-quantile", "off"), True) is None
    assert _clip_quantile(args("--clip-quantile", "0.7"), False) == 0.7
    assert _clip_quantile(args("--upload-scheme", "sealed-x25519-v1"), True) is None
    assert _clip_quantile(args("--dp-mode", "distributed"), True) is None
    with pytest.raises(SystemExit):
        args("--clip-quantile", "1.5")
    # Flags win; a setting the strategy does not read is not sent.
    assert _recipe(args("--strategy", "fedadam", "--tau", "0.02", "--momentum", "0.9"),
                   True) == {**STRATEGY_DEFAULTS["fedadam"], "strategy": "fedadam",
                             "tau": 0.02}
    config = SimulationConfig(strategy="fedadam", server_lr=0.1, tau=0.02, beta1=0.8,
                              momentum=0.9, trainable=("out.bias",))
    body = config.round_config(32, 1900, 1, 1e-5, 60.0, 30.0, r=1)
    stored = round_config.plan(body).stored()
    assert (stored["tau"], stored["beta1"], stored["trainable"]) == (0.02, 0.8, ["out.bias"])
    assert "momentum" not in stored and "beta2" not in stored  # fedadam's own default
    body = replace(config, strategy="fedavgm", trainable=None).round_config(
        32, 1900, 1, 1e-5, 60.0, 30.0, r=1)
    assert body["momentum"] == 0.9 and "tau" not in body and body["trainable"] is None


def test_a_server_lr_decay_gives_each_round_its_own_cosine_step():
    """--server-lr-decay F: round 1 at --server-lr, the last planned round at F times it,
    cosine in between, held after; each round's config (the server stores and applies it,
    fast mode plans the same body) carries its own server_lr."""
    from sync_server import round_config
    from trainer.cli import _sim_config, build_parser

    args = build_parser().parse_args(["simulate", "--strategy", "fedadam", "--server-lr", "0.2",
                                      "--server-lr-decay", "0.25", "--rounds", "5"])
    config = _sim_config(args, "federated", None)
    lrs = [round_config.plan(config.round_config(32, 1900, r, 1e-5, 60.0, 30.0, r=r)
                             ).stored()["server_lr"] for r in range(1, 7)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(0.05)
    # The cosine's midpoint is the mean of the two ends; a round past the plan keeps the last.
    assert lrs[2] == pytest.approx((0.2 + 0.05) / 2) and lrs[5] == pytest.approx(lrs[4])
    assert all(a > b for a, b in zip(lrs[:4], lrs[1:5], strict=True))
    constant = replace(config, server_lr_decay=None)
    assert {constant.round_config(32, 1900, r, 1e-5, 60.0, 30.0, r=r)["server_lr"]
            for r in (1, 3, 5)} == {0.2}
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"server_lr_decay .* \(0, 1\], got"):
            replace(config, server_lr_decay=bad)


def test_a_server_lr_warmup_ramps_each_rounds_step_up_to_the_schedule():
    """--server-lr-warmup W: round r < W runs at r / W of the scheduled lr (the decay's
    when there is one, the --server-lr-from step's), round W on at the schedule itself;
    each round's stored config carries it. A negative W or a step at round 1 is
    refused."""
    from sync_server import round_config
    from trainer.cli import _sim_config, build_parser

    def lrs(*flags):
        args = build_parser().parse_args(["simulate", "--strategy", "fedavgm", "--server-lr",
                                          "0.8", "--rounds", "6", *flags])
        config = _sim_config(args, "federated", None)
        return config, [round_config.plan(config.round_config(
            32, 1900, r, 1e-5, 60.0, 30.0, r=r)).stored()["server_lr"] for r in range(1, 8)]

    config, warm = lrs("--server-lr-warmup", "4")
    assert warm[:3] == pytest.approx([0.2, 0.4, 0.6]) and warm[3:] == pytest.approx([0.8] * 4)
    _, decayed = lrs("--server-lr-decay", "0.5")
    _, both = lrs("--server-lr-decay", "0.5", "--server-lr-warmup", "3")
    assert both == pytest.approx([lr * min(1, r / 3) for r, lr in enumerate(decayed, 1)])
    assert both[1] < decayed[1] and both[4] == decayed[4]
    assert lrs()[1] == pytest.approx([0.8] * 7)
    with pytest.raises(ValueError, match=r"server_lr_warmup .* >= 0, got -1"):
        replace(config, server_lr_warmup=-1)
    # --server-lr-from R:LR steps the lr the warmup (and a decay) multiply.
    _, stepped = lrs("--server-lr-from", "3:0.4,6:0.1")
    assert stepped == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.4, 0.1, 0.1])
    _, warm_stepped = lrs("--server-lr-from", "3:0.4", "--server-lr-warmup", "4")
    assert warm_stepped == pytest.approx([0.2, 0.4, 0.3, 0.4, 0.4, 0.4, 0.4])
    with pytest.raises(ValueError, match="server_lr_schedule's rounds must increase"):
        replace(config, server_lr_schedule=((1, 0.1),))


def test_a_local_lr_schedule_steps_the_lr_each_rounds_devices_train_at(fleet, tmp_path):
    """--local-lr-from R:LR[,R:LR...]: from round R on each round's stored config and the
    task its devices are given carry LR (before the first step --local-lr), and the devices
    do train at it: the same cohort from the same model moves a hundredth as far. Bad steps
    are refused with the reason, from the flag, a sweep grid's text or the config."""
    import argparse

    from sync_server import round_config
    from trainer.cli import _schedule, _sim_config, build_parser

    def config(*flags):
        return _sim_config(build_parser().parse_args(["simulate", *flags]), "federated", None)

    def task(sim, r):
        opened = round_config.plan(sim.round_config(32, 1900, 1, 1e-5, 60.0, 30.0, r=r))
        ready = replace(opened, derived=replace(
            opened.derived, model_version=1, expected_shapes={"out.bias": [4]}))
        assert ready.stored()["learning_rate"] == sim.local_lr_at(r)
        return ready.task(f"r{r}", 60.0)

    stepped = config("--local-lr", "0.3", "--local-lr-from", "2:0.03, 4:0.003")
    assert stepped.local_lr_schedule == ((2, 0.03), (4, 0.003))
    assert [task(stepped, r).learning_rate for r in range(1, 6)] == pytest.approx(
        [0.3, 0.03, 0.03, 0.003, 0.003])
    assert {task(config("--local-lr", "0.3"), r).learning_rate for r in (1, 4)} == {0.3}
    # A sweep grid gives the flag's text; the same steps come out.
    grid = argparse.Namespace(local_lr_from="2:0.03,4:0.003")
    assert _schedule(grid, "local_lr_from") == stepped.local_lr_schedule
    for text in ("2-0.03", "two:0.1", "2:"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["simulate", "--local-lr-from", text])
        with pytest.raises(ValueError, match="ROUND:LR"):
            _schedule(argparse.Namespace(local_lr_from=text), "local_lr_from")
    for steps, reason in ((((1, 0.1),), "increase from 2"), (((3, 0.1), (2, 0.1)), "increase"),
                          (((2, 0.1), (2, 0.2)), "increase"), (((2, 0.0),), "> 0"),
                          (((2, float("nan")),), "> 0")):
        with pytest.raises(ValueError, match=reason):
            replace(stepped, local_lr_schedule=steps)

    population, bundle = fleet
    norms = {}
    for name, steps in (("constant", ()), ("stepped", ((2, 0.003),))):
        sim = replace(CONFIG, mode="fast", dropout=0.0, local_lr_schedule=steps)
        records, interrupted = simulate_one(population, bundle, tmp_path / name, sim,
                                            progress=False)
        assert not interrupted and [r.state for r in records[1:]] == ["published"] * ROUNDS
        norms[name] = [r.update_norm_median for r in records[1:]]
    # Round 1 at --local-lr in both; round 2 from the same model and cohort at 1/100 of it.
    assert norms["stepped"][0] == norms["constant"][0] > 0
    assert 0 < norms["stepped"][1] < 0.05 * norms["constant"][1]


def test_a_clock_of_fewer_rounds_holds_its_last_step_for_the_rounds_after_it():
    """--clock-rounds N: the devices' clock runs through their events in N rounds; rounds
    after N train at its last step (and the privacy plan counts them at that step's
    eligible fleet). N must be in [1, --rounds]."""
    from tests.support.fleet import fleet_population
    from trainer.cli import _clock_rounds, build_parser
    from trainer.simulation.run import eligible_users, round_time

    def args(*flags):
        return build_parser().parse_args(["simulate", "--rounds", "6", *flags])

    assert _clock_rounds(args()) == 6 and _clock_rounds(args("--clock-rounds", "2")) == 2
    for bad in ("0", "7"):
        with pytest.raises(ValueError, match=r"--clock-rounds must be in \[1, --rounds 6\]"):
            _clock_rounds(args("--clock-rounds", bad))
    population = fleet_population()  # a clock of ROUNDS steps
    times = [round_time(population, r) for r in range(1, ROUNDS + 3)]
    assert times[:ROUNDS] == [int(t) for t in population.clock]
    assert times[ROUNDS:] == [times[ROUNDS - 1]] * 2 and times[0] < times[ROUNDS - 1]
    rates = planned_rates(population, replace(CONFIG, rounds=ROUNDS + 2))
    users = sorted(population.devices)
    last = len(eligible_users(population, users, times[-1]))
    assert len(rates) == ROUNDS + 2
    assert rates[ROUNDS:] == [min(1.0, CONFIG.clients_per_round / last)] * 2


def test_a_run_on_a_clock_of_its_own_replays_the_fleet_as_a_fleet_built_on_that_clock(
        fleet, tmp_path):
    """A config's clock_rounds (the demo's Online Retail recipe: 360 rounds on a clock of 120
    beside 100 rounds on a clock of 100): that run's devices and its privacy plan follow the
    clock ``build_population`` would have set for that many rounds; the fleet's other run
    keeps the fleet's clock."""
    from tests.support.fleet import MODEL, SPEC, fleet_population
    from trainer.simulation.experiment import run_experiment
    from trainer.simulation.population import build_population

    population = fleet_population()
    assert population.with_clock(ROUNDS) is population
    built = build_population(SPEC, 20, rounds=5, public_fraction=0.15, seed=3)
    assert np.array_equal(population.with_clock(5).clock, built.clock)
    assert population.with_clock(5).devices is population.devices
    with pytest.raises(ValueError, match=r"clock_rounds must be in \[1, rounds 3\]"):
        replace(CONFIG, clock_rounds=4)

    _, bundle = fleet
    own = replace(CONFIG, mode="fast", rounds=4, clock_rounds=2, label="own clock")
    shared = replace(CONFIG, mode="fast", rounds=4, label="fleet clock", noise_multiplier=0.8)
    _, result = run_experiment(SPEC, MODEL, tmp_path, [own, shared], rounds=4,
                               public_fraction=0.15, warmup=0.5, central=False,
                               base_bundle=bundle, progress=False, log=lambda _: None)

    def stamps(clock, rounds):
        return [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(clock[min(r, len(clock))
                                                                       - 1])))
                for r in range(1, rounds + 1)]

    four = build_population(SPEC, 20, rounds=4, public_fraction=0.15, seed=3)
    two = four.with_clock(2)
    assert np.array_equal(two.clock, build_population(
        SPEC, 20, rounds=2, public_fraction=0.15, seed=3).clock)
    for config, fleet_clock in ((own, two.clock), (shared, four.clock)):
        records = result["runs"][config.label]
        assert [r.clock for r in records[1:]] == stamps(fleet_clock, 4)
        assert [r.state for r in records[1:]] == ["published"] * 4
    # The own clock's last step (three quarters of the events) is the fleet clock's round
    # 3, and the run holds it for rounds 3 and 4.
    own_records = result["runs"]["own clock"]
    assert own_records[3].clock == own_records[4].clock == stamps(four.clock, 4)[2]
    assert own_records[2].clock != result["runs"]["fleet clock"][2].clock


def test_a_proximal_mu_reaches_the_task_every_device_is_given():
    """--proximal-mu MU (FedProx): the round's stored config and the task each selected
    device is given carry it (the device's trainer applies it:
    tests/test_local_trainer.py::test_fedprox_keeps_the_update_closer_to_the_base); the
    default is 0, plain local SGD. A negative MU is refused before any round."""
    from sync_server import round_config
    from trainer.cli import _sim_config, build_parser

    def config(*flags):
        return _sim_config(build_parser().parse_args(["simulate", *flags]), "federated", None)

    def task(sim):
        opened = round_config.plan(sim.round_config(32, 1900, 1, 1e-5, 60.0, 30.0, r=1))
        ready = replace(opened, derived=replace(  # what the server derives as it opens
            opened.derived, model_version=1, expected_shapes={"out.bias": [4]}))
        assert ready.stored()["proximal_mu"] == sim.proximal_mu
        return ready.task("r1", 60.0)

    prox = config("--proximal-mu", "2.5")
    assert task(prox).proximal_mu == 2.5
    assert task(config()).proximal_mu == 0.0
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match=r"proximal_mu .* >= 0, got"):
            replace(prox, proximal_mu=bad)


@pytest.fixture(scope="module")
def session_fleet(tmp_path_factory):
    from tests.support.fleet import pretrained_session_fleet

    return pretrained_session_fleet(tmp_path_factory.mktemp("sessions"))


def test_a_session_model_fleet_sees_the_held_out_rows_as_evaluate_does(session_fleet):
    """The simulator's repeat_sasrec (separators on, as pocketrec train's default): the
    vocabulary gains the separator as its last id, the held-out histories every round is
    evaluated on carry separators where ``pocketrec evaluate`` puts them, and the exported
    start says so in its config."""
    from tests.support.fleet import fleet_population
    from trainer.data.split import with_sessions

    population, bundle_dir = session_fleet
    plain = fleet_population()
    separator = population.vocab.session_id
    assert separator == len(population.vocab) - 1 == len(plain.vocab)
    assert population.ranked_items == len(plain.vocab)
    expected = with_sessions(plain.test, separator, 1800)
    assert population.test.users == plain.test.users
    assert np.array_equal(population.test.history, expected.history)
    assert np.array_equal(population.test.target, plain.test.target)
    assert (population.test.history == separator).any()
    config = load_bundle(bundle_dir).config
    assert (config["session_id"], config["session_gap"]) == (separator, 1800)


def test_fast_workers_history_is_the_devices_recommender_history(session_fleet, tmp_path):
    """Fast mode's online hit reads the history a device's ``Recommender`` builds from its
    SQLite log, separators placed as of the user's next event."""
    from device_sdk.recommender import Recommender

    population, bundle_dir = session_fleet
    bundle = load_bundle(bundle_dir)
    policy = HistoryPolicy(exclude_kinds=("dismiss",))
    recommender = Recommender(bundle, policy=policy)
    worker = FastDeviceWorker({"base_bundle": str(bundle_dir), "seed": SEED})
    separator, checked, opened = population.vocab.session_id, 0, 0
    for user in sorted(population.devices)[:40]:
        stream = population.devices[user]
        upto = len(stream) - 1
        if upto < 2:
            continue
        log = EventLog(tmp_path / f"{checked}.db")
        log.log_many([(stream.items[i], stream.kinds[i], float(stream.times[i]))
                      for i in range(upto)])
        expected = recommender.history(log, now=float(stream.times[upto]))
        log.close()
        got = worker.history(stream, upto)
        assert got.tolist() == expected.tolist(), user
        checked += 1
        opened += int(got[-1] == separator)
    assert checked >= 30 and 0 < opened < checked  # both: inside a visit and opening one


def test_parity_holds_for_the_session_aware_repeat_family(session_fleet, tmp_path):
    """The default family with separators: full mode's devices (SQLite logs, LocalTrainer,
    SecAgg+ over HTTP) and fast mode publish the same model within the quantization bound,
    and both evaluate it on the histories with separators."""
    config = replace(CONFIG, learning_rate=0.05)
    runs = _both_modes(session_fleet, tmp_path, config)
    _check_parity(runs, config)


def test_a_base_bundle_decides_the_model_the_fleet_is_built_for(fleet, session_fleet):
    """--base-bundle: the fleet is built for the bundle's model (architecture, separators and
    shape, so that the central reference is trained at the size the rounds train), whatever
    the simulator's default is; a flag against it is refused."""
    from trainer.cli import _simulation_model, build_parser

    def model(bundle, *flags):
        return _simulation_model(build_parser().parse_args(
            ["simulate", "--base-bundle", str(bundle), *flags]))

    spec = model(session_fleet[1])
    assert spec.arch == "repeat_sasrec"
    assert spec.options["session_gap"] == 1800
    plain = model(fleet[1])
    assert plain.arch == "dual_encoder" and "session_gap" not in plain.options
    with pytest.raises(ValueError, match="holds a repeat_sasrec model with arch"):
        model(session_fleet[1], "--model", "dual_encoder")
    with pytest.raises(ValueError, match="--session-gap 600 contradicts it"):
        model(session_fleet[1], "--session-gap", "600")
    # Flags that agree with the bundle are fine.
    assert model(session_fleet[1], "--model", "repeat_sasrec", "--session-gap", "1800"
                 ).options["session_gap"] == 1800
    # The shape is the bundle's, not simulate's defaults (dim 64, hidden 128, max_len 50,
    # two blocks), nor the demo's (dim 32, hidden 64).
    from tests.support.fleet import SESSION_MODEL

    shape = {k: SESSION_MODEL.options[k] for k in ("dim", "hidden", "max_len", "blocks")}
    assert {k: spec.options[k] for k in shape} == shape
    demo = _simulation_model(build_parser().parse_args(
        ["demo", "--base-bundle", str(session_fleet[1])]))
    assert {k: demo.options[k] for k in shape} == shape
    with pytest.raises(ValueError, match="with dim 16; --dim 24 contradicts it"):
        model(session_fleet[1], "--dim", "24")
    assert model(session_fleet[1], "--dim", "16").options["dim"] == 16


def test_the_unseen_users_check_leaves_half_the_held_out_devices_out_of_central_training():
    """bench/central_unseen.py (README, "What central training's lead is made of"): the
    central split without half A of the held-out devices has none of A's rows (training,
    validation, test, baskets) and every other user's unchanged; the three models it trains
    are the start and the two central models, and their scores on the two halves add up to
    the whole's."""
    from tests.support.fleet import MODEL, fleet_population
    from tests.support.paths import bench_module
    from trainer.simulation.experiment import central_metrics

    bench = bench_module("central_unseen")
    population = fleet_population()
    central = population.central
    held = sorted(population.test.users)
    a = set(held[::2])
    cut = bench.without(central, a)
    assert set(cut.train) == set(central.train) - a and a <= set(central.train)
    for name in ("valid", "test", "basket", "basket_valid"):
        before, after = getattr(central, name), getattr(cut, name)
        if before is None:
            assert after is None
            continue
        assert after.users == [u for u in before.users if u not in a]
        for i, user in enumerate(after.users):
            j = before.users.index(user)
            assert np.array_equal(after.history[i], before.history[j])
    assert all(np.array_equal(cut.train[u], central.train[u]) for u in cut.train)

    rows = bench.measure(population, MODEL, a)
    assert [r[2].meta["data"]["slice"] for r in rows] == ["pretrain", "central", "central"]
    # Same seed and settings: only the data differ between the two central models.
    assert any(not np.array_equal(rows[1][2].params[k], rows[2][2].params[k])
               for k in rows[1][2].params)
    (_, full_scores, full, _) = rows[1]
    whole = central_metrics(full, population)["hr@10"]
    b = len(held) - len(a)
    assert (full_scores["A line"] * len(a) + full_scores["B line"] * b) / len(held) == \
        pytest.approx(whole, abs=1e-9)
    for _, scores, _, _ in rows:
        assert all(0.0 <= scores[f"{half} line"] <= 1.0 for half in "AB")
