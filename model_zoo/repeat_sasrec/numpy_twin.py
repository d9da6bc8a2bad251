"""The repeat-aware SASRec in numpy alone: SASRec's twin for the explore score, plus the
repeat head's forward and gradients (``torch_module`` has the formula). Devices train it with
``loss_and_grads`` like any twin; parity tests tie it to the torch module."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from model_zoo.repeat_sasrec.config import RepeatSasRecConfig
from model_zoo.sasrec.numpy_twin import SasRecNumpy
from model_zoo.sasrec.numpy_twin import serving_constants as sasrec_constants
from model_zoo.softmax_head import PAD_LOGIT, check_batch, loss_and_logit_grads


class RepeatSasRecNumpy(SasRecNumpy):
    """Numpy twin of ``RepeatSasRec``; ``params`` uses the torch state_dict names."""

    def __init__(self, config: RepeatSasRecConfig, params: dict[str, np.ndarray]) -> None:
        self._load("repeat_sasrec", config, params)

    def _repeat(self, history: np.ndarray, u: np.ndarray) -> dict[str, np.ndarray]:
        """The repeat score's parts for the last position: [B, N] each, and the gate [B, 1]."""
        p = self.params
        batch, length = history.shape
        real = (history > 0).astype(u.dtype)
        rows = np.repeat(np.arange(batch), length)
        flat = history.ravel()
        rec = np.zeros((batch, self.config.n_items), u.dtype)
        opens = self._opens(history)
        ages = p["repeat.age"][::-1][None, :]
        if opens is not None:
            ages = np.where(opens[:, None], p["repeat.age_session"][::-1][None, :], ages)
        np.add.at(rec, (rows, flat), (ages * real).ravel())
        count = np.zeros_like(rec)
        np.add.at(count, (rows, flat), real.ravel())
        gate = u @ p["repeat.gate.weight"].T + p["repeat.gate.bias"]
        return {"rec": rec, "freq": np.log1p(count), "seen": (count > 0).astype(u.dtype),
                "gate": gate, "real": real, "opens": opens}

    def _opens(self, history: np.ndarray) -> np.ndarray | None:
        """[B] bool: the most recent token is the session separator (None: no separator)."""
        sep = self.config.session_id
        return (history[:, -1] == sep) if sep else None

    def _logits(self, u: np.ndarray) -> np.ndarray:
        scores = super()._logits(u)
        if self.config.session_id:
            scores[:, self.config.session_id] = PAD_LOGIT
        return scores

    def _repeat_logits(self, history: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, dict]:
        parts = self._repeat(history, u)
        logits = (self._logits(u) + parts["rec"] + parts["gate"] * parts["freq"]
                  + self.params["repeat.item_bias"] * parts["seen"])
        return logits, parts

    def logits(self, history: np.ndarray) -> np.ndarray:
        """[B, L] ids -> [B, n_items] scores; the padding column is PAD_LOGIT."""
        history = self._check_history(history)
        return self._repeat_logits(history, self._encode(history)["u"])[0]

    def loss_and_grads(
        self, history: np.ndarray, targets: np.ndarray, names: Iterable[str] | None = None
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Mean softmax cross-entropy of next-item ``targets`` [B] and the gradients of
        ``names`` (default: every tensor)."""
        history = self._check_history(history)
        targets, wanted = check_batch("repeat_sasrec", self.params, history.shape[0], targets,
                                      self.config.n_items, names)
        p = self.params
        cache = self._encode(history)
        u = cache["u"]
        logits, parts = self._repeat_logits(history, u)
        loss, g = loss_and_logit_grads(logits, targets)  # g: dL/dlogits [B, N]
        dgate = (g * parts["freq"]).sum(axis=1, keepdims=True)  # [B, 1]
        at_slots = np.take_along_axis(g, history, axis=1) * parts["real"]  # [B, L]
        grads = {
            "out.weight": g.T @ u,
            "out.bias": g.sum(axis=0),
            "repeat.age": at_slots.sum(axis=0)[::-1].copy(),
            "repeat.gate.weight": dgate.T @ u,
            "repeat.gate.bias": dgate.sum(axis=0),
            "repeat.item_bias": (g * parts["seen"]).sum(axis=0),
        }
        if parts["opens"] is not None:
            opens = parts["opens"][:, None]
            grads["repeat.age"] = np.where(opens, 0.0, at_slots).sum(axis=0)[::-1].copy()
            grads["repeat.age_session"] = np.where(opens, at_slots, 0.0).sum(axis=0)[::-1].copy()
        du = g @ p["out.weight"] + dgate @ p["repeat.gate.weight"]
        self._backward(history, cache, du, wanted, grads)
        return loss, {k: grads[k].astype(np.float32, copy=False) for k in sorted(wanted)}


def serving_constants(config: RepeatSasRecConfig, params) -> dict:
    """SASRec's serving constants (every parameter as it is, the repeat head's included) plus
    the age weights by position, oldest first (both vectors with a session separator): the
    serving graph reads them so and the converter folds that gather into the reversed vector.
    The separator's output bias carries PAD_LOGIT like padding's."""
    out = sasrec_constants(config, params)
    for name in ("repeat.age", "repeat.age_session"):
        if name in config.param_shapes():
            out[f"{name} reversed"] = (np.asarray(params[name], np.float32)[::-1].copy(),
                                       (name,))
    if config.session_id:  # the separator's output is masked like padding's
        bias, names = out["out.bias+pad_logit"]
        bias = bias.copy()
        bias[config.session_id] += np.float32(PAD_LOGIT)
        out["out.bias+pad_logit"] = (bias, names)
    return out
