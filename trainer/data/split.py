"""From the canonical table to model inputs: k-core filtering, per-user id sequences,
the chronological leave-last-out split, fixed-length history windows, per-user partitions."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from device_sdk.item_vocab import ItemVocab
from device_sdk.local_trainer import next_item_windows as windows
from device_sdk.sessions import session_histories, session_targets, session_tokens


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
    return {u: ids for u, (ids, _) in timed_user_sequences(df, vocab).items()}


def timed_user_sequences(
    df: pd.DataFrame, vocab: ItemVocab
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``user_sequences`` with each step's timestamp (int64 Unix seconds) beside it."""
    ids = vocab.ids(df["item"])
    keep = ids > 0
    users = df["user"].to_numpy()[keep]
    times = df["timestamp"].to_numpy(dtype=np.int64)[keep]
    ids = ids[keep]
    change_user = np.r_[True, users[1:] != users[:-1]]
    repeat = ~change_user & np.r_[False, ids[1:] == ids[:-1]]
    users, ids, times = users[~repeat], ids[~repeat], times[~repeat]
    change_user = change_user[~repeat]
    starts = np.flatnonzero(change_user)
    bounds = np.r_[starts, len(ids)]
    return {users[s]: (ids[s:e], times[s:e])
            for s, e in zip(bounds[:-1], bounds[1:], strict=True)}


def baskets_share(df: pd.DataFrame) -> float:
    """Share of purchase events sharing their (user, timestamp) with another purchase: how
    much of the data comes in multi-item baskets (Online Retail: ~0.99; click logs: ~0)."""
    purchases = df[df["event"] == "purchase"]
    if purchases.empty:
        return 0.0
    size = purchases.groupby(["user", "timestamp"])["item"].transform("size")
    return float((size > 1).mean())


def last_baskets(df: pd.DataFrame, vocab: ItemVocab) -> dict[str, tuple[int, np.ndarray]]:
    """Per user: (timestamp, distinct known item ids) of the last basket: the purchases at
    the user's last purchase timestamp (one invoice in Online Retail)."""
    purchases = df[df["event"] == "purchase"]
    last = purchases.groupby("user")["timestamp"].transform("max")
    rows = purchases[purchases["timestamp"] == last]
    ids = vocab.ids(rows["item"])
    out = {}
    for (user, stamp), group in pd.DataFrame(
        {"user": rows["user"].to_numpy(), "t": rows["timestamp"].to_numpy(), "id": ids}
    ).groupby(["user", "t"], sort=False):
        known = np.unique(group["id"].to_numpy())
        out[user] = (int(stamp), known[known > 0].astype(np.int32))
    return out


def time_windows(seqs: list[np.ndarray], max_len: int) -> np.ndarray:
    """``last_window`` of each step-time sequence -> [len(seqs), max_len] int64 (0 = padding)."""
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    for row, seq in enumerate(seqs):
        out[row] = last_window(seq, max_len, np.int64)
    return out


def last_window(seq: np.ndarray, max_len: int, dtype: type = np.int32) -> np.ndarray:
    """The history of the whole sequence: its last max_len ids, left-padded -> [max_len]."""
    out = np.zeros(max_len, dtype=dtype)
    tail = seq[-max_len:]
    if len(tail):
        out[-len(tail):] = tail
    return out


@dataclass
class EvalSet:
    """One held-out event per user: ``history`` [U, L] and ``target`` [U]; ``times`` [U, L]
    int64 Unix seconds of each history step (0 on padding) and ``at`` [U] the held-out
    event's (the request's) time, when the split kept them."""

    users: list[str]
    history: np.ndarray
    target: np.ndarray
    times: np.ndarray | None = None
    at: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.users)

    def subset(self, n: int, seed: int = 0) -> EvalSet:
        if n >= len(self):
            return self
        rows = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return EvalSet([self.users[i] for i in rows], self.history[rows], self.target[rows],
                       None if self.times is None else self.times[rows],
                       None if self.at is None else self.at[rows])


@dataclass
class BasketSet:
    """The next-basket protocol: per user, ``history`` [U, L] of the steps before the last
    basket and that basket's distinct item ids (``baskets[u]``, int32); ``times`` as in
    ``EvalSet``, ``at`` [U] each basket's time. ``train_len[u]``, when set, is how many
    leading steps of user u's training sequence come before the basket (a validation basket
    cut from the training history); None means all of them do."""

    users: list[str]
    history: np.ndarray
    baskets: list[np.ndarray]
    times: np.ndarray | None = None
    train_len: np.ndarray | None = None
    at: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.users)


def _chunks(steps: int, max_len: int) -> list[tuple[int, int]]:
    """``steps`` input steps cut from their end into chunks of up to ``max_len``:
    (start, end) index pairs, the last chunk first."""
    return [(max(0, end - max_len), end) for end in range(steps, 0, -max_len)]


@dataclass
class LeaveLastOut:
    """Per user: last event -> test, second-to-last -> validation, the rest -> training.
    Users with fewer than 3 steps only contribute training data. ``basket`` is the
    next-basket test set when the split holds out whole last baskets (``basket_holdout``),
    ``basket_valid`` its validation counterpart (the basket before it, cut from the training
    history). ``train_times`` are the training steps' Unix seconds when the split kept them."""

    train: dict[str, np.ndarray]
    valid: EvalSet
    test: EvalSet
    basket: BasketSet | None = None
    holdout: str = "line"
    train_times: dict[str, np.ndarray] | None = None
    basket_valid: BasketSet | None = None

    def train_before(self, baskets: BasketSet
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """The training sequences (and times) with each of ``baskets``' users cut to the
        steps before their basket: what a model predicting those baskets may be fitted on."""
        if baskets.train_len is None:
            return self.train, self.train_times
        cut = dict(zip(baskets.users, baskets.train_len.tolist(), strict=True))
        train = {u: s[: cut.get(u, len(s))] for u, s in self.train.items()}
        if self.train_times is None:
            return train, None
        return train, {u: t[: cut.get(u, len(t))] for u, t in self.train_times.items()}

    def train_examples(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Every next-item example in the training prefixes -> (history [E, L], target [E])."""
        seqs = [s for s in self.train.values() if len(s) >= 2]
        history = np.concatenate([windows(s, max_len) for s in seqs])
        target = np.concatenate([s[1:] for s in seqs]).astype(np.int32)
        return history, target

    def train_sequences(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """The same next-item steps as ``train_examples``, for models that predict at every
        position: each training prefix cut from its end into chunks of up to ``max_len``
        steps -> (inputs [S, L], targets [S, L]), left-padded, 0 = no target. The last
        chunk of a user sits exactly where serving puts the most recent item."""
        inputs, targets = [], []
        for seq in self.train.values():
            for start, end in _chunks(len(seq) - 1, max_len):
                inputs.append(last_window(seq[start:end], max_len))
                targets.append(last_window(seq[start + 1 : end + 1], max_len))
        if not inputs:
            empty = np.zeros((0, max_len), dtype=np.int32)
            return empty, empty.copy()
        return np.stack(inputs), np.stack(targets)

    def train_session_sequences(self, max_len: int, separator: int, gap: float
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``train_sequences`` over the training prefixes with session separators
        (``device_sdk.sessions``) -> (inputs [S, L], targets [S, L], anchors [S, L]): no
        target where the next token is a separator; ``anchors[s, l]`` is the chunk position
        of the separator that opened the session of target (s, l), -1 when that separator is
        outside the chunk or the target is none: the basket objective scores the whole next
        session from the separator that opens it."""
        if self.train_times is None:
            raise ValueError("session separators need the training steps' times")
        inputs, targets, anchors = [], [], []
        for user, seq in self.train.items():
            tokens = session_tokens(seq, self.train_times[user], separator, gap)
            nxt = session_targets(tokens, separator)
            opened = np.where(tokens == separator, np.arange(len(tokens)), -1)
            opened = np.maximum.accumulate(opened) if len(opened) else opened
            for start, end in _chunks(len(tokens) - 1, max_len):
                inputs.append(last_window(tokens[start:end], max_len))
                targets.append(last_window(nxt[start:end], max_len))
                pad = max_len - (end - start)  # chunk position = token index - start + pad
                anchor = opened[start:end] - start + pad
                anchor[(opened[start:end] < start) | (nxt[start:end] == 0)] = -1
                anchors.append(last_window(anchor + 1, max_len).astype(np.int64) - 1)
        if not inputs:
            empty = np.zeros((0, max_len), dtype=np.int32)
            return empty, empty.copy(), empty.astype(np.int64) - 1
        return np.stack(inputs), np.stack(targets), np.stack(anchors)

    def train_item_counts(self, n_items: int) -> np.ndarray:
        counts = np.zeros(n_items, dtype=np.int64)
        for s in self.train.values():
            np.add.at(counts, s, 1)
        counts[0] = 0
        return counts


def leave_last_out(sequences: dict[str, np.ndarray], max_len: int,
                   times: dict[str, np.ndarray] | None = None) -> LeaveLastOut:
    """``times``: each sequence's step times, kept beside the histories when given."""
    train = {u: (s if len(s) < 3 else s[:-2]) for u, s in sequences.items()}
    held = {u: s for u, s in sequences.items() if len(s) >= 3}
    users = list(held)

    def eval_set(cut: int) -> EvalSet:
        history = np.zeros((len(users), max_len), dtype=np.int32)
        for row, user in enumerate(users):
            history[row] = last_window(held[user][:cut], max_len)
        target = np.array([held[u][cut] for u in users], dtype=np.int32)
        stamps = None if times is None else time_windows(
            [times[u][:cut] for u in users], max_len)
        at = None if times is None else np.array([times[u][cut] for u in users], np.int64)
        return EvalSet(users, history, target, stamps, at)

    train_times = None if times is None else {
        u: t[: len(train[u])] for u, t in times.items()}
    return LeaveLastOut(train=train, valid=eval_set(-2), test=eval_set(-1),
                        train_times=train_times)


def basket_holdout(
    sequences: dict[str, tuple[np.ndarray, np.ndarray]],
    baskets: dict[str, tuple[int, np.ndarray]],
    max_len: int,
) -> LeaveLastOut:
    """Hold out each user's whole last basket, so that both protocols test on data no
    training step saw. For a user with an earlier basket and >= 2 steps before the last one:

    - line test: the last step, history = every step before it (the basket's earlier lines
      included: on the device they are in the log);
    - next-basket test: the last basket's items, history = the steps before that basket;
    - validation: the last step before the basket, history = the steps before it;
    - next-basket validation (``basket_valid``): the steps at the validation step's timestamp
      (the basket before the last one), history = the steps before them, for users with at
      least one such step; whoever is fitted for it sees only those earlier steps;
    - training: the steps before the validation step.

    Other users only train (all their steps)."""
    train: dict[str, np.ndarray] = {}
    train_times: dict[str, np.ndarray] = {}
    held: list[tuple[str, np.ndarray, np.ndarray, int, np.ndarray]] = []
    for user, (ids, times) in sequences.items():
        stamp, items = baskets.get(user, (None, None))
        cut = int(np.searchsorted(times, stamp)) if stamp is not None else 0
        if cut < 2 or cut == len(ids) or not len(items):
            train[user], train_times[user] = ids, times
            continue
        train[user], train_times[user] = ids[: cut - 1], times[: cut - 1]
        held.append((user, ids, times, cut, items))
    users = [h[0] for h in held]

    def eval_set(rows: list[tuple[np.ndarray, np.ndarray, int]]) -> EvalSet:
        history = np.zeros((len(rows), max_len), dtype=np.int32)
        for row, (ids, _, cut) in enumerate(rows):
            history[row] = last_window(ids[:cut], max_len)
        return EvalSet(users, history, np.array([ids[cut] for ids, _, cut in rows], np.int32),
                       time_windows([times[:cut] for _, times, cut in rows], max_len),
                       np.array([times[cut] for _, times, cut in rows], np.int64))

    def basket_set(rows: list[tuple[str, np.ndarray, np.ndarray, int, np.ndarray]],
                   train_len: np.ndarray | None) -> BasketSet:
        history = np.zeros((len(rows), max_len), dtype=np.int32)
        for row, (_, ids, _, cut, _) in enumerate(rows):
            history[row] = last_window(ids[:cut], max_len)
        return BasketSet([r[0] for r in rows], history, [r[4] for r in rows],
                         time_windows([times[:cut] for _, _, times, cut, _ in rows], max_len),
                         train_len, np.array([t[cut] for _, _, t, cut, _ in rows], np.int64))

    valid = eval_set([(ids, times, cut - 1) for _, ids, times, cut, _ in held])
    test = eval_set([(ids, times, len(ids) - 1) for _, ids, times, _, _ in held])
    basket = basket_set(held, None)
    earlier = []
    for user, ids, times, cut, _ in held:
        start = int(np.searchsorted(times, times[cut - 1]))  # first step of the basket before
        if start >= 1:
            earlier.append((user, ids, times, start, np.unique(ids[start:cut]).astype(np.int32)))
    basket_valid = basket_set(earlier, np.array([e[3] for e in earlier], dtype=np.int64))
    return LeaveLastOut(train=train, valid=valid, test=test, basket=basket, holdout="basket",
                        train_times=train_times, basket_valid=basket_valid)


def partition_by_user(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each user's events in time order: one virtual device each, for federated use."""
    return {user: part.reset_index(drop=True) for user, part in df.groupby("user", sort=True)}


def with_sessions(rows, separator: int, gap: float):
    """An ``EvalSet`` or ``BasketSet`` as a session-aware model sees it: the same rows with
    separators in each history (``device_sdk.sessions.session_histories``), closing with one
    when the request comes more than ``gap`` seconds after the last step."""
    if rows.times is None or rows.at is None:
        raise ValueError("session separators need the history's times and the request times")
    return replace(rows, history=session_histories(rows.history, rows.times, rows.at,
                                                   separator, gap))
