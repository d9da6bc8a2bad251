"""How much of central training's lead over the public start comes from the held-out users'
own data: central training once on every customer and once without half of the held-out
devices (A, drawn at random), each evaluated on A and on the other half (B), beside the
model pretrained on the public slice (the federated runs' round 0).

If the lead were the users' own histories (memorised transitions), the model that never saw
A would fall back towards the start on A; user-level DP then could not recover it by design.
If it holds on A, the lead is what the other customers teach about everyone: a population
pattern a user-level DP model may learn.

    python bench/central_unseen.py [--data ../shared/data/online_retail.csv.gz] [--seed 0]

The fleet and the model are `pocketrec demo --data`'s (the Online Retail recipe: dim 32,
hidden 64, 20 epochs, the 5% public slice of the seed); float torch models, full ranking,
each held-out device's last basket (basket HR@10) and its last line (line HR@10). About 10
minutes on two cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def subset(rows: Any, keep: set[str]) -> Any:
    """An EvalSet / BasketSet (or None) cut to the users in ``keep``, rows in order."""
    if rows is None:
        return None
    idx = [i for i, u in enumerate(rows.users) if u in keep]
    out = {}
    for f in fields(rows):
        value = getattr(rows, f.name)
        if isinstance(value, np.ndarray):
            out[f.name] = value[np.asarray(idx, dtype=np.int64)]
        elif isinstance(value, list):
            out[f.name] = [value[i] for i in idx]
        else:
            out[f.name] = value
    return type(rows)(**out)


def without(split: Any, drop: set[str]) -> Any:
    """A LeaveLastOut with every trace of the users in ``drop`` removed (and nothing else)."""

    def others(rows: Any) -> Any:
        return None if rows is None else subset(rows, set(rows.users) - drop)

    times = split.train_times
    return replace(
        split, train={u: s for u, s in split.train.items() if u not in drop},
        train_times=None if times is None else {u: t for u, t in times.items()
                                                if u not in drop},
        valid=others(split.valid), test=others(split.test), basket=others(split.basket),
        basket_valid=others(split.basket_valid))


def evaluate(ckpt: Any, population: Any, halves: dict[str, set[str]]) -> dict[str, float]:
    """``central_metrics`` on each half's held-out events (basket HR@10 NaN without
    baskets)."""
    from trainer.simulation.experiment import central_metrics

    out = {}
    for name, users in halves.items():
        m = central_metrics(ckpt, replace(population, test=subset(population.test, users),
                                          basket=subset(population.basket, users)))
        out[f"{name} line"] = m["hr@10"]
        out[f"{name} basket"] = m.get("basket_hr@10", float("nan"))
    return out


def measure(population: Any, spec: Any, a: set[str]) -> list[tuple[str, dict, Any, float]]:
    """Train the three models of the table (``spec`` on ``population``; central once with
    the held-out users ``a`` left out entirely) and evaluate each on ``a`` and on the other
    held-out users: [(label, metrics, the trained Checkpoint, seconds)]."""
    from trainer.simulation.experiment import train_central

    halves = {"A": a, "B": set(population.test.users) - a}
    rows = []
    for label, which, pop in (
            ("pretrained on the public slice (round 0)", "pretrain", population),
            ("central, every customer (saw A and B)", "central", population),
            ("central without A (saw B only)", "central",
             replace(population, central=without(population.central, a)))):
        started = time.perf_counter()
        ckpt, _ = train_central(pop, which, spec, progress=False)
        metrics = evaluate(ckpt, population, halves)
        seconds = time.perf_counter() - started
        rows.append((label, metrics, ckpt, seconds))
        print(f"  {label}: {seconds:.0f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from _retail import ONLINE_RETAIL, demo_fleet

    parser.add_argument("--data", default=str(ONLINE_RETAIL))
    parser.add_argument("--seed", type=int, default=0, help="the demo's seed (public slice)")
    parser.add_argument("--split-seed", type=int, default=0, help="draws half A")
    args = parser.parse_args(argv)
    population, spec = demo_fleet(args.data, args.seed)
    held = sorted(population.test.users)
    rng = np.random.default_rng(args.split_seed)
    a = set(rng.choice(held, size=len(held) // 2, replace=False).tolist())
    print(f"{population.name}: {len(population.central.train)} customers, "
          f"{len(held)} held-out devices: A {len(a)}, B {len(held) - len(a)}; "
          f"{spec.arch} {spec.options}, {spec.epochs} epochs", flush=True)

    rows = measure(population, spec, a)
    print()
    print("| model | line HR@10, A | line HR@10, B | basket HR@10, A | basket HR@10, B "
          "| epochs (best) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, m, ckpt, _ in rows:
        training = ckpt.meta["training"]
        print(f"| {label} | {m['A line']:.4f} | {m['B line']:.4f} | {m['A basket']:.4f} | "
              f"{m['B basket']:.4f} | {training['epochs_run']} ({training['best_epoch']}) |")
    start, full, minus = (r[1] for r in rows)
    for protocol in ("line", "basket"):
        gap = full[f"A {protocol}"] - start[f"A {protocol}"]
        own = full[f"A {protocol}"] - minus[f"A {protocol}"]
        share = own / gap if gap > 0 else float("nan")
        print(f"{protocol} HR@10 on A: central's lead over the start {gap:+.4f}; of it, "
              f"A's own data {own:+.4f} ({share:.0%}), the other customers' "
              f"{minus[f'A {protocol}'] - start[f'A {protocol}']:+.4f}")


if __name__ == "__main__":
    main()
