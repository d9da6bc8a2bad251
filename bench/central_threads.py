"""Central training's figure against torch's thread count: the demo's central reference
(`pocketrec demo --data`'s fleet and model, the same seed and data) trained in a fresh
process per thread count, each with OMP_NUM_THREADS / MKL_NUM_THREADS set before torch
loads. Floating-point sums in another order take training down another path (early
stopping then picks another epoch), so this is the spread of the central figure, which
issue 18's ratios divide by, from arithmetic alone.

    python bench/central_threads.py [--data ../shared/data/online_retail.csv.gz]
                                    [--threads 1 2] [--seed 0]

Float torch models, full ranking, the held-out devices' last line and last basket; about
5 minutes a run at 2 threads and 8 at 1 on this machine. Run it alone: the timings are
printed, the metrics are what the table is for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(data: str, seed: int) -> dict:
    """Train and score the demo's central model in this process (its threads set by the
    environment); the metrics, the epochs and torch's thread count."""
    import torch
    from _retail import demo_fleet

    from trainer.simulation.experiment import central_metrics, train_central

    population, spec = demo_fleet(data, seed)
    started = time.perf_counter()
    ckpt, _ = train_central(population, "central", spec, progress=False)
    return {**central_metrics(ckpt, population), **ckpt.meta["training"],
            "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from _retail import ONLINE_RETAIL

    parser.add_argument("--data", default=str(ONLINE_RETAIL))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.data, args.seed)))
        return
    if any(t < 1 for t in args.threads):
        parser.error("--threads must be >= 1")
    rows = []
    for threads in args.threads:
        env = {**os.environ, **{k: str(threads) for k in
                                ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
        out = subprocess.run([sys.executable, __file__, "--one", "--data", args.data,
                              "--seed", str(args.seed)], env=env, check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  {threads} thread(s): {rows[-1]['wall_s']:.0f} s", flush=True)
    print()
    print("| torch threads | line HR@10 | line NDCG@10 | basket HR@10 | basket NDCG@10 "
          "| epochs (best) | training s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['threads']} | {r['hr@10']:.4f} | {r['ndcg@10']:.4f} | "
              f"{r.get('basket_hr@10', float('nan')):.4f} | "
              f"{r.get('basket_ndcg@10', float('nan')):.4f} | {r['epochs_run']} "
              f"({r['best_epoch']}) | {r['seconds']:.0f} |")
    line = [r["hr@10"] for r in rows]
    print(f"\nline HR@10 spread over thread counts: {max(line) - min(line):.4f} "
          f"({min(line):.4f}-{max(line):.4f})")


if __name__ == "__main__":
    main()
