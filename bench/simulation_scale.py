"""How many virtual devices one round can hold on this machine, and what it costs.

For each population size N: a synthetic shop with N devices (plus a 5% public slice that
pretrains a small dual encoder), then ``--rounds`` rounds in which EVERY device takes part
(clients per round = N), through the real simulator: the real device SDK in ``--workers``
worker processes, the real sync server subprocess over HTTP, SecAgg+ (its default degree for
N), 5% of devices dropping at a random stage. Prints one row per N: the round's wall time and
its phases, per-device medians, bytes per device, and peak memory of the workers, the
server and this coordinator (Linux peak RSS).

    python bench/simulation_scale.py --devices 100 1000 10000
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.cli import _quiet  # noqa: E402
from trainer.data.dataset import DataSpec  # noqa: E402
from trainer.simulation.devices import peak_rss_mb  # noqa: E402
from trainer.simulation.experiment import (  # noqa: E402
    ModelSpec,
    export_base,
    simulate_one,
    train_central,
)
from trainer.simulation.population import build_population  # noqa: E402
from trainer.simulation.run import SimulationConfig  # noqa: E402

PUBLIC = 0.05


def measure(n: int, rounds: int, workers: int, dropout: float, root: Path) -> dict:
    users = int(round(n / (1 - PUBLIC))) + 1
    spec = DataSpec(synthetic_users=users, synthetic_items=300, seed=0)
    model = ModelSpec(options={"dim": 16, "hidden": 32, "max_len": 20}, epochs=2)
    started = time.perf_counter()
    population = build_population(spec, 20, rounds=rounds, public_fraction=PUBLIC,
                                  warmup=0.5, seed=0)
    ckpt, _ = train_central(population, "pretrain", model, progress=False)
    bundle = export_base(ckpt, population, root / "base")
    setup = time.perf_counter() - started
    devices = len(population.devices)
    config = SimulationConfig(rounds=rounds, clients_per_round=devices, dropout=dropout,
                              workers=workers, label=f"n{devices}")
    resources: dict = {}
    records, _ = simulate_one(population, bundle, root / "sim", config, progress=True,
                              resources=resources)
    done = [r for r in records if r.round > 0]
    last = done[-1]
    return {
        "devices": devices, "rounds": len(done), "setup_s": setup,
        "states": "/".join(r.state for r in done),
        "completed": last.completed, "sampled": last.sampled,
        "round_s": [r.wall_s for r in done],
        "phases": last.phases,
        "device_s": last.device_seconds_median,
        "up": last.bytes_up_per_device, "down": last.bytes_down_per_device,
        "workers_mb": resources.get("worker_max_rss_mb"),
        "server_mb": resources.get("server_max_rss_mb"),
        "coordinator_mb": peak_rss_mb(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.05)
    args = parser.parse_args()
    _quiet()
    rows = []
    for n in args.devices:
        # Kept when the run fails: the server log (DIR/sim/server.log) tells what happened.
        tmp = Path(tempfile.mkdtemp(prefix=f"scale-{n}-"))
        rows.append(measure(n, args.rounds, args.workers, args.dropout, tmp))
        shutil.rmtree(tmp)
        print(rows[-1], flush=True)
    print()
    print(f"{args.workers} worker processes, SecAgg+, {args.dropout:.0%} device dropout, "
          "dual encoder dim 16 over 300 items (10,032 values per update)")
    print("| devices per round | in the sum | round wall time | begin (replay, sync, "
          "recommend, train, advertise) | share keys | masked input | unmasking | aggregate "
          "+ publish | per device (begin, median) | bytes up / down per device | peak RSS: "
          "each worker / server / coordinator |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p = r["phases"]
        workers = ", ".join(f"{m:.0f}" for m in r["workers_mb"] or [])
        wall = " / ".join(f"{s:.0f} s" for s in r["round_s"])
        print(f"| {r['sampled']:,} | {r['completed']:,} | {wall} | {p.get('begin', 0):.0f} s "
              f"| {p.get('share_keys', 0):.0f} s | {p.get('masked_input', 0):.0f} s | "
              f"{p.get('unmasking', 0):.0f} s | {p.get('aggregate', 0):.0f} s | "
              f"{(r['device_s'] or 0) * 1000:.0f} ms | {r['up'] / 1024:,.0f} / "
              f"{r['down'] / 1024:,.0f} KiB | {workers} / {r['server_mb'] or 0:.0f} / "
              f"{r['coordinator_mb']:.0f} MiB |")
    print(f"(round wall times listed per round; median over rounds "
          f"{statistics.median(rows[-1]['round_s']):.0f} s at the largest N)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
