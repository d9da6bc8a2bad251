"""Int8 vs float LiteRT vs numpy brute force, for one or more trained runs side by side in one
run: file size, HR@10 on held-out users, single-request top-K latency (one thread).

    python bench/export_latency.py                  # trains + exports on Online Retail first
    python bench/export_latency.py --run runs/retail  # reuse a run made by pocketrec
    python bench/export_latency.py --run runs/sasrec --run runs/bench-retail  # compare models

Prints a markdown table (medians and p99 over interleaved requests: every runtime of every
run answers the same history in turn, so drift in machine load hits them alike)."""

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
    parser.add_argument("--run", action="append", help="run directory (repeatable; default "
                        "runs/bench-retail)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    runs = [Path(r) for r in (args.run or ["runs/bench-retail"])]
    for run in runs:
        ensure_run(run, args.epochs)

    from device_sdk.bundle import load_bundle
    from device_sdk.topk_model import TopKModel
    from trainer.cli import _load_run
    from trainer.export import FLOAT_MODEL
    from trainer.metrics import ranking_metrics
    from trainer.train import model_rows

    runners, sizes, quality, float_of, labels = {}, {}, {}, {}, []
    tests = []
    for run in runs:
        ckpt, prepared = _load_run(str(run))
        test = model_rows(prepared.split.test, ckpt.model_config())  # its own view
        tests.append(test)
        n_items = len(ckpt.vocab)
        arch = ckpt.architecture
        if any(name.startswith(f"{arch}: ") for name in runners):  # two runs of one family
            arch = f"{arch} ({run.name})"
        int8 = load_bundle(run / "bundle").model(num_threads=1)
        flt = TopKModel((run / FLOAT_MODEL).read_bytes(), num_threads=1)
        twin = ckpt.numpy_model()
        k = ckpt.model_config().top_k

        def numpy_topk(history: np.ndarray, twin=twin, k=k) -> np.ndarray:
            return twin.topk(history[None, :], k)[0][0]

        mine = {
            f"{arch}: litert int8": lambda h, m=int8: m.topk(h)[0],
            f"{arch}: litert float": lambda h, m=flt: m.topk(h)[0],
            f"{arch}: numpy brute force": numpy_topk,
        }
        runners.update(mine)
        sizes.update({f"{arch}: litert int8": int8.size_bytes,
                      f"{arch}: litert float": flt.size_bytes,
                      f"{arch}: numpy brute force": sum(v.nbytes for v in ckpt.params.values())})
        for name, fn in mine.items():
            ids = np.stack([fn(h) for h in test.history])
            quality[name] = ranking_metrics(ids, test.target, n_items, 10)["hr@10"]
            float_of[name] = f"{arch}: litert float"
        labels.append(f"{arch} {ckpt.config}  data: {prepared.spec.name}, {len(test):,} test "
                      f"users ({prepared.split.holdout} holdout)")

    rng = np.random.default_rng(0)
    rows = rng.integers(0, min(len(t) for t in tests), size=args.requests)
    times: dict[str, list[float]] = {name: [] for name in runners}
    test_of = {name: tests[i // 3] for i, name in enumerate(runners)}
    for row in rows:  # interleaved, so drift in machine load hits every runner alike
        for name, fn in runners.items():
            history = test_of[name].history[row]
            started = time.perf_counter_ns()
            fn(history)
            times[name].append((time.perf_counter_ns() - started) / 1e3)

    for label in labels:
        print(f"model: {label}")
    print(f"{args.requests} single requests, 1 thread, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| runtime | size (bytes) | size vs float | HR@10 | HR@10 vs float "
          "| median µs | p99 µs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in runners:
        t = np.asarray(times[name])
        base = float_of[name]
        print(f"| {name} | {sizes[name]:,} | {sizes[name] / sizes[base]:.2f} | "
              f"{quality[name]:.4f} | {quality[name] / quality[base]:.3f} | "
              f"{np.median(t):.1f} | {np.percentile(t, 99):.1f} |")
    if len(runs) > 1:
        first = np.median(times[next(iter(runners))])
        for name in list(runners)[3::3]:
            print(f"\nmedian int8 latency, {next(iter(runners))} / {name}: "
                  f"{first / np.median(times[name]):.2f}x")


if __name__ == "__main__":
    main()
