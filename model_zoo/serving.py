"""The serving contract every architecture exports (torch side; imported by the exporter only)."""

from __future__ import annotations

import torch
from torch import nn

INPUT_NAME = "history"
OUTPUT_IDS = "ids"
OUTPUT_SCORES = "scores"


class TopKServing(nn.Module):
    """Wraps a logits model: ``history`` int32[1, L] -> ``ids`` int32[1, K], ``scores`` f32[1, K].

    Top-K runs inside the graph so the device never copies a full score vector out."""

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        self.model = model
        self.k = k

    def forward(self, history: torch.Tensor) -> dict[str, torch.Tensor]:
        scores, ids = torch.topk(self.model(history), self.k)
        return {OUTPUT_IDS: ids.to(torch.int32), OUTPUT_SCORES: scores}
