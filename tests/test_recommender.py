"""Recommender: history policy, filtering, fallback, golden check refusal, threads — on the real
exported tiny model, the real LiteRT interpreter and a real SQLite event log."""

import threading

import pytest

from device_sdk.bundle import GoldenCheckError, load_bundle
from device_sdk.event_log import EventLog
from device_sdk.recommender import HistoryPolicy, Recommender, history_ids
from tests.support.bundles import public_raw, resign_bundle


def _id_of(key):
    return int(key[1:]) if key.startswith("i") else 0


def test_purchases_only_give_the_last_distinct_items_most_recent_last():
    events = [("i1", "purchase"), ("i2", "purchase"), ("i1", "purchase"),
              ("i3", "purchase"), ("i4", "purchase")]
    assert history_ids(events, _id_of, 3, HistoryPolicy()).tolist() == [1, 3, 4]
    assert history_ids(events, _id_of, 6, HistoryPolicy()).tolist() == [0, 0, 2, 1, 3, 4]


def test_dismiss_removes_and_unknown_items_are_ignored():
    events = [("i1", "view"), ("i2", "view"), ("i1", "dismiss"), ("zz", "purchase"),
              ("i3", "click")]
    assert history_ids(events, _id_of, 4, HistoryPolicy()).tolist() == [0, 0, 2, 3]
    # a positive event after the dismiss brings the item back
    events = [("i1", "view"), ("i1", "dismiss"), ("i1", "add_to_cart")]
    assert history_ids(events, _id_of, 2, HistoryPolicy()).tolist() == [0, 1]


def test_a_strong_old_event_outlasts_newer_views():
    pairs = [("i1", "purchase")] + [(f"i{n}", "view") for n in range(2, 8)]
    chosen = history_ids(pairs, _id_of, 3, HistoryPolicy())
    assert chosen.tolist() == [1, 6, 7]
    equal = HistoryPolicy(weights={"purchase": 1.0, "view": 1.0})
    assert history_ids(pairs, _id_of, 3, equal).tolist() == [5, 6, 7]


@pytest.fixture
def rec(signed_bundles, server_key):
    return Recommender(load_bundle(signed_bundles[1], public_key=public_raw(server_key)))


@pytest.fixture
def user_log(tmp_path, tiny_checkpoint):
    """A real event log holding one synthetic test user's history as purchases."""
    _, prepared = tiny_checkpoint
    keys = [prepared.vocab.keys[i] for i in prepared.split.test.history[0] if i]
    log = EventLog(tmp_path / "events.db")
    log.log_many([(key, "view", 1000.0 + n) for n, key in enumerate(keys)])
    yield log, keys
    log.close()


def test_recommend_matches_the_model_minus_exclusions(rec, user_log):
    log, keys = user_log
    assert log.recent_pairs(7) == [(e.item, e.kind) for e in log.recent(7)]
    assert log.recent_triples(7) == [(e.item, e.kind, e.ts) for e in log.recent(7)]
    ids, scores = rec.model.topk(rec.history(log))
    expected = [rec.vocab.keys[i] for i in ids]
    got = rec.recommend(log, k=10)
    assert [r.item for r in got] == expected[:10]
    assert all(r.source == "model" for r in got)
    assert [r.score for r in got] == pytest.approx(scores[:10].tolist())

    bought, dismissed = expected[0], expected[1]
    log.log(bought, "purchase")
    log.log(dismissed, "dismiss")
    after = [r.item for r in rec.recommend(log, k=10)]
    assert bought not in after and dismissed not in after and len(after) == 10


def test_candidate_filter_and_top_up_from_popularity(rec, user_log):
    log, _ = user_log
    in_stock = set(rec.vocab.keys[1::2])
    got = rec.recommend(log, k=8, candidates=in_stock)
    assert len(got) == 8 and all(r.item in in_stock for r in got)
    assert rec.recommend(log, k=8, candidates=lambda key: key in in_stock) == got
    many = rec.recommend(log, k=rec.model.k + 15)
    items = [r.item for r in many]
    assert len(items) == len(set(items)) == rec.model.k + 15
    assert {r.source for r in many} == {"model", "popular"}


def test_empty_history_falls_back_to_popularity(rec, tmp_path):
    with EventLog(tmp_path / "empty.db") as log:
        got = rec.recommend(log, k=5)
        assert [r.item for r in got] == [rec.vocab.keys[i] for i in rec.vocab.popular[:5]]
        assert all(r.source == "popular" and r.score is None for r in got)
        log.log("not-in-catalogue", "view")  # unknown items do not make a history
        assert rec.recommend(log, k=5) == got


def test_a_model_failing_its_golden_check_is_refused(tiny_export, server_key, tmp_path):
    bundle = load_bundle(tiny_export.bundle_dir)
    golden = dict(bundle.manifest["golden"])
    golden["ids"] = [[(i % 5) + 1 for i in range(len(row))] for row in golden["ids"]]
    bad = resign_bundle(tiny_export.bundle_dir, tmp_path / "bad", server_key, golden=golden)
    with pytest.raises(GoldenCheckError, match="overlap"):
        Recommender(load_bundle(bad, public_key=public_raw(server_key)))


def test_threads_share_one_recommender(rec, user_log):
    log, _ = user_log
    expected = rec.recommend(log, k=10)
    results, errors = [], []

    def work():
        try:
            results.extend(rec.recommend(log, k=10) == expected for _ in range(100))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 600 and all(results)


def test_k_must_be_positive(rec, user_log):
    with pytest.raises(ValueError, match="k must be"):
        rec.recommend(user_log[0], k=0)



def test_exclusions_follow_appends_retention_and_forget(rec, tmp_path):
    """The recommender caches per-log state; every kind of change to the log must show."""
    every = len(rec.vocab)
    bought = rec.vocab.keys[rec.vocab.popular[0]]
    with EventLog(tmp_path / "r.db", max_rows=3) as log:
        log.log(bought, "purchase", ts=1000.0)
        assert bought not in {r.item for r in rec.recommend(log, k=every)}
        assert rec.recommend(log, k=every) == rec.recommend(log, k=every)  # cached path
        for n, key in enumerate(rec.vocab.keys[5:8]):
            log.log(key, "view", ts=2000.0 + n)
        dismissed = rec.vocab.keys[9]
        log.log(dismissed, "dismiss", ts=3000.0)  # an append after a cached request
        items = {r.item for r in rec.recommend(log, k=every)}
        assert bought not in items and dismissed not in items
        assert log.apply_retention() == 2  # the purchase ages out of the log ...
        items = {r.item for r in rec.recommend(log, k=every)}
        assert bought in items and dismissed not in items  # ... and is recommendable again
        log.forget()
        assert [r.item for r in rec.recommend(log, k=3)] == [
            rec.vocab.keys[i] for i in rec.vocab.popular[:3]
        ]
