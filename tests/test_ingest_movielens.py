"""`persona-etl ingest --format movielens`: ml-latest-small against an independent count, text and attributes,
bad rows, bad files, idempotency."""

from __future__ import annotations

import csv
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fixtures.ingest_helpers import MOVIELENS, rows, scalar, settings_in, table_counts, write_bytes

from persona_tasks.errors import InputFileError
from persona_tasks.ingest import compute_event_id, ingest_files


def _read(name: str) -> list[dict]:
    with open(MOVIELENS / name, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _movie_text(m: dict) -> str:
    return m["title"] if m["genres"] == "(no genres listed)" else f"{m['title']} [{m['genres']}]"


@pytest.fixture(scope="module")
def ml_loaded(tmp_path_factory):
    s = settings_in(tmp_path_factory.mktemp("ml"))
    return s, ingest_files(s, "movielens", [MOVIELENS])


def test_movielens_sample_matches_independent_count(ml_loaded):
    s, report = ml_loaded
    ratings, tags = _read("ratings.csv"), _read("tags.csv")
    assert len(ratings) == 100_023 and len({r["userId"] for r in ratings}) == 706  # as documented
    by_file = {Path(f.file).name: f for f in report.files}
    assert set(by_file) == {"ratings.csv", "tags.csv"}  # movies.csv is a lookup, links.csv ignored
    for name, data in (("ratings.csv", ratings), ("tags.csv", tags)):
        f = by_file[name]
        assert (f.rows_read, f.rows_accepted, f.rows_rejected) == (len(data), len(data), 0)
        distinct = {(r["userId"], r["movieId"], r["timestamp"], r.get("tag")) for r in data}
        assert (f.events_new, f.events_duplicate) == (len(distinct), len(data) - len(distinct))
    t = report.totals()
    assert (t.rows_read, t.rows_accepted, t.rows_rejected) == (len(ratings) + len(tags),) * 2 + (0,)
    stats = rows(s, "SELECT event_type, count(*), count(DISTINCT user_id), count(DISTINCT item_id) "
                    "FROM raw.events GROUP BY 1 ORDER BY 1")
    assert stats == [
        ("rating", len(ratings), len({r["userId"] for r in ratings}), len({r["movieId"] for r in ratings})),
        ("tag", len(tags), len({r["userId"] for r in tags}), len({r["movieId"] for r in tags})),
    ]
    assert scalar(s, "SELECT sum(CAST(attributes->>'$.rating' AS DOUBLE)) FROM raw.events") == pytest.approx(
        sum(float(r["rating"]) for r in ratings))


def test_movielens_text_attributes_and_event_id(ml_loaded):
    s, _ = ml_loaded
    movies = {m["movieId"]: m for m in _read("movies.csv")}
    r = _read("ratings.csv")[0]
    m = movies[r["movieId"]]
    ts = datetime.fromtimestamp(int(r["timestamp"]), tz=timezone.utc).replace(tzinfo=None)
    got = rows(s, "SELECT event_id, text, attributes FROM raw.events WHERE event_type = 'rating' AND user_id = ? "
                  "AND item_id = ? AND event_ts = ?", [r["userId"], r["movieId"], ts])
    assert len(got) == 1
    event_id, text, attributes = got[0]
    assert text == _movie_text(m)
    assert event_id == compute_event_id("movielens", r["userId"], ts, "rating", r["movieId"], text)
    attrs = json.loads(attributes)
    assert attrs["rating"] == float(r["rating"]) and attrs["genres"] == m["genres"].split("|")
    # titles with quoted commas and with double quotes survive the CSV parsing
    for special in (",", '"'):
        m = next(x for x in movies.values() if special in x["title"])
        texts = rows(s, "SELECT DISTINCT text FROM raw.events WHERE item_id = ? AND event_type = 'rating'",
                     [m["movieId"]])
        assert texts in ([(_movie_text(m),)], [])
    t = _read("tags.csv")[0]
    tag_text = scalar(s, "SELECT text FROM raw.events WHERE event_type = 'tag' AND user_id = ? AND item_id = ? "
                         "AND attributes->>'$.tag' = ?", [t["userId"], t["movieId"], t["tag"]])
    assert tag_text == f"{t['tag']} — {_movie_text(movies[t['movieId']])}"


def test_movielens_twice_adds_nothing(ml_loaded):
    s, _ = ml_loaded
    before = table_counts(s)
    again = ingest_files(s, "movielens", [MOVIELENS / "ratings.csv", MOVIELENS / "movies.csv"])
    assert [f.skipped for f in again.files] == [True]
    assert table_counts(s) == before


def _ml_dir(tmp: Path, ratings: str, movies: str | None = None) -> Path:
    d = tmp / "ml"
    d.mkdir(parents=True, exist_ok=True)
    (d / "ratings.csv").write_bytes(ratings.encode("utf-8") if isinstance(ratings, str) else ratings)
    (d / "movies.csv").write_text(movies or 'movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n'
                                            '2,"American President, The (1995)",Comedy|Drama|Romance\n'
                                            '3,Empty (2000),(no genres listed)\n', encoding="utf-8")
    return d


def test_movielens_bad_rows(tmp_path):
    s = settings_in(tmp_path)
    ratings = (
        "userId,movieId,rating,timestamp\n"
        "1,1,4.5,980730861\n"           # 2 good
        "1,2,3.0,980730862\n"           # 3 good (quoted title)
        "1,3,5,980730863\n"             # 4 good (no genres)
        "2,999,2.0,980730861\n"         # 5 good: movie not in movies.csv, no title
        ",1,4.0,980730861\n"            # 6 missing userId
        "3,1,6.0,980730861\n"           # 7 rating out of range
        "3,1,great,980730861\n"         # 8 rating not a number
        "3,1,4.0,yesterday\n"           # 9 timestamp not epoch
        "3,,4.0,980730861\n"            # 10 missing movieId
        '3,1,"4.0,980730861\n'          # 11 malformed quoting
        "3,1,4.0\n"                     # 12 ragged
        "3,1,4.0,99999999999999\n"      # 13 year out of range
        "3,1,4.0,980730861\n"           # 14 good
        "3,1,4.0,980730861\n"           # 15 same rating again: one event
    )
    d = _ml_dir(tmp_path, ratings)
    (f,) = ingest_files(s, "movielens", [d / "ratings.csv"]).files  # movies.csv found next to it
    assert (f.rows_read, f.rows_accepted, f.rows_rejected) == (14, 6, 8)
    assert (f.events_new, f.events_duplicate) == (5, 1)
    assert rows(s, "SELECT line, field, reason FROM raw.events_rejected ORDER BY line") == [
        (6, "userId", "missing user id"),
        (7, "rating", "rating outside 0.5-5"),
        (8, "rating", "rating is not a number"),
        (9, "timestamp", "unparseable timestamp"),
        (10, "movieId", "missing movie id"),
        (11, "line", "malformed CSV line (expected 4 comma-separated fields)"),
        (12, "line", "malformed CSV line (expected 4 comma-separated fields)"),
        (13, "timestamp", "timestamp out of range (before 1970 or after 2099)"),
    ]
    texts = dict(rows(s, "SELECT item_id, text FROM raw.events"))
    assert texts == {"1": "Toy Story (1995) [Adventure|Animation]",
                     "2": "American President, The (1995) [Comedy|Drama|Romance]",
                     "3": "Empty (2000)", "999": None}


def test_movielens_invalid_utf8_and_gzip(tmp_path):
    s = settings_in(tmp_path)
    d = _ml_dir(tmp_path, b"userId,movieId,rating,timestamp\n1,1,4.5,980730861\n1\xff,1,4.5,980730861\n")
    (d / "tags.csv.gz").write_bytes(__import__("gzip").compress(
        b"userId,movieId,tag,timestamp\n5,2,politics,980730861\n5,2,,980730861\n"))
    fr, ft = ingest_files(s, "movielens", [d]).files
    assert (fr.rows_read, fr.rows_accepted, fr.rows_rejected) == (2, 1, 1)
    assert (ft.rows_read, ft.rows_accepted, ft.rows_rejected) == (2, 1, 1)
    assert sorted(rows(s, "SELECT line, field, reason FROM raw.events_rejected")) == [
        (3, "tag", "missing tag"), (3, "userId", "invalid UTF-8")]
    assert scalar(s, "SELECT text FROM raw.events WHERE event_type = 'tag'") == \
        "politics — American President, The (1995) [Comedy|Drama|Romance]"


def test_movielens_bad_files(tmp_path):
    s = settings_in(tmp_path)
    d = _ml_dir(tmp_path, "userId,movieId,rating,timestamp\n1,1,4.5,980730861\n")
    lonely = tmp_path / "alone" / "ratings.csv"
    lonely.parent.mkdir()
    shutil.copy(d / "ratings.csv", lonely)
    with pytest.raises(InputFileError, match="movies.csv not found") as err:
        ingest_files(s, "movielens", [lonely])
    assert str(lonely) in str(err.value)
    wrong = write_bytes(tmp_path / "x" / "ratings.csv", b"user,item,score,ts\n1,1,4.5,980730861\n")
    with pytest.raises(InputFileError, match="not a MovieLens file"):
        ingest_files(s, "movielens", [wrong, d / "movies.csv"])
    with pytest.raises(InputFileError, match="no MovieLens ratings or tags"):
        ingest_files(s, "movielens", [d / "movies.csv"])
    empty = write_bytes(tmp_path / "e" / "ratings.csv", b"")
    with pytest.raises(InputFileError, match="empty file"):
        ingest_files(s, "movielens", [d / "ratings.csv", empty])
    assert table_counts(s) == (0, 0, 0)
