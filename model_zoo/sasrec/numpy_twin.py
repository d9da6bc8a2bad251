"""The SASRec-style model in numpy alone: forward, full-softmax loss and the gradient of any
subset of its tensors (backward stops at the deepest block a requested tensor lives in).
Devices use it for local training; parity tests tie it to the torch module. No dropout here:
devices train the deterministic network."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from model_zoo.sasrec.config import SasRecConfig
from model_zoo.softmax_head import PAD_LOGIT, SoftmaxHead, check_batch, loss_and_head_grads

# Additive attention bias of a masked (future or padding) key.
MASK_VALUE = -1e9
LN_EPS = 1e-5


def attention_bias(history: np.ndarray) -> np.ndarray:
    """[B, L] ids -> [B, 1, L, L] additive bias: 0 where query l may see key m (m <= l and m
    is a real item, or m == l), MASK_VALUE elsewhere. Real positions never see padding; a
    padding position sees only itself, so its softmax stays defined."""
    length = history.shape[1]
    causal = np.tril(np.ones((length, length), dtype=np.float32))
    real = (history > 0).astype(np.float32)
    allowed = np.maximum(causal * real[:, None, :], np.eye(length, dtype=np.float32))
    return ((allowed - 1.0) * -MASK_VALUE)[:, None].astype(np.float32)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, tuple]:
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + LN_EPS)
    xhat = xc * rstd
    return xhat * w + b, (xhat, rstd)


def _layer_norm_back(
    dy: np.ndarray, cache: tuple, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (dx, dw, db)."""
    xhat, rstd = cache
    dxhat = dy * w
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    flat = dy.reshape(-1, dy.shape[-1])
    return dx, (flat * xhat.reshape(flat.shape)).sum(axis=0), flat.sum(axis=0)


def _outer_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum over batch and positions of a[..., i] * b[..., j] -> [i, j] (one BLAS matmul)."""
    return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class SasRecNumpy(SoftmaxHead):
    """Numpy twin of ``SasRec``; ``params`` uses the torch state_dict names."""

    def __init__(self, config: SasRecConfig, params: dict[str, np.ndarray]) -> None:
        self._load("sasrec", config, params)

    def _check_history(self, history: np.ndarray) -> np.ndarray:
        history = np.asarray(history)
        if history.ndim != 2 or history.shape[1] != self.config.max_len:
            raise ValueError(
                f"history must have shape [batch, {self.config.max_len}], got {history.shape}"
            )
        if history.size and (history.min() < 0 or history.max() >= self.config.n_items):
            raise ValueError(f"history ids must be in [0, {self.config.n_items})")
        return history.astype(np.int64, copy=False)

    # -- one block ---------------------------------------------------------------------------

    def _block(self, b: int, x: np.ndarray, bias: np.ndarray, last_only: bool) -> tuple:
        """x [B, L, d] -> (out [B, Lq, d], cache); Lq = 1 (the last position) when
        ``last_only``: the final block's other positions feed nothing downstream."""
        p = {k.split(".", 2)[2]: v for k, v in self.params.items() if k.startswith(f"blocks.{b}.")}
        batch, length, d = x.shape
        heads = self.config.heads
        dh = d // heads
        a, ln1 = _layer_norm(x, p["ln1.weight"], p["ln1.bias"])
        aq = a[:, -1:] if last_only else a
        lq = aq.shape[1]

        def split(t: np.ndarray) -> np.ndarray:
            return t.reshape(batch, t.shape[1], heads, dh).transpose(0, 2, 1, 3)

        q = split(aq @ p["q.weight"].T + p["q.bias"])
        k = split(a @ p["k.weight"].T + p["k.bias"])
        v = split(a @ p["v.weight"].T + p["v.bias"])
        scale = np.float32(1.0 / np.sqrt(dh))
        probs = _softmax(q @ k.transpose(0, 1, 3, 2) * scale + bias[:, :, -lq:])
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, lq, d)
        x1 = x[:, -lq:] + ctx @ p["o.weight"].T + p["o.bias"]
        c, ln2 = _layer_norm(x1, p["ln2.weight"], p["ln2.bias"])
        z = c @ p["ff1.weight"].T + p["ff1.bias"]
        r = np.maximum(z, 0.0)
        out = x1 + r @ p["ff2.weight"].T + p["ff2.bias"]
        cache = dict(p=p, a=a, aq=aq, ln1=ln1, q=q, k=k, v=v, probs=probs, ctx=ctx, c=c,
                     ln2=ln2, z=z, r=r, scale=scale, lq=lq)
        return out, cache

    @staticmethod
    def _block_back(dout: np.ndarray, cache: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """dL/d(block output) [B, Lq, d] -> (dL/d(block input) [B, L, d], grads by local name)."""
        p = cache["p"]
        batch, length, d = cache["a"].shape
        lq, heads = cache["lq"], cache["q"].shape[1]
        dh = d // heads
        g: dict[str, np.ndarray] = {}
        g["ff2.weight"] = _outer_sum(dout, cache["r"])
        g["ff2.bias"] = dout.sum(axis=(0, 1))
        dz = (dout @ p["ff2.weight"]) * (cache["z"] > 0)
        g["ff1.weight"] = _outer_sum(dz, cache["c"])
        g["ff1.bias"] = dz.sum(axis=(0, 1))
        dc = dz @ p["ff1.weight"]
        dx1, g["ln2.weight"], g["ln2.bias"] = _layer_norm_back(dc, cache["ln2"], p["ln2.weight"])
        dx1 = dx1 + dout
        g["o.weight"] = _outer_sum(dx1, cache["ctx"])
        g["o.bias"] = dx1.sum(axis=(0, 1))
        dctx = (dx1 @ p["o.weight"]).reshape(batch, lq, heads, dh).transpose(0, 2, 1, 3)
        probs, q, k, v, scale = cache["probs"], cache["q"], cache["k"], cache["v"], cache["scale"]
        dprobs = dctx @ v.transpose(0, 1, 3, 2)
        dv = probs.transpose(0, 1, 3, 2) @ dctx
        ds = probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True)) * scale
        dq = ds @ k
        dk = ds.transpose(0, 1, 3, 2) @ q

        def merge(t: np.ndarray) -> np.ndarray:
            return t.transpose(0, 2, 1, 3).reshape(batch, t.shape[2], d)

        dq, dk, dv = merge(dq), merge(dk), merge(dv)
        a, aq = cache["a"], cache["aq"]
        for name, dproj, inp in (("q", dq, aq), ("k", dk, a), ("v", dv, a)):
            g[f"{name}.weight"] = _outer_sum(dproj, inp)
            g[f"{name}.bias"] = dproj.sum(axis=(0, 1))
        da = dk @ p["k.weight"] + dv @ p["v.weight"]
        da[:, -lq:] += dq @ p["q.weight"]
        dx, g["ln1.weight"], g["ln1.bias"] = _layer_norm_back(da, cache["ln1"], p["ln1.weight"])
        dx[:, -lq:] += dx1
        return dx, g

    # -- the network ---------------------------------------------------------------------------

    def _encode(self, history: np.ndarray) -> dict:
        p = self.params
        bias = attention_bias(history)
        x = p["item_emb.weight"][history] + p["pos_emb.weight"]
        caches = []
        last = self.config.blocks - 1
        for b in range(self.config.blocks):
            x, cache = self._block(b, x, bias, last_only=b == last)
            caches.append(cache)
        u, ln_f = _layer_norm(x[:, -1], p["ln_final.weight"], p["ln_final.bias"])
        return {"blocks": caches, "ln_final": ln_f, "u": u}

    def _deepest_block(self, names: set[str]) -> int:
        """The first block the backward pass must reach (-1: down to the embeddings)."""
        if names & {"item_emb.weight", "pos_emb.weight"}:
            return -1
        blocks = [int(n.split(".")[1]) for n in names if n.startswith("blocks.")]
        return min(blocks, default=self.config.blocks)

    def loss_and_grads(
        self, history: np.ndarray, targets: np.ndarray, names: Iterable[str] | None = None
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Mean softmax cross-entropy of next-item ``targets`` [B] and the gradients of
        ``names`` (default: every tensor)."""
        history = self._check_history(history)
        targets, wanted = check_batch("sasrec", self.params, history.shape[0], targets,
                                      self.config.n_items, names)
        cache = self._encode(history)
        loss, grads, du = loss_and_head_grads(self._logits(cache["u"]), cache["u"],
                                              self.params["out.weight"], targets)
        self._backward(history, cache, du, wanted, grads)
        return loss, {k: grads[k].astype(np.float32, copy=False) for k in sorted(wanted)}

    def _backward(self, history: np.ndarray, cache: dict, du: np.ndarray, wanted: set[str],
                  grads: dict[str, np.ndarray]) -> None:
        """dL/du [B, dim] of the user vectors -> the gradients of the encoder tensors into
        ``grads``, as deep as ``wanted`` needs."""
        p = self.params
        dx_last, grads["ln_final.weight"], grads["ln_final.bias"] = _layer_norm_back(
            du, cache["ln_final"], p["ln_final.weight"]
        )
        dx = dx_last[:, None, :]  # the last block's output is its last position only
        stop = self._deepest_block(wanted)
        for b in range(self.config.blocks - 1, max(stop, 0) - 1, -1):
            dx, local = self._block_back(dx, cache["blocks"][b])
            grads.update({f"blocks.{b}.{k}": v for k, v in local.items()})
        if stop < 0:
            d_emb = np.zeros_like(p["item_emb.weight"])
            np.add.at(d_emb, history.ravel(), dx.reshape(-1, self.config.dim))
            d_emb[0] = 0.0  # the padding row never trains (torch: padding_idx=0)
            grads["item_emb.weight"] = d_emb
            grads["pos_emb.weight"] = dx.sum(axis=0)


def serving_constants(config: SasRecConfig, params) -> dict:
    """Every array the exported graph stores (``model_zoo.tensor_map``): each parameter as
    it is, the output bias with the padding logit folded in, and, for every projection that
    reads a LayerNorm's output (q, k, v after ln1; ff1 after ln2), the converter's fold of
    that norm's gain and shift into it: ``W * g`` and ``b + W @ beta``. Which of the two forms
    a file holds depends on the graph (the last block computes q for one position only, so
    its q stays unfolded); ``tensor_map.locate`` finds out."""
    p = {name: np.asarray(params[name], np.float32) for name in config.param_shapes()}
    out = {name: (value, (name,)) for name, value in p.items()}
    bias = p["out.bias"].copy()
    bias[0] = bias[0] + np.float32(PAD_LOGIT)
    out["out.bias+pad_logit"] = (bias, ("out.bias",))
    for b in range(config.blocks):
        for ln, projs in (("ln1", ("q", "k", "v")), ("ln2", ("ff1",))):
            g, beta = f"blocks.{b}.{ln}.weight", f"blocks.{b}.{ln}.bias"
            for proj in projs:
                w, bb = f"blocks.{b}.{proj}.weight", f"blocks.{b}.{proj}.bias"
                out[f"{w}*{ln}"] = (p[w] * p[g][None, :], (w, g))
                out[f"{bb}+{ln}"] = (p[bb] + p[w] @ p[beta], (bb, w, beta))
    return out
