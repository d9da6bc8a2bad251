"""EventLog on real SQLite files: round trips, validation, migrations, retention, export,
forget and threads (kill -9 durability: test_device_faults.py)."""

from __future__ import annotations

import io
import json
import math
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from device_sdk.event_log import (
    EVENT_KINDS,
    SCHEMA_VERSION,
    Event,
    EventLog,
    EventLogError,
    SchemaVersionError,
)

T0 = 1_700_000_000.0  # a fixed "now" (Unix seconds) so tests never depend on the clock


@pytest.fixture
def log(tmp_path):
    with EventLog(tmp_path / "events.db") as ev_log:
        yield ev_log


def indexes(conn: sqlite3.Connection) -> dict[str, list[str]]:
    names = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'")]
    return {n: [r[2] for r in conn.execute(f"PRAGMA index_info({n})")] for n in names}


# ---------------------------------------------------------------------------- round trips


def test_single_log_round_trip(log):
    id1 = log.log("sku-1", "click", ts=T0 + 0.125, context={"screen": "home", "pos": 3})
    id2 = log.log("sku-2")  # kind defaults to view, ts to now
    assert id2 > id1
    first, second = log.recent(10)
    assert first == Event(id1, T0 + 0.125, "click", "sku-1", {"screen": "home", "pos": 3})
    assert (second.id, second.kind, second.item, second.context) == (id2, "view", "sku-2", None)
    assert isinstance(second.ts, float) and abs(second.ts - time.time()) < 3600
    assert log.count() == 2


def test_log_many_accepts_tuples_dicts_and_events(log):
    ctx = {"q": "red shoes", "nested": {"a": [1, 2.5, None, True]}, "ü": "ß"}
    n = log.log_many([
        ("a", "view"),
        ("b", "click", T0 + 2),
        ["c", "add_to_cart", T0 + 3, ctx],
        {"item": "d", "kind": "purchase", "ts": T0 + 4, "context": {"price": 9.99}},
        {"item": "e", "kind": "dismiss"},
        Event(id=12345, ts=T0 + 6, kind="view", item="f", context=None),  # id is ignored
    ])
    assert n == 6
    got = {e.item: e for e in log.events()}
    assert set(got) == set("abcdef")
    assert got["c"].context == ctx and got["c"].ts == T0 + 3 and got["c"].kind == "add_to_cart"
    assert got["d"].context == {"price": 9.99}
    assert got["f"].id != 12345
    assert log.log_many([]) == 0
    assert log.count() == 6


def test_ordering_is_by_ts_then_id_and_recent_is_newest_last(log):
    log.log("late", ts=T0 + 30)
    log.log("early", ts=T0 + 10)
    tie_a = log.log("tie-a", ts=T0 + 20)
    tie_b = log.log("tie-b", ts=T0 + 20)
    log.log_many([("mid", "purchase", T0 + 15), ("latest", "purchase", T0 + 40)])
    order = ["early", "mid", "tie-a", "tie-b", "late", "latest"]
    assert [e.item for e in log.events()] == order
    assert [e.item for e in log.recent(3)] == order[-3:]
    assert [e.item for e in log.recent(100)] == order
    assert log.recent(0) == []
    assert [e.item for e in log.recent(5, kinds=["purchase"])] == ["mid", "latest"]
    assert [e.item for e in log.recent(1, kinds="view")] == ["late"]
    assert [e.item for e in log.events(kinds=["purchase"])] == ["mid", "latest"]
    assert [e.id for e in log.events() if e.item.startswith("tie")] == [tie_a, tie_b]


def test_events_streams_across_chunks_with_ties_and_since_id(log):
    # 2,500 rows, most sharing one timestamp, so chunk boundaries (1,000) fall inside ties.
    batch = [(f"i{k}", "click" if k % 5 == 0 else "view", T0 + (k // 2000)) for k in range(2500)]
    log.log_many(batch)
    got = list(log.events())
    assert [e.item for e in got] == [b[0] for b in batch]
    assert [(e.ts, e.id) for e in got] == sorted((e.ts, e.id) for e in got)
    cut = got[1700].id
    assert [e.id for e in log.events(since_id=cut)] == [e.id for e in got if e.id > cut]
    clicks = list(log.events(kinds=["click"]))
    assert [e.item for e in clicks] == [b[0] for b in batch if b[1] == "click"]
    assert list(log.events(since_id=got[-1].id)) == []


def test_extra_kinds(tmp_path):
    with EventLog(tmp_path / "a.db", extra_kinds=["share", "wishlist", "view"]) as ev_log:
        assert ev_log.kinds == (*EVENT_KINDS, "share", "wishlist")
        ev_log.log("x", "share", ts=T0)
        ev_log.log_many([("y", "wishlist", T0 + 1)])
        assert [(e.item, e.kind) for e in ev_log.recent(5)] == [("x", "share"), ("y", "wishlist")]
        assert ev_log.items_with_kinds(["share"]) == {"x"}
    with EventLog(tmp_path / "a.db") as plain:
        assert plain.kinds == EVENT_KINDS
        assert plain.count() == 2  # stored rows are still readable
        with pytest.raises(EventLogError, match="'share' is not one of"):
            plain.log("z", "share")


# ---------------------------------------------------------------------------- validation

BAD_LOG_CALLS = [
    ({"item": ""}, "non-empty"),
    ({"item": "x" * 257}, "257 chars"),
    ({"item": 42}, "item must be a str"),
    ({"item": None}, "item must be a str"),
    ({"item": "a", "kind": "buy"}, "kind 'buy' is not one of view, click"),
    ({"item": "a", "kind": None}, "kind None is not one of"),
    ({"item": "a", "kind": ["view"]}, r"kind \['view'\] is not one of"),
    ({"item": "a", "ts": math.nan}, "ts must be"),
    ({"item": "a", "ts": math.inf}, "ts must be"),
    ({"item": "a", "ts": -5.0}, "ts must be"),
    ({"item": "a", "ts": 0}, "ts must be"),
    ({"item": "a", "ts": "2024-01-01"}, "ts must be"),
    ({"item": "a", "ts": True}, "ts must be"),
    ({"item": "a", "context": ["not", "a", "dict"]}, "context must be a dict"),
    ({"item": "a", "context": {"f": object()}}, "not JSON-serializable"),
    ({"item": "a", "context": {"f": math.nan}}, "not JSON-serializable"),
    ({"item": "a", "context": {3: "int key"}}, "keys must be str"),
    ({"item": "a", "context": {"blob": "x" * 4096}}, "more than 4096"),
    ({"item": "a", "context": {"blob": "€" * 1400}}, "more than 4096"),  # 3 bytes a char
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_LOG_CALLS)
def test_bad_single_event_raises_and_stores_nothing(log, kwargs, message):
    log.log("kept", ts=T0)
    with pytest.raises(EventLogError, match=message) as info:
        log.log(**kwargs)
    assert info.value.code == "bad_event"
    assert isinstance(info.value, ValueError)
    assert [e.item for e in log.events()] == ["kept"]


def test_limits_are_inclusive(log):
    log.log("x" * 256, ts=T0, context={"blob": "y" * 4000})
    log.log("y", ts=1e-3)  # tiny but positive, and an int-like float
    log.log("z", ts=int(T0))  # ints are accepted and read back as floats

    class Key(str):
        pass

    log.log(Key("sub"), ts=T0 + 1)  # str subclasses are stored as plain str
    assert [e.ts for e in log.events()] == [1e-3, T0, T0, T0 + 1]
    assert [type(e.item) for e in log.events()] == [str] * 4
    assert all(isinstance(e.ts, float) for e in log.events())


@pytest.mark.parametrize(("kwargs", "message"), BAD_LOG_CALLS)
def test_bad_event_in_batch_stores_nothing(log, kwargs, message):
    log.log_many([("old-1", "view", T0), ("old-2", "click", T0 + 1)])
    good = [("new-1", "view", T0 + 2), {"item": "new-2", "kind": "view"}]
    bad = {"kind": "view", **kwargs}
    with pytest.raises(EventLogError, match=f"^event 2: .*{message}"):
        log.log_many(good + [bad] + [("new-4", "view")])
    assert [e.item for e in log.events()] == ["old-1", "old-2"]


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (("only-item",), "got 1 fields"),
        (("a", "view", T0, None, "extra"), "got 5 fields"),
        ({"item": "a"}, "needs 'item' and 'kind'"),
        ({"item": "a", "kind": "view", "timestamp": T0}, "unknown keys"),
        ("a-string", "expected a tuple"),
        (("a", "buy", T0), "kind 'buy'"),  # the fast path hands failures to the full checks
        (("a", "view", -1.0), "ts must be"),
    ],
)
def test_malformed_batch_elements(log, event, message):
    with pytest.raises(EventLogError, match=f"^event 1: .*{message}"):
        log.log_many(iter([("fine", "view"), event]))
    assert log.count() == 0


def test_bad_query_and_constructor_arguments(tmp_path, log):
    with pytest.raises(EventLogError, match="'purchased' is not one of"):
        log.items_with_kinds(["purchased"])
    with pytest.raises(EventLogError, match="'bought'"):
        log.recent(5, kinds=["bought"])
    with pytest.raises(EventLogError, match="limit"):
        log.recent(-1)
    with pytest.raises(EventLogError, match="now must be"):
        log.apply_retention(now=math.nan)
    with pytest.raises(ValueError, match="durability"):
        EventLog(tmp_path / "b.db", durability="fast")
    with pytest.raises(ValueError, match="max_rows"):
        EventLog(tmp_path / "b.db", max_rows=0)
    with pytest.raises(ValueError, match="max_age_days"):
        EventLog(tmp_path / "b.db", max_age_days=-1)


# ---------------------------------------------------------------------------- schema


def test_new_database_is_current_wal_and_indexed(tmp_path):
    path = tmp_path / "new.db"
    with EventLog(path, durability="full") as ev_log:
        assert ev_log.schema_version == SCHEMA_VERSION == 2
        ev_log.log("a", ts=T0)
        assert ev_log._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with EventLog(path) as normal:
        assert normal._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent
    assert indexes(conn) == {"events_ts_id": ["ts", "id"], "events_kind_item": ["kind", "item"]}
    conn.close()
    with EventLog(path) as again:  # reopening migrates nothing and keeps the rows
        assert again.schema_version == 2 and again.count() == 1


def test_migrates_v1_database(tmp_path):
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE events(id INTEGER PRIMARY KEY, ts REAL, kind TEXT, item TEXT,"
                 " context TEXT)")
    conn.executemany("INSERT INTO events (ts, kind, item, context) VALUES (?, ?, ?, ?)", [
        (T0 + 2, "view", "b", None),
        (T0 + 1, "purchase", "a", '{"qty":2}'),
        (T0 + 3, "dismiss", "c", None),
    ])
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()

    with EventLog(path) as ev_log:
        assert ev_log.schema_version == 2
        assert [(e.item, e.kind, e.ts, e.context) for e in ev_log.events()] == [
            ("a", "purchase", T0 + 1, {"qty": 2}),
            ("b", "view", T0 + 2, None),
            ("c", "dismiss", T0 + 3, None),
        ]
        ev_log.log("d", "click", ts=T0 + 4)
        assert ev_log.items_with_kinds(["purchase", "dismiss"]) == {"a", "c"}
    conn = sqlite3.connect(path)
    assert set(indexes(conn)) == {"events_ts_id", "events_kind_item"}
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 4
    conn.close()


def test_newer_schema_is_refused_and_file_untouched(tmp_path):
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE events(id INTEGER PRIMARY KEY, ts REAL, payload BLOB)")
    conn.execute("INSERT INTO events (ts, payload) VALUES (1.0, x'00ff')")
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    before = path.read_bytes()

    with pytest.raises(SchemaVersionError, match="version 99, newer than this SDK's 2") as info:
        EventLog(path)
    assert info.value.code == "schema_too_new"
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["future.db"]  # no WAL either


# ---------------------------------------------------------------------------- retention


def test_retention_by_age(tmp_path):
    now = T0 + 30 * 86400
    with EventLog(tmp_path / "r.db", max_age_days=7) as ev_log:
        # One event every 6 hours for 30 days, logged out of time order.
        stamps = [T0 + h * 3600 for h in range(0, 30 * 24, 6)]
        random.Random(3).shuffle(stamps)
        ev_log.log_many((f"e{ts:.0f}", "view", ts) for ts in stamps)
        cutoff = now - 7 * 86400
        expected_gone = sum(ts < cutoff for ts in stamps)
        assert ev_log.apply_retention(now=now, chunk=7) == expected_gone  # many chunks
        left = [e.ts for e in ev_log.events()]
        assert len(left) == len(stamps) - expected_gone
        assert min(left) >= cutoff
        assert ev_log.apply_retention(now=now) == 0


def test_retention_by_rows_drops_oldest_first(tmp_path):
    with EventLog(tmp_path / "r.db", max_rows=100) as ev_log:
        stamps = [T0 + k for k in range(250)]
        random.Random(4).shuffle(stamps)
        ev_log.log_many((f"e{ts:.0f}", "view", ts) for ts in stamps)
        assert ev_log.count() == 250
        assert ev_log.apply_retention(now=T0, chunk=30) == 150
        assert [e.ts for e in ev_log.events()] == [T0 + k for k in range(150, 250)]


def test_retention_runs_automatically_every_1000_inserts(tmp_path):
    with EventLog(tmp_path / "r.db", max_rows=50, max_age_days=1) as ev_log:
        old = time.time() - 5 * 86400
        ev_log.log("ancient", ts=old)
        for k in range(998):
            ev_log.log(f"s{k}")
        assert ev_log.count() == 999  # no check before the 1000th insert
        ev_log.log("s998")
        assert ev_log.count() == 50
        assert "ancient" not in {e.item for e in ev_log.events()}
        ev_log.log_many((f"b{k}", "click") for k in range(1200))
        assert ev_log.count() == 50
        assert [e.item for e in ev_log.recent(50)] == [f"b{k}" for k in range(1150, 1200)]


# ---------------------------------------------------------------------------- queries


def test_items_with_kinds_filters_candidates_with_an_index(log):
    log.log_many([
        ("bought", "purchase", T0), ("bought", "view", T0 + 1), ("nope", "dismiss", T0 + 2),
        ("looked", "view", T0 + 3), ("carted", "add_to_cart", T0 + 4),
    ])
    assert log.items_with_kinds(["purchase", "dismiss"]) == {"bought", "nope"}
    assert log.items_with_kinds(["purchase", "dismiss"], among=["looked", "nope", "x"]) == {"nope"}
    assert log.items_with_kinds("add_to_cart") == {"carted"}
    assert log.items_with_kinds(["purchase"], among=[]) == set()
    assert log.items_with_kinds([]) == set()
    many = [f"c{k}" for k in range(1200)] + ["bought"]  # more keys than one statement takes
    assert log.items_with_kinds(["purchase"], among=many) == {"bought"}

    # The statement actually run is an index seek on (kind, item), not a table scan.
    statements = []
    log._conn.set_trace_callback(statements.append)
    try:
        log.items_with_kinds(["purchase", "dismiss"], among=[f"k{i}" for i in range(50)])
    finally:
        log._conn.set_trace_callback(None)
    (sql,) = [s for s in statements if s.startswith("SELECT")]
    plan = " ".join(r[3] for r in sqlite3.connect(log.path).execute("EXPLAIN QUERY PLAN " + sql))
    assert "USING COVERING INDEX events_kind_item (kind=? AND item=?)" in plan
    assert "SCAN" not in plan


# ---------------------------------------------------------------------------- export / forget


def test_export_json_lines(tmp_path, log):
    logged = [
        ("a", "view", T0 + 1.5, None),
        ("b/ü", "purchase", T0 + 2, {"price": 12.5, "tags": ["x", "y"]}),
        ("c", "dismiss", T0 + 0.25, {"reason": "not interested"}),
    ]
    log.log_many(logged)
    path = tmp_path / "export.jsonl"
    assert log.export(path) == 3
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [set(r) for r in records] == [{"id", "ts", "kind", "item", "context"}] * 3
    by_ts = sorted(logged, key=lambda e: e[2])
    assert [(r["item"], r["kind"], r["ts"], r["context"]) for r in records] == by_ts
    assert [r["id"] for r in records] == [e.id for e in log.events()]
    buf = io.StringIO()
    assert log.export(buf) == 3
    assert buf.getvalue().splitlines() == lines


def test_forget_deletes_everything_and_shrinks_the_file(tmp_path):
    path = tmp_path / "f.db"
    wal = Path(f"{path}-wal")
    with EventLog(path) as ev_log:
        ctx = {"query": "a fairly long search string " * 8}
        ev_log.log_many((f"item-{k}", "view", T0 + k, ctx) for k in range(20_000))
        ev_log.log("last", "purchase")
        big = path.stat().st_size + wal.stat().st_size
        assert big > 2_000_000
        ev_log.forget()
        assert ev_log.count() == 0
        assert path.stat().st_size <= 32 * 1024  # a few pages: header, table, two indexes
        assert not wal.exists() or wal.stat().st_size == 0
        assert b"item-1" not in path.read_bytes()
        ev_log.log("after", ts=T0)  # still usable
        assert [e.item for e in ev_log.events()] == ["after"]
        assert ev_log.schema_version == 2


def test_close_is_idempotent_and_data_persists(tmp_path):
    path = tmp_path / "c.db"
    ev_log = EventLog(path)
    ev_log.log("a", ts=T0)
    ev_log.close()
    ev_log.close()
    with pytest.raises(sqlite3.ProgrammingError):
        ev_log.count()
    with EventLog(path) as again:
        assert [e.item for e in again.events()] == ["a"]


# ---------------------------------------------------------------------------- threads


def test_concurrent_threads_lose_nothing(tmp_path):
    path = tmp_path / "t.db"
    errors = []
    with EventLog(path, max_rows=10_000) as ev_log:
        def writer(t):
            try:
                for k in range(200):
                    ev_log.log(f"t{t}-{k}", "click", context={"t": t, "k": k})
            except Exception as exc:  # surfaced by the assert below
                errors.append(exc)

        def batcher():
            try:
                for b in range(20):
                    ev_log.log_many((f"b-{b}-{k}", "view") for k in range(10))
            except Exception as exc:
                errors.append(exc)

        def reader():
            try:
                for _ in range(100):
                    ev_log.recent(20)
                    ev_log.items_with_kinds(["click"], among=["t0-1", "t1-2"])
                    ev_log.count()
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
        threads += [threading.Thread(target=batcher), threading.Thread(target=reader)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
        assert ev_log.count() == 4 * 200 + 20 * 10
        items = [e.item for e in ev_log.events()]
        assert len(set(items)) == len(items) == 1000
        assert {f"t{t}-{k}" for t in range(4) for k in range(200)} <= set(items)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
