"""The evaluation's baselines on real data (a slice of Online Retail, the synthetic shop):
personal popularity, recency item-KNN with neighbour pruning, TIFU-KNN, and their tuning on
validation only."""

from dataclasses import replace

import numpy as np
import pytest

from device_sdk.item_vocab import ItemVocab
from tests.support.paths import ONLINE_RETAIL
from trainer.baselines import (
    TIFUKNN,
    PersonalPopularity,
    RecencyItemKNN,
    basket_vectors,
    popularity_prior,
)
from trainer.data import loaders
from trainer.data.dataset import DataSpec, holdout_split, prepare, set_popular
from trainer.data.split import BasketSet, EvalSet, last_window, timed_user_sequences
from trainer.evaluate import SETTINGS, evaluate
from trainer.metrics import repeat_share

L = 30


@pytest.fixture(scope="module")
def retail():
    """The first 400 customers of Online Retail, whole last baskets held out."""
    df = loaders.load(ONLINE_RETAIL)
    keep = sorted(df["user"].unique())[:400]
    df = df[df["user"].isin(keep)].reset_index(drop=True)
    vocab = ItemVocab.from_items(df["item"])
    split, _ = holdout_split(df, vocab, "basket", L)
    set_popular(vocab, split)
    return split, vocab


def _counts(split, n_items):
    return split.train_item_counts(n_items)


def test_personal_popularity_ranks_the_most_bought_item_first_then_own_then_popular(retail):
    split, vocab = retail
    n = len(vocab)
    ranker = PersonalPopularity(_counts(split, n))
    top = ranker.topk(split.test, 50, decay=1.0)
    prior = popularity_prior(_counts(split, n))
    checked = 0
    for row, history in zip(top, split.test.history, strict=True):
        items, counts = np.unique(history[history > 0], return_counts=True)
        if counts.max() < 2 or len(items) > 40:
            continue
        checked += 1
        assert counts[items == row[0]][0] == counts.max()  # a most repeated item first
        own = np.isin(row, items)
        first_other = np.argmin(own) if not own.all() else len(row)
        assert own[:first_other].all() and not own[first_other:].any()  # own items first
        others = row[first_other:]
        assert (np.diff(prior[others]) < 0).all()  # then by popularity
    assert checked > 50


def test_personal_popularity_decay_prefers_the_recent_of_two_equal_counts(retail):
    split, vocab = retail
    ranker = PersonalPopularity(_counts(split, len(vocab)))
    a, b = split.test.target[:2]  # two real items, each bought twice below
    history = np.zeros((1, L), dtype=np.int32)
    history[0, -4:] = [a, b, a, b]  # b is the more recent
    rows = EvalSet(["x"], history, np.array([a]))
    assert ranker.topk(rows, 5, decay=0.9)[0, 0] == b
    assert ranker.topk(rows, 5, decay=0.9)[0, 1] == a
    with pytest.raises(ValueError, match="decay"):
        ranker.topk(rows, 5, decay=0.0)


def test_item_knn_keeps_at_most_k_neighbours_the_largest_ones_and_itself(retail):
    split, vocab = retail
    knn = RecencyItemKNN(split.train, _counts(split, len(vocab)))
    full = knn.similarity
    for k in (1, 5, 20):
        pruned = knn.neighbours_matrix(k)
        nnz = np.diff(pruned.indptr)
        assert nnz.max() <= k
        for item in np.flatnonzero(np.diag(full) > 0)[:200]:
            kept = pruned.indices[pruned.indptr[item]:pruned.indptr[item + 1]]
            assert item in kept  # itself always, even where another item ties at 1
            dropped = np.setdiff1d(np.flatnonzero(full[item] > 0), kept)
            if len(dropped):
                assert full[item, kept].min() >= full[item, dropped].max()
    with pytest.raises(ValueError, match="neighbours"):
        knn.neighbours_matrix(0)


def test_recency_item_knn_window_one_scores_only_the_last_items_neighbours(retail):
    split, vocab = retail
    knn = RecencyItemKNN(split.train, _counts(split, len(vocab)))
    h = split.test.history[:64]
    got = knn.scores(h, None, split.test.users[:64], window=1, decay=0.5)
    want = knn.similarity[h[:, -1]]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_basket_vectors_are_the_decayed_mean_of_binary_baskets():
    # baskets {1, 2} (2 twice), {3}, {2}: ages 2, 1, 0; weights 0.25, 0.5, 1 over 1.75
    seq = np.array([1, 2, 2, 3, 2])
    times = np.array([10, 10, 10, 20, 30])
    v = basket_vectors([seq], [times], 5, decay=0.5).toarray()[0]
    np.testing.assert_allclose(v, [0, 0.25 / 1.75, 1.25 / 1.75, 0.5 / 1.75, 0])
    flat = basket_vectors([seq], None, 5, decay=1.0).toarray()[0]  # no times: one per step
    np.testing.assert_allclose(flat, [0, 0.2, 0.6, 0.2, 0])


def test_tifu_at_alpha_one_is_the_users_own_decayed_vector(retail):
    split, vocab = retail
    n = len(vocab)
    tifu = TIFUKNN(split.train, split.train_times, _counts(split, n))
    rows = split.basket
    got = tifu.scores(rows.history, rows.times, rows.users, decay=0.8, neighbours=10, alpha=1.0)
    seqs = [h[h > 0] for h in rows.history]
    stamps = [t[h > 0] for h, t in zip(rows.history, rows.times, strict=True)]
    np.testing.assert_allclose(got, basket_vectors(seqs, stamps, n, 0.8).toarray())
    mixed = tifu.scores(rows.history, rows.times, rows.users, decay=0.8, neighbours=10,
                        alpha=0.5)
    assert not np.allclose(mixed, got)  # the neighbours do move the scores


def test_tifu_never_takes_a_user_as_its_own_neighbour(retail):
    split, vocab = retail
    n = len(vocab)
    tifu = TIFUKNN(split.train, split.train_times, _counts(split, n))
    # a customer whose whole training history fits the window: its history vector is its
    # own pool vector, at distance 0, so it would be its own nearest neighbour
    user = next(u for u in split.test.users if 5 <= len(split.train[u]) <= L)
    seq, times = split.train[user], split.train_times[user]
    history = last_window(seq, L)[None, :]
    stamps = last_window(times, L, np.int64)[None, :]
    own = basket_vectors([seq], [times], n, 1.0).toarray()
    as_stranger = tifu.scores(history, stamps, ["not in the pool"], decay=1.0, neighbours=1,
                              alpha=0.0)
    np.testing.assert_allclose(as_stranger, own)  # the pool's copy of itself is nearest
    as_itself = tifu.scores(history, stamps, [user], decay=1.0, neighbours=1, alpha=0.0)
    assert not np.allclose(as_itself, own)


def test_the_validation_basket_is_the_one_before_the_test_basket_fitted_before_it(retail):
    split, vocab = retail
    sequences = timed_user_sequences(loaders.load(ONLINE_RETAIL), vocab)
    valid = split.basket_valid
    assert 0 < len(valid) <= len(split.basket)
    train, times = split.train_before(valid)
    test_row = {u: i for i, u in enumerate(split.basket.users)}
    for row, user in enumerate(valid.users):
        ids, stamps = sequences[user]
        start = valid.train_len[row]
        end = int(np.searchsorted(stamps, stamps[start], side="right"))
        np.testing.assert_array_equal(train[user], ids[:start])  # fitted before the basket
        assert stamps[start - 1] < stamps[start] < stamps[end]  # a whole basket of its own
        np.testing.assert_array_equal(valid.baskets[row], np.unique(ids[start:end]))
        # the test basket is next (its first item may have collapsed into the step before,
        # when both baskets hold it: consecutive repeats are one step)
        assert np.isin(ids[end:], split.basket.baskets[test_row[user]]).all()
        np.testing.assert_array_equal(valid.history[row], last_window(ids[:start], L))
    untouched = set(split.train) - set(valid.users)
    assert all(np.array_equal(train[u], split.train[u]) for u in untouched)


def test_tuning_reads_validation_only_so_new_test_labels_leave_the_picks_unchanged(retail):
    split, vocab = retail
    n = len(vocab)
    before = evaluate(split, n, vocab.popular)
    rng = np.random.default_rng(0)
    test = split.test
    fake_test = EvalSet(test.users, rng.integers(1, n, size=test.history.shape, dtype=np.int32),
                        rng.integers(1, n, size=len(test), dtype=np.int32), test.times)
    fake_basket = BasketSet(split.basket.users, split.basket.history[::-1].copy(),
                            [rng.integers(1, n, size=3).astype(np.int32)
                             for _ in split.basket.baskets], split.basket.times)
    after = evaluate(replace(split, test=fake_test, basket=fake_basket), n, vocab.popular)
    assert [t.tried for *_, t in before.tunings] == [t.tried for *_, t in after.tunings]
    assert [r[SETTINGS] for r in before.rows] == [r[SETTINGS] for r in after.rows]
    assert {p for _, p, _ in before.tunings} == {"line", "basket"}
    tuned = [r for r in before.rows if r[SETTINGS] != "-"]
    assert len(tuned) == 3
    for old, new in zip(before.rows, after.rows, strict=True):
        assert old["hr@10"] != new["hr@10"] or old["basket_recall@10"] != new[
            "basket_recall@10"]  # the test labels did change what was measured


def test_tuned_baselines_beat_popularity_on_the_synthetic_shop():
    prepared = prepare(DataSpec(synthetic_users=300, synthetic_items=150), max_len=20)
    result = evaluate(prepared.split, len(prepared.vocab), prepared.vocab.popular)
    rows = {r["model"]: r for r in result.rows}
    assert set(rows) == {"popularity", "item-knn", "personal popularity", "recency item-knn",
                         "tifu-knn"}
    for name in ("personal popularity", "recency item-knn", "tifu-knn"):
        assert rows[name]["hr@10"] > rows["popularity"]["hr@10"]
        assert rows[name][SETTINGS].endswith("| -")  # no baskets in the synthetic shop
    assert all(r["basket_hr@10"] == "-" for r in result.rows)
    assert {p for _, p, _ in result.tunings} == {"line"}


def test_bad_histories_are_refused_by_name(retail):
    split, vocab = retail
    ranker = PersonalPopularity(_counts(split, len(vocab)))
    flat = EvalSet(["u"], np.array([1, 2, 3]), np.array([1]))
    with pytest.raises(ValueError, match=r"history must be \[U, L\]"):
        ranker.topk(flat, 5)
    outside = EvalSet(["u"], np.array([[1, len(vocab)]]), np.array([1]))
    with pytest.raises(ValueError, match="history ids"):
        ranker.topk(outside, 5)
    with pytest.raises(ValueError, match="alpha"):
        TIFUKNN(split.train, None, _counts(split, len(vocab))).topk(split.test, 5, alpha=2.0)


def test_repeat_share_of_buy_it_again_is_its_own_items_up_to_ten(retail):
    split, vocab = retail
    top = PersonalPopularity(_counts(split, len(vocab))).topk(split.test, 10)
    distinct = np.array([len(np.unique(h[h > 0])) for h in split.test.history])
    assert repeat_share(top, split.test.history, 10) == pytest.approx(
        np.mean(np.minimum(distinct, 10) / 10))
    new_only = np.tile(np.setdiff1d(np.arange(1, len(vocab)), split.test.history[0])[:10],
                       (1, 1))
    assert repeat_share(new_only, split.test.history[:1], 10) == 0.0
    with pytest.raises(ValueError, match="same U"):
        repeat_share(top[:3], split.test.history[:2], 10)
