"""Which data a run uses, and everything derived from it: vocabulary, sequences, split.

A run records its ``DataSpec`` so that export and evaluate rebuild exactly the same split."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from device_sdk.item_vocab import ItemVocab
from trainer.data import loaders, synthetic
from trainer.data.split import LeaveLastOut, kcore, leave_last_out, user_sequences

POPULAR_LIST_SIZE = 200


@dataclass
class DataSpec:
    """``path`` None means the embedded synthetic shop (``synthetic_*`` settings)."""

    path: str | None = None
    format: str = "auto"
    kcore: int = 0
    synthetic_users: int = 2000
    synthetic_items: int = 1000
    seed: int = 0

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


def prepare(spec: DataSpec, max_len: int, vocab: ItemVocab | None = None) -> Prepared:
    """Load, build (or reuse) the vocabulary, split leave-last-out, and rank the popularity
    fallback by training-portion counts (never by held-out events)."""
    df = spec.load()
    if vocab is None:
        vocab = ItemVocab.from_items(df["item"])
    split = leave_last_out(user_sequences(df, vocab), max_len)
    counts = split.train_item_counts(len(vocab))
    vocab.popular = [int(i) for i in np.argsort(-counts, kind="stable")[:POPULAR_LIST_SIZE]
                     if counts[i] > 0]
    stats = {
        "events": int(len(df)),
        "users": int(df["user"].nunique()),
        "items": len(vocab) - 1,
        "event_kinds": {k: int(v) for k, v in df["event"].value_counts().items()},
        "eval_users": len(split.test),
    }
    return Prepared(spec, vocab, split, stats)
