"""Synthetic generator: determinism, schema, realism, and that history beats popularity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from trainer.data.interactions import COLUMNS, EVENT_KINDS, canonical
from trainer.data.synthetic import DEFAULT_START, generate


@pytest.fixture(scope="module")
def log() -> pd.DataFrame:
    return generate()


def test_deterministic_under_seed() -> None:
    pd.testing.assert_frame_equal(generate(300, 200, seed=7), generate(300, 200, seed=7))


def test_seeds_differ() -> None:
    a, b = generate(300, 200, seed=1), generate(300, 200, seed=2)
    assert not a.equals(b)


def test_schema(log: pd.DataFrame) -> None:
    assert list(log.columns) == list(COLUMNS)
    assert log["timestamp"].dtype == "int64"
    pd.testing.assert_frame_equal(canonical(log), log)  # already valid, sorted and indexed
    assert set(log["event"]) <= set(EVENT_KINDS)
    assert {"view", "add_to_cart", "purchase"} <= set(log["event"])
    assert log["user"].str.fullmatch(r"u\d{4}").all()
    assert log["item"].str.fullmatch(r"SKU\d{5}").all()
    assert log["user"].nunique() == 2000
    assert log["timestamp"].min() >= DEFAULT_START
    # Sessions start within 90 days; in-session offsets add at most hours.
    assert log["timestamp"].max() < DEFAULT_START + 91 * 86400


def test_volume(log: pd.DataFrame) -> None:
    per_user = log.groupby("user").size()
    assert 20 <= per_user.mean() <= 60
    assert log["item"].nunique() > 900  # the long tail does get seen


def test_popularity_is_heavy_tailed(log: pd.DataFrame) -> None:
    counts = log["item"].value_counts().to_numpy()  # descending
    assert counts[: len(counts) // 10].sum() > 0.4 * counts.sum()


def test_funnel_follows_a_view(log: pd.DataFrame) -> None:
    first_view = (
        log[log["event"] == "view"].groupby(["user", "item"])["timestamp"].min().rename("viewed")
    )
    for kind in ("add_to_cart", "purchase", "dismiss"):
        later = log[log["event"] == kind].join(first_view, on=["user", "item"])
        assert len(later) > 0
        assert (later["viewed"] < later["timestamp"]).all(), kind
    carts = log[log["event"] == "add_to_cart"].groupby(["user", "item"])["timestamp"].min()
    buys = log[log["event"] == "purchase"].join(carts.rename("carted"), on=["user", "item"])
    assert (buys["carted"] < buys["timestamp"]).all()


def _hit_rate_at_10(scores: np.ndarray, users: np.ndarray, targets: np.ndarray) -> np.ndarray:
    top = np.argsort(-scores, axis=1)[:, :10]
    return (top[users] == targets[:, None]).any(axis=1)


def test_history_beats_popularity(log: pd.DataFrame) -> None:
    """Item co-occurrence on each user's history vs global popularity, on the last event."""
    _, user = np.unique(log["user"].to_numpy(), return_inverse=True)
    _, item = np.unique(log["item"].to_numpy(), return_inverse=True)
    last = log.groupby("user").tail(1).index.to_numpy()
    train = np.ones(len(log), dtype=bool)
    train[last] = False
    seen = np.zeros((user.max() + 1, item.max() + 1))
    seen[user[train], item[train]] = 1.0
    target_user, target = user[last], item[last]

    popularity = np.broadcast_to(seen.sum(axis=0), seen.shape).copy()
    cooccurrence = seen @ (seen.T @ seen)
    pop_hr = _hit_rate_at_10(popularity, target_user, target).mean()
    co_hr = _hit_rate_at_10(cooccurrence, target_user, target).mean()
    assert co_hr >= 2 * pop_hr, (co_hr, pop_hr)

    # Also for targets the user never touched before (no credit for repeats).
    new = seen[target_user, target] == 0
    assert new.sum() > 100
    popularity[seen > 0] = -1
    cooccurrence[seen > 0] = -1
    pop_new = _hit_rate_at_10(popularity, target_user, target)[new].mean()
    co_new = _hit_rate_at_10(cooccurrence, target_user, target)[new].mean()
    assert co_new >= 3 * pop_new, (co_new, pop_new)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_users": 0},
        {"n_topics": 2000},
        {"mean_sessions": 0.5},
        {"p_cart": 1.5},
    ],
)
def test_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate(**kwargs)
