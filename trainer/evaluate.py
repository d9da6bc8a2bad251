"""One table comparing the popularity baseline, the torch model, and the float and int8 LiteRT
models (run through the real interpreter) on the same held-out events, full ranking."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from device_sdk.bundle import load_bundle
from device_sdk.topk_model import TopKModel
from trainer.checkpoint import Checkpoint
from trainer.data.split import EvalSet
from trainer.metrics import ranking_metrics, topk_agreement
from trainer.train import torch_topk

K = 10


def popularity_topk(popular: list[int], users: int, k: int) -> np.ndarray:
    return np.tile(np.asarray(popular[:k], dtype=np.int32), (users, 1))


def evaluate_models(
    ckpt: Checkpoint,
    data: EvalSet,
    bundle_dir: str | Path | None = None,
    float_path: str | Path | None = None,
) -> list[dict]:
    """Rows of metrics; ``agree@10`` is top-10 overlap with the torch model's ranking."""
    n_items = len(ckpt.vocab)
    k_out = ckpt.model_config().top_k
    ranked = {
        "popularity": popularity_topk(ckpt.vocab.popular, len(data), k_out),
        "torch (float)": torch_topk(ckpt.torch_module(), data.history, k_out),
    }
    if float_path is not None and Path(float_path).is_file():
        ranked["litert float"] = TopKModel(Path(float_path).read_bytes()).topk_many(data.history)[0]
    if bundle_dir is not None:
        ranked["litert int8"] = load_bundle(bundle_dir).model().topk_many(data.history)[0]
    reference = ranked["torch (float)"]
    rows = []
    for name, topk in ranked.items():
        row = {"model": name, **ranking_metrics(topk, data.target, n_items, K)}
        row[f"agree@{K}"] = topk_agreement(topk, reference, K)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of metric rows (first column left-aligned)."""
    cols = list(rows[0])
    cells = [[r[c] if isinstance(r[c], str) else f"{r[c]:.4f}" for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    def line(values: list[str]) -> str:
        padded = [v.rjust(w) for v, w in zip(values, widths, strict=True)]
        padded[0] = values[0].ljust(widths[0])
        return "  ".join(padded)

    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, cells)])
