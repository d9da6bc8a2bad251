"""Which data a run uses, and everything derived from it: vocabulary, sequences, split.

A run records its ``DataSpec`` so that export and evaluate rebuild exactly the same split."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from device_sdk.item_vocab import ItemVocab
from trainer.data import loaders, synthetic
from trainer.data.split import (
    LeaveLastOut,
    basket_holdout,
    baskets_share,
    kcore,
    last_baskets,
    leave_last_out,
    timed_user_sequences,
)

POPULAR_LIST_SIZE = 200
HOLDOUTS = ("auto", "line", "basket")
# "auto" holds out whole last baskets when at least this share of purchases comes in baskets.
BASKET_SHARE = 0.5


@dataclass
class DataSpec:
    """``path`` None means the embedded synthetic shop (``synthetic_*`` settings).

    ``holdout``: "line" holds out each user's last two steps (leave-last-out over lines);
    "basket" holds out each user's whole last basket, which both the line and the
    next-basket protocols can then test on; "auto" picks "basket" for basket data."""

    path: str | None = None
    format: str = "auto"
    kcore: int = 0
    synthetic_users: int = 2000
    synthetic_items: int = 1000
    seed: int = 0
    holdout: str = "auto"

    def __post_init__(self) -> None:
        if self.holdout not in HOLDOUTS:
            raise ValueError(f"holdout must be one of {HOLDOUTS}, got {self.holdout!r}")

    @property
    def name(self) -> str:
        return "synthetic" if self.path is None else Path(self.path).name

    def load(self) -> pd.DataFrame:
        if self.path is None:
            df = synthetic.generate(self.synthetic_users, self.synthetic_items, seed=self.seed)
        else:
            df = loaders.load(self.path, self.format)
        return kcore(df, self.kcore)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prepared:
    spec: DataSpec
    vocab: ItemVocab
    split: LeaveLastOut
    stats: dict = field(default_factory=dict)


def holdout_split(df: pd.DataFrame, vocab: ItemVocab, holdout: str, max_len: int
                  ) -> tuple[LeaveLastOut, dict[str, int]]:
    """The split for ``holdout`` ("auto": basket for basket data), and per held-out user
    the timestamp where its held-out events start (its last basket, or its last step)."""
    sequences = timed_user_sequences(df, vocab)
    if holdout == "auto":
        holdout = "basket" if baskets_share(df) >= BASKET_SHARE else "line"
    if holdout == "basket":
        baskets = last_baskets(df, vocab)
        split = basket_holdout(sequences, baskets, max_len)
        cut = {u: int(baskets[u][0]) for u in split.test.users}
    else:
        split = leave_last_out({u: ids for u, (ids, _) in sequences.items()}, max_len,
                               {u: times for u, (_, times) in sequences.items()})
        cut = {u: int(sequences[u][1][-1]) for u in split.test.users}
    return split, cut


def set_popular(vocab: ItemVocab, split: LeaveLastOut) -> None:
    """The popularity fallback, by training-portion counts (never held-out events)."""
    counts = split.train_item_counts(len(vocab))
    vocab.popular = [int(i) for i in np.argsort(-counts, kind="stable")[:POPULAR_LIST_SIZE]
                     if counts[i] > 0]


def repeat_rate(split: LeaveLastOut) -> float:
    """Share of validation targets already in their user's history: how often people buy
    again (0 on MovieLens, about a third on Online Retail). The exporter picks the devices'
    history policy from it."""
    valid = split.valid
    if not len(valid):
        return 0.0
    return float(np.mean((valid.history == valid.target[:, None]).any(axis=1)))


def prepare(spec: DataSpec, max_len: int, vocab: ItemVocab | None = None) -> Prepared:
    """Load, build (or reuse) the vocabulary, split leave-last-out, and rank the popularity
    fallback by training-portion counts (never by held-out events)."""
    df = spec.load()
    if vocab is None:
        vocab = ItemVocab.from_items(df["item"])
    split, _ = holdout_split(df, vocab, spec.holdout, max_len)
    set_popular(vocab, split)
    stats = {
        "events": int(len(df)),
        "users": int(df["user"].nunique()),
        "items": len(vocab) - 1,
        "event_kinds": {k: int(v) for k, v in df["event"].value_counts().items()},
        "eval_users": len(split.test),
        "holdout": split.holdout,
        "repeat_rate": repeat_rate(split),
    }
    return Prepared(spec, vocab, split, stats)
