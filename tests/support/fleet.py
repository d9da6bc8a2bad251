"""The small synthetic fleet the simulator tests share (full and fast mode): its data, its
model and its pretrained, exported starting bundle."""

from __future__ import annotations

from pathlib import Path

from trainer.data.dataset import DataSpec
from trainer.simulation.experiment import ModelSpec, build_fleet, export_base, train_central
from trainer.simulation.population import Population, build_population

SPEC = DataSpec(synthetic_users=240, synthetic_items=120, seed=3)
MODEL = ModelSpec(options={"dim": 16, "hidden": 32, "max_len": 20}, epochs=2)
ROUNDS = 3
# The default family with session separators, as pocketrec simulate --model repeat_sasrec.
SESSION_MODEL = ModelSpec("repeat_sasrec", {"dim": 16, "hidden": 32, "max_len": 20,
                                            "blocks": 1, "session_gap": 1800}, epochs=2)


def fleet_population(seed: int = 3) -> Population:
    return build_population(SPEC, 20, rounds=ROUNDS, public_fraction=0.15, seed=seed)


def pretrained_fleet(directory: Path) -> tuple[Population, Path]:
    """The population and its pretrained start exported into ``directory``."""
    population = fleet_population()
    ckpt, _ = train_central(population, "pretrain", MODEL, progress=False)
    return population, export_base(ckpt, population, directory)


def pretrained_session_fleet(directory: Path) -> tuple[Population, Path]:
    """``pretrained_fleet`` for the session-aware repeat_sasrec: the population as that model
    sees it and its exported start."""
    population, model = build_fleet(SPEC, SESSION_MODEL, rounds=ROUNDS, public_fraction=0.15,
                                    warmup=0.5)
    ckpt, _ = train_central(population, "pretrain", model, progress=False)
    return population, export_base(ckpt, population, directory)
