from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from model_zoo.sasrec.config import SasRecConfig


@dataclass(frozen=True)
class RepeatSasRecConfig(SasRecConfig):
    """SASRec's shapes plus the repeat head's: one learned weight per history age
    (``max_len``), a gate on the user state (``dim`` + 1) and one repeat bias per item
    (``n_items``). Devices federate the repeat head with SASRec's federated tensors.

    ``session_id`` > 0: the history carries that id as a session separator
    (``device_sdk.sessions``; steps more than ``session_gap`` seconds apart), the model never
    ranks it, and a second age vector (``repeat.age_session``) weighs the history when the
    most recent token is a separator: a new visit, where people buy again, rather than a
    basket being filled."""

    session_id: int = 0
    session_gap: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.session_id:
            if not 0 < self.session_id < self.n_items:
                raise ValueError(f"session_id must be in 1..{self.n_items - 1}, "
                                 f"got {self.session_id}")
            if self.session_gap <= 0:
                raise ValueError(f"session_gap must be > 0 seconds with a session_id, got "
                                 f"{self.session_gap}")
            if self.top_k > self.n_items - 2:
                object.__setattr__(self, "top_k", self.n_items - 2)
        elif self.session_gap:
            raise ValueError("session_gap needs a session_id")

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
        if self.session_id:
            shapes["repeat.age_session"] = (self.max_len,)
        return shapes

    def federated_params(self) -> tuple[str, ...]:
        return (*super().federated_params(),
                *(n for n in self.param_shapes() if n.startswith("repeat.")))
