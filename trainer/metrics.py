"""Full-ranking metrics for next-item prediction with one held-out target per user."""

from __future__ import annotations

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


def topk_agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean |top-k(a) ∩ top-k(b)| / k over rows: how often two models recommend the same."""
    a, b = np.asarray(a)[:, :k], np.asarray(b)[:, :k]
    return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, b, strict=True)]))
