"""Full vs fast simulation, side by side in one run on the same configuration.

For each data set: build the fleet, pretrain the simulator's default dual encoder on the
public slice (not timed), then run the same rounds in ``full`` mode (the real device SDK
in worker processes, the real sync server over HTTP, SecAgg+ masks, a LiteRT export per
round) and in ``fast`` mode (trainer.simulation.fast). Prints per mode: seconds per round
(from the end of round 0's evaluation to the end of the last round, evaluation included),
device updates per second (inputs in the published sums), and the cost of one update
(worker CPU seconds: workers x seconds / updates) next to ``LocalTrainer.train`` alone on
the same devices, in this process. Peak RSS of the coordinator and workers.

    python bench/simulation_speed.py  # on an otherwise idle machine
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.cli import _quiet  # noqa: E402
from trainer.data.dataset import DataSpec  # noqa: E402
from trainer.simulation.experiment import (  # noqa: E402
    ModelSpec,
    export_base,
    simulate_one,
    train_central,
)
from trainer.simulation.population import build_population  # noqa: E402
from trainer.simulation.run import SimulationConfig  # noqa: E402

ONLINE_RETAIL = REPO.parent / "shared" / "data" / "online_retail.csv.gz"


def local_trainer_ms(population, bundle_dir: Path, config: SimulationConfig, n: int) -> float:
    """Median milliseconds of LocalTrainer.train alone (examples built from the stream, the
    numpy twin, clipping) on the first ``n`` devices eligible at round 1."""
    from device_sdk.bundle import load_bundle
    from device_sdk.event_log import Event
    from device_sdk.local_trainer import LocalTrainer, LocalTrainingConfig
    from device_sdk.recommender import HistoryPolicy

    bundle = load_bundle(bundle_dir)
    trainer = LocalTrainer(bundle, HistoryPolicy(exclude_kinds=("dismiss",)))
    federated = bundle.manifest.get("architecture", {}).get("federated")
    task = LocalTrainingConfig(
        local_epochs=config.local_epochs, learning_rate=config.learning_rate,
        batch_size=config.batch_size, clip_norm=config.clip_norm,
        max_examples=config.max_examples, trainable=tuple(federated) if federated else None)
    now = int(population.clock[0])
    times = []
    for user in sorted(population.devices):
        stream = population.devices[user]
        upto = int(np.searchsorted(stream.times, now))
        if upto < 2:
            continue
        events = [Event(i, float(stream.times[i]), stream.kinds[i], stream.items[i], None)
                  for i in range(upto)]
        t0 = time.perf_counter()
        trainer.train(events, task, base_version=1, seed=len(times))
        times.append(time.perf_counter() - t0)
        if len(times) == n:
            break
    return 1000 * float(np.median(times))


def measure(name: str, spec: DataSpec, dim: int, clients: int, rounds: dict[str, int],
            workers: int, root: Path) -> list[dict]:
    model = ModelSpec(options={"dim": dim, "hidden": 2 * dim, "max_len": 50}, epochs=3)
    longest = max(rounds.values())
    population = build_population(spec, 50, rounds=longest, public_fraction=0.05,
                                  warmup=0.5, seed=0)
    ckpt, _ = train_central(population, "pretrain", model, progress=False)
    bundle = export_base(ckpt, population, root / name / "base")
    # The CLI's defaults for simulate.
    base = SimulationConfig(rounds=longest, clients_per_round=clients, dropout=0.05,
                            clip_norm=0.3, strategy="fedavgm", server_lr=0.5, momentum=0.5,
                            learning_rate=0.3, workers=workers, seed=0, label=name)
    trainer_ms = local_trainer_ms(population, bundle, base, 50)
    rows = []
    for mode, n in rounds.items():
        stamps: list[float] = []
        resources: dict = {}
        config = replace(base, mode=mode, rounds=n, export_every=0)
        records, _ = simulate_one(population, bundle, root / name / mode, config,
                                  progress=False, resources=resources,
                                  on_round=lambda r, s=stamps: s.append(time.perf_counter()))
        done = [r for r in records if r.round > 0]
        seconds = (stamps[-1] - stamps[0]) / len(done)
        updates = sum(r.completed for r in done)
        rows.append({
            "data": name, "devices/round": clients, "mode": mode, "rounds": len(done),
            "s/round": seconds, "updates/s": updates / (seconds * len(done)),
            "ms/update": 1000 * workers * seconds * len(done) / max(updates, 1),
            "LocalTrainer ms": trainer_ms,
            "final HR@10": done[-1].hr10,
            "workers RSS MiB": max(resources.get("worker_max_rss_mb") or [0]),
            "server RSS MiB": resources.get("server_max_rss_mb"),
        })
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    _quiet()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-rounds", type=int, default=2)
    parser.add_argument("--fast-rounds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--online-retail", default=str(ONLINE_RETAIL))
    args = parser.parse_args()
    rounds = {"full": args.full_rounds, "fast": args.fast_rounds}
    with tempfile.TemporaryDirectory() as tmp:
        # The demo's model on the embedded shop, simulate's on Online Retail.
        rows = measure("embedded shop", DataSpec(), 32, 32, rounds, args.workers, Path(tmp))
        rows += measure("Online Retail", DataSpec(path=args.online_retail), 64, 100, rounds,
                        args.workers, Path(tmp))
    print()
    print("| data | devices/round | mode | rounds | s/round | device updates/s | "
          "worker ms/update | LocalTrainer ms | speed-up | workers peak RSS MiB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        full = next(r for r in rows if r["data"] == row["data"] and r["mode"] == "full")
        print(f"| {row['data']} | {row['devices/round']} | {row['mode']} | {row['rounds']} | "
              f"{row['s/round']:.2f} | {row['updates/s']:.1f} | {row['ms/update']:.1f} | "
              f"{row['LocalTrainer ms']:.1f} | {full['s/round'] / row['s/round']:.0f}x | "
              f"{row['workers RSS MiB']:.0f} |")


if __name__ == "__main__":
    main()
