"""`persona-etl ingest --format merrec`: a small file in the MerRec Parquet schema (tests/fixtures)."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.ingest_helpers import rows, scalar, settings_in, table_counts, write_bytes
from fixtures.merrec_fixture import EVENT_TYPES, merrec_rows, write_merrec_fixture

from persona_tasks.errors import InputFileError
from persona_tasks.ingest import compute_event_id, ingest_files

CONTRACT = {"item_view": "view", "item_like": "like", "item_add_to_cart_tap": "cart", "offer_make": "offer",
            "buy_start": "checkout", "buy_comp": "purchase"}


def test_merrec_fixture_counts_types_and_content(tmp_path):
    s = settings_in(tmp_path)
    path = write_merrec_fixture(tmp_path / "shard-000.parquet")
    src = merrec_rows()
    assert {r["event_id"] for r in src} == set(EVENT_TYPES)
    (f,) = ingest_files(s, "merrec", [path]).files
    assert (f.rows_read, f.rows_accepted, f.rows_rejected) == (len(src), len(src), 0)
    assert (f.events_new, f.events_duplicate) == (len(src), 0)
    by_type = dict(rows(s, "SELECT event_type, count(*) FROM raw.events GROUP BY 1"))
    assert by_type == dict(Counter(CONTRACT[r["event_id"]] for r in src))
    assert scalar(s, "SELECT count(DISTINCT user_id) FROM raw.events") == len({r["user_id"] for r in src})
    r = src[0]
    ts = r["stime"].replace(tzinfo=None)
    got = rows(s, "SELECT event_id, text, attributes FROM raw.events WHERE user_id = ? AND event_ts = ?",
               [str(r["user_id"]), ts])
    assert len(got) == 1
    event_id, text, attributes = got[0]
    assert text == r["name"]
    assert event_id == compute_event_id("merrec", str(r["user_id"]), ts, "view", str(r["item_id"]), r["name"])
    attrs = json.loads(attributes)
    assert attrs["category"] == f"{r['c0_name']} > {r['c1_name']} > {r['c2_name']}"
    assert attrs["brand"] == r["brand_name"] and attrs["price"] == r["price"]
    assert attrs["merrec_event"] == "item_view"
    # an empty brand is no brand
    assert scalar(s, "SELECT count(*) FROM raw.events WHERE attributes->>'$.brand' = ''") == 0
    # the same shard again (under another name) adds nothing
    write_bytes(tmp_path / "again.parquet", path.read_bytes())
    again = ingest_files(s, "merrec", [tmp_path]).files  # the folder: both shards, same content
    assert len(again) == 2 and all(x.skipped for x in again)
    assert table_counts(s) == (len(src), 0, 1)


def test_merrec_bad_rows(tmp_path):
    s = settings_in(tmp_path)
    path = write_merrec_fixture(tmp_path / "bad.parquet", bad_rows=True)
    n_good = len(merrec_rows())
    (f,) = ingest_files(s, "merrec", [path]).files
    assert (f.rows_read, f.rows_accepted, f.rows_rejected) == (n_good + 5, n_good, 5)
    assert rows(s, "SELECT line, field, reason FROM raw.events_rejected ORDER BY line") == [
        (n_good + 1, "user_id", "missing user id"),
        (n_good + 2, "event_id", "unknown event type"),
        (n_good + 3, "stime", "missing timestamp"),
        (n_good + 4, "item_id", "missing item id"),
        (n_good + 5, "stime", "timestamp out of range (before 1970 or after 2099)"),
    ]
    raw = json.loads(scalar(s, "SELECT raw_record FROM raw.events_rejected WHERE field = 'event_id'"))
    assert raw["event_id"] == "item_share" and raw["user_id"] == 101


def test_merrec_folder_of_shards_and_other_stime_types(tmp_path):
    s = settings_in(tmp_path)
    shards = tmp_path / "20230501"
    write_merrec_fixture(shards / "000.parquet")
    t = pq.read_table(shards / "000.parquet")
    # stime as epoch seconds and as naive timestamps: the same instants, so the same events
    epoch = t.set_column(t.schema.get_field_index("stime"), "stime",
                         pa.compute.divide(pa.compute.cast(t["stime"], pa.int64()), 1_000_000))
    pq.write_table(epoch, shards / "001.parquet")
    naive = t.set_column(t.schema.get_field_index("stime"), "stime", t["stime"].cast(pa.timestamp("us")))
    pq.write_table(naive, shards / "002.parquet")
    report = ingest_files(s, "merrec", [shards])
    assert [f.rows_accepted for f in report.files] == [len(t)] * 3
    assert [f.events_new for f in report.files] == [len(t), 0, 0]
    assert [f.events_duplicate for f in report.files] == [0, len(t), len(t)]


def test_merrec_bad_files(tmp_path):
    s = settings_in(tmp_path)
    t = pq.read_table(write_merrec_fixture(tmp_path / "ok.parquet"))
    pq.write_table(t.drop_columns(["event_id", "stime"]), tmp_path / "cols.parquet")
    with pytest.raises(InputFileError, match="missing column.s. event_id, stime") as err:
        ingest_files(s, "merrec", [tmp_path / "cols.parquet"])
    assert "cols.parquet" in str(err.value)
    data = (tmp_path / "ok.parquet").read_bytes()
    for name, content, problem in [
        ("cut.parquet", data[: len(data) // 2], "not a Parquet file"),
        ("text.parquet", b"user_id,item_id\n1,2\n", "not a Parquet file"),
        ("empty.parquet", b"", "empty file"),
    ]:
        with pytest.raises(InputFileError, match=problem):
            ingest_files(s, "merrec", [tmp_path / "ok.parquet", write_bytes(tmp_path / "bad" / name, content)])
    (tmp_path / "void").mkdir()
    with pytest.raises(InputFileError, match="no MerRec Parquet files"):
        ingest_files(s, "merrec", [tmp_path / "void"])
    assert table_counts(s) == (0, 0, 0)
