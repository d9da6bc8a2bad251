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
