"""Non-learned baselines every evaluation table carries, and their tuning on validation.

Each ranker scores every item for every history row (full ranking, like the models) from the
same [U, L] histories the models see (0 = padding, most recent last). Rankers with settings
declare a small ``grid``; ``tune`` picks the setting with the best validation metric. Ties
between equal scores go to the more popular item (training counts), so an item nobody scored
is never ranked above a popular one at random."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import scipy.sparse as sp

# Weight of the popularity tie-break: below any real score difference the rankers produce.
TIE = 1e-12


class Rows(Protocol):
    """What a ranker reads: an ``EvalSet`` or ``BasketSet``."""

    users: list[str]
    history: np.ndarray
    times: np.ndarray | None


def popularity_topk(popular: list[int], users: int, k: int) -> np.ndarray:
    """The same popularity list for every user -> [users, k] int32."""
    return np.tile(np.asarray(popular[:k], dtype=np.int32), (users, 1))


def topk_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """[B, N] scores -> [B, k] int32 ids of the k highest, best first."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1).astype(np.int32)


def popularity_prior(counts: np.ndarray) -> np.ndarray:
    """[N] training counts -> [N] float64 in (0, 1], higher for more popular (by rank, so
    ties between counts are broken by id); 0 for the padding id."""
    counts = np.asarray(counts)
    n = len(counts)
    prior = np.zeros(n, dtype=np.float64)
    order = np.argsort(-counts, kind="stable")
    prior[order] = 1.0 - np.arange(n) / n
    prior[0] = 0.0
    return prior


def _check_history(history: np.ndarray, n_items: int) -> np.ndarray:
    history = np.asarray(history)
    if history.ndim != 2:
        raise ValueError(f"history must be [U, L] item ids; got shape {history.shape}")
    if len(history) and (history.min() < 0 or history.max() >= n_items):
        raise ValueError(f"history ids must be in [0, {n_items}) (0 = padding); got "
                         f"{history.min()}..{history.max()}")
    return history.astype(np.int64)


def _positive(name: str, value: float, upper: float | None = None) -> None:
    if not value > 0 or (upper is not None and value > upper):
        bound = f"in (0, {upper}]" if upper is not None else "> 0"
        raise ValueError(f"{name} must be {bound}; got {value}")


def _recency_weights(history: np.ndarray, decay: float, window: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[B, L] ids -> (row, item, decay^age) per non-padding step among the last ``window``
    steps (age 0 = the most recent step); a sparse [B, N] matrix sums repeats."""
    b, length = history.shape
    age = np.arange(length - 1, -1, -1, dtype=np.float64)
    weight = np.broadcast_to(decay ** age, history.shape)
    keep = history > 0
    if window is not None:
        keep &= age[None, :] < window
    rows = np.broadcast_to(np.arange(b)[:, None], history.shape)[keep]
    return rows, history[keep], weight[keep]


class Ranker:
    """Base: ``scores`` [B, N] for a slice of rows; ``topk`` batches it and ranks."""

    name = ""
    grid: dict[str, list] = {}

    def __init__(self, counts: np.ndarray) -> None:
        self.n_items = len(counts)
        self.prior = popularity_prior(counts)

    def scores(self, history: np.ndarray, times: np.ndarray | None, users: list[str],
               **params) -> np.ndarray:
        raise NotImplementedError

    def topk(self, rows: Rows, k: int, batch: int = 512, **params) -> np.ndarray:
        """Every item scored for every row -> [U, k] int32 ids, best first."""
        history = _check_history(rows.history, self.n_items)
        if not 0 < k < self.n_items:
            raise ValueError(f"k must be in [1, {self.n_items - 1}]; got {k}")
        out = np.zeros((len(history), k), dtype=np.int32)
        for start in range(0, len(history), batch):
            end = start + batch
            times = None if rows.times is None else rows.times[start:end]
            s = self.scores(history[start:end], times, rows.users[start:end], **params)
            s = s + TIE * self.prior
            s[:, 0] = -np.inf
            out[start:end] = topk_rows(s, k)
        return out


class Popularity(Ranker):
    """Every user gets the most popular training items."""

    name = "popularity"

    def scores(self, history, times, users, **params) -> np.ndarray:
        return np.zeros((len(history), self.n_items))


class PersonalPopularity(Ranker):
    """"Buy it again": the customer's own past items, scored by a recency-decayed count
    (sum of decay^age over the history positions holding the item, age 0 = most recent
    step), above every other item, which follow by popularity."""

    name = "personal popularity"
    grid = {"decay": [1.0, 0.99, 0.98, 0.95, 0.9, 0.8]}

    def scores(self, history, times, users, decay: float = 1.0) -> np.ndarray:
        _positive("decay", decay, 1.0)
        rows, items, weight = _recency_weights(history, decay)
        out = np.zeros((len(history), self.n_items))
        np.add.at(out, (rows, items), weight)
        out[rows, items] += 1.0  # any own item above every item the customer never bought
        return out


def cosine_similarity(train: dict[str, np.ndarray], n_items: int) -> np.ndarray:
    """[N, N] float32 cosine between items over the binary user x item matrix of the
    training sequences (two items are similar when the same users bought them)."""
    seqs = [u[u > 0] for u in (np.unique(s) for s in train.values())]
    rows = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
    cols = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
    x = sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)),
                      shape=(len(seqs), n_items))
    co = (x.T @ x).toarray()
    norm = np.sqrt(np.diag(co)).astype(np.float32)
    norm[norm == 0] = 1.0
    return co / norm[:, None] / norm[None, :]


class ItemKNN:
    """Item-to-item co-occurrence: two items are similar when the same users bought them
    (cosine over the binary user x item matrix of the training sequences). A history scores
    item j by the sum of its distinct items' similarity to j; an item's similarity to itself
    is 1, so re-purchases compete like any neighbour (repeats are real targets in retail)."""

    def __init__(self, train: dict[str, np.ndarray], n_items: int) -> None:
        self.similarity = cosine_similarity(train, n_items)
        self.n_items = n_items

    def topk(self, history: np.ndarray, k: int, batch: int = 256) -> np.ndarray:
        """[U, L] ids (0 = padding) -> [U, k] int32 ids, best first."""
        out = np.zeros((len(history), k), dtype=np.int32)
        for start in range(0, len(history), batch):
            rows = history[start : start + batch]
            bag = np.zeros((len(rows), self.n_items), dtype=np.float32)
            np.put_along_axis(bag, rows.astype(np.int64), 1.0, axis=1)  # distinct items
            bag[:, 0] = 0.0
            scores = bag @ self.similarity
            scores[:, 0] = -np.inf
            out[start : start + len(rows)] = topk_rows(scores, k)
        return out


class RecencyItemKNN(Ranker):
    """Item-KNN over the recent past: item j scores sum over the last ``window`` history
    steps h of decay^age(h) x cos(h, j), where each item keeps only its ``neighbours`` most
    similar items (itself always among them, so repeats keep their signal; None = all)."""

    name = "recency item-knn"
    grid = {"window": [5, 20, 50], "decay": [0.6, 0.8, 1.0], "neighbours": [20, 100, None]}

    def __init__(self, train: dict[str, np.ndarray], counts: np.ndarray) -> None:
        super().__init__(counts)
        self.similarity = cosine_similarity(train, self.n_items)
        self._pruned: dict[int, sp.csr_matrix] = {}

    def neighbours_matrix(self, neighbours: int | None) -> sp.csr_matrix | np.ndarray:
        """The similarity with each row cut to its ``neighbours`` largest entries."""
        if neighbours is None or neighbours >= self.n_items:
            return self.similarity
        if neighbours < 1:
            raise ValueError(f"neighbours must be >= 1 or None (all); got {neighbours}")
        if neighbours not in self._pruned:
            sim = self.similarity
            order = sim.copy()
            np.fill_diagonal(order, np.inf)  # itself first, even when another item ties at 1
            keep = np.argpartition(-order, neighbours - 1, axis=1)[:, :neighbours]
            values = np.take_along_axis(sim, keep, axis=1)
            rows = np.repeat(np.arange(self.n_items), neighbours)
            pruned = sp.csr_matrix((values.ravel(), (rows, keep.ravel())),
                                   shape=sim.shape)
            pruned.eliminate_zeros()
            self._pruned[neighbours] = pruned
        return self._pruned[neighbours]

    def scores(self, history, times, users, window: int = 20, decay: float = 0.6,
               neighbours: int | None = None) -> np.ndarray:
        _positive("decay", decay, 1.0)
        if window < 1:
            raise ValueError(f"window must be >= 1 step; got {window}")
        rows, items, weight = _recency_weights(history, decay, window)
        w = sp.csr_matrix((weight, (rows, items)), shape=(len(history), self.n_items))
        out = w @ self.neighbours_matrix(neighbours)
        return out.toarray() if sp.issparse(out) else np.asarray(out, dtype=np.float64)


def basket_vectors(seqs: list[np.ndarray], times: list[np.ndarray] | None, n_items: int,
                   decay: float) -> sp.csr_matrix:
    """Per sequence, the time-decayed mean of its basket vectors -> [S, N] csr float64.

    A basket is a run of steps with one timestamp (one step each when ``times`` is None);
    its vector is binary over its items. The most recent basket weighs 1, the one before it
    ``decay``, and so on; the weights are normalised to sum 1 (Hu et al. 2020, with one
    decay over baskets and groups of one basket)."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    ids = np.concatenate(seqs).astype(np.int64) if len(seqs) else np.zeros(0, np.int64)
    row = np.repeat(np.arange(len(seqs)), lengths)
    if times is None:
        stamp = np.arange(len(ids), dtype=np.int64)
    else:
        stamp = np.concatenate(times).astype(np.int64) if len(times) else np.zeros(0, np.int64)
    keep = ids > 0
    ids, row, stamp = ids[keep], row[keep], stamp[keep]
    if not len(ids):
        return sp.csr_matrix((len(seqs), n_items))
    new = np.r_[True, (row[1:] != row[:-1]) | (stamp[1:] != stamp[:-1])]
    basket = np.cumsum(new) - 1  # global basket index
    first = np.r_[True, row[1:] != row[:-1]]
    basket_start = np.maximum.accumulate(np.where(first, basket, 0))
    local = basket - basket_start  # 0 = the sequence's first basket
    count = np.zeros(len(seqs), dtype=np.int64)
    np.maximum.at(count, row, local + 1)
    age = count[row] - 1 - local
    # sum of decay^age over the sequence's baskets
    norm = count.astype(np.float64) if decay == 1.0 else (1.0 - decay**count) / (1.0 - decay)
    # one entry per (basket, item): a basket's vector is binary
    _, unique = np.unique(basket * n_items + ids, return_index=True)
    weight = decay ** age[unique] / norm[row[unique]]
    return sp.csr_matrix((weight, (row[unique], ids[unique])), shape=(len(seqs), n_items))


class TIFUKNN(Ranker):
    """TIFU-KNN-style next-basket baseline (Hu et al. 2020): a user's vector is the
    time-decayed mean of their basket vectors (``basket_vectors``); the prediction blends it,
    alpha : 1 - alpha, with the mean vector of its ``neighbours`` nearest training users
    (Euclidean distance between vectors, the user itself excluded)."""

    name = "tifu-knn"
    grid = {"decay": [0.6, 0.8, 0.9, 1.0], "neighbours": [20, 100, 300],
            "alpha": [0.2, 0.5, 0.8, 1.0]}

    def __init__(self, train: dict[str, np.ndarray], train_times: dict[str, np.ndarray] | None,
                 counts: np.ndarray) -> None:
        super().__init__(counts)
        self.pool_users = [u for u, s in train.items() if (np.asarray(s) > 0).any()]
        self._seqs = [np.asarray(train[u]) for u in self.pool_users]
        self._times = None if train_times is None else [train_times[u] for u in self.pool_users]
        self._index = {u: i for i, u in enumerate(self.pool_users)}
        self._pool: dict[float, tuple[sp.csr_matrix, np.ndarray]] = {}

    def pool(self, decay: float) -> tuple[sp.csr_matrix, np.ndarray]:
        """The training users' vectors [M, N] and their squared norms [M]."""
        if decay not in self._pool:
            vectors = basket_vectors(self._seqs, self._times, self.n_items, decay)
            self._pool[decay] = (vectors, np.asarray(vectors.multiply(vectors).sum(axis=1)
                                                     ).ravel())
        return self._pool[decay]

    def user_vectors(self, history: np.ndarray, times: np.ndarray | None,
                     decay: float) -> sp.csr_matrix:
        """[B, L] histories (with step times, or None) -> their vectors [B, N]."""
        seqs = [h[h > 0] for h in history]
        stamps = None if times is None else [t[h > 0] for h, t in zip(history, times,
                                                                       strict=True)]
        return basket_vectors(seqs, stamps, self.n_items, decay)

    def scores(self, history, times, users, decay: float = 0.9, neighbours: int = 100,
               alpha: float = 0.7) -> np.ndarray:
        _positive("decay", decay, 1.0)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
        if neighbours < 1:
            raise ValueError(f"neighbours must be >= 1; got {neighbours}")
        own = self.user_vectors(history, times, decay)
        out = alpha * own.toarray()
        if alpha == 1.0 or not self.pool_users:
            return out
        vectors, sq = self.pool(decay)
        own_sq = np.asarray(own.multiply(own).sum(axis=1)).ravel()
        dist = own_sq[:, None] + sq[None, :] - 2.0 * (own @ vectors.T).toarray()
        for row, user in enumerate(users):
            if user in self._index:
                dist[row, self._index[user]] = np.inf
        k = min(neighbours, len(self.pool_users))
        near = np.argpartition(dist, k - 1, axis=1)[:, :k]
        pick = sp.csr_matrix((np.full(near.size, 1.0 / k), (np.repeat(np.arange(len(near)), k),
                                                             near.ravel())),
                             shape=(len(near), len(self.pool_users)))
        return out + (1.0 - alpha) * (pick @ vectors).toarray()


@dataclass
class Tuning:
    """What ``tune`` tried: every setting of the grid with its validation metric."""

    metric: str
    tried: list[tuple[dict, float]] = field(default_factory=list)

    @property
    def best(self) -> dict:
        """The first setting (grid order) with the highest metric."""
        return max(self.tried, key=lambda t: t[1])[0] if self.tried else {}

    def format(self) -> str:
        best = self.best
        lines = []
        for params, value in self.tried:
            mark = "*" if params == best else " "
            lines.append(f"  {mark} {settings_text(params):<40} {self.metric} {value:.4f}")
        return "\n".join(lines)


def settings_text(params: dict) -> str:
    """{'decay': 0.8, 'neighbours': None} -> 'decay=0.8 neighbours=all'."""
    return " ".join(f"{k}={'all' if v is None else v}" for k, v in params.items()) or "-"


def tune(ranker: Ranker, valid: Rows, metric: Callable[[np.ndarray], float], metric_name: str,
         k: int) -> Tuning:
    """Score every setting of ``ranker.grid`` on ``valid`` (top-k lists into ``metric``)."""
    if not len(valid.users):
        raise ValueError(f"no validation rows to tune {ranker.name} on")
    tuning = Tuning(metric_name)
    names = list(ranker.grid)
    for values in itertools.product(*(ranker.grid[n] for n in names)):
        params = dict(zip(names, values, strict=True))
        tuning.tried.append((params, float(metric(ranker.topk(valid, k, **params)))))
    return tuning
