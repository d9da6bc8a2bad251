"""Non-learned baselines every evaluation table carries: popularity and item-KNN."""

from __future__ import annotations

import numpy as np


def popularity_topk(popular: list[int], users: int, k: int) -> np.ndarray:
    """The same popularity list for every user -> [users, k] int32."""
    return np.tile(np.asarray(popular[:k], dtype=np.int32), (users, 1))


class ItemKNN:
    """Item-to-item co-occurrence: two items are similar when the same users bought them
    (cosine over the binary user x item matrix of the training sequences). A history scores
    item j by the sum of its distinct items' similarity to j; an item's similarity to itself
    is 1, so re-purchases compete like any neighbour (repeats are real targets in retail)."""

    def __init__(self, train: dict[str, np.ndarray], n_items: int) -> None:
        users = [np.unique(seq) for seq in train.values() if len(seq)]
        x = np.zeros((len(users), n_items), dtype=np.float32)
        for row, items in enumerate(users):
            x[row, items] = 1.0
        x[:, 0] = 0.0
        co = x.T @ x  # [N, N] co-occurrence counts
        norm = np.sqrt(np.diag(co)).astype(np.float32)
        norm[norm == 0] = 1.0
        self.similarity = co / norm[:, None] / norm[None, :]
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
            part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
            out[start : start + len(rows)] = np.take_along_axis(part, order, axis=1)
        return out
