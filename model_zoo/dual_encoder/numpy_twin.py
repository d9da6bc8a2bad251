"""The dual encoder in numpy alone: forward, full-softmax loss and the gradient of every
trainable tensor. Devices use it for local training; parity tests tie it to the torch module."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from model_zoo.dual_encoder.config import DualEncoderConfig
from model_zoo.softmax_head import PAD_LOGIT, SoftmaxHead, check_batch, loss_and_head_grads


def recency_weights(config: DualEncoderConfig) -> np.ndarray:
    """Weight per history position [max_len], 1.0 for the most recent (last) position."""
    exponents = np.arange(config.max_len - 1, -1, -1, dtype=np.float32)
    return np.power(np.float32(config.recency_decay), exponents).astype(np.float32)


class DualEncoderNumpy(SoftmaxHead):
    """Numpy twin of ``DualEncoder``; ``params`` uses the torch state_dict names."""

    def __init__(self, config: DualEncoderConfig, params: dict[str, np.ndarray]) -> None:
        self._load("dual_encoder", config, params)
        self._recency = recency_weights(config)

    def _check_history(self, history: np.ndarray) -> np.ndarray:
        history = np.asarray(history)
        if history.ndim != 2 or history.shape[1] != self.config.max_len:
            raise ValueError(
                f"history must have shape [batch, {self.config.max_len}], got {history.shape}"
            )
        if history.size and (history.min() < 0 or history.max() >= self.config.n_items):
            raise ValueError(f"history ids must be in [0, {self.config.n_items})")
        return history.astype(np.int64, copy=False)

    def _encode(self, history: np.ndarray) -> dict[str, np.ndarray]:
        p = self.params
        w = (history > 0).astype(np.float32) * self._recency  # [B, L]
        total = w.sum(axis=1, keepdims=True)
        attn = w / np.where(total > 0, total, np.float32(1.0))  # [B, L]; empty history -> 0
        u0 = np.einsum("bl,bld->bd", attn, p["item_emb.weight"][history])
        z1 = u0 @ p["mlp.0.weight"].T + p["mlp.0.bias"]
        h1 = np.maximum(z1, 0.0)
        u = u0 + h1 @ p["mlp.2.weight"].T + p["mlp.2.bias"]
        return {"attn": attn, "u0": u0, "z1": z1, "h1": h1, "u": u}

    def loss_and_grads(
        self, history: np.ndarray, targets: np.ndarray, names: Iterable[str] | None = None
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Mean softmax cross-entropy of next-item ``targets`` [B] and the gradients of
        ``names`` (default: every tensor)."""
        history = self._check_history(history)
        targets, wanted = check_batch("dual_encoder", self.params, history.shape[0], targets,
                                      self.config.n_items, names)
        p = self.params
        cache = self._encode(history)
        loss, grads, du = loss_and_head_grads(self._logits(cache["u"]), cache["u"],
                                              p["out.weight"], targets)
        grads["mlp.2.weight"] = du.T @ cache["h1"]
        grads["mlp.2.bias"] = du.sum(axis=0)
        dz1 = (du @ p["mlp.2.weight"]) * (cache["z1"] > 0)
        grads["mlp.0.weight"] = dz1.T @ cache["u0"]
        grads["mlp.0.bias"] = dz1.sum(axis=0)
        du0 = du + dz1 @ p["mlp.0.weight"]
        d_emb = np.zeros_like(p["item_emb.weight"])
        contrib = cache["attn"][:, :, None] * du0[:, None, :]
        np.add.at(d_emb, history.ravel(), contrib.reshape(-1, self.config.dim))
        d_emb[0] = 0.0  # the padding row never trains (torch: padding_idx=0)
        grads["item_emb.weight"] = d_emb
        return loss, {k: grads[k].astype(np.float32, copy=False) for k in sorted(wanted)}


def serving_constants(config: DualEncoderConfig, params) -> dict:
    """Every array the exported graph stores (``model_zoo.tensor_map``): each parameter as
    it is, and the output bias with the padding column's logit folded in."""
    out = {name: (np.asarray(params[name], np.float32), (name,)) for name in config.param_shapes()}
    bias = np.asarray(params["out.bias"], np.float32).copy()
    bias[0] = bias[0] + np.float32(PAD_LOGIT)
    out["out.bias+pad_logit"] = (bias, ("out.bias",))
    return out
