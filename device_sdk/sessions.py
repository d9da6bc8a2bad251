"""Session boundaries in a model's history: a reserved separator id between two steps more
than ``gap`` seconds apart, and after the last step when the request comes more than ``gap``
seconds after it.

A history of item ids alone cannot tell "the shopper is filling a basket now" from "a new
visit starts": the first wants the next item of the basket being built, the second the items
people buy again. The separator is that signal, in the same int32 ids the serving graph
already takes. A model trained with it (``config.session_id`` > 0) gets it from the trainer,
the evaluation and the device alike, through ``session_tokens``; its vocabulary carries the
separator as the last key, ``SESSION_KEY``, and its output never ranks it."""

from __future__ import annotations

import numpy as np

# The separator's vocabulary key: ASCII "record separator", never a product code.
SESSION_KEY = "\x1e"


def session_tokens(ids: np.ndarray, times: np.ndarray, separator: int, gap: float,
                   now: float | None = None) -> np.ndarray:
    """Item ids (oldest first) and their Unix times -> int32 ids with ``separator`` between
    two steps more than ``gap`` seconds apart, and after the last step when ``now`` is more
    than ``gap`` seconds later (the request opens a new session)."""
    ids = np.asarray(ids, dtype=np.int32)
    times = np.asarray(times, dtype=np.float64)
    if ids.shape != times.shape or ids.ndim != 1:
        raise ValueError(f"ids and times must be 1-D of one length, got {ids.shape} and "
                         f"{times.shape}")
    if separator <= 0 or gap <= 0:
        raise ValueError(f"separator and gap must be > 0, got {separator} and {gap}")
    if not len(ids):
        return ids
    breaks = np.flatnonzero(np.diff(times) > gap) + 1  # first step of each later session
    out = np.insert(ids, breaks, np.int32(separator))
    if now is not None and now - times[-1] > gap:
        out = np.append(out, np.int32(separator))
    return out


def session_targets(tokens: np.ndarray, separator: int) -> np.ndarray:
    """The next-item target of each token of ``session_tokens``' output but the last ->
    int32 [len - 1], 0 (no target) where the next token is the separator."""
    nxt = np.asarray(tokens[1:], dtype=np.int32).copy()
    nxt[nxt == separator] = 0
    return nxt


def session_window(ids: np.ndarray, times: np.ndarray, separator: int, gap: float,
                   now: float | None, max_len: int) -> np.ndarray:
    """``session_tokens``' last ``max_len`` ids, left-padded with 0 -> int32 [max_len]."""
    tokens = session_tokens(ids, times, separator, gap, now)[-max_len:]
    out = np.zeros(max_len, dtype=np.int32)
    if len(tokens):
        out[max_len - len(tokens):] = tokens
    return out


def session_histories(history: np.ndarray, times: np.ndarray, now: np.ndarray,
                      separator: int, gap: float) -> np.ndarray:
    """Left-padded [U, L] histories with their step times [U, L] and each row's request time
    [U] -> the same rows with separators inserted (``session_window`` per row; the oldest
    steps make room for them)."""
    history = np.asarray(history)
    out = np.zeros(history.shape, dtype=np.int32)
    for row in range(len(history)):
        real = history[row] > 0
        out[row] = session_window(history[row][real], times[row][real], separator, gap,
                                  float(now[row]), history.shape[1])
    return out
