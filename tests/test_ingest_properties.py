"""Property-based tests of the loaders: random malformed rows and files never crash an ingest.

Row-level garbage under a valid header must never raise: every physical line is read and either accepted or
rejected (accepted + rejected = read, matching the ledger and raw.events_rejected). A random file may also be
refused, but only with InputFileError (the file is not of its declared format).
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.ingest_helpers import AOL_HEADER, rows, settings_in
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persona_tasks.errors import InputFileError
from persona_tasks.ingest import ingest_files

# a handful of examples per property keeps the suite quick; INGEST_PROPERTY_EXAMPLES=200 explores much more
PROPS = settings(max_examples=int(os.environ.get("INGEST_PROPERTY_EXAMPLES", "12")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_counter = itertools.count()

MOVIES = 'movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n2,"Big, Film (2000)",Drama\n'

# --------------------------------------------------------------------------------------------- strategies

garbage = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n"), max_size=20)
words = st.text(alphabet="abcdefghij xyz'\"-&,", min_size=1, max_size=15)
raw_bytes = st.binary(max_size=40)
digits = st.integers(min_value=-5, max_value=10**12).map(str)
users = st.integers(min_value=0, max_value=30).map(str)
dates = st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2150, 1, 1))
good_dates = st.datetimes(min_value=datetime(1995, 1, 1), max_value=datetime(2030, 1, 1))


def mostly(good: st.SearchStrategy, *bad: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` about four times in five, else one of ``bad`` (one_of alone picks the bad ones too often)."""
    worse = st.one_of(*bad)
    return st.integers(0, 99).flatmap(lambda i: good if i < 80 else worse)


aol_time = mostly(good_dates.map(lambda d: d.strftime("%Y-%m-%d %H:%M:%S")),
                  dates.map(lambda d: d.strftime("%Y-%m-%d %H:%M:%S")), garbage, st.just(""))
epoch = mostly(good_dates.map(lambda d: str(int(d.replace(tzinfo=timezone.utc).timestamp()))), digits, garbage)
iso = mostly(good_dates.map(lambda d: d.isoformat()), dates.map(lambda d: d.strftime("%Y-%m-%d %H:%M:%S+05:00")),
             good_dates.map(lambda d: str(int(d.timestamp() * 1000))), garbage, st.just(""))
etype = mostly(st.sampled_from(["search", "click", "view", "purchase", "Click", " view "]),
               st.sampled_from(["teleport", ""]), garbage)


def _line(fields: st.SearchStrategy, sep: str) -> st.SearchStrategy:
    """Mostly a row of fields joined by sep; else one with a field dropped or added, invalid UTF-8 or raw bytes."""
    joined = fields.map(lambda t: sep.join(t))
    ragged = st.tuples(fields, st.sampled_from([-1, 1, 2])).map(
        lambda t: sep.join(list(t[0])[: len(t[0]) + t[1]] if t[1] < 0 else list(t[0]) + ["x"] * t[1]))
    return mostly(joined.map(lambda s: s.encode("utf-8")),
                  ragged.map(lambda s: s.encode("utf-8")), joined.map(lambda s: s.encode() + b"\xff\xfe"),
                  raw_bytes, st.just(b""), st.just(b"\r"))


aol_line = _line(st.tuples(mostly(users, garbage, st.just("")), mostly(words, garbage, st.just("")), aol_time,
                           mostly(st.just(""), digits, garbage),
                           mostly(st.sampled_from(["", "http://www.example.com/a", "https://B.org"]), garbage)), "\t")
csv_field = st.one_of(garbage, garbage.map(lambda s: '"' + s.replace('"', '""') + '"'))
ml_line = _line(st.tuples(mostly(users, csv_field), mostly(st.sampled_from(["1", "2", "9"]), csv_field),
                          mostly(st.sampled_from(["0.5", "4.5", "5.0"]), st.sampled_from(["6", "nan", "-1"]),
                                 csv_field),
                          mostly(epoch, csv_field)), ",")
ev_csv_line = _line(st.tuples(mostly(users, csv_field), mostly(iso, csv_field), mostly(etype, csv_field),
                              mostly(users, csv_field), mostly(words.map(lambda w: '"' + w.replace('"', '""') + '"'),
                                                               csv_field)), ",")
json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | garbage,
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(garbage, c, max_size=3), max_leaves=6)
ev_json_line = mostly(
    st.fixed_dictionaries({"user_id": mostly(users, json_value), "event_ts": mostly(iso, json_value),
                           "event_type": mostly(etype, json_value)},
                          optional={"item_id": json_value, "text": json_value}).map(lambda d: json.dumps(d).encode()),
    json_value.map(lambda v: json.dumps(v).encode()),
    raw_bytes,
)


def expected_rows(body: bytes) -> int:
    """Independent count of data rows: non-empty physical lines (one trailing CR stripped)."""
    n = 0
    for seg in body.split(b"\n"):
        if seg.endswith(b"\r"):
            seg = seg[:-1]
        n += bool(seg)
    return n


# --------------------------------------------------------------------------------------------- checks


@pytest.fixture(scope="module")
def wh(tmp_path_factory):
    return tmp_path_factory.mktemp("props")


def _fresh(wh: Path, name: str) -> Path:
    d = wh / f"f{next(_counter)}"
    d.mkdir()
    return d / name


def _check(s, report, expected_read: int | None = None):
    for f in report.files:
        if f.skipped:
            continue
        assert f.rows_accepted + f.rows_rejected == f.rows_read
        if expected_read is not None:
            assert f.rows_read == expected_read
        ledger = rows(s, "SELECT rows_read, rows_accepted, rows_rejected, events_new FROM raw.ingest_batches "
                         "WHERE batch_id = ?", [f.batch_id])
        assert ledger == [(f.rows_read, f.rows_accepted, f.rows_rejected, f.events_new)]
        assert rows(s, "SELECT count(*) FROM raw.events_rejected WHERE batch_id = ?", [f.batch_id]) == [
            (f.rows_rejected,)]
        assert rows(s, "SELECT count(*) FROM raw.events WHERE batch_id = ?", [f.batch_id]) == [(f.events_new,)]
        # reasons and fields are from a fixed vocabulary, never the data
        for field, reason in rows(s, "SELECT DISTINCT field, reason FROM raw.events_rejected WHERE batch_id = ?",
                                  [f.batch_id]):
            assert reason.isascii() and len(reason) < 80, reason


# --------------------------------------------------------------------------------------------- row level


@PROPS
@given(lines=st.lists(aol_line, max_size=25), gz=st.booleans(), dup=st.integers(0, 3))
def test_aol_random_rows_never_crash(wh, lines, gz, dup):
    s = settings_in(wh)
    body = b"\n".join(lines + lines[:dup])
    data = AOL_HEADER.encode() + b"\n" + body
    path = _fresh(wh, "log.txt.gz" if gz else "log.txt")
    path.write_bytes(gzip.compress(data) if gz else data)
    report = ingest_files(s, "aol", [path])
    _check(s, report, expected_rows(body))


@PROPS
@given(lines=st.lists(ml_line, max_size=25))
def test_movielens_random_rows_never_crash(wh, lines):
    s = settings_in(wh)
    body = b"\n".join(lines)
    path = _fresh(wh, "ratings.csv")
    path.write_bytes(b"userId,movieId,rating,timestamp\n" + body)
    (path.parent / "movies.csv").write_text(MOVIES)
    _check(s, ingest_files(s, "movielens", [path.parent]), expected_rows(body))


@PROPS
@given(lines=st.lists(ev_csv_line, max_size=25), ts_format=st.sampled_from([None, "epoch_ms", "%Y-%m-%d"]),
       dup=st.integers(0, 3))
def test_events_csv_random_rows_never_crash(wh, lines, ts_format, dup):
    s = settings_in(wh, ts_format=ts_format, event_type_map={"Click": "click"})
    body = b"\n".join(lines + lines[:dup])
    path = _fresh(wh, "ev.csv")
    path.write_bytes(b"user_id,event_ts,event_type,item_id,text\n" + body)
    _check(s, ingest_files(s, "events", [path]), expected_rows(body))


@PROPS
@given(lines=st.lists(ev_json_line, max_size=25))
def test_events_jsonl_random_rows_never_crash(wh, lines):
    s = settings_in(wh)
    body = b"\n".join(lines)
    if body[:2] == b"\x1f\x8b":  # would read as a (corrupt) gzip file: not a row-level case
        body = b"{}\n" + body
    path = _fresh(wh, "ev.jsonl")
    path.write_bytes(body)
    try:
        report = ingest_files(s, "events", [path])
    except InputFileError as exc:  # only allowed when no record has user_id / event_ts / event_type at all
        assert "no record has" in str(exc) or "empty file" in str(exc)
        return
    _check(s, report, expected_rows(body))


def _column(kind: str, values: list) -> pa.Array:
    if kind == "str":
        return pa.array([None if v is None else str(v) for v in values], pa.string())
    if kind == "int":
        return pa.array([v if isinstance(v, int) else None for v in values], pa.int64())
    if kind == "ts":
        base = datetime(1970, 1, 1, tzinfo=timezone.utc)
        return pa.array([base + timedelta(seconds=v % 10**10) if isinstance(v, int) else None for v in values],
                        pa.timestamp("us", tz="UTC"))
    return pa.array([float(v) if isinstance(v, int) else None for v in values], pa.float64())


cell = st.one_of(st.none(), st.integers(-(2**62), 2**62), garbage)
good_cells = {
    "user_id": mostly(st.integers(0, 9), cell), "item_id": mostly(st.integers(0, 9), cell),
    "name": mostly(words, cell), "text": mostly(words, cell), "price": mostly(st.integers(0, 500), cell),
    "event_id": mostly(st.sampled_from(["item_view", "buy_comp", "offer_make"]), cell),
    "event_type": mostly(st.sampled_from(["view", "purchase", "Click"]), cell),
    "stime": mostly(st.integers(10**9, 2 * 10**9), cell), "event_ts": mostly(st.integers(10**9, 2 * 10**9), cell),
}
kinds = st.sampled_from(["str", "int", "ts", "float"])


@PROPS
@given(n=st.integers(0, 20), data=st.data(), fmt=st.sampled_from(["merrec", "events"]))
def test_parquet_random_rows_never_crash(wh, n, data, fmt):
    cols = (["user_id", "item_id", "name", "event_id", "stime", "price"] if fmt == "merrec"
            else ["user_id", "event_ts", "event_type", "item_id", "text"])
    table = pa.table({c: _column(data.draw(kinds, c), data.draw(st.lists(good_cells[c], min_size=n, max_size=n), c))
                      for c in cols})
    path = _fresh(wh, "x.parquet")
    pq.write_table(table, path)
    s = settings_in(wh, ts_format=data.draw(st.sampled_from([None, "epoch_s"])))
    _check(s, ingest_files(s, fmt, [path]), n)


# --------------------------------------------------------------------------------------------- file level


def _truncate(data: bytes, cut: int) -> bytes:
    return data[: max(1, len(data) - cut)] if data else data


random_file = st.one_of(
    st.binary(max_size=300),
    st.tuples(st.lists(aol_line, max_size=8), st.sampled_from([AOL_HEADER.encode(), b"userId,movieId,rating,timestamp",
                                                               b"user_id,event_ts,event_type,item_id,text", b""]))
    .map(lambda t: b"\n".join([t[1], *t[0]])),
)


@PROPS
@given(content=random_file, gz=st.booleans(), cut=st.integers(0, 30), fmt=st.sampled_from(
    ["aol", "movielens", "merrec", "events:csv", "events:jsonl", "events:parquet"]))
def test_random_files_fail_only_with_input_file_error(wh, content, gz, cut, fmt):
    if gz:
        content = gzip.compress(content)
        content = _truncate(content, cut) if cut else content
    fmt, _, kind = fmt.partition(":")
    name = {"aol": "log.txt", "movielens": "ratings.csv", "merrec": "x.parquet"}.get(fmt, f"ev.{kind}")
    path = _fresh(wh, name)
    path.write_bytes(content)
    if fmt == "movielens":
        (path.parent / "movies.csv").write_text(MOVIES)
    s = settings_in(wh)
    try:
        report = ingest_files(s, fmt, [path])
    except InputFileError as exc:
        assert str(path) in str(exc)
        return
    _check(s, report)


def test_expected_rows_helper():
    assert expected_rows(b"a\n\nb\r\n\r\n\r\rc") == 3
