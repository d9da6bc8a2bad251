"""The SASRec-style model as a torch module: training (incl. Opacus DP-SGD) and LiteRT export.

Attention is written with plain ``nn.Linear`` projections and matmuls rather than
``nn.MultiheadAttention``: Opacus then sees only Linear, LayerNorm and Embedding layers, all of
which it clips exactly (ghost clipping included), the numpy twin shares the state_dict names
one to one, and litert-torch converts nothing but matmul/softmax. The output table is untied
from the input embedding (Opacus gets per-sample gradients of tied weights wrong)."""

from __future__ import annotations

import math

import torch
from torch import nn

from model_zoo.sasrec.config import SasRecConfig
from model_zoo.sasrec.numpy_twin import LN_EPS, MASK_VALUE
from model_zoo.softmax_head import PAD_LOGIT


class Block(nn.Module):
    """Pre-norm: ``x + o(attention(q, k, v of ln1(x)))``, then ``x + ff2(relu(ff1(ln2(x))))``."""

    def __init__(self, config: SasRecConfig) -> None:
        super().__init__()
        d = config.dim
        self.heads = config.heads
        self.ln1 = nn.LayerNorm(d, eps=LN_EPS)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d, eps=LN_EPS)
        self.ff1 = nn.Linear(d, config.hidden)
        self.ff2 = nn.Linear(config.hidden, d)
        self.drop = nn.Dropout(config.dropout)

    def attention(self, x: torch.Tensor, bias: torch.Tensor, last_only: bool) -> torch.Tensor:
        """x [B, L, d], bias [B, 1, L, L] additive mask -> [B, Lq, d]; Lq = 1 (the last
        query only) when ``last_only``."""
        b, length, d = x.shape
        dh = d // self.heads
        xq = x[:, -1:] if last_only else x
        lq = xq.shape[1]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], self.heads, dh).transpose(1, 2)  # [B, H, ., dh]

        q, k, v = split(self.q(xq)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(dh)) + bias[:, :, -lq:]
        ctx = torch.softmax(scores, dim=-1) @ v
        return self.o(ctx.transpose(1, 2).reshape(b, lq, d))

    def forward(self, x: torch.Tensor, bias: torch.Tensor, last_only: bool = False
                ) -> torch.Tensor:
        """[B, L, d] -> [B, L, d], or [B, 1, d] (the last position) when ``last_only``: what
        serving needs from the final block, at a fraction of the cost."""
        h = self.ln1(x)
        x = (x[:, -1:] if last_only else x) + self.drop(self.attention(h, bias, last_only))
        return x + self.drop(self.ff2(torch.relu(self.ff1(self.ln2(x)))))


class SasRec(nn.Module):
    def __init__(self, config: SasRecConfig) -> None:
        super().__init__()
        self.config = config
        d, n, length = config.dim, config.n_items, config.max_len
        self.item_emb = nn.Embedding(n, d, padding_idx=0)
        self.pos_emb = nn.Embedding(length, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.blocks))
        self.ln_final = nn.LayerNorm(d, eps=LN_EPS)
        self.out = nn.Linear(d, n)
        self.register_buffer("positions", torch.arange(length), persistent=False)
        self.register_buffer("causal", torch.tril(torch.ones(length, length)), persistent=False)
        self.register_buffer("eye", torch.eye(length), persistent=False)
        pad = torch.zeros(n)
        pad[0] = PAD_LOGIT
        self.register_buffer("pad_logit", pad, persistent=False)
        nn.init.normal_(self.item_emb.weight, std=0.1)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        nn.init.normal_(self.pos_emb.weight, std=0.1)
        nn.init.normal_(self.out.weight, std=0.1)
        nn.init.zeros_(self.out.bias)

    def _states(self, history: torch.Tensor, last_only: bool) -> torch.Tensor:
        real = (history > 0).to(torch.float32)  # [B, L]
        allowed = torch.maximum(self.causal * real.unsqueeze(1), self.eye)  # [B, L, L]
        bias = ((allowed - 1.0) * -MASK_VALUE).unsqueeze(1)  # 0 allowed, MASK_VALUE not
        # Positions as a [B, L] lookup, not [L]: Opacus needs the batch dimension first.
        positions = self.positions.expand(history.shape[0], -1).contiguous()
        x = self.drop(self.item_emb(history) + self.pos_emb(positions))
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            x = block(x, bias, last_only=last_only and index == last)
        return self.ln_final(x)

    def sequence_states(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] ids (0 = padding) -> [B, L, d] states after the final layer norm; position
        l only sees positions <= l, and real positions never see padding."""
        return self._states(history, last_only=False)

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, dim]: the state at the last (most recent) position (the final
        block computes that position only)."""
        return self._states(history, last_only=True)[:, -1]

    def sequence_logits(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, n_items]: position l's scores for the item after it. Central
        training uses every position of a sequence at once (one forward, L predictions)."""
        return self.out(self.sequence_states(history)) + self.pad_logit

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, n_items] logits (padding column = PAD_LOGIT)."""
        return self.out(self.user_vectors(history)) + self.pad_logit
