"""Int8 vs float LiteRT vs numpy brute force on one trained model, side by side in one run:
file size, HR@10 on held-out users, single-request top-K latency (one thread).

    python bench/export_latency.py                  # trains + exports on Online Retail first
    python bench/export_latency.py --run runs/retail  # reuse a run made by pocketrec

Prints a markdown table (medians and p99 over interleaved requests)."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
from _retail import ensure_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/bench-retail")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    run = Path(args.run)
    ensure_run(run, args.epochs)

    from device_sdk.bundle import load_bundle
    from device_sdk.topk_model import TopKModel
    from trainer.cli import _load_run
    from trainer.export import FLOAT_MODEL
    from trainer.metrics import ranking_metrics

    ckpt, prepared = _load_run(str(run))
    test = prepared.split.test
    n_items = len(ckpt.vocab)
    bundle = load_bundle(run / "bundle")
    int8 = bundle.model(num_threads=1)
    flt = TopKModel((run / FLOAT_MODEL).read_bytes(), num_threads=1)
    twin = ckpt.numpy_model()
    k = ckpt.model_config().top_k

    def numpy_topk(history: np.ndarray) -> np.ndarray:
        return twin.topk(history[None, :], k)[0][0]

    runners = {
        "litert int8": lambda h: int8.topk(h)[0],
        "litert float": lambda h: flt.topk(h)[0],
        "numpy brute force": numpy_topk,
    }
    sizes = {"litert int8": int8.size_bytes, "litert float": flt.size_bytes,
             "numpy brute force": sum(v.nbytes for v in ckpt.params.values())}
    quality = {}
    for name, fn in runners.items():
        ids = np.stack([fn(h) for h in test.history])
        quality[name] = ranking_metrics(ids, test.target, n_items, 10)["hr@10"]

    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(test), size=args.requests)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for row in rows:  # interleaved, so drift in machine load hits every runner alike
        history = test.history[row]
        for name, fn in runners.items():
            started = time.perf_counter_ns()
            fn(history)
            times[name].append((time.perf_counter_ns() - started) / 1e3)

    print(f"model: {ckpt.architecture} {ckpt.config}  data: {prepared.spec.name}, "
          f"{len(test):,} test users; {args.requests} single requests, 1 thread, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| runtime | size (bytes) | size vs float | HR@10 | HR@10 vs float "
          "| median µs | p99 µs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base_size, base_hr = sizes["litert float"], quality["litert float"]
    for name in runners:
        t = np.asarray(times[name])
        print(f"| {name} | {sizes[name]:,} | {sizes[name] / base_size:.2f} | "
              f"{quality[name]:.4f} | {quality[name] / base_hr:.3f} | "
              f"{np.median(t):.1f} | {np.percentile(t, 99):.1f} |")


if __name__ == "__main__":
    main()
