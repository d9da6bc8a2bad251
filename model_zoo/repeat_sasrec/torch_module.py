"""The repeat-aware SASRec as a torch module: SASRec's logits (the explore score) plus a
repeat score over the history's own items, computed in the graph from the history input.

For item i and a history h (most recent last) the repeat score is

    sum over positions l holding i of age_weight[age(l)]     (learned recency, signed)
  + gate(u) * log(1 + count_i)                                 (frequency, per user)
  + item_bias[i] * [count_i > 0]                               (how repeatable i is)

with ``gate(u) = u . w + b`` read from SASRec's user state u. Items outside the history get
0, so the explore logits rank the new items. Serving scatters the last position's terms onto
item ids; training does the same for every position of a chunk at once (age counted from
that position). The padding id stays at PAD_LOGIT: it is never scattered a real weight.

With a session separator (``config.session_id``), a history whose most recent token is the
separator (a new visit) reads its ages from ``age_session`` instead of ``age``: recency in a
basket being filled and at the start of a visit are opposite signals (the line just added is
rarely the next; last visit's items are often bought again)."""

from __future__ import annotations

import torch
from torch import nn

from model_zoo.repeat_sasrec.config import RepeatSasRecConfig
from model_zoo.sasrec.torch_module import SasRec

ONE_HOT_ROWS = 64


class RepeatHead(nn.Module):
    def __init__(self, config: RepeatSasRecConfig) -> None:
        super().__init__()
        self.age = nn.Parameter(torch.zeros(config.max_len))
        self.gate = nn.Linear(config.dim, 1)
        self.item_bias = nn.Parameter(torch.zeros(config.n_items))
        if config.session_id:
            self.age_session = nn.Parameter(torch.zeros(config.max_len))
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)


class RepeatSasRec(SasRec):
    # Opacus has no per-sample gradient sampler for the repeat head's bare parameters.
    central_dp = False
    # Central training steps the repeat head 10x faster (trainer.train.param_groups).
    lr_multipliers = {"repeat.": 10.0}

    def __init__(self, config: RepeatSasRecConfig) -> None:
        super().__init__(config)
        self.repeat = RepeatHead(config)
        self.session_id = config.session_id
        if self.session_id:  # the separator is never ranked, like padding
            self.pad_logit[self.session_id] = self.pad_logit[0]
        length = config.max_len
        # Training: age[t, l] = t - l of key l seen from query t (l <= t), and which l count.
        t = torch.arange(length)
        self.register_buffer("ages", (t[:, None] - t[None, :]).clamp(min=0), persistent=False)
        # Serving: the age of each position seen from the last one.
        self.register_buffer("last_ages", torch.arange(length - 1, -1, -1), persistent=False)
        self.register_buffer("item_ids", torch.arange(config.n_items, dtype=torch.int32),
                             persistent=False)

    def sequence_logits(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, N]: position t's scores with the repeat score of the history
        up to t. Only history slots carry repeat terms, so they are computed per (t, l) slot
        and scattered once: slot l holding item i adds ``age[t - l]`` and its share
        ``(gate * log(1 + c) + item_bias_i) / c`` of the per-item terms, c = the count of i
        in positions <= t, so the c slots of item i add up to the per-item terms."""
        states = self.sequence_states(history)
        logits = self.out(states) + self.pad_logit  # [B, L, N]
        b, length = history.shape
        real = (history > 0).to(states.dtype)
        seen = self.causal.unsqueeze(0) * real.unsqueeze(1)  # [B, t, l]: l <= t, real
        same = (history.unsqueeze(2) == history.unsqueeze(1)).to(states.dtype)  # [B, l', l]
        count = (seen @ same) * seen  # [B, t, l]: occurrences of h_l in positions <= t
        share = (self.repeat.gate(states) * torch.log1p(count)  # gate [B, t, 1]
                 + self.repeat.item_bias[history].unsqueeze(1)) / count.clamp(min=1.0)
        age = self.repeat.age[self.ages].unsqueeze(0)  # [1, t, l]
        if self.session_id:  # position t opens a session: its own recency weights
            opens = (history == self.session_id).unsqueeze(2)  # [B, t, 1]
            age = torch.where(opens, self.repeat.age_session[self.ages].unsqueeze(0), age)
        slots = (age + share) * seen
        index = history.unsqueeze(1).expand(b, length, length)
        return logits.scatter_add(-1, index, slots)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, n_items] logits. The repeat terms go onto item ids through a
        one-hot comparison with every id (LiteRT's scatter takes no accumulating update),
        built ``ONE_HOT_ROWS`` histories at a time to bound its [rows, L, N] memory."""
        u = self.user_vectors(history)
        logits = self.out(u) + self.pad_logit  # [B, N]
        real = (history > 0).to(u.dtype)
        weight = self.repeat.age[self.last_ages]  # [L]
        if self.session_id:
            opens = (history[:, -1:] == self.session_id).to(u.dtype)  # [B, 1]
            weight = (weight * (1.0 - opens)
                      + self.repeat.age_session[self.last_ages] * opens)  # [B, L]
        weight = weight * real  # [B, L]
        parts = []
        for start in range(0, history.shape[0], ONE_HOT_ROWS):
            rows = slice(start, start + ONE_HOT_ROWS)
            one_hot = (self.item_ids.unsqueeze(-1) == history[rows].unsqueeze(1)
                       ).to(u.dtype)  # [b, N, L]
            stacked = torch.stack([weight[rows], real[rows]], dim=2)  # [b, L, 2]
            parts.append(one_hot @ stacked)  # [b, N, 2]: age-weighted sum, count
        rec_count = torch.cat(parts) if len(parts) > 1 else parts[0]
        rec, count = rec_count[:, :, 0], rec_count[:, :, 1]
        return (logits + rec + self.repeat.gate(u) * torch.log1p(count)
                + self.repeat.item_bias * (count > 0).to(u.dtype))
