"""What local training hands to the uploader: a clipped float delta and its example count."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ModelUpdate:
    """``delta`` maps parameter names (state_dict names) to float32 arrays of new - base
    weights, already L2-clipped as one vector to ``clip_norm``; ``norm`` is its L2 norm after
    clipping, ``norm_before_clip`` before."""

    base_version: int
    delta: dict[str, np.ndarray]
    num_examples: int
    clip_norm: float
    norm: float
    norm_before_clip: float
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def num_values(self) -> int:
        return int(sum(v.size for v in self.delta.values()))
