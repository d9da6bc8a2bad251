"""Full-ranking metrics: next-item prediction with one held-out target per user, and
next-basket prediction with a held-out set of items per user."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ranking_metrics(topk: np.ndarray, target: np.ndarray, n_items: int, k: int = 10) -> dict:
    """``topk`` [U, K>=k] ids best first (every item was scored), ``target`` [U].

    hr@k and ndcg@k at the cut-off k; mrr over the whole K returned (a target ranked below
    K counts 0); coverage = share of the catalogue (n_items - 1 real items) appearing in any
    user's top-k."""
    topk = np.asarray(topk)
    target = np.asarray(target)
    if topk.ndim != 2 or topk.shape[0] != target.shape[0] or topk.shape[1] < k:
        raise ValueError(f"topk must be [U, >={k}] matching target [U]; got {topk.shape}")
    hits = topk == target[:, None]
    found = hits.any(axis=1)
    pos = hits.argmax(axis=1)  # 0 where not found; masked by ``found`` below
    at_k = found & (pos < k)
    return {
        f"hr@{k}": float(at_k.mean()),
        f"ndcg@{k}": float(np.where(at_k, 1.0 / np.log2(pos + 2.0), 0.0).mean()),
        f"mrr@{topk.shape[1]}": float(np.where(found, 1.0 / (pos + 1.0), 0.0).mean()),
        f"coverage@{k}": float(len(np.unique(topk[:, :k])) / (n_items - 1)),
    }


def _in_row_sets(rows: np.ndarray, members: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """[U, k] bool: whether ``rows[u, j]`` is among the ids ``members[i]`` whose
    ``owner[i] == u``; one vectorised membership test over (user, id) keys instead of a
    Python loop over users."""
    rows = np.asarray(rows, dtype=np.int64)
    members = np.asarray(members, dtype=np.int64)
    span = int(max(rows.max(initial=0), members.max(initial=0))) + 1
    keys = np.asarray(owner, dtype=np.int64) * span + members
    return np.isin(np.arange(rows.shape[0], dtype=np.int64)[:, None] * span + rows, keys)


def basket_metrics(topk: np.ndarray, baskets: Sequence[np.ndarray], k: int = 10) -> dict:
    """``topk`` [U, >=k] ids best first, ``baskets[u]`` the distinct item ids of user u's
    held-out basket (non-empty). Per user, averaged:

    - hr@k: 1 if any basket item is in the top k;
    - recall@k: |top-k ∩ basket| / |basket| (a basket larger than k cannot reach 1);
    - ndcg@k: binary-relevance DCG of the top k over the ideal DCG of min(k, |basket|) hits.
    """
    topk = np.asarray(topk)
    if topk.ndim != 2 or topk.shape[0] != len(baskets) or topk.shape[1] < k:
        raise ValueError(f"topk must be [U, >={k}] matching {len(baskets)} baskets; "
                         f"got {topk.shape}")
    sizes = np.array([len(b) for b in baskets], dtype=np.int64)
    if (sizes == 0).any():
        raise ValueError("every held-out basket needs at least one item")
    members = (np.concatenate([np.asarray(b, dtype=np.int64) for b in baskets])
               if len(baskets) else np.zeros(0, np.int64))
    hit = _in_row_sets(topk[:, :k], members, np.repeat(np.arange(len(baskets)), sizes))
    gains = 1.0 / np.log2(np.arange(k) + 2.0)
    ideal = np.cumsum(gains)[np.minimum(k, sizes) - 1]
    return {f"basket_hr@{k}": float(hit.any(axis=1).mean()),
            f"basket_recall@{k}": float((hit.sum(axis=1) / sizes).mean()),
            f"basket_ndcg@{k}": float(((hit * gains).sum(axis=1) / ideal).mean())}


def repeat_share(topk: np.ndarray, history: np.ndarray, k: int = 10) -> float:
    """Mean share of each top-k list that is already in the user's history [U, L] (0 =
    padding): 1 = the ranker only re-recommends, 0 = only new items."""
    topk, history = np.asarray(topk)[:, :k], np.asarray(history)
    if topk.shape[0] != history.shape[0] or history.ndim != 2:
        raise ValueError(f"topk [U, >={k}] and history [U, L] must have the same U; got "
                         f"{topk.shape} and {history.shape}")
    real = history > 0
    owner = np.broadcast_to(np.arange(history.shape[0])[:, None], history.shape)[real]
    return float(_in_row_sets(topk, history[real], owner).mean(axis=1).mean())


def topk_agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean |top-k(a) ∩ top-k(b)| / k over rows: how often two models recommend the same."""
    a, b = np.sort(np.asarray(a)[:, :k], axis=1), np.asarray(b)[:, :k]
    distinct = np.ones(a.shape, dtype=bool)  # a repeated id counts once, as in a set
    distinct[:, 1:] = a[:, 1:] != a[:, :-1]
    owner = np.broadcast_to(np.arange(b.shape[0])[:, None], b.shape).ravel()
    common = _in_row_sets(a, b.ravel(), owner) & distinct
    return float((common.sum(axis=1) / k).mean())
