"""`pocketrec demo` over several seeds: each run's round-0, final and central HR@10, then the
mean and spread over seeds, so a difference between runs can be set against the noise.

    python bench/demo_seeds.py                       # seeds 0 1 2, the embedded shop
    python bench/demo_seeds.py --seeds 0 0 1 2       # seed 0 twice: the same numbers?
    python bench/demo_seeds.py -- --data ../shared/data/online_retail.csv.gz --recipe shop
    python bench/demo_seeds.py --read runs/a runs/b   # the tables of demo runs made before

(With --data and no --recipe, demo runs the Online Retail recipe: about 45 minutes a seed
in fast mode.)

Runs the real command (`python -m trainer.cli demo --seed S --run DIR/seed-S-K`, anything
after ``--`` passed on), one at a time, and reads each report's rounds.json. The simulator's
server seeds its selection coins and DP noise from the seed; the devices' SecAgg+ stochastic
rounding is drawn fresh, so the last digits of the federated rounds could move between two
runs of one seed (docs/ARCHITECTURE.md, Training).

A second table holds issue 18's ratios per seed: each federated run's final HR@10 over
central training's (the target without DP is 0.90), and the share of the gap from round 0
to central that the DP run closed (the target at epsilon <= 8 is 0.50), on each protocol."""

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
    return {**read(run_dir)[1], "seconds": time.perf_counter() - started}


def read(run_dir: Path) -> tuple[int, dict[str, float]]:
    """A finished demo run's directory -> (its seed, the table's columns)."""
    data = json.loads((run_dir / "report" / "rounds.json").read_text())
    return data["meta"]["config[federated]"]["seed"], columns(data)


def columns(data: dict) -> dict[str, float]:
    rows = {row["run"]: row for row in data["summary"]}
    return {"round 0": rows["federated"]["start_hr10"],
            "federated": rows["federated"]["final_hr10"],
            "federated+DP": rows["federated+DP"]["final_hr10"],
            "central": data["central"]["hr@10"],
            "epsilon": rows["federated+DP"]["epsilon"],
            **basket_columns(data)}


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


RATIOS = ("federated / central", "federated+DP: share of the gap closed")


def ratios(r: dict[str, float]) -> dict[str, float]:
    """Issue 18's two ratios on each protocol the run has (basket ones with a basket
    holdout): federated / central, and (federated+DP - round 0) / (central - round 0)."""
    out = {}
    for prefix in ("", "basket ") if BASKET[0] in r else ("",):
        start, central = r[f"{prefix}round 0"], r[f"{prefix}central"]
        out[f"{prefix}{RATIOS[0]}"] = r[f"{prefix}federated"] / central
        # No gap to close (central at or below round 0): no share to report.
        out[f"{prefix}{RATIOS[1]}"] = ((r[f"{prefix}federated+DP"] - start) / (central - start)
                                       if central > start else float("nan"))
    return out


HEADERS = {"round 0": "HR@10 round 0", "federated": "federated, final",
           "federated+DP": "federated + DP, final"}


def print_table(header: str, columns: tuple[str, ...], results: list[tuple[int, dict]],
                digits: dict[str, int]) -> None:
    print()
    print(f"| {header} |" + "".join(f" {HEADERS.get(c, c)} |" for c in columns))
    print("|---|" + "---:|" * len(columns))
    for seed, r in results:
        print(f"| {seed} | " + " | ".join(f"{r[c]:.{digits.get(c, 4)}f}" for c in columns) + " |")
    distinct = {seed: r for seed, r in results}  # a repeated seed counts once (its last run)
    if len(distinct) > 1:
        cells = []
        for c in columns:
            values = [r[c] for r in distinct.values()]
            cells.append(f"{statistics.mean(values):.{digits.get(c, 4)}f} ± "
                         f"{statistics.stdev(values):.{digits.get(c, 4)}f}")
        print(f"| mean ± sd over {len(distinct)} seeds | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dir", help="where the runs go (default: a temporary directory)")
    parser.add_argument("--read", nargs="+", type=Path, metavar="RUN",
                        help="print the tables of these finished demo runs (each its --run "
                             "directory) instead of running any")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if args.read:
        if extra:
            parser.error(f"--read runs nothing: {' '.join(extra)} would not be used")
        results = [read(path) for path in args.read]
    else:
        root = Path(args.dir or tempfile.mkdtemp(prefix="demo-seeds-"))
        results = []
        for k, seed in enumerate(args.seeds):
            results.append((seed, run(seed, root / f"seed-{seed}-{k}", extra)))
            print(f"seed {seed}: " + ", ".join(f"{c} {results[-1][1][c]:.4f}" for c in COLUMNS)
                  + f" ({results[-1][1]['seconds']:.0f} s)", flush=True)
    columns = COLUMNS + (BASKET if all(BASKET[0] in r for _, r in results) else ())
    print_table("seed", columns, results, {"epsilon": 2})
    shares = [(seed, ratios(r)) for seed, r in results]
    print_table("seed (issue 18: >= 0.90 and >= 0.50)", tuple(shares[0][1]), shares, {})
    return 0


if __name__ == "__main__":
    sys.exit(main())
