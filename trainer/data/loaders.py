"""Read public interaction data sets into the canonical table (see ``interactions``).

Formats (names in ``FORMATS``):

- ``online_retail``: UCI Online Retail CSV (InvoiceNo, StockCode, Description, Quantity,
  InvoiceDate, UnitPrice, CustomerID, Country). One kept invoice line = one ``purchase``.
  Dropped: invoices starting with ``C`` (cancellations) or ``A`` (bad-debt adjustments),
  Quantity <= 0, empty CustomerID, and non-product codes: those in ``NON_PRODUCT_CODES``,
  codes starting with ``GIFT_`` (gift vouchers) and codes without any digit (e.g. ``DCGSSBOY``).
  User = CustomerID as an integer string, item = StockCode upper-cased and stripped.
  InvoiceDate is ``2010-12-01 08:26:00`` (ISO) or ``12/1/2010 8:26`` (the common CSV export);
  it has no zone and is read as UTC.
- ``retailrocket``: ``events.csv`` (timestamp in milliseconds, visitorid, event, itemid, ...);
  view -> view, addtocart -> add_to_cart, transaction -> purchase.
- ``movielens100k``: ``u.data``, tab separated, no header: user item rating timestamp (seconds).
- ``movielens1m``: ``ratings.dat``, ``::`` separated, no header: user::movie::rating::timestamp.
- ``generic``: CSV with header user,item,timestamp[,event]; timestamp is integer/float Unix
  seconds or an ISO-8601 datetime (no zone = UTC); a missing event column means ``purchase``.

Every rating is one ``view`` in the MovieLens formats (the rating value is ignored). Files may be
gzip-compressed whatever their name; compression is recognised from the magic bytes. Header
names are matched case-insensitively.
"""

from __future__ import annotations

import csv
import errno
import gzip
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from trainer.data.interactions import EVENT_KINDS, DataFormatError, canonical

FORMATS: tuple[str, ...] = (
    "online_retail",
    "retailrocket",
    "movielens100k",
    "movielens1m",
    "generic",
)

NON_PRODUCT_CODES: frozenset[str] = frozenset(
    {"POST", "DOT", "M", "D", "C2", "CRUK", "PADS", "BANK CHARGES", "AMAZONFEE", "B", "S"}
)

# Required header columns of the CSV formats, in their canonical spelling.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "online_retail": ("InvoiceNo", "StockCode", "Quantity", "InvoiceDate", "CustomerID"),
    "retailrocket": ("timestamp", "visitorid", "event", "itemid"),
    "generic": ("user", "item", "timestamp"),
}

_RETAILROCKET_EVENTS = {"view": "view", "addtocart": "add_to_cart", "transaction": "purchase"}

_EVENT_ALIASES = {
    **{k: k for k in EVENT_KINDS},
    "addtocart": "add_to_cart",
    "add-to-cart": "add_to_cart",
    "cart": "add_to_cart",
    "transaction": "purchase",
    "buy": "purchase",
}

_GZIP_MAGIC = b"\x1f\x8b"
_INT_LINE_TAB = re.compile(r"^\s*-?\d+\t-?\d+\t-?\d+(\.\d+)?\t-?\d+\s*$")
_INT_LINE_COLONS = re.compile(r"^\s*-?\d+::-?\d+::-?\d+(\.\d+)?::-?\d+\s*$")


def load(path: str | Path, format: str = "auto") -> pd.DataFrame:
    """Load ``path`` as ``format`` (or the detected one) into the canonical interaction table.

    Raises FileNotFoundError if the file is missing, DataFormatError if it is not in the
    format asked for (the message names the missing columns) or has no usable rows.
    """
    path = Path(path)
    _check_exists(path)
    if format == "auto":
        format = detect_format(path)
    elif format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected 'auto' or one of {FORMATS}")
    df = _READERS[format](path)
    if df.empty:
        raise DataFormatError(f"{format} file {path} has no usable rows after filtering")
    return canonical(df)


def detect_format(path: str | Path) -> str:
    """Name the format of ``path`` from its first line (one of ``FORMATS``)."""
    path = Path(path)
    _check_exists(path)
    first = _first_line(path)
    if not first.strip():
        raise DataFormatError(f"cannot detect the format of {path}: the first line is empty")
    header = {name.lower() for name in _split_header(first)}
    for name, required in _REQUIRED.items():
        if {c.lower() for c in required} <= header:
            return name
    if _INT_LINE_TAB.match(first):
        return "movielens100k"
    if _INT_LINE_COLONS.match(first):
        return "movielens1m"
    shown = first if len(first) <= 120 else first[:117] + "..."
    raise DataFormatError(
        f"cannot detect the format of {path}: first line {shown!r} matches none of {FORMATS}"
    )


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))


def _compression(path: Path) -> str | None:
    with path.open("rb") as f:
        return "gzip" if f.read(2) == _GZIP_MAGIC else None


def _first_line(path: Path) -> str:
    opener = gzip.open if _compression(path) == "gzip" else open
    with opener(path, "rb") as f:
        raw = f.readline(64 * 1024)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.rstrip("\r\n")


def _split_header(line: str) -> list[str]:
    return [name.strip() for name in next(csv.reader([line]))]


def _read_csv(path: Path, **kwargs: object) -> pd.DataFrame:
    """pandas.read_csv with detected compression, UTF-8 falling back to Latin-1."""
    compression = _compression(path)
    try:
        try:
            return pd.read_csv(path, compression=compression, encoding="utf-8-sig", **kwargs)
        except UnicodeDecodeError:
            # The widely circulated Online Retail export is Latin-1, not UTF-8.
            return pd.read_csv(path, compression=compression, encoding="latin-1", **kwargs)
    except (pd.errors.ParserError, ValueError) as e:
        raise DataFormatError(f"cannot parse {path}: {e}") from e


def _read_header_csv(path: Path, format: str) -> pd.DataFrame:
    """Read the required columns of a CSV format, renamed to their canonical spelling."""
    header = _split_header(_first_line(path))
    by_lower = {name.lower(): name for name in header}
    required = _REQUIRED[format]
    optional = ("event",) if format == "generic" else ()
    missing = [c for c in required if c.lower() not in by_lower]
    if missing:
        raise DataFormatError(f"{format} file {path} lacks column(s) {missing}")
    wanted = [c for c in required + optional if c.lower() in by_lower]
    rename = {by_lower[c.lower()]: c for c in wanted}
    # Everything as text: codes like "00123" or "85123A" must not be turned into numbers.
    df = _read_csv(path, usecols=list(rename), dtype=str, keep_default_na=False)
    return df.rename(columns=rename)


def _per_distinct(values: pd.Series) -> tuple[np.ndarray, pd.Series]:
    """Codes and distinct values, so text work runs once per distinct value, not per row."""
    codes, uniques = pd.factorize(values, sort=False)
    return codes, pd.Series(uniques, dtype=str)


def _unix_seconds_from_dates(values: pd.Series, formats: tuple[str, ...], what: str) -> np.ndarray:
    """Parse datetime text (no zone = UTC) to int64 Unix seconds, trying ``formats`` in turn."""
    # Timestamps repeat a lot (one per invoice), so parse each distinct text once.
    codes, uniques = _per_distinct(values)
    uniques = uniques.str.strip()
    last_error: Exception | None = None
    for fmt in formats:
        try:
            parsed = pd.to_datetime(uniques, format=fmt, utc=True)
            break
        except (ValueError, TypeError) as e:
            last_error = e
    else:
        raise DataFormatError(f"cannot parse {what}: {last_error}") from last_error
    seconds = parsed.dt.tz_localize(None).to_numpy().astype("datetime64[s]").astype("int64")
    return seconds[codes]


def _int_column(values: pd.Series, what: str) -> np.ndarray:
    numbers = pd.to_numeric(values.str.strip(), errors="coerce")
    bad = numbers.isna()
    if bad.any():
        raise DataFormatError(f"{what} has non-numeric value(s), e.g. {values[bad].iloc[0]!r}")
    return np.floor(numbers.to_numpy(dtype="float64")).astype("int64")


def _events(values: pd.Series, mapping: dict[str, str], what: str) -> pd.Series:
    mapped = values.str.strip().str.lower().map(mapping)
    unknown = mapped.isna()
    if unknown.any():
        kinds = sorted(values[unknown].unique())[:10]
        raise DataFormatError(f"{what} has unknown event kind(s) {kinds}; known: {sorted(mapping)}")
    return mapped


def _load_online_retail(path: Path) -> pd.DataFrame:
    df = _read_header_csv(path, "online_retail")
    # Python-level string ops on 540k rows take seconds; the columns have only ~4k-26k
    # distinct values, so clean and test those and index back.
    inv_codes, invoices = _per_distinct(df["InvoiceNo"])
    bad_invoice = invoices.str.strip().str.upper().str.startswith(("C", "A")).to_numpy()
    cust_codes, customers = _per_distinct(df["CustomerID"])
    customers = customers.str.strip().str.replace(r"\.0*$", "", regex=True)
    item_codes, items = _per_distinct(df["StockCode"])
    items = items.str.strip().str.upper()
    bad_item = (
        items.isin(NON_PRODUCT_CODES) | items.str.startswith("GIFT_") | ~items.str.contains(r"\d")
    ).to_numpy()
    quantity = pd.to_numeric(df["Quantity"], errors="coerce").to_numpy()
    keep = (
        ~bad_invoice[inv_codes]
        & (quantity > 0)
        & (customers.to_numpy() != "")[cust_codes]
        & ~bad_item[item_codes]
    )
    if not keep.any():
        return pd.DataFrame(columns=["user", "item", "timestamp", "event"])
    timestamp = _unix_seconds_from_dates(
        df.loc[keep, "InvoiceDate"],
        ("ISO8601", "%m/%d/%Y %H:%M", "%m/%d/%Y %H:%M:%S"),
        f"InvoiceDate in {path}",
    )
    return pd.DataFrame(
        {
            "user": customers.to_numpy()[cust_codes[keep]],
            "item": items.to_numpy()[item_codes[keep]],
            "timestamp": timestamp,
            "event": "purchase",
        }
    )


def _load_retailrocket(path: Path) -> pd.DataFrame:
    df = _read_header_csv(path, "retailrocket")
    millis = _int_column(df["timestamp"], f"timestamp in {path}")
    return pd.DataFrame(
        {
            "user": df["visitorid"].str.strip(),
            "item": df["itemid"].str.strip(),
            "timestamp": millis // 1000,
            "event": _events(df["event"], _RETAILROCKET_EVENTS, f"retailrocket file {path}"),
        }
    )


def _load_movielens(path: Path, format: str, sep: str, fields: int, layout: str) -> pd.DataFrame:
    df = _read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False)
    if df.shape[1] != fields:
        raise DataFormatError(
            f"{format} file {path} has {df.shape[1]} field(s) per line split on {sep!r}; "
            f"expected {layout}"
        )
    return df


def _load_movielens100k(path: Path) -> pd.DataFrame:
    layout = "4 tab-separated fields: user item rating timestamp"
    df = _load_movielens(path, "movielens100k", "\t", 4, layout)
    user, item, timestamp = df[0], df[1], df[3]
    return _movielens_frame(user, item, timestamp, path)


def _load_movielens1m(path: Path) -> pd.DataFrame:
    # Splitting on ":" keeps pandas' fast C parser ("::" would need the python engine);
    # each "::" then leaves an empty field between the four real ones.
    layout = "user::movie::rating::timestamp"
    df = _load_movielens(path, "movielens1m", ":", 7, layout)
    if (df[[1, 3, 5]] != "").any(axis=None):
        raise DataFormatError(f"movielens1m file {path} is not '::' separated ({layout})")
    return _movielens_frame(df[0], df[2], df[6], path)


def _movielens_frame(
    user: pd.Series, item: pd.Series, timestamp: pd.Series, path: Path
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user": user.str.strip(),
            "item": item.str.strip(),
            "timestamp": _int_column(timestamp, f"timestamp in {path}"),
            "event": "view",
        }
    )


def _load_generic(path: Path) -> pd.DataFrame:
    df = _read_header_csv(path, "generic")
    user, item = df["user"].str.strip(), df["item"].str.strip()
    empty = (user == "") | (item == "")
    if empty.any():
        line = int(np.flatnonzero(empty.to_numpy())[0]) + 2  # 1-based, after the header
        raise DataFormatError(
            f"generic file {path} has {int(empty.sum())} row(s) without user or item "
            f"(first on line {line})"
        )
    stamps = df["timestamp"].str.strip()
    numbers = pd.to_numeric(stamps, errors="coerce")
    if numbers.notna().all():
        timestamp = np.floor(numbers.to_numpy(dtype="float64")).astype("int64")
    else:
        timestamp = _unix_seconds_from_dates(stamps, ("ISO8601",), f"timestamp in {path}")
    if "event" in df.columns:
        event = _events(df["event"], _EVENT_ALIASES, f"generic file {path}")
    else:
        event = "purchase"
    return pd.DataFrame({"user": user, "item": item, "timestamp": timestamp, "event": event})


_READERS = {
    "online_retail": _load_online_retail,
    "retailrocket": _load_retailrocket,
    "movielens100k": _load_movielens100k,
    "movielens1m": _load_movielens1m,
    "generic": _load_generic,
}
