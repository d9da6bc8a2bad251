"""EventLog: the device's local behaviour log, one SQLite file (stdlib ``sqlite3`` only).

Every view, click, add-to-cart, purchase or dismiss the app reports is one row
``events(id, ts, kind, item, context)``. The recommender reads the newest rows as the user's
history (``recent_pairs``), drops purchased or dismissed items (``items_with_kinds``) and
reuses both while ``watermark()`` is unchanged; the local trainer streams the whole log with
``events()``. Nothing here leaves the device.

Storage
    ``ts`` is stored as REAL Unix seconds, exactly the float the caller passed (default
    ``time.time()``), so what is logged is what is read back, bit for bit. ``context`` is
    stored as compact JSON text (NULL when absent). Rows are ordered by ``(ts, id)``: ``id``
    is SQLite's rowid, so events with equal timestamps keep their logging order.

Durability
    The journal is WAL. With ``durability="normal"`` (the default) SQLite runs with
    ``synchronous=NORMAL``: a commit appends to the WAL file and returns without fsync. The
    write has reached the OS page cache, so a committed transaction survives any crash of
    the *process* (exceptions, the app being swiped away, ``kill -9``); only an OS crash or
    power loss can lose the last few commits, and even then the WAL checksums make SQLite
    roll back to the last intact commit, so the database is never corrupted. For a
    behaviour log that is the right trade: a lost click or two on power loss is harmless,
    an fsync per tap is not free on flash. ``durability="full"`` runs ``synchronous=FULL``:
    one fsync of the WAL per commit, so commits also survive power loss.
    ``tests/test_event_log.py`` kills a writer process with SIGKILL repeatedly and checks
    that every event it saw committed is present and ``integrity_check`` is ok. The WAL is
    checkpointed every ``WAL_AUTOCHECKPOINT_PAGES`` pages (see the constant for why).

Schema versions
    ``PRAGMA user_version`` holds the schema version. ``MIGRATIONS[i]`` takes a database
    from version i to i + 1; each runs in one ``BEGIN IMMEDIATE`` transaction together with
    the ``user_version`` bump, so a crash mid-migration leaves the previous version intact.
    A file with a version newer than ``SCHEMA_VERSION`` (written by a newer SDK) raises
    ``SchemaVersionError`` before anything is written to it.

Threads
    One connection (``check_same_thread=False``) guarded by one ``threading.RLock``. It is
    simple and correct: Python's sqlite3 connection objects must not be used by two threads
    at once, and at the sizes of a device log (single-row commits of tens of microseconds,
    reads of ~50 rows) a second reader connection would buy nothing that WAL does not
    already give other *processes*. Long operations (retention, ``events()``, ``export``)
    take the lock per chunk, so a logging thread never waits for more than one chunk.

Retention
    ``max_age_days`` and ``max_rows`` cap the log; ``apply_retention()`` deletes the oldest
    rows (by ``(ts, id)``) in chunks of ``chunk`` rows, one transaction each. It also runs
    automatically every 1000 inserts, after an O(log n) check that usually finds nothing to do.
"""

from __future__ import annotations

import json
import math
import numbers
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

EVENT_KINDS: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase", "dismiss")
SCHEMA_VERSION = 2

MAX_ITEM_CHARS = 256
MAX_CONTEXT_BYTES = 4096
MAX_KIND_CHARS = 64
RETENTION_CHECK_EVERY = 1000  # inserts between automatic (cheap) retention checks
_READ_CHUNK = 1000  # rows per locked fetch when streaming
_MAX_SQL_VARS = 500  # stay far below SQLite's host-parameter limit (999 on old builds)

# Checkpoint the WAL every ~16 MiB (4000 pages of 4 KiB) instead of SQLite's 1000 pages: a
# checkpoint is the one place synchronous=NORMAL fsyncs, so this quarters the fsyncs and the
# random writes into the main file (bulk inserts run ~15-30% faster; see bench/event_log.py).
# journal_size_limit trims the WAL back to 16 MiB after a burst overshoots it.
WAL_AUTOCHECKPOINT_PAGES = 4000
JOURNAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024

_INSERT = "INSERT INTO events (ts, kind, item, context) VALUES (?, ?, ?, ?)"
_COLUMNS = "id, ts, kind, item, context"


class EventLogError(ValueError):
    """A bad event or query argument; the message names the field and the problem."""

    code = "bad_event"


class SchemaVersionError(RuntimeError):
    """The database was written by a newer SDK (its schema version is above ours)."""

    code = "schema_too_new"


@dataclass(frozen=True, slots=True)
class Event:
    """One logged event. ``ts`` is Unix seconds (float); ``context`` a JSON object or None."""

    id: int
    ts: float
    kind: str
    item: str
    context: dict | None


# ---------------------------------------------------------------------------- migrations


def _v0_to_v1(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE events ("
        " id INTEGER PRIMARY KEY,"  # the rowid: monotonically increasing, breaks ts ties
        " ts REAL NOT NULL,"  # Unix seconds
        " kind TEXT NOT NULL,"
        " item TEXT NOT NULL,"
        " context TEXT)"  # compact JSON object or NULL
    )


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    # (ts, id): history, streaming and retention all walk the log in time order.
    conn.execute("CREATE INDEX IF NOT EXISTS events_ts_id ON events (ts, id)")
    # (kind, item): "which of these ~50 candidates did the user buy or dismiss?" as index seeks.
    conn.execute("CREATE INDEX IF NOT EXISTS events_kind_item ON events (kind, item)")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v0_to_v1, _v1_to_v2]
assert len(MIGRATIONS) == SCHEMA_VERSION


# ---------------------------------------------------------------------------- validation


def _bad(message: str) -> EventLogError:
    return EventLogError(message)


def _check_ts(ts: Any, name: str = "ts") -> float:
    if type(ts) is not float:  # fast path: time.time() floats skip the slow checks
        if isinstance(ts, bool) or not isinstance(ts, numbers.Real):
            raise _bad(f"{name} must be Unix seconds (a finite number > 0), got {ts!r}")
        ts = float(ts)
    if not (ts > 0.0 and math.isfinite(ts)):
        raise _bad(f"{name} must be Unix seconds (a finite number > 0), got {ts!r}")
    return ts


# One encoder for every context: json.dumps with non-default options builds a new encoder per
# call, which costs more than encoding a small dict. Compact, UTF-8 as is, and strict JSON
# (NaN/Infinity are not JSON and would not load in other tools).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _dump_context(context: Any) -> str | None:
    """The compact JSON text stored for ``context`` (None stays NULL)."""
    if context is None:
        return None
    if not isinstance(context, dict):
        raise _bad(f"context must be a dict or None, got {type(context).__name__}")
    for key in context:
        if type(key) is not str:
            # json.dumps would silently turn 3 into "3" and the round trip would differ.
            raise _bad(f"context keys must be str, got {key!r}")
    try:
        text = _ENCODER.encode(context)
    except (TypeError, ValueError) as exc:
        raise _bad(f"context is not JSON-serializable: {exc}") from None
    # A char is at most 4 UTF-8 bytes: only long texts need the encode to be measured.
    if len(text) * 4 > MAX_CONTEXT_BYTES and len(text.encode()) > MAX_CONTEXT_BYTES:
        raise _bad(
            f"context JSON is {len(text.encode())} bytes, more than {MAX_CONTEXT_BYTES}"
        )
    return text


def _check_item(item: Any) -> str:
    """The slow path of the item check: precise errors, str subclasses become plain str."""
    if not isinstance(item, str):
        raise _bad(f"item must be a str, got {type(item).__name__}")
    if not item:
        raise _bad("item must be a non-empty str")
    if len(item) > MAX_ITEM_CHARS:
        raise _bad(f"item is {len(item)} chars, more than {MAX_ITEM_CHARS}")
    return str(item)


def _bad_kind(kind: Any, kinds: tuple[str, ...]) -> EventLogError:
    return _bad(f"kind {kind!r} is not one of {', '.join(kinds)}")


def _event(row: tuple) -> Event:
    ctx = row[4]
    return Event(row[0], float(row[1]), row[2], row[3], None if ctx is None else json.loads(ctx))


def _chunks(values: list, size: int) -> Iterator[list]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


# ---------------------------------------------------------------------------- the log


class EventLog:
    """The device's behaviour log in one SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        *,
        durability: str = "normal",
        max_age_days: float | None = None,
        max_rows: int | None = None,
        extra_kinds: Iterable[str] = (),
    ) -> None:
        """Open (creating and migrating as needed) the log at ``path``.

        ``durability``: "normal" (survives process crashes) or "full" (also power loss).
        ``max_age_days``: delete events older than this many days. ``max_rows``: keep at
        most this many events. ``extra_kinds``: event kinds beyond ``EVENT_KINDS``.
        Raises SchemaVersionError for a file from a newer SDK (left unmodified) and
        sqlite3.DatabaseError for a file that is not SQLite.
        """
        if durability not in ("normal", "full"):
            raise ValueError(f"durability must be 'normal' or 'full', got {durability!r}")
        if max_age_days is not None and not (max_age_days > 0 and math.isfinite(max_age_days)):
            raise ValueError(f"max_age_days must be a finite number > 0, got {max_age_days!r}")
        if max_rows is not None and (isinstance(max_rows, bool) or not max_rows >= 1):
            raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
        kinds = list(EVENT_KINDS)
        for kind in extra_kinds:
            if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_CHARS:
                raise ValueError(f"extra kind must be a str of 1..{MAX_KIND_CHARS} chars: {kind!r}")
            if kind not in kinds:
                kinds.append(kind)
        self.path = Path(path)
        self.kinds: tuple[str, ...] = tuple(kinds)
        self._kind_set = frozenset(kinds)
        self.durability = durability
        self.max_age_days = max_age_days
        self.max_rows = max_rows
        self._lock = threading.RLock()
        self._inserts_since_check = 0
        self._deletions = 0  # bumped whenever rows are deleted: see watermark()

        # isolation_level=None: the sqlite3 module issues no implicit BEGINs; a lone INSERT
        # is its own committed transaction and multi-statement work uses explicit BEGIN.
        # timeout=5.0 is SQLite's busy_timeout (5000 ms): wait out another process' write
        # lock instead of failing at once.
        conn = sqlite3.connect(
            str(self.path), timeout=5.0, isolation_level=None, check_same_thread=False
        )
        try:
            # Read the version before anything that writes (journal_mode=WAL rewrites the
            # header), so a file from a newer SDK is left byte-for-byte untouched.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"{self.path} has event-log schema version {version}, newer than this "
                    f"SDK's {SCHEMA_VERSION}; update the SDK (the file was not modified)"
                )
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"{self.path}: cannot enable WAL (got {mode!r})")
            conn.execute(f"PRAGMA synchronous = {durability.upper()}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._closed = False

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        for target, step in enumerate(MIGRATIONS, start=1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Re-read inside the write lock: another process may have migrated meanwhile.
                current = conn.execute("PRAGMA user_version").fetchone()[0]
                if current < target:
                    step(conn)
                    conn.execute(f"PRAGMA user_version = {target}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        """The file's schema version (``PRAGMA user_version``)."""
        with self._lock:
            return self._conn.execute("PRAGMA user_version").fetchone()[0]

    # ------------------------------------------------------------------------ writing

    def log(
        self,
        item: str,
        kind: str = "view",
        *,
        ts: float | None = None,
        context: dict | None = None,
    ) -> int:
        """Log one event (``ts`` in Unix seconds, default now); returns its id.

        The event is committed when this returns."""
        if type(item) is not str or not 0 < len(item) <= MAX_ITEM_CHARS:
            item = _check_item(item)
        # type() first: an unhashable kind must be a bad event, not a TypeError from the set.
        if type(kind) is not str or kind not in self._kind_set:
            raise _bad_kind(kind, self.kinds)
        ts = time.time() if ts is None else _check_ts(ts)
        ctx = None if context is None else _dump_context(context)
        with self._lock:
            rowid = self._conn.execute(_INSERT, (ts, kind, item, ctx)).lastrowid
            self._inserts_since_check += 1
            check = self._inserts_since_check >= RETENTION_CHECK_EVERY
        if check:
            self._auto_retention()
        return rowid

    def log_many(self, events: Iterable[Any]) -> int:
        """Log a batch in one transaction, all or nothing; returns the number logged.

        Each event is a tuple ``(item, kind[, ts[, context]])``, a dict with keys
        ``item``, ``kind`` and optionally ``ts``, ``context``, or an ``Event`` (its id is
        ignored). Every event is validated before the transaction opens, so a bad batch
        raises ``EventLogError`` ("event 3: ...") and stores nothing. Events without ``ts``
        all get the same "now", so they keep their batch order."""
        now = time.time()
        kind_set = self._kind_set
        rows = []
        append = rows.append
        for i, ev in enumerate(events):
            # Fast path for the common shape, (item, kind) or (item, kind, ts) with valid
            # values; anything unusual or wrong goes through _normalise for the full checks.
            if type(ev) is tuple and 2 <= len(ev) <= 3:
                item, kind = ev[0], ev[1]
                ts = ev[2] if len(ev) == 3 else now
                if (
                    type(item) is str
                    and 0 < len(item) <= MAX_ITEM_CHARS
                    and type(kind) is str
                    and kind in kind_set
                    and type(ts) is float
                    and 0.0 < ts < math.inf
                ):
                    append((ts, kind, item, None))
                    continue
            try:
                append(self._normalise(ev, now))
            except EventLogError as exc:
                raise EventLogError(f"event {i}: {exc}") from None
        if not rows:
            return 0
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT, rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._inserts_since_check += len(rows)
            check = self._inserts_since_check >= RETENTION_CHECK_EVERY
        if check:
            self._auto_retention()
        return len(rows)

    def _normalise(self, ev: Any, now: float) -> tuple:
        """One batch element -> the (ts, kind, item, context_json) row, fully validated."""
        ts = context = None
        if isinstance(ev, tuple | list):
            if not 2 <= len(ev) <= 4:
                raise _bad(f"a tuple event is (item, kind[, ts[, context]]), got {len(ev)} fields")
            item, kind = ev[0], ev[1]
            if len(ev) > 2:
                ts = ev[2]
            if len(ev) > 3:
                context = ev[3]
        elif isinstance(ev, dict):
            unknown = set(ev) - {"item", "kind", "ts", "context"}
            if unknown:
                raise _bad(f"unknown keys {sorted(map(str, unknown))}")
            if "item" not in ev or "kind" not in ev:
                raise _bad("a dict event needs 'item' and 'kind'")
            item, kind, ts, context = ev["item"], ev["kind"], ev.get("ts"), ev.get("context")
        elif isinstance(ev, Event):
            item, kind, ts, context = ev.item, ev.kind, ev.ts, ev.context
        else:
            raise _bad(
                "expected a tuple (item, kind[, ts[, context]]), a dict or an Event, "
                f"got {type(ev).__name__}"
            )
        if type(item) is not str or not 0 < len(item) <= MAX_ITEM_CHARS:
            item = _check_item(item)
        if not isinstance(kind, str) or kind not in self._kind_set:
            raise _bad_kind(kind, self.kinds)
        return (now if ts is None else _check_ts(ts), kind, item, _dump_context(context))

    # ------------------------------------------------------------------------ reading

    def _kind_filter(self, kinds: Iterable[str] | None) -> tuple[str, list[str]]:
        """SQL ``AND +kind IN (...)`` and its parameters; '' when ``kinds`` is None.

        The unary + keeps the planner on the (ts, id) index: walking the (kind, item) index
        instead would need a sort of every matching row before the first one comes out."""
        if kinds is None:
            return "", []
        wanted = self._check_kinds(kinds)
        return f" AND +kind IN ({','.join('?' * len(wanted))})", wanted

    def _check_kinds(self, kinds: Iterable[str]) -> list[str]:
        if isinstance(kinds, str):
            kinds = [kinds]  # a lone "purchase" would otherwise be iterated letter by letter
        wanted: list[str] = []
        for kind in kinds:
            if not isinstance(kind, str) or kind not in self._kind_set:
                # A typo ("purchased") would otherwise silently match nothing.
                raise _bad_kind(kind, self.kinds)
            if kind not in wanted:
                wanted.append(kind)
        return wanted

    def recent(self, limit: int, kinds: Iterable[str] | None = None) -> list[Event]:
        """The ``limit`` newest events (of ``kinds``, if given), oldest first, newest last."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise _bad(f"limit must be an int >= 0, got {limit!r}")
        if limit == 0:
            return []
        where, params = self._kind_filter(kinds)
        if kinds is not None and not params:
            return []
        sql = (
            f"SELECT {_COLUMNS} FROM events WHERE 1{where} ORDER BY ts DESC, id DESC LIMIT ?"
        )
        with self._lock:
            rows = self._conn.execute(sql, [*params, limit]).fetchall()
        rows.reverse()
        return [_event(r) for r in rows]

    def recent_pairs(self, limit: int) -> list[tuple[str, str]]:
        """``(item, kind)`` of the ``limit`` newest events, oldest first: the recommender's
        per-request read, without decoding contexts or building Event objects."""
        return self._newest("item, kind", limit)

    def recent_triples(self, limit: int) -> list[tuple[str, str, float]]:
        """``(item, kind, ts)`` of the ``limit`` newest events, oldest first: the read of a
        recommender whose model marks session boundaries."""
        return self._newest("item, kind, ts", limit)

    def _newest(self, columns: str, limit: int) -> list[tuple]:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise _bad(f"limit must be an int >= 0, got {limit!r}")
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {columns} FROM events ORDER BY ts DESC, id DESC LIMIT ?", (limit,)
            ).fetchall()
        rows.reverse()
        return rows

    def events(
        self, *, since_id: int = 0, kinds: Iterable[str] | None = None
    ) -> Iterator[Event]:
        """Every event with ``id > since_id`` (of ``kinds``, if given), ordered by (ts, id).

        Streamed in chunks of 1000 with keyset pagination, holding the lock per chunk only:
        events logged while iterating may or may not be included."""
        where, params = self._kind_filter(kinds)
        if kinds is not None and not params:
            return
        with self._lock:
            # Start the index walk at the earliest timestamp among the wanted ids, so an
            # incremental read (since the last sync) does not scan the whole log.
            floor = self._conn.execute(
                "SELECT min(+ts) FROM events WHERE id > ?", (since_id,)
            ).fetchone()[0]
        if floor is None:
            return
        # +id: filter, don't seek the rowid, so the (ts, id) index drives the order.
        sql = (
            f"SELECT {_COLUMNS} FROM events WHERE (ts, id) > (?, ?) AND +id > ?{where}"
            f" ORDER BY ts, id LIMIT {_READ_CHUNK}"
        )
        cursor = (floor, -1)  # -1 < any rowid: includes every row at ts == floor
        while True:
            with self._lock:
                rows = self._conn.execute(sql, [*cursor, since_id, *params]).fetchall()
            for row in rows:
                yield _event(row)
            if len(rows) < _READ_CHUNK:
                return
            cursor = (rows[-1][1], rows[-1][0])

    def items_with_kinds(
        self, kinds: Iterable[str], among: Iterable[str] | None = None, since_id: int = 0
    ) -> set[str]:
        """Distinct item keys with any event of ``kinds``; only keys in ``among`` if given,
        only events with ``id > since_id`` if given (a rowid range: cheap for the newest).

        Index seeks on (kind, item): cheap enough to filter a top-K list on every request."""
        wanted = self._check_kinds(kinds)
        if not wanted:
            return set()
        kind_sql = ",".join("?" * len(wanted))
        if since_id:
            sql = f"SELECT DISTINCT item FROM events WHERE id > ? AND +kind IN ({kind_sql})"
            with self._lock:
                found = {r[0] for r in self._conn.execute(sql, [since_id, *wanted])}
            return found if among is None else found & set(among)
        if among is None:
            sql = f"SELECT DISTINCT item FROM events WHERE kind IN ({kind_sql})"
            with self._lock:
                return {r[0] for r in self._conn.execute(sql, wanted)}
        keys = list(dict.fromkeys(among))
        found: set[str] = set()
        with self._lock:
            for part in _chunks(keys, _MAX_SQL_VARS):
                sql = (
                    f"SELECT DISTINCT item FROM events WHERE kind IN ({kind_sql})"
                    f" AND item IN ({','.join('?' * len(part))})"
                )
                found.update(r[0] for r in self._conn.execute(sql, [*wanted, *part]))
        return found

    def watermark(self) -> tuple[int, int]:
        """``(deletion generation, largest id)``: equal between two calls iff this EventLog
        neither logged nor deleted anything in between, so readers can cache derived state
        (the Recommender caches history and exclusions on it). Writes by other processes to
        the same file are not tracked."""
        with self._lock:
            top = self._conn.execute("SELECT max(id) FROM events").fetchone()[0]
            return self._deletions, top or 0

    def count(self) -> int:
        """Number of events stored."""
        with self._lock:
            return self._conn.execute("SELECT count(*) FROM events").fetchone()[0]

    # ------------------------------------------------------------------------ retention

    def _auto_retention(self) -> None:
        """Every RETENTION_CHECK_EVERY inserts: O(log n) look, full pass only if needed."""
        with self._lock:
            self._inserts_since_check = 0
            if self.max_age_days is None and self.max_rows is None:
                return
            # Each subquery is a single min/max, which SQLite answers from one b-tree edge.
            oldest, low, high = self._conn.execute(
                "SELECT (SELECT min(ts) FROM events), (SELECT min(id) FROM events),"
                " (SELECT max(id) FROM events)"
            ).fetchone()
        if oldest is None:
            return
        now = time.time()
        too_old = self.max_age_days is not None and oldest < now - self.max_age_days * 86400.0
        # high - low + 1 bounds the row count from above (ids only grow; gaps only shrink it).
        maybe_too_many = self.max_rows is not None and high - low + 1 > self.max_rows
        if too_old or maybe_too_many:
            self.apply_retention(now)

    def apply_retention(self, now: float | None = None, chunk: int = 500) -> int:
        """Delete events older than ``max_age_days`` before ``now`` (Unix seconds, default
        the current time), then the oldest beyond ``max_rows``; returns rows deleted.

        Works in transactions of at most ``chunk`` rows so writers never wait long."""
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
        now = time.time() if now is None else _check_ts(now, "now")
        deleted = 0
        if self.max_age_days is not None:
            cutoff = now - self.max_age_days * 86400.0
            sql = (
                "DELETE FROM events WHERE id IN"
                " (SELECT id FROM events WHERE ts < ? ORDER BY ts, id LIMIT ?)"
            )
            while True:
                with self._lock:
                    n = self._conn.execute(sql, (cutoff, chunk)).rowcount
                    self._deletions += n > 0
                deleted += n
                if n < chunk:
                    break
        if self.max_rows is not None:
            sql = "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY ts, id LIMIT ?)"
            # Count once (O(n)); rows logged meanwhile are left for the next check.
            excess = self.count() - self.max_rows
            while excess > 0:
                with self._lock:
                    n = self._conn.execute(sql, (min(chunk, excess),)).rowcount
                    self._deletions += n > 0
                if n == 0:
                    break
                deleted += n
                excess -= n
        return deleted

    # ------------------------------------------------------------------------ export / forget

    def export(self, out: str | Path | IO[str]) -> int:
        """Write every event as JSON lines (id, ts, kind, item, context) to a path or a text
        file object, ordered by (ts, id); returns the number of rows written."""
        if isinstance(out, str | Path):
            with open(out, "w", encoding="utf-8", newline="\n") as fh:
                return self._export_to(fh)
        return self._export_to(out)

    def _export_to(self, fh: IO[str]) -> int:
        n = 0
        for ev in self.events():
            record = {"id": ev.id, "ts": ev.ts, "kind": ev.kind, "item": ev.item,
                      "context": ev.context}
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
        return n

    def forget(self) -> None:
        """Delete every event and reclaim the space, so no trace stays on disk.

        VACUUM rebuilds the file without the freed pages; the TRUNCATE checkpoint copies
        that into the main file and empties the WAL (which held the old pages' images).
        Raises sqlite3.OperationalError if another connection keeps the WAL from emptying."""
        with self._lock:
            conn = self._conn
            conn.execute("DELETE FROM events")
            self._deletions += 1
            conn.execute("VACUUM")
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            self._inserts_since_check = 0
        if busy:
            raise sqlite3.OperationalError(
                f"{self.path}: events deleted, but another connection kept the WAL from "
                "being truncated; call forget() again once it has closed"
            )

    # ------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Close the connection (idempotent). The last close also checkpoints the WAL."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._conn.execute("PRAGMA optimize")  # cheap; keeps planner stats useful
            finally:
                self._conn.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventLog({str(self.path)!r}, durability={self.durability!r})"
