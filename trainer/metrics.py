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
    gains = 1.0 / np.log2(np.arange(k) + 2.0)
    hr, recall, ndcg = [], [], []
    for row, basket in zip(topk[:, :k], baskets, strict=True):
        if not len(basket):
            raise ValueError("every held-out basket needs at least one item")
        hit = np.isin(row, basket)
        hr.append(hit.any())
        recall.append(hit.sum() / len(basket))
        ndcg.append(gains[hit].sum() / gains[: min(k, len(basket))].sum())
    return {f"basket_hr@{k}": float(np.mean(hr)), f"basket_recall@{k}": float(np.mean(recall)),
            f"basket_ndcg@{k}": float(np.mean(ndcg))}


def repeat_share(topk: np.ndarray, history: np.ndarray, k: int = 10) -> float:
    """Mean share of each top-k list that is already in the user's history [U, L] (0 =
    padding): 1 = the ranker only re-recommends, 0 = only new items."""
    topk, history = np.asarray(topk)[:, :k], np.asarray(history)
    if topk.shape[0] != history.shape[0] or history.ndim != 2:
        raise ValueError(f"topk [U, >={k}] and history [U, L] must have the same U; got "
                         f"{topk.shape} and {history.shape}")
    return float(np.mean([np.isin(row, h[h > 0]).mean() for row, h in
                          zip(topk, history, strict=True)]))


def topk_agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean |top-k(a) ∩ top-k(b)| / k over rows: how often two models recommend the same."""
    a, b = np.asarray(a)[:, :k], np.asarray(b)[:, :k]
    return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, b, strict=True)]))
