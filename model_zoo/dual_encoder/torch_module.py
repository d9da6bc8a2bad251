"""The dual encoder as a torch module: training (incl. Opacus DP-SGD) and LiteRT export.

nn.Embedding + masked mean rather than EmbeddingBag, and an untied output table, because
Opacus computes wrong per-sample gradients for EmbeddingBag repeats and tied weights."""

from __future__ import annotations

import torch
from torch import nn

from model_zoo.dual_encoder.config import DualEncoderConfig
from model_zoo.dual_encoder.numpy_twin import PAD_LOGIT, recency_weights


class DualEncoder(nn.Module):
    def __init__(self, config: DualEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.n_items, config.dim, padding_idx=0)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, config.hidden), nn.ReLU(), nn.Linear(config.hidden, config.dim)
        )
        self.out = nn.Linear(config.dim, config.n_items)
        self.register_buffer(
            "recency", torch.from_numpy(recency_weights(config)), persistent=False
        )
        pad = torch.zeros(config.n_items)
        pad[0] = PAD_LOGIT
        self.register_buffer("pad_logit", pad, persistent=False)
        nn.init.normal_(self.item_emb.weight, std=0.1)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        nn.init.normal_(self.out.weight, std=0.1)
        nn.init.zeros_(self.out.bias)

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] ids (0 = padding) -> [B, dim]."""
        w = (history > 0).to(torch.float32) * self.recency
        total = w.sum(dim=1, keepdim=True)
        attn = w / (total + (total == 0).to(torch.float32))
        u0 = (attn.unsqueeze(-1) * self.item_emb(history)).sum(dim=1)
        return u0 + self.mlp(u0)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, n_items] logits (padding column = PAD_LOGIT)."""
        return self.out(self.user_vectors(history)) + self.pad_logit

