"""Per-device token buckets in process memory.

A bucket holds up to ``per_minute`` tokens and refills at ``per_minute / 60`` per second;
each request takes one. Kept in memory for now: with several gunicorn workers each has its
own buckets, so a device may get up to workers x ``per_minute`` requests per minute."""

from __future__ import annotations

import math
import threading
import time


class RateLimiter:
    """``take(key)`` -> 0 when allowed, else the seconds until a token is available."""

    def __init__(self, per_minute: int, max_keys: int = 100_000) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, updated)
        self._lock = threading.Lock()

    def take(self, key: str, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, updated = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - updated) * self.rate)
            if tokens >= 1.0:
                self._remember(key, tokens - 1.0, now)
                return 0
            self._remember(key, tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self.rate))

    def _remember(self, key: str, tokens: float, now: float) -> None:
        if key not in self._buckets and len(self._buckets) >= self._max_keys:
            # Full buckets carry no information: drop them to bound memory.
            self._buckets = {
                k: (t, u) for k, (t, u) in self._buckets.items()
                if t + (now - u) * self.rate < self.capacity
            }
        self._buckets[key] = (tokens, now)
