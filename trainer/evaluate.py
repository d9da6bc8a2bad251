"""One table comparing the baselines (popularity, item-KNN; personal popularity, recency
item-KNN and TIFU-KNN tuned on validation) with one or more trained runs
(torch, float and int8 LiteRT through the real interpreter) on the same held-out data, full
ranking over every item, under two protocols:

- line: leave-last-out over purchase lines (HR@10, NDCG@10, MRR@50, coverage@10, top-10
  agreement with the run's torch model, repeat@10 = share of the top 10 already in the
  history);
- basket: the items of each user's last basket from the steps before it (HR@10, recall@10,
  NDCG@10 against the basket, repeat@10), when the split held out whole baskets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_sdk.bundle import load_bundle
from device_sdk.topk_model import TopKModel
from trainer.baselines import (
    TIFUKNN,
    ItemKNN,
    PersonalPopularity,
    Ranker,
    RecencyItemKNN,
    Rows,
    Tuning,
    popularity_topk,
    settings_text,
    tune,
)
from trainer.checkpoint import Checkpoint
from trainer.data.split import LeaveLastOut
from trainer.metrics import basket_metrics, ranking_metrics, repeat_share, topk_agreement
from trainer.train import model_rows, session_of, torch_topk

K = 10
MISSING = "-"
SETTINGS = "tuned on validation (line | basket)"
# A (rows -> [U, k_out] ids) ranker for one protocol.
Rank = Callable[[Rows], np.ndarray]


@dataclass
class RunToEvaluate:
    """A trained run: its checkpoint, its split (rebuilt from the run's data spec) and,
    when exported, the int8 bundle and the float .tflite beside it."""

    ckpt: Checkpoint
    split: LeaveLastOut
    bundle_dir: Path | None = None
    float_path: Path | None = None


@dataclass
class Evaluation:
    """The table's rows and, per tuned baseline and protocol, the grid validation scored."""

    rows: list[dict]
    tunings: list[tuple[str, str, Tuning]] = field(default_factory=list)

    def format_tunings(self) -> str:
        return "\n".join(f"{name}, {protocol} protocol (validation, {len(t.tried)} settings):"
                         f"\n{t.format()}" for name, protocol, t in self.tunings)


@dataclass
class _Row:
    name: str
    line: Rank
    basket: Rank | None
    compare_with: int | None  # index of the run whose torch model agree@10 is against
    settings: str = MISSING


def _line_metric(target: np.ndarray, n_items: int) -> Callable[[np.ndarray], float]:
    return lambda topk: ranking_metrics(topk, target, n_items, K)[f"ndcg@{K}"]


def _basket_metric(baskets: list[np.ndarray]) -> Callable[[np.ndarray], float]:
    return lambda topk: basket_metrics(topk, baskets, K)[f"basket_ndcg@{K}"]


def tuned_baselines(split: LeaveLastOut, n_items: int, split_name: str = "test",
                    k_out: int = 50) -> tuple[list[_Row], list[tuple[str, str, Tuning]]]:
    """Personal popularity, recency item-KNN and TIFU-KNN, each tuned per protocol on
    validation only: the line protocol on ``split.valid`` with the rankers fitted on
    ``split.train``; the basket protocol on ``split.basket_valid`` (the basket before the
    test one) with the rankers fitted on the training steps before that basket. The picked
    settings then rank the evaluated split with the rankers fitted on ``split.train``."""
    counts = _counts(split.train, n_items)
    fitted = _fit(split.train, split.train_times, counts)
    line_metric = _line_metric(split.valid.target, n_items)
    basket_rows = split.basket if split_name == "test" else None
    valid_baskets = split.basket_valid if basket_rows is not None else None
    if valid_baskets is not None and len(valid_baskets):
        train_v, times_v = split.train_before(valid_baskets)
        fitted_v = _fit(train_v, times_v, _counts(train_v, n_items))
    rows, tunings = [], []
    for name, ranker in fitted.items():
        line = tune(ranker, split.valid, line_metric, f"ndcg@{K}", K)
        tunings.append((name, "line", line))
        basket_fn, basket_text = None, MISSING
        if basket_rows is not None:
            if valid_baskets is not None and len(valid_baskets):
                basket = tune(fitted_v[name], valid_baskets,
                              _basket_metric(valid_baskets.baskets), f"basket_ndcg@{K}", K)
                tunings.append((name, "basket", basket))
                picked = basket.best
                basket_text = settings_text(picked)
            else:  # no user has a basket before the test one: reuse the line pick
                picked = line.best
                basket_text = f"{settings_text(picked)} (line's pick)"
            basket_fn = _with_settings(ranker, picked, k_out)
        rows.append(_Row(name, _with_settings(ranker, line.best, k_out), basket_fn, 0,
                         f"{settings_text(line.best)} | {basket_text}"))
    return rows, tunings


def _with_settings(ranker: Ranker, params: dict, k_out: int) -> Rank:
    return lambda rows: ranker.topk(rows, k_out, **params)


def _on_history(model: Callable[[np.ndarray], np.ndarray], config) -> Rank:
    """A run's model on the rows as it sees them (``model_rows``: with session separators
    when it was trained with them)."""
    return lambda rows: model(model_rows(rows, config).history)


def _counts(train: dict[str, np.ndarray], n_items: int) -> np.ndarray:
    counts = np.zeros(n_items, dtype=np.int64)
    for s in train.values():
        np.add.at(counts, s, 1)
    counts[0] = 0
    return counts


def _fit(train: dict[str, np.ndarray], times: dict[str, np.ndarray] | None,
         counts: np.ndarray) -> dict[str, Ranker]:
    return {"personal popularity": PersonalPopularity(counts),
            "recency item-knn": RecencyItemKNN(train, counts),
            "tifu-knn": TIFUKNN(train, times, counts)}


def evaluate_runs(runs: list[RunToEvaluate], split_name: str = "test") -> Evaluation:
    """The table (``MISSING`` where a protocol does not apply) and the baselines' tuning. The
    first run's data defines the users; every other run must hold out exactly the same
    targets."""
    first = runs[0]
    line = getattr(first.split, split_name)
    for run in runs[1:]:
        other = getattr(run.split, split_name)
        same = (other.users == line.users and np.array_equal(other.target, line.target)
                and _items(run.ckpt.vocab) == _items(first.ckpt.vocab))
        if not same:
            raise ValueError("runs to compare must use the same data, vocabulary and holdout "
                             f"(pocketrec train with the same --data/--holdout); "
                             f"{run.ckpt.architecture} differs")
    return evaluate(first.split, ranked_items(first.ckpt.vocab), first.ckpt.vocab.popular,
                    runs, split_name)


def _items(vocab) -> list[str]:
    """The item keys, in id order: runs with and without a session separator (always the
    last id) rank the same items under the same ids."""
    return vocab.keys[:ranked_items(vocab)]


def ranked_items(vocab) -> int:
    """The id range every ranker scores, padding included: the vocabulary without the
    session separator (always its last id, never ranked)."""
    return len(vocab) - (1 if vocab.session_id else 0)


def evaluate(split: LeaveLastOut, n_items: int, popular: list[int],
             runs: list[RunToEvaluate] | None = None, split_name: str = "test") -> Evaluation:
    """The baselines (tuned on validation) and each run's models on one split's
    ``split_name`` rows; without runs, the baselines alone."""
    runs = runs or []
    line = getattr(split, split_name)
    basket = split.basket if split_name == "test" else None
    k_out = max(50, K)
    knn = ItemKNN(split.train, n_items)
    compare = 0 if runs else None
    rankers = [
        _Row("popularity", lambda r: popularity_topk(popular, len(r.history), k_out),
             lambda r: popularity_topk(popular, len(r.history), k_out), compare),
        _Row("item-knn", lambda r: knn.topk(r.history, k_out),
             lambda r: knn.topk(r.history, k_out), compare),
    ]
    tuned, tunings = tuned_baselines(split, n_items, split_name, k_out)
    for row in tuned:
        row.compare_with = compare
    rankers += tuned
    torch_rows = {}
    for index, run in enumerate(runs):
        config = run.ckpt.model_config()
        # A run trained with session separators says so: runs with and without compare.
        arch = run.ckpt.architecture + (" +sessions" if session_of(config)[0] else "")
        module = run.ckpt.torch_module()
        models = [(f"{arch} torch (float)", lambda h, m=module: torch_topk(m, h, k_out))]
        torch_rows[index] = len(rankers)
        if run.float_path is not None and Path(run.float_path).is_file():
            flt = TopKModel(Path(run.float_path).read_bytes())
            models.append((f"{arch} litert float", lambda h, m=flt: m.topk_many(h)[0]))
        if run.bundle_dir is not None:
            int8 = load_bundle(run.bundle_dir).model()
            models.append((f"{arch} litert int8", lambda h, m=int8: m.topk_many(h)[0]))
        for name, model in models:
            rankers.append(_Row(name, _on_history(model, config), _on_history(model, config),
                                index))

    ranked = [r.line(line) for r in rankers]
    rows = []
    for ranker, topk in zip(rankers, ranked, strict=True):
        row = {"model": ranker.name, **ranking_metrics(topk, line.target, n_items, K)}
        row[f"agree@{K}"] = (MISSING if ranker.compare_with is None else
                             topk_agreement(topk, ranked[torch_rows[ranker.compare_with]], K))
        row[f"repeat@{K}"] = repeat_share(topk, line.history, K)
        if basket is not None:
            basket_topk = ranker.basket(basket)
            row.update(basket_metrics(basket_topk, basket.baskets, K))
            row[f"basket_repeat@{K}"] = repeat_share(basket_topk, basket.history, K)
        else:
            row.update({f"basket_{m}@{K}": MISSING for m in ("hr", "recall", "ndcg", "repeat")})
        row[SETTINGS] = ranker.settings
        rows.append(row)
    return Evaluation(rows, tunings)


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
