"""A trained model on disk: ``checkpoint.json`` (architecture, config, run metadata),
``weights.npz`` (float tensors by torch state_dict name), ``items.json`` (vocabulary)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import model_zoo
from device_sdk.bundle import ITEMS, WEIGHTS, load_weights, save_weights
from device_sdk.item_vocab import ItemVocab

META = "checkpoint.json"


@dataclass
class Checkpoint:
    architecture: str
    config: dict[str, Any]
    params: dict[str, np.ndarray]
    vocab: ItemVocab
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> model_zoo.Architecture:
        return model_zoo.get(self.architecture)

    def model_config(self) -> Any:
        return self.arch.config_from_dict(self.config)

    def torch_module(self) -> Any:
        import torch

        module = self.arch.torch_module(self.model_config())
        module.load_state_dict({k: torch.from_numpy(v) for k, v in self.params.items()})
        return module.eval()

    def numpy_model(self) -> Any:
        return self.arch.numpy_model(self.model_config(), self.params)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / WEIGHTS).write_bytes(save_weights(self.params))
        (directory / ITEMS).write_bytes(self.vocab.to_json())
        meta = {"architecture": self.architecture, "config": self.config, "meta": self.meta}
        (directory / META).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Checkpoint:
        directory = Path(directory)
        if not (directory / META).is_file():
            raise FileNotFoundError(f"no checkpoint at {directory} (missing {META}); run "
                                    "`pocketrec train` first")
        meta = json.loads((directory / META).read_text())
        return cls(
            architecture=meta["architecture"],
            config=meta["config"],
            params=load_weights((directory / WEIGHTS).read_bytes()),
            vocab=ItemVocab.from_json((directory / ITEMS).read_bytes()),
            meta=meta.get("meta", {}),
        )
