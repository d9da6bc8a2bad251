"""A tiny registry of architectures by name, so callers never branch on the model type."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_REGISTRY: dict[str, Architecture] = {}


@dataclass(frozen=True)
class Architecture:
    """One architecture's three faces.

    ``config_cls`` is a dataclass with ``to_dict``/``from_dict``; ``numpy_cls(config, params)``
    is the device-side twin; ``torch_path`` ("module:Class") names the torch module, imported
    only when asked for so that device code never loads torch. ``serving_constants(config,
    params)`` lists every array the exported LiteRT graph may store (``model_zoo.tensor_map``),
    so a publisher can write new weights into a base file; None means "always re-export".
    """

    name: str
    config_cls: type
    numpy_cls: type
    torch_path: str
    serving_constants: Callable[[Any, Mapping[str, Any]], dict] | None = None

    def config(self, **overrides: Any) -> Any:
        return self.config_cls(**overrides)

    def config_from_dict(self, data: dict[str, Any]) -> Any:
        return self.config_cls.from_dict(data)

    def numpy_model(self, config: Any, params: dict) -> Any:
        return self.numpy_cls(config, params)

    def torch_module(self, config: Any) -> Any:
        module_name, cls_name = self.torch_path.split(":")
        return getattr(importlib.import_module(module_name), cls_name)(config)


def register(arch: Architecture) -> Architecture:
    if arch.name in _REGISTRY:
        raise ValueError(f"architecture {arch.name!r} is already registered")
    _REGISTRY[arch.name] = arch
    return arch


def get(name: str) -> Architecture:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(_REGISTRY)}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)
