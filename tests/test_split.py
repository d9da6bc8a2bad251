"""Vocabulary, sequences, k-core and the chronological leave-last-out split."""

import numpy as np
import pandas as pd
import pytest

from device_sdk.item_vocab import ItemVocab
from trainer.data.interactions import canonical
from trainer.data.split import kcore, leave_last_out, partition_by_user, user_sequences, windows


def _table(rows):
    return canonical(pd.DataFrame(rows, columns=["user", "item", "timestamp", "event"]))


def test_vocab_orders_by_popularity_and_reserves_padding():
    vocab = ItemVocab.from_items(["b", "a", "b", "c", "b", "a"])
    assert vocab.keys == ["", "b", "a", "c"]
    assert vocab.ids(["a", "zzz", "c"]).tolist() == [2, 0, 3]
    assert ItemVocab.from_json(vocab.to_json()) == vocab
    assert vocab.digest() != ItemVocab(["", "a", "b", "c"]).digest()
    with pytest.raises(ValueError, match="padding"):
        ItemVocab(["a"])
    with pytest.raises(ValueError, match="not a valid item vocabulary"):
        ItemVocab.from_json(b"[1, 2]")


def test_sequences_are_chronological_and_collapse_repeats():
    df = _table([
        ("u1", "x", 30, "purchase"), ("u1", "x", 20, "add_to_cart"), ("u1", "x", 10, "view"),
        ("u1", "y", 40, "view"), ("u1", "x", 50, "view"), ("u2", "y", 5, "view"),
        ("u2", "unknown", 6, "view"),
    ])
    vocab = ItemVocab(["", "x", "y"])
    seqs = user_sequences(df, vocab)
    assert seqs["u1"].tolist() == [1, 2, 1]  # funnel x,x,x is one step; x again later counts
    assert seqs["u2"].tolist() == [2]  # unknown item dropped


def test_windows_left_pad_most_recent_last():
    assert windows(np.array([5, 6, 7, 8]), 3).tolist() == [[0, 0, 5], [0, 5, 6], [5, 6, 7]]


def test_leave_last_out_holds_out_the_last_two_steps():
    split = leave_last_out({"a": np.array([1, 2, 3, 4, 5]), "b": np.array([1, 2])}, 3)
    assert split.train["a"].tolist() == [1, 2, 3] and split.train["b"].tolist() == [1, 2]
    assert split.valid.users == ["a"]
    assert split.valid.history.tolist() == [[1, 2, 3]] and split.valid.target.tolist() == [4]
    assert split.test.history.tolist() == [[2, 3, 4]] and split.test.target.tolist() == [5]
    history, target = split.train_examples(3)
    assert history.tolist() == [[0, 0, 1], [0, 1, 2], [0, 0, 1]]
    assert target.tolist() == [2, 3, 2]
    # No held-out event leaks into training.
    assert split.train_item_counts(6).tolist() == [0, 2, 2, 1, 0, 0]


def test_kcore_and_partitions():
    df = _table([("u1", "a", 1, "view"), ("u1", "b", 2, "view"), ("u2", "a", 3, "view"),
                 ("u2", "b", 4, "view"), ("u3", "a", 5, "view")])
    core = kcore(df, 2)
    assert sorted(core["user"].unique()) == ["u1", "u2"]
    parts = partition_by_user(df)
    assert list(parts) == ["u1", "u2", "u3"]
    assert parts["u1"]["timestamp"].tolist() == [1, 2]


def _baskets_table():
    """u1: three invoices (t=10: a b, t=20: c a, t=30: d e b); u2: one invoice only."""
    return _table([
        ("u1", "a", 10, "purchase"), ("u1", "b", 10, "purchase"),
        ("u1", "c", 20, "purchase"), ("u1", "a", 20, "purchase"),
        ("u1", "d", 30, "purchase"), ("u1", "e", 30, "purchase"), ("u1", "b", 30, "purchase"),
        ("u2", "a", 40, "purchase"), ("u2", "c", 40, "purchase"), ("u2", "d", 40, "purchase"),
    ])


def test_basket_holdout_keeps_every_test_basket_out_of_training():
    from trainer.data.split import basket_holdout, baskets_share, last_baskets, timed_user_sequences

    df = _baskets_table()
    vocab = ItemVocab.from_items(df["item"])
    ids = {k: vocab.id_of(k) for k in "abcde"}
    split = basket_holdout(timed_user_sequences(df, vocab), last_baskets(df, vocab), max_len=4)
    assert split.holdout == "basket" and split.test.users == ["u1"]
    # u1: a b c a | d e b. Valid = the last step before the basket (a), trained on a b c.
    assert split.train["u1"].tolist() == [ids["a"], ids["b"], ids["c"]]
    assert split.valid.target.tolist() == [ids["a"]]
    assert split.valid.history[0].tolist() == [0, ids["a"], ids["b"], ids["c"]]
    assert split.test.target.tolist() == [ids["b"]]  # the last line, history: all before it
    assert split.test.history[0].tolist() == [ids["c"], ids["a"], ids["d"], ids["e"]]
    assert sorted(split.basket.baskets[0].tolist()) == sorted([ids["d"], ids["e"], ids["b"]])
    assert split.basket.history[0].tolist() == [ids["a"], ids["b"], ids["c"], ids["a"]]
    assert split.train["u2"].tolist() == [ids["a"], ids["c"], ids["d"]]  # one basket: trains
    assert baskets_share(df) == 1.0
    assert baskets_share(df.assign(timestamp=range(len(df)))) == 0.0


def test_auto_holdout_picks_baskets_only_for_basket_data(tmp_path):
    from trainer.data.dataset import DataSpec, prepare

    path = tmp_path / "shop.csv"
    _baskets_table().to_csv(path, index=False)
    assert prepare(DataSpec(path=str(path)), max_len=4).split.holdout == "basket"
    assert prepare(DataSpec(path=str(path), holdout="line"), max_len=4).split.holdout == "line"
    synthetic = DataSpec(synthetic_users=40, synthetic_items=30)
    assert prepare(synthetic, max_len=4).split.holdout == "line"
    with pytest.raises(ValueError, match="holdout"):
        DataSpec(holdout="nope")


def test_train_sequences_hold_the_same_steps_as_the_windows():
    rng = np.random.default_rng(0)
    train = {f"u{i}": rng.integers(1, 20, size=n) for i, n in enumerate([1, 2, 7, 13, 30])}
    split = leave_last_out(train, max_len=5)
    history, target = split.train_examples(5)
    inputs, targets = split.train_sequences(5)
    assert inputs.shape == targets.shape and inputs.shape[1] == 5
    assert sorted(targets[targets > 0].tolist()) == sorted(target.tolist())
    # Every chunk's last position is exactly the serving window of that step.
    last = {(tuple(h), t) for h, t in zip(history.tolist(), target.tolist(), strict=True)}
    assert all((tuple(i), t[-1]) in last for i, t in zip(inputs.tolist(), targets.tolist(),
                                                         strict=True))
    assert ((inputs > 0) == (targets > 0)).all()  # a target exactly where there is an input


def test_basket_metrics_and_item_knn():
    from trainer.baselines import ItemKNN
    from trainer.metrics import basket_metrics

    got = basket_metrics(np.array([[1, 2, 3], [4, 5, 6]]), [np.array([2, 9]), np.array([7])], 3)
    ideal = 1 + 1 / np.log2(3)
    assert got["basket_hr@3"] == 0.5
    assert got["basket_recall@3"] == pytest.approx(0.25)
    assert got["basket_ndcg@3"] == pytest.approx((1 / np.log2(3)) / ideal / 2)
    # Items bought by the same customers are neighbours; 3 and 4 never co-occur with 1.
    knn = ItemKNN({"u1": np.array([1, 2]), "u2": np.array([1, 2, 3]), "u3": np.array([4, 3])}, 5)
    top = knn.topk(np.array([[0, 0, 1]]), 3)[0].tolist()
    assert top[:2] == [1, 2] and 4 not in top
