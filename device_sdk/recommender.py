"""The on-device recommender: the user's log -> history ids -> LiteRT top-K -> filtered items.

History policy (what the model sees). The serving graph takes ids only, so event kinds weigh
in through *which* items enter the L history slots:

- every known item in the last ``scan_factor * L`` events is a candidate; its strength is the
  largest kind weight among its events (view 1, click 2, add_to_cart 3, purchase 4);
- a ``dismiss`` newer than the item's last positive event removes it (the user said no);
- candidate score = strength * 0.5 ** (age / L), age = events logged after its last one, so
  an old purchase outlasts a fresh glance, and the top-L candidates fill the history, ordered
  by their last event, most recent last (the model's recency weighting expects that order).

A log of purchases only (Online Retail) therefore gives exactly "the last L distinct items".
With ``distinct=False`` (a bundle trained on data where people buy again) the history is
instead the last L positive events as they happened, repeats kept, as the model saw them in
training; a dismissed item still leaves it.

The bundle's manifest carries the policy the trainer chose from the data (``history_policy``:
``exclude_kinds``, ``distinct``); an app passing its own ``HistoryPolicy`` overrides it.

A model trained with session separators (its config's ``session_id`` and ``session_gap``)
gets them between history steps more than the gap apart, and a closing one when the request
comes more than the gap after the last step (``device_sdk.sessions``): the request's time is
part of its input.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from device_sdk.bundle import Bundle, run_golden_check
from device_sdk.sessions import session_window

if TYPE_CHECKING:
    from device_sdk.event_log import EventLog

DEFAULT_KIND_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 4.0, "dismiss": 0.0}
)
NEGATIVE_KINDS = frozenset({"dismiss"})


@dataclass(frozen=True)
class HistoryPolicy:
    """How the log becomes the model's history and which items are never recommended.

    ``weights``: kind -> strength; kinds weighing 0 never enter the history, kinds missing
    here (an app's extra kinds) weigh 1. ``exclude_kinds``: items with any such event are
    dropped from results (already bought, or dismissed)."""

    weights: Mapping[str, float] = field(default_factory=lambda: DEFAULT_KIND_WEIGHTS)
    scan_factor: int = 4
    exclude_kinds: tuple[str, ...] = ("purchase", "dismiss")
    distinct: bool = True

    def weight(self, kind: str) -> float:
        return float(self.weights.get(kind, 1.0))

    @classmethod
    def from_manifest(cls, manifest: Mapping) -> HistoryPolicy:
        """The policy a bundle's manifest names (``history_policy``); the defaults for a
        bundle that names none. A malformed entry raises ValueError naming it."""
        spec = manifest.get("history_policy")
        if spec is None:
            return cls()
        if not isinstance(spec, Mapping):
            raise ValueError(f"manifest history_policy must be an object, got {spec!r:.80}")
        kinds = spec.get("exclude_kinds", cls.exclude_kinds)
        distinct = spec.get("distinct", True)
        if not isinstance(kinds, list | tuple) or not all(isinstance(k, str) for k in kinds):
            raise ValueError(f"manifest history_policy.exclude_kinds must be a list of "
                             f"strings, got {kinds!r:.80}")
        if not isinstance(distinct, bool):
            raise ValueError(f"manifest history_policy.distinct must be a boolean, got "
                             f"{distinct!r:.80}")
        return cls(exclude_kinds=tuple(kinds), distinct=distinct)


@dataclass(frozen=True)
class Recommendation:
    item: str
    score: float | None  # model score; None for popularity fill
    source: str  # "model" or "popular"


def history_ids(
    events: Iterable[tuple[str, str]],
    vocab_id: Callable[[str], int],
    max_len: int,
    policy: HistoryPolicy,
) -> np.ndarray:
    """``(item, kind)`` pairs, oldest first -> int32[max_len] history, left-padded with 0,
    most recent last."""
    steps = history_steps(((key, kind, 0.0) for key, kind in events), vocab_id, max_len,
                          policy)
    out = np.zeros(max_len, dtype=np.int32)
    if steps:
        out[max_len - len(steps):] = [item for item, _ in steps]
    return out


def history_steps(
    events: Iterable[tuple[str, str, float]],
    vocab_id: Callable[[str], int],
    max_len: int,
    policy: HistoryPolicy,
) -> list[tuple[int, float]]:
    """``(item, kind, ts)`` triples, oldest first -> the history's steps ``(id, ts)``, at
    most ``max_len``, most recent last: ``history_ids`` before padding, with each step's
    time (its last event's) for session boundaries."""
    strength: dict[int, float] = {}
    last_pos: dict[int, int] = {}
    dismissed_at: dict[int, int] = {}
    stamps: list[float] = []
    weights = {kind: policy.weight(kind) for kind in policy.weights}
    events_kept: list[tuple[int, int]] = []  # (position, item) of every positive event
    pos = -1
    for pos, (key, kind, ts) in enumerate(events):
        stamps.append(ts)
        item = vocab_id(key)
        if not item:
            continue
        if kind in NEGATIVE_KINDS:
            dismissed_at[item] = pos
            continue
        w = weights.get(kind, 1.0)
        if w > 0:
            if w > strength.get(item, 0.0):
                strength[item] = w
            last_pos[item] = pos
            events_kept.append((pos, item))
    n = pos + 1
    if not policy.distinct:
        return [(item, stamps[p]) for p, item in
                _event_history(events_kept, dismissed_at, max_len)]
    scored = [
        (s * 0.5 ** ((n - 1 - last_pos[i]) / max_len), last_pos[i], i)
        for i, s in strength.items()
        if dismissed_at.get(i, -1) < last_pos[i]
    ]
    if len(scored) > max_len:
        scored = sorted(scored, reverse=True)[:max_len]
    return [(i, stamps[p]) for _, p, i in sorted(scored, key=lambda t: t[1])]


def _event_history(kept: list[tuple[int, int]], dismissed_at: dict[int, int],
                   max_len: int) -> list[tuple[int, int]]:
    """The last ``max_len`` positive events ``(position, item)``, repeats kept, most recent
    last; an item dismissed after its last positive event leaves the history (every
    occurrence)."""
    last: dict[int, int] = {}
    for pos, item in kept:
        last[item] = pos
    return [(p, item) for p, item in kept if dismissed_at.get(item, -1) < last[item]][-max_len:]


class Recommender:
    """One verified bundle serving top-k for one user's log. Thread-safe: the LiteRT
    interpreter is created once here and serialised by ``TopKModel``; the rest is read-only.

    Construction runs the bundle's golden check and raises ``GoldenCheckError`` when the local
    runtime does not reproduce the publisher's answers: such a model is never served."""

    def __init__(
        self, bundle: Bundle, *, policy: HistoryPolicy | None = None, num_threads: int = 1
    ) -> None:
        self.bundle = bundle
        self.policy = policy or HistoryPolicy.from_manifest(bundle.manifest)
        self.vocab = bundle.items()
        self.model = bundle.model(num_threads=num_threads)
        self.golden_overlap = run_golden_check(self.model, bundle.manifest["golden"])
        self._n_items = len(self.vocab)
        # A model trained with session separators (``device_sdk.sessions``) gets them here too.
        config = bundle.config
        self._session = (int(config.get("session_id", 0)), float(config.get("session_gap", 0)))
        if self._session[0] and (self._session[0] != self.vocab.session_id
                                 or not self._session[1] > 0):
            raise ValueError(f"bundle config session_id {self._session[0]} / session_gap "
                             f"{self._session[1]} do not match the vocabulary's separator id "
                             f"{self.vocab.session_id} and a positive gap")
        # Per log: (watermark, what the history is built from, excluded items). Reading the
        # log costs ~1 us per row on a slow device, so what the last request derived is
        # reused while the log is unchanged, and the excluded set is extended from the new
        # rows only.
        self._cache: weakref.WeakKeyDictionary[EventLog, tuple] = weakref.WeakKeyDictionary()
        self._cache_lock = threading.Lock()

    @property
    def version(self) -> int:
        return self.bundle.version

    @property
    def max_len(self) -> int:
        return self.model.max_len

    def history(self, log: EventLog, now: float | None = None) -> np.ndarray:
        """The model's input for ``log``; with session separators, as of ``now`` (Unix
        seconds, default the clock): a request long after the last event opens a session."""
        return self._window(self._read(log), now)

    def _read(self, log: EventLog) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """What the history is built from: the padded history itself, or with session
        separators the steps' ids and times (the separators depend on the request time)."""
        limit = self.policy.scan_factor * self.max_len
        if not self._session[0]:
            return history_ids(log.recent_pairs(limit), self.vocab.id_of, self.max_len,
                               self.policy)
        steps = history_steps(log.recent_triples(limit), self.vocab.id_of, self.max_len,
                              self.policy)
        return (np.array([i for i, _ in steps], dtype=np.int32),
                np.array([t for _, t in steps], dtype=np.float64))

    def _window(self, read: np.ndarray | tuple[np.ndarray, np.ndarray],
                now: float | None) -> np.ndarray:
        if not self._session[0]:
            return read
        separator, gap = self._session
        return session_window(*read, separator, gap, time.time() if now is None else now,
                              self.max_len)

    def _log_state(self, log: EventLog, now: float | None = None
                   ) -> tuple[np.ndarray, frozenset[str]]:
        """(history, excluded item keys) for ``log``, from the cache when still valid."""
        mark = log.watermark()  # taken first: rows logged meanwhile are re-read next time
        with self._cache_lock:
            cached = self._cache.get(log)
        if cached is not None and cached[0] == mark:
            return self._window(cached[1], now), cached[2]
        kinds = self.policy.exclude_kinds
        if not kinds:
            excluded: frozenset[str] = frozenset()
        elif cached is not None and cached[0][0] == mark[0]:  # only appends since: extend
            excluded = cached[2] | log.items_with_kinds(kinds, since_id=cached[0][1])
        else:
            excluded = frozenset(log.items_with_kinds(kinds))
        read = self._read(log)
        with self._cache_lock:
            self._cache[log] = (mark, read, excluded)
        return self._window(read, now), excluded

    def recommend(
        self,
        log: EventLog,
        k: int = 10,
        *,
        candidates: Collection[str] | Callable[[str], bool] | None = None,
        now: float | None = None,
    ) -> list[Recommendation]:
        """Up to ``k`` items, best first: the model's top-K minus excluded (bought, dismissed),
        unknown and non-candidate items, topped up from the popularity list. An empty history
        gives the popularity list alone. ``candidates`` is a set of allowed keys or a predicate
        (e.g. "in stock"). ``now``: the request's Unix time for a bundle whose model marks
        sessions (default: the clock)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        allowed = _predicate(candidates)
        history, excluded = self._log_state(log, now)
        ranked: list[tuple[str, float | None, str]] = []
        if history.any():
            ids, scores = self.model.topk(history)
            ranked = [
                (self.vocab.keys[i], float(s), "model")
                for i, s in zip(ids.tolist(), scores.tolist(), strict=True)
                if 0 < i < self._n_items  # a garbage id from a broken runtime is dropped
            ]
        out: list[Recommendation] = []
        seen: set[str] = set()
        popular = ((self.vocab.keys[i], None, "popular") for i in self.vocab.popular)
        for key, score, source in itertools.chain(ranked, popular):
            if key in seen or key in excluded or not allowed(key):
                continue
            seen.add(key)
            out.append(Recommendation(key, score, source))
            if len(out) == k:
                break
        return out


def _predicate(candidates: Collection[str] | Callable[[str], bool] | None) -> Callable[[str], bool]:
    if candidates is None:
        return lambda _key: True
    if callable(candidates):
        return candidates
    allowed = frozenset(candidates)
    return allowed.__contains__
