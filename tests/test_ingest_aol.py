"""`persona-etl ingest --format aol`: the bundled AOL sample against an independent count, bad rows, bad files,
idempotency."""

from __future__ import annotations

import gzip
import shutil
from datetime import datetime
from pathlib import Path

import pytest
from fixtures.ingest_helpers import AOL_SAMPLE, aol_file, rows, scalar, settings_in, table_counts, write_bytes

from persona_tasks.errors import InputFileError
from persona_tasks.ingest import compute_event_id, ingest_files


def _independent_aol(path: Path) -> dict:
    """Plain-Python reading of an AOL file (gzip + split on tab), the way the format is defined."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    assert lines[0] == "AnonID\tQuery\tQueryTime\tItemRank\tClickURL"
    data = [ln.rstrip("\r").split("\t") for ln in lines[1:] if ln]
    assert all(len(r) == 5 for r in data)
    searches = {(r[0], r[2], r[1].strip()) for r in data}
    clicks = {(r[0], r[2], r[4]) for r in data if r[4]}
    return {
        "rows": len(data),
        "users": len({r[0] for r in data}),
        "searches": len(searches),
        "clicks": len(clicks),
        "click_rows": sum(1 for r in data if r[4]),
        "first": data[0],
    }


@pytest.fixture(scope="module")
def aol_loaded(tmp_path_factory):
    s = settings_in(tmp_path_factory.mktemp("aol"))
    report = ingest_files(s, "aol", [AOL_SAMPLE])
    return s, report


def test_aol_sample_matches_independent_count(aol_loaded):
    s, report = aol_loaded
    exp = _independent_aol(AOL_SAMPLE)
    assert exp["rows"] == 122_930 and exp["users"] == 300  # as documented in data/README.md
    (f,) = report.files
    assert not f.skipped
    assert (f.rows_read, f.rows_accepted, f.rows_rejected) == (exp["rows"], exp["rows"], 0)
    t = report.totals()
    assert (t.rows_read, t.rows_accepted, t.rows_rejected) == (exp["rows"], exp["rows"], 0)
    assert f.events_new == exp["searches"] + exp["clicks"]
    assert f.events_duplicate == exp["click_rows"] - exp["clicks"]
    by_type = dict(rows(s, "SELECT event_type, count(*) FROM raw.events GROUP BY 1"))
    assert by_type == {"search": exp["searches"], "click": exp["clicks"]}
    assert scalar(s, "SELECT count(DISTINCT user_id) FROM raw.events") == exp["users"]
    assert scalar(s, "SELECT count(*) FROM raw.events_rejected") == 0
    ledger = rows(s, "SELECT format, source, rows_read, rows_accepted, rows_rejected, events_new "
                     "FROM raw.ingest_batches")
    assert ledger == [("aol", "aol", exp["rows"], exp["rows"], 0, f.events_new)]


def test_aol_events_content(aol_loaded):
    s, _ = aol_loaded
    user, query, ts, _rank, url = _independent_aol(AOL_SAMPLE)["first"]
    when = datetime.strptime(ts, "%Y-%m-%d %H:%M:%S")
    search = rows(s, "SELECT event_id, item_id, text, attributes FROM raw.events WHERE user_id = ? AND event_ts = ? "
                  "AND event_type = 'search' AND text = ?", [user, when, query])
    assert len(search) == 1  # the query was repeated for each of its clicks: one search
    assert search[0][0] == compute_event_id("aol", user, when, "search", None, query)
    assert search[0][1] is None
    click = rows(s, "SELECT event_id, text, attributes->>'$.url' FROM raw.events WHERE user_id = ? AND item_id = ? "
                 "AND event_type = 'click' AND event_ts = ?", [user, url, when])
    domain = url.split("://", 1)[-1].split("/", 1)[0].lower().removeprefix("www.")
    assert click == [(compute_event_id("aol", user, when, "click", url, domain), domain, url)]
    assert scalar(s, "SELECT count(*) FROM raw.events WHERE event_type = 'click' AND text LIKE 'www.%'") == 0
    assert scalar(s, "SELECT count(*) FROM raw.events WHERE event_ts < '2006-03-01' OR event_ts >= '2006-06-01'") == 0


def test_aol_ingest_twice_adds_nothing(aol_loaded, tmp_path):
    s, first = aol_loaded
    before = table_counts(s)
    again = ingest_files(s, "aol", [AOL_SAMPLE])
    assert again.files[0].skipped and again.files[0].batch_id == first.files[0].batch_id
    assert again.totals().rows_read == 0
    copy = shutil.copy(AOL_SAMPLE, tmp_path / "renamed.txt.gz")  # same content under another name
    assert ingest_files(s, "aol", [Path(copy)]).files[0].skipped
    assert table_counts(s) == before


BAD_LINES = [
    "1\tcheap flights boston\t2006-03-01 10:00:00\t1\thttp://www.Expedia.com",  # 2 good (search + click)
    "1\tcheap flights boston\t2006-03-01 10:00:00\t2\thttp://www.kayak.com/x",  # 3 same search, 2nd click
    "1\tcheap flights boston\t2006-03-01 10:05:00\t\t",                         # 4 no click: a 2nd search
    "2\tsecret thing\t2006-03-01 10:00:00",                                     # 5 ragged (3 fields)
    "\tmissing user\t2006-03-01 10:00:00\t\t",                                  # 6 no AnonID
    "3\tbad time\t2006-13-45 99:00:00\t\t",                                     # 7 unparseable QueryTime
    "3\tno time\t\t\t",                                                         # 8 missing QueryTime
    "4\t\t2006-03-01 10:00:00\t\t",                                             # 9 missing query
    "5\trank query\t2006-03-01 10:00:00\tfirst\thttp://a.com",                  # 10 ItemRank not an integer
    "6\tq\t1969-07-20 20:17:00\t\t",                                            # 11 before 1970
    "7\tok again\t2006-03-02 00:00:01\t\t",                                     # 12 good
]


def test_aol_bad_rows_are_rejected_with_line_field_reason(tmp_path):
    s = settings_in(tmp_path)
    path = aol_file(tmp_path / "log.txt", BAD_LINES)
    # invalid UTF-8 inside a query, line 13
    with open(path, "ab") as f:
        f.write(b"8\tcaf\xe9 query\t2006-03-01 10:00:00\t\t\n")
    (f,) = ingest_files(s, "aol", [path]).files
    assert (f.rows_read, f.rows_accepted, f.rows_rejected) == (12, 4, 8)
    assert f.rows_accepted + f.rows_rejected == f.rows_read
    assert (f.events_new, f.events_duplicate) == (5, 0)  # 3 searches + 2 clicks
    rejected = rows(s, "SELECT line, field, reason FROM raw.events_rejected ORDER BY line")
    assert rejected == [
        (5, "line", "expected 5 tab-separated fields, found 3"),
        (6, "AnonID", "missing user id"),
        (7, "QueryTime", "unparseable timestamp"),
        (8, "QueryTime", "missing timestamp"),
        (9, "Query", "missing query"),
        (10, "ItemRank", "ItemRank is not an integer"),
        (11, "QueryTime", "timestamp out of range (before 1970 or after 2099)"),
        (13, "Query", "invalid UTF-8"),
    ]
    # the raw record is kept for repair; reasons never carry query text
    assert scalar(s, "SELECT raw_record FROM raw.events_rejected WHERE line = 5") == BAD_LINES[3]
    assert scalar(s, "SELECT count(*) FROM raw.events_rejected WHERE reason LIKE '%secret%'") == 0
    assert rows(s, "SELECT text FROM raw.events WHERE event_type = 'click' ORDER BY text") == [("expedia.com",),
                                                                                              ("kayak.com",)]
    assert rows(s, "SELECT rows_read, rows_accepted, rows_rejected FROM raw.ingest_batches") == [(12, 4, 8)]


def test_aol_overlapping_files_add_only_new_events(tmp_path):
    s = settings_in(tmp_path)
    a = aol_file(tmp_path / "a.txt", BAD_LINES[:3])
    b = aol_file(tmp_path / "b.txt.gz", BAD_LINES[1:4] + [BAD_LINES[-1]], gz=True)
    fa, fb = ingest_files(s, "aol", [a, b]).files
    assert (fa.events_new, fa.events_duplicate) == (4, 0)
    # b: search 10:00 (already), kayak click (already), search 10:05 (already), the last row (new)
    assert (fb.rows_read, fb.rows_accepted, fb.rows_rejected) == (4, 3, 1)
    assert (fb.events_new, fb.events_duplicate) == (1, 3)
    assert scalar(s, "SELECT count(*) FROM raw.events") == 5
    assert scalar(s, "SELECT count(DISTINCT event_id) FROM raw.events") == 5


@pytest.mark.parametrize(
    "name, content, gz, problem",
    [
        ("empty.txt", b"", False, "empty file"),
        ("empty.gz", b"", True, "empty file"),
        ("noheader.txt", b"1\tq\t2006-03-01 10:00:00\t\t\n", False, "header lacks column(s)"),
        ("short.txt", b"AnonID\tQuery\tQueryTime\n1\tq\t2006-03-01 10:00:00\n", False,
         "header lacks column(s) ItemRank, ClickURL"),
        ("order.txt", b"Query\tAnonID\tQueryTime\tItemRank\tClickURL\n", False, "in this order"),
        ("binary.bin", bytes(range(256)) * 4, False, "not a valid AOL query-log file"),
    ],
)
def test_aol_bad_files_fail_naming_file_and_problem_and_write_nothing(tmp_path, name, content, gz, problem):
    s = settings_in(tmp_path)
    path = write_bytes(tmp_path / name, content, gz=gz)
    with pytest.raises(InputFileError) as err:
        ingest_files(s, "aol", [path])
    assert str(path) in str(err.value) and problem in str(err.value)
    assert table_counts(s) == (0, 0, 0)


def test_aol_truncated_gzip_fails_and_a_bad_file_stops_the_whole_command(tmp_path):
    s = settings_in(tmp_path)
    good = aol_file(tmp_path / "good.txt", BAD_LINES[:3])
    data = gzip.compress(("AnonID\tQuery\tQueryTime\tItemRank\tClickURL\n" + "1\tq\t2006-03-01 10:00:00\t\t\n" * 5000)
                         .encode(), mtime=0)
    truncated = write_bytes(tmp_path / "cut.txt.gz", data[: len(data) // 2])
    with pytest.raises(InputFileError, match="truncated gzip") as err:
        ingest_files(s, "aol", [good, truncated])
    assert str(truncated) in str(err.value)
    assert table_counts(s) == (0, 0, 0)  # checked before anything is written: the good file is not loaded either
    with pytest.raises(InputFileError, match="no such file"):
        ingest_files(s, "aol", [tmp_path / "missing.txt.gz"])


def test_aol_crlf_and_header_only_files(tmp_path):
    s = settings_in(tmp_path)
    crlf = write_bytes(tmp_path / "crlf.txt", ("AnonID\tQuery\tQueryTime\tItemRank\tClickURL\r\n"
                                               "9\tq one\t2006-03-01 10:00:00\t1\thttp://x.org/\r\n").encode())
    header_only = aol_file(tmp_path / "header.txt", [])
    f1, f2 = ingest_files(s, "aol", [crlf, header_only]).files
    assert (f1.rows_read, f1.rows_accepted, f1.events_new) == (1, 1, 2)
    assert (f2.rows_read, f2.rows_accepted, f2.rows_rejected) == (0, 0, 0)
    assert rows(s, "SELECT text FROM raw.events ORDER BY event_type") == [("x.org",), ("q one",)]
