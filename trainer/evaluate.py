"""One table comparing the baselines (popularity, item-KNN) with one or more trained runs
(torch, float and int8 LiteRT through the real interpreter) on the same held-out data, full
ranking over every item, under two protocols:

- line: leave-last-out over purchase lines (HR@10, NDCG@10, MRR@50, coverage@10, top-10
  agreement with the run's torch model);
- basket: the items of each user's last basket from the steps before it (HR@10, recall@10,
  NDCG@10 against the basket), when the split held out whole baskets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_sdk.bundle import load_bundle
from device_sdk.topk_model import TopKModel
from trainer.baselines import ItemKNN, popularity_topk
from trainer.checkpoint import Checkpoint
from trainer.data.split import LeaveLastOut
from trainer.metrics import basket_metrics, ranking_metrics, topk_agreement
from trainer.train import torch_topk

K = 10
MISSING = "-"


@dataclass
class RunToEvaluate:
    """A trained run: its checkpoint, its split (rebuilt from the run's data spec) and,
    when exported, the int8 bundle and the float .tflite beside it."""

    ckpt: Checkpoint
    split: LeaveLastOut
    bundle_dir: Path | None = None
    float_path: Path | None = None


def evaluate_runs(runs: list[RunToEvaluate], split_name: str = "test") -> list[dict]:
    """Rows of metrics (``MISSING`` where a protocol does not apply). The first run's data
    defines the users; every other run must hold out exactly the same targets."""
    first = runs[0]
    line = getattr(first.split, split_name)
    basket = first.split.basket if split_name == "test" else None
    for run in runs[1:]:
        other = getattr(run.split, split_name)
        same = (other.users == line.users and np.array_equal(other.target, line.target)
                and run.ckpt.vocab.digest() == first.ckpt.vocab.digest())
        if not same:
            raise ValueError("runs to compare must use the same data, vocabulary and holdout "
                             f"(pocketrec train with the same --data/--holdout); "
                             f"{run.ckpt.architecture} differs")
    n_items = len(first.ckpt.vocab)
    k_out = max(50, K)
    knn = ItemKNN(first.split.train, n_items)
    # (row name, ranker [U, L] -> [U, k_out] ids, index of the run whose torch model it is
    # compared with: a run's own, the first run's for the baselines)
    rankers: list[tuple[str, Callable[[np.ndarray], np.ndarray], int]] = [
        ("popularity", lambda h: popularity_topk(first.ckpt.vocab.popular, len(h), k_out), 0),
        ("item-knn", lambda h: knn.topk(h, k_out), 0),
    ]
    torch_rows = {}
    for index, run in enumerate(runs):
        arch = run.ckpt.architecture
        module = run.ckpt.torch_module()
        torch_rows[index] = len(rankers)
        rankers.append((f"{arch} torch (float)", lambda h, m=module: torch_topk(m, h, k_out),
                        index))
        if run.float_path is not None and Path(run.float_path).is_file():
            flt = TopKModel(Path(run.float_path).read_bytes())
            rankers.append((f"{arch} litert float", lambda h, m=flt: m.topk_many(h)[0], index))
        if run.bundle_dir is not None:
            int8 = load_bundle(run.bundle_dir).model()
            rankers.append((f"{arch} litert int8", lambda h, m=int8: m.topk_many(h)[0], index))

    ranked = [rank(line.history) for _, rank, _ in rankers]
    rows = []
    for (name, rank, index), topk in zip(rankers, ranked, strict=True):
        row = {"model": name, **ranking_metrics(topk, line.target, n_items, K)}
        row[f"agree@{K}"] = topk_agreement(topk, ranked[torch_rows[index]], K)
        if basket is not None:
            row.update(basket_metrics(rank(basket.history), basket.baskets, K))
        else:
            row.update({f"basket_{m}@{K}": MISSING for m in ("hr", "recall", "ndcg")})
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
