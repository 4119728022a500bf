"""Sessionisation and intent memories, on a hand-made raw.events built by one real `dbt build`.

Edge cases: a gap of exactly the threshold, one second more, equal timestamps (a search before its same-second
click, whatever the event ids), interleaved users, rows inserted
out of order, the midnight cut, one user id in two sources, duplicate raw rows, PII masking, text normalisation,
collapsed repeats, the length cap, and the session gap as a dbt var.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from conftest import make_event
from persona_tasks import dbt_runner
from persona_tasks.warehouse import connect_read_only

D = "2024-03-01"
TOY = {"rating": 4.5, "title": "Toy Story (1995)", "genres": ["Adventure", "Animation"]}


def _rows() -> list[tuple]:
    rows = [
        # gap exactly 30 min stays, 30 min + 1 s splits
        make_event("gap", f"{D} 10:00:00", "search", "first"),
        make_event("gap", f"{D} 10:30:00", "search", "second"),
        make_event("gap", f"{D} 11:00:01", "search", "third"),
        # equal timestamps: one session, the search first, then the other types by event_id
        make_event("tie", f"{D} 12:00:00", "search", "tie query"),
        make_event("tie", f"{D} 12:00:00", "click", "example.org", "http://www.example.org/a",
                   {"url": "http://www.example.org/a", "rank": None}),
        make_event("tie", f"{D} 12:00:00", "view", "Blue Lamp", "item-9"),
        # AOL-shaped: a query and its click logged with one timestamp, the click's event_id sorting first
        make_event("aolu", f"{D} 13:00:00", "search", "cheap flights boston"),
        make_event("aolu", f"{D} 13:00:00", "click", "expedia.com", "http://www.expedia.com/x",
                   {"url": "http://www.expedia.com/x", "rank": 1}),
        make_event("aolu", f"{D} 13:01:00", "click", "kayak.com", "http://www.kayak.com/y",
                   {"url": "http://www.kayak.com/y", "rank": 2}),
        # interleaved users: u1 has a 45 min gap (two sessions) that u2's event would bridge if mixed up
        make_event("u1", f"{D} 09:00:00", "search", "u1 early"),
        make_event("u2", f"{D} 09:20:00", "search", "u2 only"),
        make_event("u1", f"{D} 09:45:00", "search", "u1 late"),
        # midnight cut: 15 minutes apart, two days
        make_event("night", f"{D} 23:50:00", "search", "late night"),
        make_event("night", "2024-03-02 00:05:00", "search", "after midnight"),
        # one user id in two sources: two users
        make_event("same", f"{D} 14:00:00", "search", "from test", source="test"),
        make_event("same", f"{D} 14:05:00", "search", "from other", source="other"),
        # PII masking and normalisation (a search: lower-cased, whitespace collapsed)
        make_event("pii", f"{D} 15:00:00", "search",
                   "  Mail John.Doe@Example.com\tor call (555) 123-4567,  acct 12345678 in 1995 "),
        # repeats collapsed; event types in order of first occurrence
        make_event("rep", f"{D} 16:00:00", "search", "shoes"),
        make_event("rep", f"{D} 16:01:00", "search", "shoes"),
        make_event("rep", f"{D} 16:02:00", "click", "nike.com", "http://nike.com/a", {"url": "http://nike.com/a"}),
        make_event("rep", f"{D} 16:03:00", "click", "nike.com", "http://nike.com/b", {"url": "http://nike.com/b"}),
        make_event("rep", f"{D} 16:04:00", "search", "shoes"),
        # MovieLens-shaped rating and tag
        make_event("ml", f"{D} 17:00:00", "rating", "Toy Story (1995) [Adventure|Animation]", "1", TOY),
        make_event("ml", f"{D} 17:01:00", "tag", "pixar — Toy Story (1995) [Adventure|Animation]", "1",
                   {"tag": "pixar", "title": "Toy Story (1995)", "genres": ["Adventure", "Animation"]}),
    ]
    # a session of clicks only: nothing but sites, so its embedding_text falls back to its memory_text
    rows += [make_event("clickonly", f"{D} 19:30:00", "click", "nike.com", "http://nike.com/z",
                        {"url": "http://nike.com/z"})]
    # a long session: 100 distinct searches a minute apart -> memory_text capped
    start = datetime.fromisoformat(f"{D} 18:00:00")
    rows += [make_event("long", start + timedelta(minutes=i), "search", f"query number {i:03d} padding")
             for i in range(100)]
    # a duplicate raw row: same content, later batch
    dup = make_event("dup", f"{D} 20:00:00", "search", "only once", batch_id="b1", ingested_at="2030-01-01 00:00:00")
    dup_again = make_event("dup", f"{D} 20:00:00", "search", "only once", batch_id="b2",
                           ingested_at="2030-01-02 00:00:00")
    rows += [dup_again, dup]
    random.Random(7).shuffle(rows)  # out of order in the table
    return rows


@pytest.fixture(scope="module")
def built(warehouse_settings, insert_events):
    settings = warehouse_settings("sessions")
    insert_events(settings, _rows())
    result = dbt_runner.build(settings)
    return settings, result


def _memories(settings, user_id, source="test"):
    with connect_read_only(settings) as con:
        return con.execute(
            "SELECT started_at, ended_at, n_actions, event_types, memory_text, event_ids, event_date, session_id,"
            " memory_id FROM marts.intent_memories WHERE user_id = ? AND source = ? ORDER BY started_at",
            [user_id, source],
        ).fetchall()


def test_build_runs_models_and_tests(built):
    _, result = built
    assert not result.failures
    kinds = {n.resource_type for n in result.nodes}
    assert {"model", "test"} <= kinds
    assert {n.name for n in result.nodes if n.resource_type == "model"} >= {
        "stg_events", "int_sessions", "intent_memories"}
    assert result.startup_seconds > 0 and result.total_seconds >= result.startup_seconds


def test_schemas_are_exact(built):
    settings, _ = built
    with connect_read_only(settings) as con:
        found = set(con.execute(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables").fetchall())
    assert {("staging.stg_events",), ("intermediate.int_sessions",), ("marts.intent_memories",)} <= found


def test_gap_of_exactly_the_threshold_stays_one_more_second_splits(built):
    settings, _ = built
    mems = _memories(settings, "gap")
    assert [m[2] for m in mems] == [2, 1]
    assert mems[0][4] == "searched: first; searched: second"
    assert mems[1][4] == "searched: third"


def test_equal_timestamps_are_one_session_search_first_then_event_id(built):
    settings, _ = built
    (m,) = _memories(settings, "tie")
    assert m[0] == m[1] and m[2] == 3
    search_id = next(r[0] for r in _rows() if r[1] == "tie" and r[3] == "search")
    assert m[5][0] == search_id and m[5][1:] == sorted(m[5][1:])  # equal event_ts: search first, then event_id
    assert m[3][0] == "search" and set(m[3]) == {"search", "click", "view"}
    assert m[4].startswith("searched: tie query; ")
    assert "clicked: example.org" in m[4] and "viewed: Blue Lamp" in m[4]


def test_a_search_comes_before_its_click_at_the_same_timestamp(built):
    settings, _ = built
    rows = [r for r in _rows() if r[1] == "aolu"]
    search_id = next(r[0] for r in rows if r[3] == "search")
    click_id = next(r[0] for r in rows if r[3] == "click" and r[2].minute == 0)
    later_click_id = next(r[0] for r in rows if r[3] == "click" and r[2].minute == 1)
    assert click_id < search_id  # ordering by (event_ts, event_id) alone would put the click first
    (m,) = _memories(settings, "aolu")
    assert m[2] == 3
    assert m[4] == "searched: cheap flights boston; clicked: expedia.com; clicked: kayak.com"
    assert m[5] == [search_id, click_id, later_click_id]
    assert m[3] == ["search", "click"]
    with connect_read_only(settings) as con:
        seq = con.execute("SELECT event_type, event_seq, is_session_start FROM intermediate.int_sessions "
                          "WHERE user_id = 'aolu' ORDER BY event_seq").fetchall()
        ranks = dict(con.execute("SELECT event_type, max(event_order_rank) FROM staging.stg_events "
                                 "WHERE user_id = 'aolu' GROUP BY 1").fetchall())
    assert seq == [("search", 1, True), ("click", 2, False), ("click", 3, False)]
    assert ranks == {"search": 0, "click": 1}


def test_interleaved_users_do_not_bridge_each_other(built):
    settings, _ = built
    assert [m[4] for m in _memories(settings, "u1")] == ["searched: u1 early", "searched: u1 late"]
    assert [m[4] for m in _memories(settings, "u2")] == ["searched: u2 only"]


def test_sessions_are_cut_at_midnight(built):
    settings, _ = built
    mems = _memories(settings, "night")
    assert [(str(m[6]), m[2]) for m in mems] == [("2024-03-01", 1), ("2024-03-02", 1)]


def test_a_user_is_source_and_user_id(built):
    settings, _ = built
    assert [m[4] for m in _memories(settings, "same", "test")] == ["searched: from test"]
    assert [m[4] for m in _memories(settings, "same", "other")] == ["searched: from other"]


def test_duplicate_raw_rows_are_one_event(built):
    settings, _ = built
    (m,) = _memories(settings, "dup")
    assert m[2] == 1 and len(m[5]) == 1
    with connect_read_only(settings) as con:
        assert con.execute("SELECT batch_id FROM staging.stg_events WHERE user_id = 'dup'").fetchall() == [("b1",)]


def test_text_is_normalised_and_pii_masked(built):
    settings, _ = built
    with connect_read_only(settings) as con:
        text, masked = con.execute(
            "SELECT text, text_masked FROM staging.stg_events WHERE user_id = 'pii'").fetchall()[0]
    assert text == "mail john.doe@example.com or call (555) 123-4567, acct 12345678 in 1995"
    assert masked == "mail [email] or call [phone], acct [number] in 1995"
    (m,) = _memories(settings, "pii")
    assert m[4] == "searched: mail [email] or call [phone], acct [number] in 1995"


def test_consecutive_repeats_are_collapsed_and_types_keep_first_occurrence_order(built):
    settings, _ = built
    (m,) = _memories(settings, "rep")
    assert m[2] == 5 and len(m[5]) == 5
    assert m[3] == ["search", "click"]
    assert m[4] == "searched: shoes; clicked: nike.com; searched: shoes"


def test_rating_and_tag_parts(built):
    settings, _ = built
    (m,) = _memories(settings, "ml")
    assert m[4] == "rated 4.5: Toy Story (1995) [Adventure|Animation]; tagged 'pixar': Toy Story (1995)"
    assert m[3] == ["rating", "tag"]


def test_memory_text_is_capped_with_an_ellipsis(built):
    settings, _ = built
    mems = _memories(settings, "long")
    assert len(mems) == 1 and mems[0][2] == 100
    text = mems[0][4]
    assert len(text) == settings.memory_text_max_chars and text.endswith("…")
    assert text.startswith("searched: query number 000 padding; searched: query number 001 padding")


def test_ids_are_consistent_between_sessions_and_memories(built):
    settings, _ = built
    with connect_read_only(settings) as con:
        mismatches = con.execute("""
            SELECT count(*) FROM (
                SELECT session_id, list(event_id ORDER BY event_seq) AS ids FROM intermediate.int_sessions GROUP BY 1
            ) s FULL JOIN marts.intent_memories m USING (session_id)
            WHERE s.ids IS DISTINCT FROM m.event_ids
        """).fetchall()[0][0]
        n_events = con.execute("SELECT count(*) FROM staging.stg_events").fetchall()[0][0]
        n_raw = con.execute("SELECT count(*) FROM raw.events").fetchall()[0][0]
    assert mismatches == 0
    assert n_events == n_raw - 1  # one duplicate


def test_session_gap_is_a_dbt_var(warehouse_settings, insert_events):
    settings = warehouse_settings("gap45", session_gap_minutes=45)
    insert_events(settings, [r for r in _rows() if r[1] in ("gap", "u1")])
    dbt_runner.build(settings, select="+intent_memories")
    assert [m[2] for m in _memories(settings, "gap")] == [3]  # 30 min + 1 s < 45 min
    assert [m[2] for m in _memories(settings, "u1")] == [2]  # exactly 45 min stays


def _embedding_text(settings, user_id):
    with connect_read_only(settings) as con:
        return [r[0] for r in con.execute(
            "SELECT embedding_text FROM marts.intent_memories WHERE user_id = ? ORDER BY started_at",
            [user_id]).fetchall()]


def test_embedding_text_is_what_the_user_meant(built):
    settings, _ = built
    # no template verbs, no clicked sites; each distinct part once, in order of first occurrence
    assert _embedding_text(settings, "aolu") == ["cheap flights boston"]
    assert _embedding_text(settings, "rep") == ["shoes"]
    assert _embedding_text(settings, "tie") == ["tie query; Blue Lamp"]
    assert _embedding_text(settings, "gap") == ["first; second", "third"]
    # PII stays masked; a rating keeps title and genres but not the value; a tag is '<tag>: <title>'
    assert _embedding_text(settings, "pii") == ["mail [email] or call [phone], acct [number] in 1995"]
    assert _embedding_text(settings, "ml") == ["Toy Story (1995) [Adventure|Animation]; pixar: Toy Story (1995)"]
    # only clicks: the display text is the best there is
    assert _embedding_text(settings, "clickonly") == ["clicked: nike.com"]
    long = _embedding_text(settings, "long")[0]
    assert len(long) == settings.memory_text_max_chars and long.endswith("…")
    assert long.startswith("query number 000 padding; query number 001 padding")


def test_a_mart_built_before_embedding_text_is_rebuilt_in_full(warehouse_settings, insert_events):
    import duckdb

    settings = warehouse_settings("upgrade")
    insert_events(settings, [r for r in _rows() if r[1] in ("aolu", "rep")])
    dbt_runner.build(settings)
    before = _memories(settings, "aolu")
    # an older warehouse: the same mart without the column (incremental models refuse a schema change)
    con = duckdb.connect(str(settings.warehouse))
    con.execute("ALTER TABLE marts.intent_memories DROP COLUMN embedding_text")
    con.close()
    assert dbt_runner._mart_columns_missing(settings) == ["embedding_text"]
    dbt_runner.build(settings)  # incremental call: rebuilt in full once, same rows and ids
    assert _memories(settings, "aolu") == before
    assert _embedding_text(settings, "aolu") == ["cheap flights boston"]
    assert dbt_runner._mart_columns_missing(settings) == []
