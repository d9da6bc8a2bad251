from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class DualEncoderConfig:
    """Shapes of the dual encoder.

    n_items counts the padding id 0, so real item ids are 1..n_items-1. History is
    ``max_len`` ids, left-padded with 0, most recent last. Position l (0-based) gets weight
    ``recency_decay ** (max_len - 1 - l)`` in the pooled mean; 1.0 means a plain mean.
    """

    n_items: int
    dim: int = 64
    hidden: int = 128
    max_len: int = 50
    recency_decay: float = 1.0
    top_k: int = 50

    def __post_init__(self) -> None:
        if self.n_items < 2:
            raise ValueError(f"n_items must be >= 2 (padding + one item), got {self.n_items}")
        if not 0.0 < self.recency_decay <= 1.0:
            raise ValueError(f"recency_decay must be in (0, 1], got {self.recency_decay}")
        for name in ("dim", "hidden", "max_len", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.n_items - 1:
            object.__setattr__(self, "top_k", self.n_items - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DualEncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown dual_encoder config key(s) {unknown}")
        return cls(**data)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Trainable tensors by name (torch state_dict names), with their shapes."""
        n, d, h = self.n_items, self.dim, self.hidden
        return {
            "item_emb.weight": (n, d),
            "mlp.0.weight": (h, d),
            "mlp.0.bias": (h,),
            "mlp.2.weight": (d, h),
            "mlp.2.bias": (d,),
            "out.weight": (n, d),
            "out.bias": (n,),
        }

    def federated_params(self) -> tuple[str, ...]:
        """The parameters federated rounds update by default: all of them."""
        return tuple(self.param_shapes())
