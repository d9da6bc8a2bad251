"""From the canonical table to model inputs: k-core filtering, per-user id sequences,
the chronological leave-last-out split, fixed-length history windows, per-user partitions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from device_sdk.item_vocab import ItemVocab
from device_sdk.local_trainer import next_item_windows as windows


def kcore(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """Repeatedly drop users and items with fewer than ``k`` events until none remain."""
    if k <= 1:
        return df
    while True:
        users = df["user"].map(df["user"].value_counts())
        items = df["item"].map(df["item"].value_counts())
        keep = (users >= k) & (items >= k)
        if keep.all():
            return df.reset_index(drop=True)
        df = df[keep]


def user_sequences(df: pd.DataFrame, vocab: ItemVocab) -> dict[str, np.ndarray]:
    """Chronological int32 id sequence per user.

    Consecutive repeats of one item collapse into one step: a view -> cart -> purchase funnel,
    or two lines of one invoice for the same product, is one interest, not three next items.
    Items outside the vocabulary are dropped."""
    ids = vocab.ids(df["item"])
    keep = ids > 0
    users = df["user"].to_numpy()[keep]
    ids = ids[keep]
    change_user = np.r_[True, users[1:] != users[:-1]]
    repeat = ~change_user & np.r_[False, ids[1:] == ids[:-1]]
    users, ids, change_user = users[~repeat], ids[~repeat], change_user[~repeat]
    starts = np.flatnonzero(change_user)
    bounds = np.r_[starts, len(ids)]
    return {users[s]: ids[s:e] for s, e in zip(bounds[:-1], bounds[1:], strict=True)}


def last_window(seq: np.ndarray, max_len: int) -> np.ndarray:
    """The history of the whole sequence: its last max_len ids, left-padded -> [max_len]."""
    out = np.zeros(max_len, dtype=np.int32)
    tail = seq[-max_len:]
    if len(tail):
        out[-len(tail):] = tail
    return out


@dataclass
class EvalSet:
    """One held-out event per user: ``history`` [U, L] and ``target`` [U]."""

    users: list[str]
    history: np.ndarray
    target: np.ndarray

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, n: int, seed: int = 0) -> EvalSet:
        if n >= len(self):
            return self
        rows = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return EvalSet([self.users[i] for i in rows], self.history[rows], self.target[rows])


@dataclass
class LeaveLastOut:
    """Per user: last event -> test, second-to-last -> validation, the rest -> training.
    Users with fewer than 3 steps only contribute training data."""

    train: dict[str, np.ndarray]
    valid: EvalSet
    test: EvalSet

    def train_examples(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Every next-item example in the training prefixes -> (history [E, L], target [E])."""
        seqs = [s for s in self.train.values() if len(s) >= 2]
        history = np.concatenate([windows(s, max_len) for s in seqs])
        target = np.concatenate([s[1:] for s in seqs]).astype(np.int32)
        return history, target

    def train_item_counts(self, n_items: int) -> np.ndarray:
        counts = np.zeros(n_items, dtype=np.int64)
        for s in self.train.values():
            np.add.at(counts, s, 1)
        counts[0] = 0
        return counts


def leave_last_out(sequences: dict[str, np.ndarray], max_len: int) -> LeaveLastOut:
    train = {u: (s if len(s) < 3 else s[:-2]) for u, s in sequences.items()}
    held = {u: s for u, s in sequences.items() if len(s) >= 3}
    users = list(held)

    def eval_set(cut: int) -> EvalSet:
        history = np.zeros((len(users), max_len), dtype=np.int32)
        for row, user in enumerate(users):
            history[row] = last_window(held[user][:cut], max_len)
        target = np.array([held[u][cut] for u in users], dtype=np.int32)
        return EvalSet(users, history, target)

    return LeaveLastOut(train=train, valid=eval_set(-2), test=eval_set(-1))


def partition_by_user(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each user's events in time order: one virtual device each, for federated use."""
    return {user: part.reset_index(drop=True) for user, part in df.groupby("user", sort=True)}
