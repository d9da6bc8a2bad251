from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from model_zoo.sasrec.config import SasRecConfig


@dataclass(frozen=True)
class RepeatSasRecConfig(SasRecConfig):
    """SASRec's shapes plus the repeat head's: one learned weight per history age
    (``max_len``), a gate on the user state (``dim`` + 1) and one repeat bias per item
    (``n_items``). Devices federate the repeat head with SASRec's federated tensors."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RepeatSasRecConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown repeat_sasrec config key(s) {unknown}")
        return cls(**data)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = super().param_shapes()
        shapes.update({"repeat.age": (self.max_len,), "repeat.gate.weight": (1, self.dim),
                       "repeat.gate.bias": (1,), "repeat.item_bias": (self.n_items,)})
        return shapes

    def federated_params(self) -> tuple[str, ...]:
        return (*super().federated_params(),
                *(n for n in self.param_shapes() if n.startswith("repeat.")))
