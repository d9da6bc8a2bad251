"""EventLog overhead vs raw sqlite3 on the same schema and pragmas (WAL, same synchronous,
same checkpoint interval).

    python bench/event_log.py [--events 200000] [--batch 1000] [--singles 2000] [--repeats 3]

(a) batched inserts: EventLog.log_many vs raw ``executemany`` + commit, events/s;
(b) single inserts: EventLog.log vs raw ``execute`` + ``commit``, per-call latency.
Both sides build their rows from the same prepared Python tuples and both serialise the
contexts inside the timed region (an app writing SQLite directly would have to do that too).
Each repeat uses a fresh database; the table reports medians over repeats. Times are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_sdk.event_log import (  # noqa: E402
    EVENT_KINDS,
    JOURNAL_SIZE_LIMIT_BYTES,
    WAL_AUTOCHECKPOINT_PAGES,
    EventLog,
)

INSERT = "INSERT INTO events (ts, kind, item, context) VALUES (?, ?, ?, ?)"
T0 = 1_700_000_000.0


def make_events(n: int, context_share: float, seed: int) -> list[tuple]:
    """(item, kind, ts[, context]) tuples over 5,000 item keys, timestamps increasing."""
    rng = random.Random(seed)
    kinds = [*EVENT_KINDS[:1] * 6, *EVENT_KINDS]  # mostly views, like a real shop
    out = []
    for k in range(n):
        item, kind, ts = f"sku-{rng.randrange(5000):05d}", rng.choice(kinds), T0 + k * 0.01
        if rng.random() < context_share:
            out.append((item, kind, ts, {"screen": "home", "pos": rng.randrange(20)}))
        else:
            out.append((item, kind, ts))
    return out


def fresh_db(tmp: Path, name: str) -> Path:
    """An empty database with the current EventLog schema (created by EventLog itself)."""
    path = tmp / name
    EventLog(path).close()
    return path


def raw_connect(path: Path, durability: str) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path))
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {durability.upper()}")
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
    return conn


def raw_row(ev: tuple) -> tuple:
    ctx = ev[3] if len(ev) > 3 else None
    ctx_json = None if ctx is None else json.dumps(ctx)  # default options: the cached encoder
    return (ev[2], ev[1], ev[0], ctx_json)


def batched_rate(tmp: Path, events: list[tuple], batch: int, ours: bool, tag: str) -> float:
    """Events per second inserting ``events`` in batches of ``batch``, one commit each."""
    path = fresh_db(tmp, f"batch-{tag}-{'ours' if ours else 'raw'}.db")
    batches = [events[i : i + batch] for i in range(0, len(events), batch)]
    if ours:
        log = EventLog(path)
        start = time.perf_counter()
        for chunk in batches:
            log.log_many(chunk)
        elapsed = time.perf_counter() - start
        log.close()
    else:
        conn = raw_connect(path, "normal")
        start = time.perf_counter()
        for chunk in batches:
            conn.executemany(INSERT, [raw_row(ev) for ev in chunk])
            conn.commit()
        elapsed = time.perf_counter() - start
        conn.close()
    return len(events) / elapsed


def single_latencies(tmp: Path, events: list[tuple], durability: str, ours: bool,
                     tag: str) -> list[float]:
    """Seconds per committed single insert (ts = time.time() on both sides)."""
    path = fresh_db(tmp, f"single-{tag}-{'ours' if ours else 'raw'}.db")
    out = []
    clock = time.perf_counter
    if ours:
        log = EventLog(path, durability=durability)
        for ev in events:
            start = clock()
            log.log(ev[0], ev[1])
            out.append(clock() - start)
        log.close()
    else:
        conn = raw_connect(path, durability)
        for ev in events:
            start = clock()
            conn.execute(INSERT, (time.time(), ev[1], ev[0], None))
            conn.commit()
            out.append(clock() - start)
        conn.close()
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000, help="events per batched run")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--singles", type=int, default=2000, help="single inserts per run (normal)")
    ap.add_argument("--singles-full", type=int, default=300, help="single inserts (full)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for share in (0.0, 0.1):
            events = make_events(args.events, share, seed=1)
            ours, raw = [], []
            for r in range(args.repeats):  # alternate who goes first to spread cache effects
                pair = [(True, ours), (False, raw)]
                for is_ours, sink in pair if r % 2 == 0 else pair[::-1]:
                    sink.append(batched_rate(tmp, events, args.batch, is_ours, f"{share}-{r}"))
            o, w = statistics.median(ours), statistics.median(raw)
            rows.append((f"batched log_many ({args.batch}/txn, {share:.0%} with context)",
                         "normal", f"{o:,.0f} ev/s", f"{w:,.0f} ev/s", f"{w / o:.2f}x"))

        for durability, n in (("normal", args.singles), ("full", args.singles_full)):
            events = make_events(n, 0.0, seed=2)
            stats = {True: ([], []), False: ([], [])}
            for r in range(args.repeats):
                for is_ours in (True, False) if r % 2 == 0 else (False, True):
                    lat = single_latencies(tmp, events, durability, is_ours, f"{durability}-{r}")
                    stats[is_ours][0].append(statistics.median(lat))
                    stats[is_ours][1].append(pct(lat, 0.99))
            (om, op), (wm, wp) = ([statistics.median(v) for v in stats[k]] for k in (True, False))
            rows.append(("single log, median latency", durability, f"{om * 1e6:.1f} us",
                         f"{wm * 1e6:.1f} us", f"{om / wm:.2f}x"))
            rows.append(("single log, p99 latency", durability, f"{op * 1e6:.1f} us",
                         f"{wp * 1e6:.1f} us", f"{op / wp:.2f}x"))

    print(f"EventLog vs raw sqlite3 {sqlite3.sqlite_version} (WAL), Python "
          f"{sys.version.split()[0]}, medians of {args.repeats} repeats; "
          f"batched: {args.events:,} events per run\n")
    print("| operation | synchronous | EventLog | raw sqlite3 | ours/raw (time) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
