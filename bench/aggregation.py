"""Server aggregation cost per round at the Online Retail model's update size, side by side
in one run: open (X25519 + ChaCha20-Poly1305) + decode (PRT1) + validate each sealed update,
then aggregate with DP-FedAvg and with plain FedAvg, for 100 and 1000 updates.

    python bench/aggregation.py                 # shapes of the default Online Retail model
    python bench/aggregation.py --clients 100 1000 --repeats 3

Updates are random deltas clipped to the clip norm; shapes are the dual encoder's at
n_items=3660, dim=64, hidden=128 (488,716 values, 1.86 MiB as float32)."""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from device_sdk.model_update import ModelUpdate
from device_sdk.protocol import open_update, seal_update, validate_update
from model_zoo.dual_encoder import DualEncoderConfig
from sync_server.strategies import ClientUpdate, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-items", type=int, default=3660)
    args = parser.parse_args()

    shapes = DualEncoderConfig(n_items=args.n_items).param_shapes()
    weights = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    values = sum(int(np.prod(s)) for s in shapes.values())
    clip = 1.0
    server_key = X25519PrivateKey.generate()
    transport = server_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    rng = np.random.default_rng(0)

    def sealed(n: int) -> bytes:
        delta = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
        norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in delta.values())))
        delta = {k: (v * (clip / norm)).astype(np.float32) for k, v in delta.items()}
        update = ModelUpdate(1, delta, 10, clip, clip, norm)
        return seal_update(update, round_id="r1", device_id=f"{n:032x}",
                           transport_public_key=transport)

    print(f"update: {values:,} float32 values ({values * 4 / 2**20:.2f} MiB); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"medians of {args.repeats}\n")
    print("| updates | open + decode + validate, per update | DP-FedAvg aggregate | "
          "FedAvg aggregate | round total (DP) |")
    print("|---:|---:|---:|---:|---:|")
    for clients in args.clients:
        payloads = [sealed(n) for n in range(clients)]
        open_s, dp_s, plain_s = [], [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            updates = []
            for n, payload in enumerate(payloads):
                tensors, meta = open_update(payload, round_id="r1", device_id=f"{n:032x}",
                                            transport_private_key=server_key)
                validate_update(tensors, shapes, clip)
                updates.append(ClientUpdate(tensors, int(meta["num_examples"])))
            open_s.append((time.perf_counter() - started) / clients)
            dp = build({"strategy": "fedavg", "noise_multiplier": 1.0, "clip_norm": clip,
                        "expected_clients": clients})
            started = time.perf_counter()
            dp.aggregate(weights, updates)
            dp_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            build({"strategy": "fedavg"}).aggregate(weights, updates)
            plain_s.append(time.perf_counter() - started)
            del updates
        o, d, p = (float(np.median(x)) for x in (open_s, dp_s, plain_s))
        print(f"| {clients:,} | {o * 1e3:.1f} ms | {d:.2f} s | {p:.2f} s | "
              f"{o * clients + d:.2f} s |")


if __name__ == "__main__":
    main()
