"""`persona-etl ingest --format events`: generic CSV / Parquet / JSONL with the [ingest.events] mapping."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.ingest_helpers import rows, scalar, settings_in, table_counts, write_bytes

from persona_tasks.errors import InputFileError, PersonaEtlError
from persona_tasks.ingest import compute_event_id, ingest_files

MAPPING = dict(user_id="uid", event_ts="ts", event_type="kind", item_id="sku", text="title",
               attributes=["price", "category"], event_type_map={"PageView": "view", "AddToCart": "cart"})


def _parquet(path, n=50):
    base = datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)
    kinds = ["PageView", "AddToCart", "purchase", "Search ", "refund"]  # 'refund' is not a contract type
    table = pa.table({
        "uid": [f"u{i % 7}" for i in range(n)],
        "ts": pa.array([base + timedelta(seconds=37 * i, microseconds=250 * (i % 3)) for i in range(n)],
                       pa.timestamp("us", tz="UTC")),
        "kind": [kinds[i % 5] for i in range(n)],
        "sku": [i % 11 for i in range(n)],
        "title": [f"item {i % 11}" for i in range(n)],
        "price": [round(1.5 * i, 2) for i in range(n)],
        "category": ["shoes" if i % 2 else None for i in range(n)],
        "extra": list(range(n)),
    })
    pq.write_table(table, path)
    return table.to_pylist()


def test_events_parquet_mapping_types_and_counts(tmp_path):
    s = settings_in(tmp_path, **MAPPING)
    src = _parquet(tmp_path / "ev.parquet")
    (f,) = ingest_files(s, "events", [tmp_path / "ev.parquet"], source="shop").files
    good = [r for r in src if r["kind"] != "refund"]
    assert (f.rows_read, f.rows_accepted, f.rows_rejected) == (len(src), len(good), len(src) - len(good))
    mapped = {"PageView": "view", "AddToCart": "cart", "purchase": "purchase", "Search ": "search"}
    assert dict(rows(s, "SELECT event_type, count(*) FROM raw.events GROUP BY 1")) == {
        t: sum(1 for r in good if mapped[r["kind"]] == t) for t in set(mapped.values())}
    assert rows(s, "SELECT DISTINCT field, reason FROM raw.events_rejected") == [("kind", "unknown event type")]
    assert scalar(s, "SELECT min(line) FROM raw.events_rejected") == 5  # 1-based row number
    r = good[1]  # microseconds in the timestamp
    ts = r["ts"].replace(tzinfo=None)
    got = rows(s, "SELECT event_id, source, attributes FROM raw.events WHERE user_id = ? AND event_ts = ?",
               [r["uid"], ts])
    assert got[0][0] == compute_event_id("shop", r["uid"], ts, "cart", str(r["sku"]), r["title"])
    assert got[0][1] == "shop"
    assert json.loads(got[0][2]) == {"price": r["price"], "category": r["category"]}
    raw = json.loads(scalar(s, "SELECT raw_record FROM raw.events_rejected ORDER BY line LIMIT 1"))
    assert raw["kind"] == "refund" and raw["extra"] == 4


CSV = (
    'uid,ts,kind,sku,title,price,category\n'
    'u1,2024-03-01T12:00:00Z,PageView,1,"Shoes, red",9.5,shoes\n'         # 2 good
    'u1,2024-03-01T14:00:00+02:00,PageView,1,"Shoes, red",9.5,shoes\n'    # 3 the same instant: same event
    'u2,2024-03-01 12:00:00,AddToCart,2,"say ""hi""",,\n'                 # 4 good, quotes, empty attrs
    'u3,01/03/2024,purchase,3,x,1,y\n'                                     # 5 not ISO
    'u4,2024-03-01,unknown,3,x,1,y\n'                                      # 6 unknown type
    'u5,2024-03-01,view,3,x\n'                                             # 7 ragged
)


def test_events_csv_iso_offsets_quotes_and_duplicates(tmp_path):
    s = settings_in(tmp_path, **MAPPING)
    path = write_bytes(tmp_path / "ev.csv.gz", CSV.encode(), gz=True)
    (f,) = ingest_files(s, "events", [path]).files
    assert (f.rows_read, f.rows_accepted, f.rows_rejected) == (6, 3, 3)
    assert (f.events_new, f.events_duplicate) == (2, 1)
    assert rows(s, "SELECT line, field, reason FROM raw.events_rejected ORDER BY line") == [
        (5, "ts", "unparseable timestamp"), (6, "kind", "unknown event type"),
        (7, "line", "malformed CSV line (expected 7 comma-separated fields)")]
    assert rows(s, "SELECT user_id, event_ts, text, attributes FROM raw.events ORDER BY user_id") == [
        ("u1", datetime(2024, 3, 1, 12), "Shoes, red", '{"price":"9.5","category":"shoes"}'),
        ("u2", datetime(2024, 3, 1, 12), 'say "hi"', '{"price":null,"category":null}'),
    ]


@pytest.mark.parametrize("ts_format, value, expected", [
    ("epoch_ms", "1709294400123", datetime(2024, 3, 1, 12, 0, 0, 123000)),
    ("epoch_s", "1709294400", datetime(2024, 3, 1, 12)),
    ("%d/%m/%Y %H:%M", "01/03/2024 12:00", datetime(2024, 3, 1, 12)),
    (None, "2024-03-01T13:00:00+01:00", datetime(2024, 3, 1, 12)),
])
def test_events_timestamp_formats(tmp_path, ts_format, value, expected):
    s = settings_in(tmp_path, ts_format=ts_format, item_id=None, text=None)
    path = write_bytes(tmp_path / "ev.csv", f"user_id,event_ts,event_type\nu,{value},view\n".encode())
    (f,) = ingest_files(s, "events", [path]).files
    assert f.rows_accepted == 1
    assert scalar(s, "SELECT event_ts FROM raw.events") == expected


def test_events_jsonl(tmp_path):
    s = settings_in(tmp_path, attributes=["price"])
    lines = [
        {"user_id": 42, "event_ts": "2024-03-01T12:00:00Z", "event_type": "purchase", "item_id": 7, "text": "t",
         "price": 9.5},
        {"user_id": "u2", "event_ts": "2024-03-01T12:00:00Z", "event_type": "search", "text": "boots"},
        "not json at all",
        [1, 2],
        {"user_id": "u3", "event_type": "view"},
        {"user_id": "u4", "event_ts": "2024-03-01T12:00:00Z", "event_type": "view", "price": {"EUR": 3}},
    ]
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n"
    path = write_bytes(tmp_path / "ev.ndjson", text.encode())
    (f,) = ingest_files(s, "events", [path]).files
    assert (f.rows_read, f.rows_accepted, f.rows_rejected) == (6, 3, 3)
    assert rows(s, "SELECT line, field, reason FROM raw.events_rejected ORDER BY line") == [
        (3, "line", "not a JSON object"), (4, "line", "not a JSON object"), (5, "event_ts", "missing timestamp")]
    assert rows(s, "SELECT user_id, item_id, text, attributes FROM raw.events ORDER BY user_id") == [
        ("42", "7", "t", '{"price":9.5}'), ("u2", None, "boots", '{"price":null}'),
        ("u4", None, None, '{"price":{"EUR":3}}')]


def test_events_bad_files_and_config(tmp_path):
    s = settings_in(tmp_path, **MAPPING)
    csv_missing = write_bytes(tmp_path / "a.csv", b"uid,ts,kind\nu,2024-03-01,view\n")
    with pytest.raises(InputFileError, match="missing column.s. sku, title, price, category"):
        ingest_files(s, "events", [csv_missing])
    pq.write_table(pa.table({"uid": ["u"], "ts": ["2024-03-01"]}), tmp_path / "b.parquet")
    with pytest.raises(InputFileError, match="missing column.s. kind"):
        ingest_files(s, "events", [tmp_path / "b.parquet"])
    with pytest.raises(InputFileError, match="unsupported file type"):
        ingest_files(s, "events", [write_bytes(tmp_path / "c.xlsx", b"PK\x03\x04")])
    with pytest.raises(InputFileError, match="no record has uid, ts, kind"):
        ingest_files(s, "events", [write_bytes(tmp_path / "d.jsonl", b'{"a": 1}\n{"b": 2}\n')])
    with pytest.raises(InputFileError, match="not a Parquet file"):
        ingest_files(s, "events", [write_bytes(tmp_path / "e.parquet", b"uid,ts\n")])
    with pytest.raises(PersonaEtlError, match="ts_format"):
        ingest_files(settings_in(tmp_path, ts_format="%Q"), "events", [csv_missing])
    assert table_counts(s) == (0, 0, 0)
