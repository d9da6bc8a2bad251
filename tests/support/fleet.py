"""The small synthetic fleet the simulator tests share (full and fast mode): its data, its
model and its pretrained, exported starting bundle."""

from __future__ import annotations

from pathlib import Path

from trainer.data.dataset import DataSpec
from trainer.simulation.experiment import ModelSpec, export_base, train_central
from trainer.simulation.population import Population, build_population

SPEC = DataSpec(synthetic_users=240, synthetic_items=120, seed=3)
MODEL = ModelSpec(options={"dim": 16, "hidden": 32, "max_len": 20}, epochs=2)
ROUNDS = 3


def fleet_population(seed: int = 3) -> Population:
    return build_population(SPEC, 20, rounds=ROUNDS, public_fraction=0.15, seed=seed)


def pretrained_fleet(directory: Path) -> tuple[Population, Path]:
    """The population and its pretrained start exported into ``directory``."""
    population = fleet_population()
    ckpt, _ = train_central(population, "pretrain", MODEL, progress=False)
    return population, export_base(ckpt, population, directory)
