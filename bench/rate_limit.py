"""What a rate-limited request costs: one ``DatabaseStorage.incr`` (the counter the
per-address and per-device limits share, ``sync_server.rate_limit``) on SQLite (a WAL file,
as the server uses it) and on PostgreSQL (the tests' private server, tests/support/postgres.py).

    python bench/rate_limit.py --hits 2000 --threads 4

Each database gets ``--threads`` threads hitting one key ``--hits`` times in all, and as
many hitting distinct keys; the table prints the per-hit median and p99 and checks that no
hit was lost (the final count equals the hits sent). Timings are this machine's, never
asserted."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.support.postgres: the private PostgreSQL of the tests

from sync_server.db import Database, upgrade  # noqa: E402
from sync_server.rate_limit import DatabaseStorage  # noqa: E402


def run(storage: DatabaseStorage, hits: int, threads: int, shared: bool
        ) -> tuple[list[float], int]:
    """Per-hit seconds and the counters' final total."""
    seconds: list[float] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        key = "bench/shared" if shared else f"bench/key-{n}"
        mine = []
        for _ in range(hits // threads):
            started = time.perf_counter()
            storage.incr(key, 3600)
            mine.append(time.perf_counter() - started)
        with lock:
            seconds.extend(mine)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    keys = ["bench/shared"] if shared else [f"bench/key-{n}" for n in range(threads)]
    return seconds, sum(storage.get(k) for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    hits = args.hits - args.hits % args.threads
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from tests.support.postgres import PostgresServer

        pg = PostgresServer()
        try:
            for name, url in (("SQLite", f"sqlite:///{tmp}/bench.db"),
                              ("PostgreSQL", pg.create_database())):
                upgrade(url)
                db = Database(url)
                storage = DatabaseStorage(db=db)
                for shared in (True, False):
                    storage.reset()
                    seconds, total = run(storage, hits, args.threads, shared)
                    ms = sorted(s * 1000 for s in seconds)
                    rows.append((name, "one key" if shared else "a key each", hits,
                                 statistics.median(ms), ms[int(0.99 * (len(ms) - 1))],
                                 total == hits))
                db.engine.dispose()
        finally:
            pg.close()
    print(f"| database | keys ({args.threads} threads) | hits | median ms | p99 ms | "
          "no hit lost |")
    print("|---|---|---:|---:|---:|---|")
    for name, keys, n, median, p99, exact in rows:
        print(f"| {name} | {keys} | {n} | {median:.2f} | {p99:.2f} | {exact} |")


if __name__ == "__main__":
    main()
