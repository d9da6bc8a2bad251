"""The full-softmax next-item head every numpy twin shares: scoring and top-K of a user
vector against the output table, batch checks, the loss and the gradients of the output
table, and the gradient flowing back into the user vector."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# Logit given to the padding id so it never wins top-K and takes no softmax mass.
PAD_LOGIT = -1e9


class SoftmaxHead:
    """Mixin for numpy twins whose ``_encode(history)["u"]`` [B, dim] is scored against
    ``out.weight`` / ``out.bias``; the twin provides ``config``, ``params``,
    ``_check_history`` and ``_encode``."""

    config: Any
    params: dict[str, np.ndarray]

    def _load(self, name: str, config: Any, params: dict[str, np.ndarray]) -> None:
        """Keep ``config`` and float32 copies of exactly ``config.param_shapes()`` (torch
        state_dict names), refusing missing or misshapen tensors."""
        expected = config.param_shapes()
        missing = sorted(set(expected) - set(params))
        if missing:
            raise ValueError(f"{name} params lack {missing}")
        for key, shape in expected.items():
            if tuple(params[key].shape) != shape:
                raise ValueError(f"param {key} has shape {params[key].shape}, expected {shape}")
        self.config = config
        self.params = {k: np.asarray(params[k], dtype=np.float32) for k in expected}

    def user_vectors(self, history: np.ndarray) -> np.ndarray:
        """[B, L] ids -> [B, dim] user vectors."""
        return self._encode(self._check_history(history))["u"]

    def logits(self, history: np.ndarray) -> np.ndarray:
        """[B, L] ids -> [B, n_items] scores; the padding column is PAD_LOGIT."""
        return self._logits(self.user_vectors(history))

    def _logits(self, u: np.ndarray) -> np.ndarray:
        scores = u @ self.params["out.weight"].T + self.params["out.bias"]
        scores[:, 0] = PAD_LOGIT
        return scores

    def topk(self, history: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ids (int32) and scores (float32), best first, each [B, k]."""
        k = self.config.top_k if k is None else k
        scores = self.logits(history)
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        ids = np.take_along_axis(part, order, axis=1)
        return ids.astype(np.int32), np.take_along_axis(part_scores, order, axis=1)


def check_batch(architecture: str, params: Mapping[str, np.ndarray], batch: int,
                targets: np.ndarray, n_items: int, names: Iterable[str] | None
                ) -> tuple[np.ndarray, set[str]]:
    """Targets as int64 [batch] in [1, n_items), and the requested tensor names (default:
    every tensor); ValueError naming the problem otherwise."""
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (batch,):
        raise ValueError(f"targets must have shape [{batch}], got {targets.shape}")
    if targets.size and (targets.min() < 1 or targets.max() >= n_items):
        raise ValueError(f"target ids must be in [1, {n_items})")
    wanted = set(params) if names is None else set(names)
    unknown = sorted(wanted - set(params))
    if unknown:
        raise ValueError(f"{unknown} are not parameters of this {architecture} model")
    return targets, wanted


def loss_and_head_grads(logits: np.ndarray, u: np.ndarray, out_weight: np.ndarray,
                        targets: np.ndarray
                        ) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
    """Mean cross-entropy of ``logits`` [B, N] (overwritten), the gradients of ``out.weight``
    and ``out.bias``, and dL/du [B, D] for the rest of the backward pass."""
    loss, g = loss_and_logit_grads(logits, targets)
    return loss, {"out.weight": g.T @ u, "out.bias": g.sum(axis=0)}, g @ out_weight


def loss_and_logit_grads(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of ``logits`` [B, N] (overwritten) and dL/dlogits [B, N]."""
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    probs = exp / exp.sum(axis=1, keepdims=True)
    rows = np.arange(logits.shape[0])
    loss = float(-np.log(np.maximum(probs[rows, targets], 1e-30)).mean())
    g = probs
    g[rows, targets] -= 1.0
    g /= logits.shape[0]
    return loss, g
