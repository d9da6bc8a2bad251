"""The canonical interaction table every loader produces.

A pandas DataFrame with exactly these columns, sorted by (user, timestamp) with the
source's order kept among equal timestamps:

- ``user``: str, the device/person key
- ``item``: str, the external item key
- ``timestamp``: int64, Unix seconds (UTC)
- ``event``: str, one of EVENT_KINDS
"""

from __future__ import annotations

import pandas as pd

EVENT_KINDS: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase", "dismiss")
COLUMNS: tuple[str, ...] = ("user", "item", "timestamp", "event")


class DataFormatError(ValueError):
    """The file is not in the format asked for (or any known format); the message says why."""


def canonical(df: pd.DataFrame) -> pd.DataFrame:
    """Validate and normalise a frame to the canonical table (types, order, index)."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataFormatError(f"interaction table lacks column(s) {missing}")
    out = pd.DataFrame(
        {
            "user": df["user"].astype(str),
            "item": df["item"].astype(str),
            "timestamp": df["timestamp"].astype("int64"),
            "event": df["event"].astype(str),
        }
    )
    unknown = sorted(set(out["event"].unique()) - set(EVENT_KINDS))
    if unknown:
        raise DataFormatError(f"unknown event kind(s) {unknown}; expected one of {EVENT_KINDS}")
    out = out.sort_values(["user", "timestamp"], kind="stable").reset_index(drop=True)
    return out
