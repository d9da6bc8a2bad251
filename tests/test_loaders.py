"""Loaders: every format from small fixtures, auto-detection, errors, and the real Online Retail."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from trainer.data.interactions import COLUMNS, DataFormatError
from trainer.data.loaders import FORMATS, NON_PRODUCT_CODES, detect_format, load

REAL_ONLINE_RETAIL = Path(__file__).resolve().parents[2] / "shared/data/online_retail.csv.gz"

OR_HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country"

# (InvoiceNo, StockCode, Description, Quantity, ISO date, UnitPrice, CustomerID); the comment
# says why each row is kept or dropped. Each dropped row breaks exactly one rule.
OR_ROWS = [
    ("536365", "85123A", "WHITE HANGING HEART", "6", "2010-12-01 08:26:00", "2.55", "17850"),
    ("536365", "71053", "WHITE METAL LANTERN", "6", "2010-12-01 08:26:00", "3.39", "17850"),
    ("C536379", "22556", "CANCELLED", "1", "2010-12-01 09:41:00", "27.5", "14527"),  # cancel
    ("536370", "POST", "POSTAGE", "3", "2010-12-01 08:45:00", "18.0", "12583"),  # postage
    ("536414", "22139", '"TEA SET, CERAMIC"', "56", "2010-12-01 11:52:00", "0.0", ""),  # no user
    ("A563185", "22423", "Adjust bad debt", "1", "2011-08-12 14:50:00", "1.0", "12583"),  # A
    ("536370", "22728", "ALARM CLOCK", "24", "2010-12-01 08:45:00", "3.75", "12583.0"),  # keep
    ("536381", "gift_0001_10", "Gift Voucher", "1", "2010-12-01 09:41:00", "8.51", "12583"),
    ("536382", "DCGSSBOY", "BOYS PARTY BAG", "1", "2010-12-01 09:42:00", "3.29", "12583"),
    ("536383", "c2", "CARRIAGE", "1", "2010-12-01 09:43:00", "50.0", "12583"),  # C2 after upper
    ("536384", "22960", "JAM MAKING SET", "0", "2010-12-01 09:44:00", "4.25", "12583"),  # qty 0
    ("536385", " 84406b ", "CREAM CUPID", "2", "2010-12-01 07:00:00", "2.1", "17850"),  # keep
    ("536386", "DCGS0003", "BOXED ASHTRAY", "1", "2010-12-02 10:00:00", "2.0", "12583"),  # keep
]


def _utc(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


OR_EXPECTED = pd.DataFrame(
    [
        ("12583", "22728", _utc("2010-12-01 08:45:00"), "purchase"),
        ("12583", "DCGS0003", _utc("2010-12-02 10:00:00"), "purchase"),
        ("17850", "84406B", _utc("2010-12-01 07:00:00"), "purchase"),
        ("17850", "85123A", _utc("2010-12-01 08:26:00"), "purchase"),
        ("17850", "71053", _utc("2010-12-01 08:26:00"), "purchase"),
    ],
    columns=list(COLUMNS),
)


def _us_date(iso: str) -> str:
    """The widely circulated export's form: 12/1/2010 8:26."""
    d = datetime.fromisoformat(iso)
    return f"{d.month}/{d.day}/{d.year} {d.hour}:{d.minute:02d}"


def _online_retail_text(us_dates: bool = False) -> str:
    lines = [OR_HEADER]
    for inv, code, desc, qty, date, price, cust in OR_ROWS:
        date = _us_date(date) if us_dates else date
        lines.append(",".join([inv, code, desc, qty, date, price, cust, "United Kingdom"]))
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, *, gz: bool = False, encoding: str = "utf-8") -> Path:
    data = text.encode(encoding)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _rows(df: pd.DataFrame) -> list[tuple]:
    return list(df.itertuples(index=False, name=None))


def _assert_canonical(df: pd.DataFrame) -> None:
    assert list(df.columns) == list(COLUMNS)
    assert df["timestamp"].dtype == "int64"
    assert df.index.equals(pd.RangeIndex(len(df)))


# --- Online Retail ---------------------------------------------------------------------------


def test_online_retail_filters_and_maps(tmp_path: Path) -> None:
    path = _write(tmp_path / "retail.csv", _online_retail_text())
    df = load(path, "online_retail")
    _assert_canonical(df)
    assert _rows(df) == _rows(OR_EXPECTED)
    assert _utc("2010-12-01 08:26:00") == 1291191960  # the conversion itself, pinned


@pytest.mark.parametrize(
    ("name", "us_dates"),
    [("retail.csv.gz", False), ("retail.csv.gz", True), ("no_extension", True)],
)
def test_online_retail_gzip_and_us_dates(tmp_path: Path, name: str, us_dates: bool) -> None:
    path = _write(tmp_path / name, _online_retail_text(us_dates), gz=True)
    assert detect_format(path) == "online_retail"
    assert _rows(load(path)) == _rows(OR_EXPECTED)


def test_online_retail_latin1_export(tmp_path: Path) -> None:
    text = _online_retail_text(us_dates=True).replace("ALARM CLOCK", "ALARM CLOCK £3")
    path = _write(tmp_path / "Online Retail.csv", text, encoding="latin-1")
    assert _rows(load(path)) == _rows(OR_EXPECTED)


def test_online_retail_nothing_left_after_filtering(tmp_path: Path) -> None:
    text = OR_HEADER + "\nC536379,22556,CANCELLED,-1,2010-12-01 09:41:00,27.5,14527,UK\n"
    path = _write(tmp_path / "cancels.csv", text)
    with pytest.raises(DataFormatError, match="no usable rows"):
        load(path)


def test_online_retail_bad_date(tmp_path: Path) -> None:
    text = OR_HEADER + "\n536365,85123A,X,6,yesterday,2.55,17850,UK\n"
    with pytest.raises(DataFormatError, match="InvoiceDate"):
        load(_write(tmp_path / "bad.csv", text))


# --- RetailRocket ----------------------------------------------------------------------------

RR_TEXT = """timestamp,visitorid,event,itemid,transactionid
1433221332117,257597,view,355908,
1433224214164,992329,view,248676,
1433221999827,111016,view,318965,
1433222000000,257597,addtocart,355908,
1433222100500,257597,transaction,355908,4000
"""


def test_retailrocket(tmp_path: Path) -> None:
    path = _write(tmp_path / "events.csv", RR_TEXT)
    assert detect_format(path) == "retailrocket"
    df = load(path)
    _assert_canonical(df)
    assert _rows(df) == [
        ("111016", "318965", 1433221999, "view"),
        ("257597", "355908", 1433221332, "view"),
        ("257597", "355908", 1433222000, "add_to_cart"),
        ("257597", "355908", 1433222100, "purchase"),
        ("992329", "248676", 1433224214, "view"),
    ]


def test_retailrocket_unknown_event(tmp_path: Path) -> None:
    path = _write(tmp_path / "events.csv", RR_TEXT.replace("addtocart", "wishlist"))
    with pytest.raises(DataFormatError, match="wishlist"):
        load(path)


# --- MovieLens -------------------------------------------------------------------------------


def test_movielens100k(tmp_path: Path) -> None:
    text = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t377\t1\t878887116\n"
    path = _write(tmp_path / "u.data", text)
    assert detect_format(path) == "movielens100k"
    df = load(path)
    _assert_canonical(df)
    assert _rows(df) == [
        ("186", "302", 891717742, "view"),
        ("196", "377", 878887116, "view"),
        ("196", "242", 881250949, "view"),
    ]


def test_movielens1m(tmp_path: Path) -> None:
    text = (
        "1::1193::5::978300760\n1::661::3::978302109\n"
        "2::1357::5::978298709\n10::3068::4::978299000\n"
    )
    path = _write(tmp_path / "ratings.dat", text, gz=True)
    assert detect_format(path) == "movielens1m"
    df = load(path)
    _assert_canonical(df)
    # Users are text keys, so "10" sorts between "1" and "2".
    assert _rows(df) == [
        ("1", "1193", 978300760, "view"),
        ("1", "661", 978302109, "view"),
        ("10", "3068", 978299000, "view"),
        ("2", "1357", 978298709, "view"),
    ]


# --- generic ---------------------------------------------------------------------------------


def test_generic_integer_seconds_and_event_aliases(tmp_path: Path) -> None:
    text = """user,item,timestamp,event,extra
a,x,100,view,1
a,x,105,AddToCart,1
a,y,103,cart,1
a,z,101,add-to-cart,1
b,x,50,transaction,1
b,y,51,buy,1
b,z,52, purchase ,1
b,w,53,dismiss,1
b,v,53,click,1
"""
    path = _write(tmp_path / "log.csv", text)
    assert detect_format(path) == "generic"
    assert _rows(load(path)) == [
        ("a", "x", 100, "view"),
        ("a", "z", 101, "add_to_cart"),
        ("a", "y", 103, "add_to_cart"),
        ("a", "x", 105, "add_to_cart"),
        ("b", "x", 50, "purchase"),
        ("b", "y", 51, "purchase"),
        ("b", "z", 52, "purchase"),
        ("b", "w", 53, "dismiss"),
        ("b", "v", 53, "click"),
    ]


def test_generic_iso_dates_without_event(tmp_path: Path) -> None:
    text = """User,Item,Timestamp
u1,0042,2020-01-01 00:00:10
u1,0007,2020-01-01T01:00:00+01:00
"""
    df = load(_write(tmp_path / "log.csv", text))
    assert _rows(df) == [
        ("u1", "0007", _utc("2020-01-01 00:00:00"), "purchase"),
        ("u1", "0042", _utc("2020-01-01 00:00:10"), "purchase"),
    ]


def test_generic_unknown_event(tmp_path: Path) -> None:
    path = _write(tmp_path / "log.csv", "user,item,timestamp,event\na,x,1,like\n")
    with pytest.raises(DataFormatError, match="like"):
        load(path)


def test_generic_missing_user(tmp_path: Path) -> None:
    path = _write(tmp_path / "log.csv", "user,item,timestamp\na,x,1\n,y,2\n")
    with pytest.raises(DataFormatError, match="line 3"):
        load(path)


# --- errors ----------------------------------------------------------------------------------


def test_named_format_lists_missing_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "x.csv", "Quantity,InvoiceDate,CustomerID\n1,2010-12-01 08:26:00,1\n")
    with pytest.raises(DataFormatError) as info:
        load(path, "online_retail")
    expected = f"online_retail file {path} lacks column(s) ['InvoiceNo', 'StockCode']"
    assert str(info.value) == expected


def test_wrong_named_format(tmp_path: Path) -> None:
    retail = _write(tmp_path / "retail.csv", _online_retail_text())
    with pytest.raises(DataFormatError, match=r"lacks column\(s\) \['timestamp', 'visitorid'"):
        load(retail, "retailrocket")
    with pytest.raises(DataFormatError, match=r"lacks column\(s\) \['user', 'item', 'timestamp'\]"):
        load(retail, "generic")
    with pytest.raises(DataFormatError, match="expected 4 tab-separated fields"):
        load(retail, "movielens100k")
    events = _write(tmp_path / "events.csv", RR_TEXT)
    with pytest.raises(DataFormatError, match=r"\['InvoiceNo', 'StockCode', 'Quantity'"):
        load(events, "online_retail")


def test_unrecognisable_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "notes.txt", "hello world,42\nmore text\n")
    with pytest.raises(DataFormatError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message
    assert "hello world,42" in message
    assert all(name in message for name in FORMATS)


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="empty"):
        detect_format(_write(tmp_path / "empty.csv", ""))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load(path)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        detect_format(path)


def test_unknown_format_name(tmp_path: Path) -> None:
    path = _write(tmp_path / "events.csv", RR_TEXT)
    with pytest.raises(ValueError, match="unknown format 'parquet'"):
        load(path, "parquet")


# --- the real data set -----------------------------------------------------------------------


def test_real_online_retail() -> None:
    df = load(REAL_ONLINE_RETAIL)
    _assert_canonical(df)
    assert set(df["event"]) == {"purchase"}
    assert (df["user"] != "").all() and df["user"].str.fullmatch(r"\d{5}").all()
    assert 380_000 <= len(df) <= 400_000  # well below the 541,909 raw lines
    assert 4_300 <= df["user"].nunique() <= 4_372
    assert 3_600 <= df["item"].nunique() <= 4_000
    items = set(df["item"])
    assert not items & NON_PRODUCT_CODES
    assert not any(item.startswith("GIFT_") for item in items)
    assert all(any(ch.isdigit() for ch in item) for item in items)
    assert df["timestamp"].min() >= _utc("2010-12-01 00:00:00")
    assert df["timestamp"].max() < _utc("2011-12-10 00:00:00")
