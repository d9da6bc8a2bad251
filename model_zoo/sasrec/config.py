from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class SasRecConfig:
    """Shapes of the SASRec-style sequential model.

    n_items counts the padding id 0, so real item ids are 1..n_items-1. History is
    ``max_len`` ids, left-padded with 0, most recent last. ``blocks`` pre-norm causal
    self-attention blocks of width ``dim`` (``heads`` heads) with a ReLU feed-forward of width
    ``hidden``; ``dropout`` applies in central training only. ``federated_blocks``: how many
    of the last blocks devices train (with the output table and the final layer norm).
    """

    n_items: int
    dim: int = 64
    hidden: int = 128
    blocks: int = 2
    heads: int = 1
    max_len: int = 50
    dropout: float = 0.2
    top_k: int = 50
    federated_blocks: int = 1

    def __post_init__(self) -> None:
        if self.n_items < 2:
            raise ValueError(f"n_items must be >= 2 (padding + one item), got {self.n_items}")
        for name in ("dim", "hidden", "blocks", "heads", "max_len", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.federated_blocks <= self.blocks:
            raise ValueError(f"federated_blocks must be in [0, {self.blocks}], "
                             f"got {self.federated_blocks}")
        if self.top_k > self.n_items - 1:
            object.__setattr__(self, "top_k", self.n_items - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SasRecConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sasrec config key(s) {unknown}")
        return cls(**data)

    @staticmethod
    def block_shapes(prefix: str, d: int, h: int) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for ln in ("ln1", "ln2"):
            shapes[f"{prefix}.{ln}.weight"] = (d,)
            shapes[f"{prefix}.{ln}.bias"] = (d,)
        for proj in ("q", "k", "v", "o"):
            shapes[f"{prefix}.{proj}.weight"] = (d, d)
            shapes[f"{prefix}.{proj}.bias"] = (d,)
        shapes[f"{prefix}.ff1.weight"] = (h, d)
        shapes[f"{prefix}.ff1.bias"] = (h,)
        shapes[f"{prefix}.ff2.weight"] = (d, h)
        shapes[f"{prefix}.ff2.bias"] = (d,)
        return shapes

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Trainable tensors by name (torch state_dict names), with their shapes."""
        n, d = self.n_items, self.dim
        shapes: dict[str, tuple[int, ...]] = {
            "item_emb.weight": (n, d),
            "pos_emb.weight": (self.max_len, d),
        }
        for b in range(self.blocks):
            shapes.update(self.block_shapes(f"blocks.{b}", d, self.hidden))
        shapes.update({"ln_final.weight": (d,), "ln_final.bias": (d,),
                       "out.weight": (n, d), "out.bias": (n,)})
        return shapes

    def federated_params(self) -> tuple[str, ...]:
        """The parameters federated rounds update by default: the output table, the final
        layer norm and the last ``federated_blocks`` blocks (see docs/ARCHITECTURE.md)."""
        first = self.blocks - self.federated_blocks
        return tuple(
            name for name in self.param_shapes()
            if name.startswith(("out.", "ln_final."))
            or (name.startswith("blocks.") and int(name.split(".")[1]) >= first)
        )
