"""Shared by the benchmarks: a trained + exported Online Retail run, made once and reused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ONLINE_RETAIL = REPO.parent / "shared" / "data" / "online_retail.csv.gz"
sys.path.insert(0, str(REPO))  # the project's packages, from a checkout without an install


def ensure_run(
    run: Path, epochs: int, signing_key: Path | None = None,
    train_args: tuple[str, ...] = ("--holdout", "line"),
) -> None:
    """Train (``pocketrec train``) and export (``pocketrec export``) into ``run`` unless the
    checkpoint / bundle are already there. The default dual-encoder run holds out lines, as
    the README's device and server tables were measured."""
    cli = [sys.executable, "-m", "trainer.cli"]
    if not (run / "checkpoint").is_dir():
        subprocess.run([*cli, "train", "--model", "dual_encoder", "--data", str(ONLINE_RETAIL),
                        "--run", str(run),
                        "--epochs", str(epochs), "--no-progress", *train_args], check=True)
    if not (run / "bundle").is_dir():
        key = ["--signing-key", str(signing_key)] if signing_key else []
        subprocess.run([*cli, "export", "--run", str(run), *key], check=True)


def demo_fleet(data: str | Path = ONLINE_RETAIL, seed: int = 0):
    """The fleet and the model `pocketrec demo --data DATA --seed SEED` builds (its recipe's
    pretraining settings included): (Population, ModelSpec), for the central-training
    benchmarks."""
    from trainer.cli import _data_spec, _simulation_model, build_parser, demo_runs
    from trainer.simulation.experiment import build_fleet

    demo = build_parser().parse_args(["demo", "--mode", "fast", "--data", str(data),
                                      "--seed", str(seed)])
    demo_runs(demo)  # the recipe's pretraining settings (epochs) onto the demo's flags
    return build_fleet(_data_spec(demo), _simulation_model(demo), rounds=1,
                       public_fraction=demo.public_fraction, warmup=demo.warmup)
