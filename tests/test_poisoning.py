"""Model poisoning by one device, measured on the real server (SQLite and PostgreSQL).

Sealed path (the server sees each update): an update above the clip norm C, or one claiming
more examples than the task's ``max_examples`` (FedAvg weighs by the count), is refused 422
``update_rejected``. A device sending a maximal-norm update (norm exactly C, all of it on one
coordinate or aligned against the honest mean) then moves a FedAvg round (server_lr 1, no
DP) by its weight times C: C / n_expected when every device reports the same count, at most
C max_examples / (max_examples + the honest devices' examples) otherwise.

SecAgg+ path (the server sees only the sum): a device that skips the SDK's clipping can mask
any ring vector. The server's guard (``secure_aggregation.check_sum_norm``) fails the round
(``sum_norm_above_bound``) when the unmasked sum is longer than |U3| C plus the rounding (and
distributed-DP noise) allowance, before any noise, release or ledger entry. The remaining
limit, measured here: within the guard one malicious device can still replace the honest sum
by any vector of norm up to the bound B: its contribution a has |a| <= B + |honest sum|
(against C for an honest device); a per-device bound needs norm proofs (e.g. zero-knowledge
range proofs) this protocol does not have.

``POCKETREC_POISONING_REPORT=<file>`` appends each measurement as a JSON line
(``bench/poisoning.py`` prints them as a table)."""

import json
import math
import os
from functools import partial

import numpy as np
import pytest

from device_sdk.model_update import ModelUpdate
from device_sdk.protocol import SEALED_SCHEME, seal_update
from device_sdk.uploads import SealedUpload, SecAggUpload, secagg_vector
from tests.support.bundles import zip_bundle
from tests.support.server import (
    REPUBLISH_SETTINGS,
    ServerProcess,
    drive,
    masked_frames_left,
    open_round,
    publish,
    settled,
    sync_client,
    weights_of,
)

C = 1.0
SETTINGS = {**REPUBLISH_SETTINGS, "RATE_LIMIT": 100_000}
FEDAVG = {"strategy": "fedavg", "server_lr": 1.0, "clip_norm": C, "deadline_s": 600.0}
open_round = partial(open_round, **FEDAVG)  # a test's own config overrides FEDAVG


def report(**row):
    path = os.environ.get("POCKETREC_POISONING_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.fixture
def server(tmp_path, tiny_export, db_settings):
    with ServerProcess(tmp_path / "server", **SETTINGS, **db_settings) as srv:
        assert publish(srv, zip_bundle(tiny_export.bundle_dir)).status == 201
        srv.backend = "postgresql" if db_settings else "sqlite"
        yield srv


def unit(shapes, rng):
    """A random direction over every weight, as {name: float64 array} of norm 1."""
    parts = {k: rng.normal(size=s) for k, s in shapes.items()}
    norm = math.sqrt(sum(float(np.sum(v * v)) for v in parts.values()))
    return {k: v / norm for k, v in parts.items()}


def scaled(direction, factor):
    return {k: v * factor for k, v in direction.items()}


def norm_of(tensors):
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(v, np.float64))))
                         for v in tensors.values()))


def one_coordinate(shapes, value):
    """All of ``value`` on the first coordinate of the first tensor."""
    out = {k: np.zeros(s) for k, s in shapes.items()}
    out[sorted(shapes)[0]].flat[0] = value
    return out


def as_update(delta, version, examples, clip=C):
    delta32 = {k: np.asarray(v, np.float32) for k, v in delta.items()}
    n = norm_of(delta32)
    return ModelUpdate(version, delta32, examples, clip, n, n)


def movement(client, base_version, new_version, expected_without):
    """|published delta - what the round would have moved without the attacker's term|."""
    old, new = weights_of(client, base_version), weights_of(client, new_version)
    return math.sqrt(sum(float(np.sum(np.square(
        new[k].astype(np.float64) - old[k] - expected_without[k]))) for k in old))


def test_sealed_path_refuses_oversized_updates_and_bounds_a_max_norm_attacker(
        server, tmp_path):
    clients = [sync_client(server, tmp_path, f"d{n}") for n in range(4)]
    honest, attacker = clients[:3], clients[3]
    shapes = {k: v.shape for k, v in weights_of(attacker, 1).items()}
    rng = np.random.default_rng(11)
    version = 1
    cases = [("one_coordinate", 10, 10), ("against_honest_mean", 10, 10),
             ("max_examples_vs_fewer", 2, 10)]
    for n_case, (attack, honest_examples, attacker_examples) in enumerate(cases):
        opened = open_round(server, target_clients=4, upload_scheme=SEALED_SCHEME,
                            max_examples=10)
        round_id = opened["round_id"]
        tasks = [client.checkin(version, 10) for client in clients]
        deltas = [scaled(unit(shapes, rng), 0.9 * C) for _ in honest]
        honest_sum = {k: sum(d[k] for d in deltas) for k in shapes}
        if attack == "against_honest_mean":
            poison = scaled(honest_sum, -C / norm_of(honest_sum))
        else:
            poison = one_coordinate(shapes, C)
        if n_case == 0:  # refused: above the clip norm, or claiming too many examples
            path = f"/v1/rounds/{round_id}/update"
            keys = attacker.server_keys()
            for bad in (as_update(one_coordinate(shapes, 1.5 * C), version, 10, clip=1.5 * C),
                        as_update(poison, version, 11), as_update(poison, version, 10**9)):
                sealed = seal_update(bad, round_id=round_id,
                                     device_id=attacker.identity.device_id,
                                     transport_public_key=keys.transport_key)
                response = attacker.request("POST", path, body=sealed)
                assert response.status == 422
                assert json.loads(response.data)["error"]["code"] == "update_rejected"
            assert server.round(round_id, settled=False)["received"] == 0
        for client, task, delta in zip(honest, tasks, deltas, strict=False):
            assert SealedUpload().submit(client, task, as_update(
                delta, version, honest_examples))["accepted"]
        assert SealedUpload().submit(attacker, tasks[3], as_update(
            poison, version, attacker_examples))["accepted"]
        view = settled(server, round_id, timeout=60.0)
        assert view["state"] == "published" and view["received"] == 4
        total = 3 * honest_examples + attacker_examples
        without = {k: honest_sum[k] * honest_examples / total for k in shapes}
        moved = movement(attacker, version, view["published_version"], without)
        bound = C * attacker_examples / total  # C / n_expected when the counts are equal
        assert moved <= bound + 1e-5, (attack, moved, bound)
        if honest_examples == attacker_examples:
            assert bound == C / 4
        report(path="sealed", attack=attack, backend=server.backend, clip=C, clients=4,
               honest_examples=honest_examples, attacker_examples=attacker_examples,
               bound=bound, moved=moved)
        version = view["published_version"]


def test_secagg_guard_fails_an_unclipped_sum_and_lets_honest_max_norm_rounds_publish(
        server, tmp_path):
    """Four SecAgg+ rounds on one server: honest devices at exactly C, all aligned (the
    longest honest sum) publish; a device masking 7.5 C on one coordinate (its own session,
    bypassing the SDK's clipping) fails the round with nothing released; a device that knows
    the honest sum and replaces it, staying inside the guard, shows the documented limit;
    honest max-norm devices with distributed DP noise publish (the guard's noise allowance)."""
    clients = [sync_client(server, tmp_path, f"d{n}") for n in range(4)]
    shapes = {k: v.shape for k, v in weights_of(clients[0], 1).items()}
    rng = np.random.default_rng(12)
    version = 1
    cases = ["honest_max_norm_aligned", "unclipped_one_coordinate", "within_guard_replace_sum",
             "honest_max_norm_aligned_distributed_dp"]
    for attack in cases:
        distributed = attack.endswith("distributed_dp")
        config = {"target_clients": 4, "min_clients": 3, "secagg_poll_s": 0.05,
                  "secagg_stage_timeout_s": 60.0}
        if distributed:
            config.update(noise_multiplier=0.5, dp_mode="distributed")
        opened = open_round(server, **config)
        round_id = opened["round_id"]
        tasks = [client.checkin(version, 10) for client in clients]
        if attack.startswith("honest"):
            direction = unit(shapes, rng)
            inputs = [scaled(direction, C)] * 4
        else:
            inputs = [scaled(unit(shapes, rng), 0.9 * C) for _ in range(3)]
            honest_sum = {k: sum(d[k] for d in inputs) for k in shapes}
            bound = 4 * C  # |U3| C, what the server's guard allows (+ rounding slack)
            if attack == "unclipped_one_coordinate":
                inputs.append(one_coordinate(shapes, 7.5 * C))
            else:  # cancel the honest sum, then put just under the bound on one coordinate
                target = one_coordinate(shapes, 0.999 * bound)
                inputs.append({k: target[k] - honest_sum[k] for k in shapes})
        sessions = [SecAggUpload().session(client, task, flat(vector))
                    for client, task, vector in zip(clients, tasks, inputs, strict=True)]
        for session in sessions:
            session.start()
        drive(sessions, "unmask")
        view = settled(server, round_id, timeout=60.0)
        ledger = view["epsilon"]
        if attack == "unclipped_one_coordinate":
            assert view["state"] == "failed" and view["published_version"] is None
            assert view["reason"].startswith("sum_norm_above_bound"), view["reason"]
            assert ledger is None and masked_frames_left(server) == []
            report(path="secagg", attack=attack, backend=server.backend, clip=C, clients=4,
                   attacker_norm=7.5 * C, outcome="failed: sum_norm_above_bound")
            continue
        assert view["state"] == "published", view["reason"]
        guard = view["measurements"]["sum_norm_bound"]
        new_version = view["published_version"]
        if attack.startswith("honest"):
            without = {k: sum(d[k] for d in inputs) / 4 for k in shapes}
            error = movement(clients[0], version, new_version, without)
            if distributed:
                assert ledger is not None and ledger > 0
                assert guard > 4 * C
            else:  # only stochastic rounding: < 1 unit per coordinate per device
                scale = float(tasks[0].secagg["scale"])
                d = sum(math.prod(s) for s in shapes.values())
                assert error <= math.sqrt(d) / scale + 1e-5
                assert guard == pytest.approx(4 * C, rel=1e-3)
            report(path="secagg", attack=attack, backend=server.backend, clip=C, clients=4,
                   sum_norm=4 * C, guard=guard, outcome="published")
        else:
            without = {k: honest_sum[k] / 4 for k in shapes}
            moved = movement(clients[0], version, new_version, without)
            limit = (guard + norm_of(honest_sum)) / 4
            assert moved <= limit + 1e-5
            assert ledger is None
            report(path="secagg", attack=attack, backend=server.backend, clip=C, clients=4,
                   honest_bound=C / 4, limit=limit, moved=moved, guard=guard,
                   outcome="published (within the guard)")
        version = new_version


def flat(tensors):
    return np.concatenate([np.asarray(tensors[k], np.float64).ravel() for k in sorted(tensors)])


def test_adaptive_clipping_fails_a_round_whose_bits_no_honest_cohort_could_sum_to(
        server, tmp_path):
    """Adaptive clipping's bits travel as the SecAgg+ vector's last value, C (b - 1/2).
    An honest round publishes and the next round's clip is its estimate; a device that
    sends 10 C there instead (to drag the clip) fails its round like an unclipped update,
    and the clip stays the last published round's estimate. Within the bound a device can
    move the count by at most 1/2 whatever it sends: the sensitivity the noise covers."""
    clients = [sync_client(server, tmp_path, f"d{n}") for n in range(4)]
    shapes = {k: v.shape for k, v in weights_of(clients[0], 1).items()}
    rng = np.random.default_rng(5)
    adaptive = {"target_clients": 4, "min_clients": 3, "secagg_poll_s": 0.05,
                "secagg_stage_timeout_s": 60.0, "clip_quantile": 0.5, "clip_lr": 0.2}
    version, estimate = 1, None
    for attack in (False, True, False):
        opened = open_round(server, **adaptive)
        round_id, config = opened["round_id"], opened["config"]
        if estimate is None:
            assert config["clip_norm"] == C and "first estimate" in config["clip_basis"]
        else:  # the newest published round's estimate, whatever failed since
            assert config["clip_norm"] == pytest.approx(estimate[1], rel=1e-12)
            assert estimate[0] in config["clip_basis"]
        clip = config["clip_norm"]
        tasks = [client.checkin(version, 10) for client in clients]
        assert all(t.clip_norm == clip and t.secagg["clip_bit"] is True for t in tasks)
        updates = [as_update(scaled(unit(shapes, rng), 0.5 * clip), version, 10, clip)
                   for _ in range(4)]  # every honest update within the clip: b = 1
        vectors = [secagg_vector(u, clip_bit=True) for u in updates]
        if attack:
            vectors[3] = np.append(flat(updates[3].delta), 10 * clip)
        sessions = [SecAggUpload().session(client, task, vector)
                    for client, task, vector in zip(clients, tasks, vectors, strict=True)]
        for session in sessions:
            session.start()
        drive(sessions, "unmask")
        view = settled(server, round_id, timeout=60.0)
        if attack:
            assert view["state"] == "failed" and view["published_version"] is None
            assert view["reason"].startswith("sum_norm_above_bound"), view["reason"]
            assert "under-the-clip bits" in view["reason"]
            continue
        assert view["state"] == "published", view["reason"]
        m = view["measurements"]
        # No DP: the count is exact but for the rounding (< 1 unit per device).
        scale = float(tasks[0].secagg["scale"])
        assert m["clip_below_fraction"] == pytest.approx(1.0, abs=4 / (scale * clip))
        assert m["clip_norm_next"] == pytest.approx(clip * math.exp(-0.2 * 0.5), rel=1e-6)
        estimate = (round_id, m["clip_norm_next"])
        version = view["published_version"]
