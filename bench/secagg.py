"""SecAgg+ (secagg+-v1) vs the plain sealed upload (sealed-x25519-v1) at the Online Retail
model's update size: per-device time and bytes, server time, side by side in one run.

    python bench/secagg.py                                  # 10, 100, 1000 devices; 0 and 10% drop
    python bench/secagg.py --devices 10 --values 10000      # a quick check
    python bench/secagg.py --devices 100 1000 --dropout 0.1 --repeats 1

A whole round runs in one process, one thread, as tests/test_secagg.py drives it: every device
is a real ``SecAggDevice`` (advertise, share_keys, masked_input, unmask), the server side is
the code sync_server runs (verify_advert, neighbour_graph, parse_reveal, PRT1 decode + ring
sum, unmask_sum, dequantize, FedAvg.aggregate_sum). Messages travel as the JSON / PRT1 bytes
they would be on the wire (compact JSON, the poll view the server answers with), so byte
counts are exact bodies; HTTP headers, request signatures, polling and the database are left
out of both schemes. The plain side is seal_update on the device and open_update +
validate_update + FedAvg.aggregate on the server, for the same surviving devices.

``--dropout`` devices drop after sharing keys (in U2, not U3), so the server rebuilds their
mask keys and removes their pairwise masks. The dropout rows of one device count reuse that
count's advertise / share_keys / masked_input runs (a dropped device's masked input is never
given to the server); each row's unmask answers are fresh. Updates are random deltas clipped
to L2 norm <= 1, in two float32 tensors; the default size is the dual encoder's at n_items=3660
(488,716 values). Server runs alternate between the schemes (who goes first swaps each
repeat) so load from other processes hits both alike. Times are printed, never asserted.
The default run takes about 6 minutes on 2 idle cores (most of it the 1000 devices' stages).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cryptography
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from device_sdk import secagg
from device_sdk.model_update import ModelUpdate
from device_sdk.protocol import (
    b64,
    b64decode,
    decode_tensors,
    device_id_for,
    encode_tensors,
    open_update,
    seal_update,
    validate_update,
)
from device_sdk.uploads import flatten_update
from sync_server.strategies import ClientUpdate, FedAvg

ROUND = "round-1"
ACTION = {"share_keys": "share_keys", "masked_input": "masked_input", "unmasking": "unmask"}
clock = time.perf_counter

# Bonawitz et al. 2017 (CCS, "Practical Secure Aggregation for Privacy-Preserving Machine
# Learning"): communication expansion over sending the raw input in the clear.
BONAWITZ = {"users": 2**10, "values": 2**20, "input_bits": 16, "expansion": 1.73}


def wire(obj: Any) -> bytes:
    """A JSON body as the device (and Flask's jsonify) sends it: compact separators."""
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def poll_view(stage: str, payload: Any) -> bytes:
    """GET /v1/rounds/<id>/secagg when the server asks for ``stage``'s answer."""
    return wire({"round_id": ROUND, "stage": stage, "action": ACTION[stage], "dropped": False,
                 "retry_after": 1.0, "payload": payload})


def tensor_shapes(values: int) -> dict[str, tuple[int, ...]]:
    half = values // 2
    return {"tower_a": (half,), "tower_b": (values - half,)}


def make_update(seed: int, shapes: Mapping[str, tuple[int, ...]], clip: float) -> ModelUpdate:
    """A random float32 delta with L2 norm just under ``clip`` (content does not change cost)."""
    rng = np.random.default_rng(seed)
    raw = {k: rng.standard_normal(math.prod(s), dtype=np.float32).reshape(s)
           for k, s in shapes.items()}
    norm = math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in raw.values()))
    factor = clip * (1 - 1e-4) / norm
    delta = {k: (v.astype(np.float64) * factor).astype(np.float32) for k, v in raw.items()}
    return ModelUpdate(1, delta, 10, clip, clip * (1 - 1e-4), norm)


def quantiles(values: Sequence[float]) -> tuple[float, float]:
    return float(np.median(values)), float(np.percentile(values, 95))


@dataclass
class Identity:
    key: Ed25519PrivateKey
    raw: bytes
    device_id: str


def identities(n: int) -> list[Identity]:
    out = []
    for _ in range(n):
        key = Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        out.append(Identity(key, raw, device_id_for(raw)))
    return sorted(out, key=lambda i: i.device_id)


# --- SecAgg+: the devices ------------------------------------------------------------------


@dataclass
class SecAggRound:
    """Everything the server received, and what each device spent, for one device count."""

    ids: list[str]
    raw_identity: dict[str, bytes]
    degree: int
    threshold: int
    graph_seed: bytes
    scale: float
    adverts: dict[str, Any] = field(default_factory=dict)  # parsed advert JSON bodies
    frames: dict[str, bytes] = field(default_factory=dict)  # masked-input PRT1 bodies
    devices: dict[str, secagg.SecAggDevice] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # device -> stage -> s
    sent: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> message -> bytes
    received: dict[str, dict[str, int]] = field(default_factory=dict)


def run_devices(people: list[Identity], shapes: Mapping[str, tuple[int, ...]], clip: float,
                min_clients: int, survivor_sums: dict[float, tuple[set[str], np.ndarray]],
                seed: int) -> SecAggRound:
    """Stages 0-2 for every device (all advertise, share and mask); fills ``survivor_sums``
    (rate -> (dropped ids, float sum of the others' updates)) for the correctness check."""
    n, values = len(people), sum(math.prod(s) for s in shapes.values())
    ids = [p.device_id for p in people]
    degree = secagg.default_degree(n)
    r = SecAggRound(ids=ids, raw_identity={p.device_id: p.raw for p in people},
                    degree=degree, threshold=secagg.default_threshold(degree),
                    graph_seed=os.urandom(secagg.SEED_BYTES),
                    scale=secagg.quantization_scale(clip, n))
    params = secagg.TaskParams(r.scale, values, min_clients)
    for p in people:
        u = p.device_id
        r.devices[u] = secagg.SecAggDevice(ROUND, u, p.key, params)
        r.seconds[u], r.sent[u], r.received[u] = {}, {}, {}

    # 0. advertise
    for u in ids:
        started = clock()
        body = wire(r.devices[u].advertise())
        r.seconds[u]["advertise"] = clock() - started
        r.sent[u]["advert"] = len(body)
        r.adverts[u] = json.loads(body)

    # 1. share keys: the server's roster for each device, the device's encrypted shares
    graph = secagg.neighbour_graph(ids, r.degree, r.graph_seed)
    identity_b64 = {u: b64(raw) for u, raw in r.raw_identity.items()}
    relayed: dict[str, dict[str, str]] = {}
    for u in ids:
        view = poll_view("share_keys", {
            "participants": ids, "degree": r.degree, "threshold": r.threshold,
            "graph_seed": b64(r.graph_seed),
            "adverts": {v: {"identity": identity_b64[v], "advert": r.adverts[v]}
                        for v in (*graph[u], u)}})
        started = clock()
        body = wire(r.devices[u].share_keys(json.loads(view)["payload"]))
        r.seconds[u]["share_keys"] = clock() - started
        r.sent[u]["shares"], r.received[u]["roster"] = len(body), len(view)
        relayed[u] = json.loads(body)["shares"]

    # 2. masked input (U2 = everyone: the dropouts happen after this stage's inbox)
    for i, u in enumerate(ids):
        view = poll_view("masked_input", {"u2": ids,
                                          "shares": {s: relayed[s][u] for s in graph[u]}})
        update = make_update(seed + i, shapes, clip)
        started = clock()
        inbox = json.loads(view)["payload"]
        vector = flatten_update(update)
        masked = r.devices[u].masked_input(inbox, vector)
        frame = encode_tensors({"masked": masked}, {"round_id": ROUND})
        r.seconds[u]["masked_input"] = clock() - started
        r.sent[u]["masked"], r.received[u]["inbox"] = len(frame), len(view)
        r.frames[u] = frame
        for dropped, total in survivor_sums.values():
            if u not in dropped:
                total += vector
    return r


def unmask_answers(r: SecAggRound, u3: list[str]) -> tuple[dict[str, bytes], dict[str, float],
                                                          int]:
    """Stage 3 for the survivors ``u3``: (answer bodies, seconds per device, request bytes).
    Each row answers on a copy of the device (a device answers once; the copy is the same
    device in another round whose survivors differ)."""
    view = poll_view("unmasking", {"u3": u3})
    answers, seconds = {}, {}
    for u in u3:
        device = copy.copy(r.devices[u])
        started = clock()
        answers[u] = wire(device.unmask(json.loads(view)["payload"]))
        seconds[u] = clock() - started
    return answers, seconds, len(view)


# --- the servers ---------------------------------------------------------------------------


def secagg_server(r: SecAggRound, u3: list[str], answers: Mapping[str, bytes],
                  shapes: Mapping[str, tuple[int, ...]],
                  weights: Mapping[str, np.ndarray]) -> tuple[dict[str, float], np.ndarray]:
    """The server's SecAgg+ work for one round; (seconds per step, dequantized flat sum)."""
    ids, u2, survivors = r.ids, set(r.ids), set(u3)
    length = sum(math.prod(s) for s in shapes.values())
    cpu = time.process_time()
    t0 = clock()
    # keys: advert signatures (checked at intake), the graph, the revealed shares' shapes
    for u in ids:
        secagg.verify_advert(r.adverts[u], ROUND, u, r.raw_identity[u])
    graph = secagg.neighbour_graph(ids, r.degree, r.graph_seed)
    adverts = {u: {k: b64decode(r.adverts[u][k]) for k in ("c_pk", "b_commit")} for u in u2}
    reveals = {}
    for u in u3:
        neighbours = set(graph[u]) & u2
        reveals[u] = secagg.parse_reveal(json.loads(answers[u]), neighbours & survivors,
                                         neighbours - survivors)
    t1 = clock()
    masked_sum = np.zeros(length, dtype=np.uint32)
    for u in u3:
        tensors, _ = decode_tensors(r.frames[u])
        np.add(masked_sum, tensors["masked"], out=masked_sum)
    t2 = clock()
    ring = secagg.unmask_sum(round_id=ROUND, masked_sum=masked_sum, graph=graph,
                             adverts=adverts, u2=u2, u3=survivors, reveals=reveals,
                             threshold=r.threshold)
    t3 = clock()
    flat = secagg.dequantize(ring, r.scale)
    total, offset = {}, 0
    for name in sorted(shapes):
        size = math.prod(shapes[name])
        total[name] = flat[offset : offset + size].reshape(shapes[name])
        offset += size
    FedAvg().aggregate_sum(dict(weights), total, len(u3))
    t4 = clock()
    return {"keys": t1 - t0, "sum": t2 - t1, "unmask": t3 - t2, "apply": t4 - t3,
            "total": t4 - t0, "cpu": time.process_time() - cpu}, flat


def plain_server(sealed: Mapping[str, bytes], u3: list[str], key: X25519PrivateKey,
                 shapes: Mapping[str, tuple[int, ...]], clip: float,
                 weights: Mapping[str, np.ndarray]) -> dict[str, float]:
    cpu = time.process_time()
    t0 = clock()
    updates = []
    for u in u3:
        tensors, meta = open_update(sealed[u], round_id=ROUND, device_id=u,
                                    transport_private_key=key)
        validate_update(tensors, shapes, clip)
        updates.append(ClientUpdate(tensors, int(meta["num_examples"])))
    t1 = clock()
    FedAvg().aggregate(dict(weights), updates)
    t2 = clock()
    return {"open": t1 - t0, "fedavg": t2 - t1, "total": t2 - t0,
            "cpu": time.process_time() - cpu}


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.median([run[k] for run in runs])) for k in runs[0]}


# --- the apples-to-apples point: Bonawitz et al.'s n and vector length ------------------------


def reference_bytes(n: int, values: int) -> dict[str, int]:
    """Exact bytes one device sends (and receives) in a SecAgg+ round of ``n`` devices with
    ``values`` values and no dropouts, at the default degree: the device and its neighbours
    run the real stages (the others only advertise)."""
    people = identities(n)
    ids = [p.device_id for p in people]
    degree = secagg.default_degree(n)
    threshold = secagg.default_threshold(degree)
    params = secagg.TaskParams(secagg.quantization_scale(1.0, n), values, 3)
    devices = {p.device_id: secagg.SecAggDevice(ROUND, p.device_id, p.key, params)
               for p in people}
    raw = {p.device_id: b64(p.raw) for p in people}
    adverts = {u: devices[u].advertise() for u in ids}
    seed = os.urandom(secagg.SEED_BYTES)
    graph = secagg.neighbour_graph(ids, degree, seed)
    me = ids[0]
    shares, out = {}, {}
    for u in (me, *graph[me]):
        view = poll_view("share_keys", {
            "participants": ids, "degree": degree, "threshold": threshold,
            "graph_seed": b64(seed),
            "adverts": {v: {"identity": raw[v], "advert": adverts[v]} for v in (*graph[u], u)}})
        shares[u] = devices[u].share_keys(json.loads(view)["payload"])["shares"]
        if u == me:
            out["roster"], out["shares"] = len(view), len(wire(shares[u]))
    out["advert"] = len(wire(adverts[me]))
    inbox = poll_view("masked_input", {"u2": ids, "shares": {s: shares[s][me]
                                                             for s in graph[me]}})
    masked = devices[me].masked_input(json.loads(inbox)["payload"], np.zeros(values))
    out["masked"] = len(encode_tensors({"masked": masked}, {"round_id": ROUND}))
    request = poll_view("unmasking", {"u3": ids})
    out["unmask"] = len(wire(devices[me].unmask(json.loads(request)["payload"])))
    out["inbox"], out["request"] = len(inbox), len(request)
    out["degree"], out["threshold"] = degree, threshold
    return out


def warm_up(key: X25519PrivateKey, transport: bytes) -> None:
    """One tiny round of each scheme first, so lazy imports and first-call costs land here."""
    shapes = tensor_shapes(64)
    weights = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    people = identities(4)
    r = run_devices(people, shapes, 1.0, 3, {}, seed=1)
    u3 = r.ids[1:]
    answers, _, _ = unmask_answers(r, u3)
    secagg_server(r, u3, answers, shapes, weights)
    sealed = {p.device_id: seal_update(make_update(1, shapes, 1.0), round_id=ROUND,
                                       device_id=p.device_id, transport_public_key=transport)
              for p in people}
    plain_server(sealed, u3, key, shapes, 1.0, weights)


# --- main --------------------------------------------------------------------------------------


def kib(n: float) -> str:
    return f"{n / 1024:,.0f} KiB"


def ms(s: float) -> str:
    return f"{s * 1e3:,.0f}" if s >= 0.0995 else f"{s * 1e3:.1f}"


def secs(s: float) -> str:
    return f"{s:.2f}" if s >= 0.1 else f"{s:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1],
                        help="fractions of devices dropping after share_keys")
    parser.add_argument("--values", type=int, default=488_716,
                        help="update size (default: the Online Retail dual encoder's)")
    parser.add_argument("--repeats", type=int, default=3, help="server runs per row (median)")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the n=1024, 2^20-value byte count (about 10 s)")
    args = parser.parse_args()
    if min(args.devices) < 3 or not all(0 <= p < 0.3 for p in args.dropout):
        parser.error("need >= 3 devices and dropout fractions in [0, 0.3)")

    begun = clock()
    shapes = tensor_shapes(args.values)
    weights = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    server_key = X25519PrivateKey.generate()
    transport = server_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    rng = np.random.default_rng(args.seed)
    rows, stage_notes, byte_notes = [], [], []
    load_start = os.getloadavg()[0]
    warm_up(server_key, transport)

    for n in args.devices:
        people = identities(n)
        ids = [p.device_id for p in people]
        drops = {p: set(rng.choice(ids, size=round(p * n), replace=False).tolist())
                 for p in args.dropout}
        min_clients = min(max(3, math.ceil((1 - secagg.DEFAULT_DROPOUT) * n)),
                          *(n - len(d) for d in drops.values()))
        sums = {p: (d, np.zeros(args.values)) for p, d in drops.items()}
        r = run_devices(people, shapes, args.clip, min_clients, sums, seed=args.seed * 7919)
        # plain: the same devices seal the same kind of update
        sealed, seal_s = {}, []
        for i, u in enumerate(ids):
            update = make_update(args.seed * 7919 + i, shapes, args.clip)
            started = clock()
            sealed[u] = seal_update(update, round_id=ROUND, device_id=u,
                                    transport_public_key=transport)
            seal_s.append(clock() - started)
        plain_bytes = float(np.median([len(b) for b in sealed.values()]))
        for p, dropped in drops.items():
            u3 = [u for u in ids if u not in dropped]
            answers, unmask_s, request = unmask_answers(r, u3)
            per_device = [sum(r.seconds[u].values()) + unmask_s[u] for u in u3]
            sent = float(np.median([sum(r.sent[u].values()) + len(answers[u]) for u in u3]))
            received = float(np.median([sum(r.received[u].values()) + request for u in u3]))
            server_in = sum(sum(r.sent[u].values()) for u in ids) + sum(
                len(a) for a in answers.values())
            secure_runs, plain_runs = [], []
            for repeat in range(args.repeats):  # alternate who goes first: shared-load drift
                for secure in (True, False) if repeat % 2 == 0 else (False, True):
                    gc.collect()
                    if not secure:
                        plain_runs.append(plain_server(sealed, u3, server_key, shapes,
                                                       args.clip, weights))
                        continue
                    timing, flat = secagg_server(r, u3, answers, shapes, weights)
                    secure_runs.append(timing)
                    if len(secure_runs) == 1:  # the round is correct, or nothing here counts
                        error = float(np.abs(flat - sums[p][1]).max())
                        if not error < len(u3) / r.scale:
                            sys.exit(f"n={n}, dropout {p}: unmasked sum is off by {error}")
                    del flat
            sec, plain = median_of(secure_runs), median_of(plain_runs)
            rows.append([
                f"{n:,}", f"{len(dropped)} ({p:.0%})", f"{r.degree} / {r.threshold}",
                "{} / {} ms".format(*map(ms, quantiles(per_device))),
                "{} / {} ms".format(*map(ms, quantiles(seal_s))),
                kib(sent), kib(received), kib(plain_bytes),
                f"{sent / (4 * args.values):.3f}x / {sent / plain_bytes:.3f}x",
                f"{server_in / 2**20:,.1f} / {plain_bytes * len(u3) / 2**20:,.1f} MiB",
                f"{secs(sec['total'])} s (keys {secs(sec['keys'])} + sum {secs(sec['sum'])} + "
                f"unmask {secs(sec['unmask'])} + apply {secs(sec['apply'])})",
                f"{secs(plain['total'])} s (open {secs(plain['open'])} + "
                f"FedAvg {secs(plain['fedavg'])})",
                f"{sec['total'] / plain['total']:.2f}x / {sec['cpu'] / plain['cpu']:.2f}x"])
            if p == args.dropout[0]:
                u = u3[0]
                stage_notes.append(
                    f"n={n:,}: " + ", ".join(
                        f"{stage} {ms(float(np.median([r.seconds[v][stage] for v in u3])))}"
                        for stage in ("advertise", "share_keys", "masked_input"))
                    + f", unmask {ms(float(np.median(list(unmask_s.values()))))}")
                byte_notes.append(
                    f"n={n:,}: sent advert {r.sent[u]['advert']:,} + shares "
                    f"{r.sent[u]['shares']:,} + masked frame {r.sent[u]['masked']:,} + unmask "
                    f"{len(answers[u]):,}; received roster {r.received[u]['roster']:,} + inbox "
                    f"{r.received[u]['inbox']:,} + unmask request {request:,}")
        del r, sums
        del sealed
        gc.collect()

    reference = None if args.no_reference else reference_bytes(BONAWITZ["users"],
                                                                 BONAWITZ["values"])
    elapsed = clock() - begun
    load_end = os.getloadavg()[0]

    print(f"SecAgg+ ({secagg.SCHEME}) vs plain sealed upload (sealed-x25519-v1): "
          f"{args.values:,} values per update ({args.values * 4 / 2**20:.2f} MiB float32, "
          f"two tensors), clip {args.clip}; one process, one thread; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, numpy {np.__version__}, cryptography "
          f"{cryptography.__version__}")
    print(f"command: {sys.executable} {' '.join(sys.argv)}  (total {elapsed:,.0f} s; "
          f"1-min load average {load_start:.1f} at start, {load_end:.1f} at end)")
    print("every device runs every stage and is timed (none sampled); device time = advertise "
          "+ share_keys + masked_input (flatten, quantize, all PRG masks, PRT1 frame) + unmask, "
          "with JSON parse/encode of each message, over the surviving devices; plain = "
          "seal_update. Bytes are exact message bodies (no HTTP headers). Server SecAgg+ = "
          "keys (verify adverts, graph, parse reveals) + sum (PRT1 decode + ring add) + "
          "unmask_sum + apply (dequantize, FedAvg.aggregate_sum); server plain = open_update + "
          f"validate_update + FedAvg.aggregate; server times are perf_counter wall, medians of "
          f"{args.repeats} runs alternating the two schemes; ratio = SecAgg+ / plain, by wall "
          "time and by time.process_time (this process's CPU time only: less sensitive to "
          "other load on the machine).\n")
    header = ["devices", "dropped", "k / t", "device time SecAgg+ (median / p95)",
              "device time plain (median / p95)", "device sent SecAgg+",
              "device received SecAgg+", "device sent plain",
              "expansion (SecAgg+ sent / float32 input, / sealed)",
              "server bytes in (SecAgg+ / plain)", "server SecAgg+", "server plain",
              "server ratio (wall / process CPU)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\ndevice stages, median ms (dropout "
          f"{args.dropout[0]:.0%}): " + "; ".join(stage_notes))
    print("bytes per device: " + "; ".join(byte_notes))
    print("targets (issue): server SecAgg+ <= 2x plain; device time <= 1 s at 1000 devices.")
    b = BONAWITZ
    print(f"\nBonawitz et al. 2017 (complete graph, {b['users']:,} users, {b['values']:,} "
          f"{b['input_bits']}-bit values): {b['expansion']}x the raw input size.")
    if reference is not None:
        m = b["values"]
        keyed = reference["advert"] + reference["shares"] + reference["unmask"]
        total = keyed + reference["masked"]
        frame_header = reference["masked"] - 4 * m
        print(f"ours at the same point (n={b['users']:,}, k={reference['degree']}, "
              f"t={reference['threshold']}, {m:,} values, no dropouts, counted on a real "
              f"device): sent {total:,} B = masked frame {reference['masked']:,} (32-bit ring: "
              f"{4 * m:,} + {frame_header} header) + advert {reference['advert']:,} + shares "
              f"{reference['shares']:,} + unmask {reference['unmask']:,}; received "
              f"{reference['roster'] + reference['inbox'] + reference['request']:,} B.")
        print(f"expansion = 32 / input_bits + 8 (advert + k shares + unmask + header) / "
              f"(input_bits x values): {total / (2 * m):.3f}x for 16-bit inputs "
              f"(Bonawitz's basis), {total / (4 * m):.3f}x for our float32 inputs.")


if __name__ == "__main__":
    main()
