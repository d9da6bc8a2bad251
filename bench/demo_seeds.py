"""`pocketrec demo` over several seeds: each run's round-0, final and central HR@10, then the
mean and spread over seeds, so a difference between runs can be set against the noise.

    python bench/demo_seeds.py                       # seeds 0 1 2, the embedded shop
    python bench/demo_seeds.py --seeds 0 0 1 2       # seed 0 twice: the same numbers?
    python bench/demo_seeds.py -- --data ../shared/data/online_retail.csv.gz --recipe shop

(With --data and no --recipe, demo runs the Online Retail recipe: about 45 minutes a seed
in fast mode.)

Runs the real command (`python -m trainer.cli demo --seed S --run DIR/seed-S-K`, anything
after ``--`` passed on), one at a time, and reads each report's rounds.json. The simulator's
server seeds its selection coins and DP noise from the seed; the devices' SecAgg+ stochastic
rounding is drawn fresh, so the last digits of the federated rounds could move between two
runs of one seed (docs/ARCHITECTURE.md, Training)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("round 0", "federated", "federated+DP", "central", "epsilon")


def run(seed: int, run_dir: Path, extra: list[str]) -> dict[str, float]:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "trainer.cli", "demo", "--seed", str(seed),
                    "--run", str(run_dir), "--no-progress", *extra], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    data = json.loads((run_dir / "report" / "rounds.json").read_text())
    rows = {row["run"]: row for row in data["summary"]}
    return {"round 0": rows["federated"]["start_hr10"],
            "federated": rows["federated"]["final_hr10"],
            "federated+DP": rows["federated+DP"]["final_hr10"],
            "central": data["central"]["hr@10"],
            "epsilon": rows["federated+DP"]["epsilon"],
            **basket_columns(data),
            "seconds": time.perf_counter() - started}


BASKET = ("basket round 0", "basket federated", "basket federated+DP", "basket central")


def basket_columns(data: dict) -> dict[str, float]:
    """Basket HR@10 of the same models, for data with a next-basket holdout (else none)."""
    runs, central = data["runs"], data["central"]
    if runs["federated"][0].get("basket_hr10") is None:
        return {}
    return {"basket round 0": runs["federated"][0]["basket_hr10"],
            "basket federated": runs["federated"][-1]["basket_hr10"],
            "basket federated+DP": runs["federated+DP"][-1]["basket_hr10"],
            "basket central": central["basket_hr@10"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dir", help="where the runs go (default: a temporary directory)")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    root = Path(args.dir or tempfile.mkdtemp(prefix="demo-seeds-"))
    results = []
    for k, seed in enumerate(args.seeds):
        results.append((seed, run(seed, root / f"seed-{seed}-{k}", extra)))
        print(f"seed {seed}: " + ", ".join(f"{c} {results[-1][1][c]:.4f}" for c in COLUMNS)
              + f" ({results[-1][1]['seconds']:.0f} s)", flush=True)
    columns = COLUMNS + (BASKET if all(BASKET[0] in r for _, r in results) else ())
    print()
    print("| seed | HR@10 round 0 | federated, final | federated + DP, final | central | "
          "epsilon |" + ("".join(f" {c} |" for c in BASKET) if columns != COLUMNS else ""))
    print("|---|" + "---:|" * len(columns))
    for seed, r in results:
        print(f"| {seed} | " + " | ".join(f"{r[c]:.4f}" if c != "epsilon" else f"{r[c]:.2f}"
                                          for c in columns) + " |")
    distinct = {seed: r for seed, r in results}  # a repeated seed counts once (its last run)
    if len(distinct) > 1:
        cells = []
        for c in columns:
            values = [r[c] for r in distinct.values()]
            digits = 2 if c == "epsilon" else 4
            cells.append(f"{statistics.mean(values):.{digits}f} ± "
                         f"{statistics.stdev(values):.{digits}f}")
        print(f"| mean ± sd over {len(distinct)} seeds | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
