"""Incremental builds of marts.intent_memories: only changed event days are rebuilt, and the result equals a
full refresh.

The tests share one warehouse and run in order (each step builds on the previous one). To see which days a
build touched, rows of the already-built days are tagged with a sentinel prefix in memory_text: a rebuilt day
loses it, an untouched day keeps it.
"""

from __future__ import annotations

import pytest

from conftest import make_event
from persona_tasks import dbt_runner
from persona_tasks.warehouse import connect, connect_read_only

SENTINEL = "UNTOUCHED "
COLUMNS = ("memory_id, user_id, session_id, event_date, started_at, ended_at, n_actions, event_types, memory_text,"
           " event_ids, source")


def _day(day: str) -> list[tuple]:
    return [
        make_event("a", f"{day} 10:00:00", "search", f"a morning {day}"),
        make_event("a", f"{day} 10:05:00", "click", "shop.example", "http://shop.example/x",
                   {"url": "http://shop.example/x"}),
        make_event("a", f"{day} 11:00:00", "search", f"a later {day}"),
        make_event("b", f"{day} 23:55:00", "view", f"b item {day}", "i1"),
    ]


def _snapshot(settings) -> list[tuple]:
    with connect_read_only(settings) as con:
        return con.execute(f"SELECT {COLUMNS} FROM marts.intent_memories ORDER BY memory_id").fetchall()


def _tag_built_days(settings) -> None:
    con = connect(settings)
    try:
        con.execute(f"UPDATE marts.intent_memories SET memory_text = '{SENTINEL}' || memory_text "
                    f"WHERE NOT starts_with(memory_text, '{SENTINEL}')")
    finally:
        con.close()


def _untagged_days(settings) -> set[str]:
    with connect_read_only(settings) as con:
        rows = con.execute(f"SELECT DISTINCT strftime(event_date, '%Y-%m-%d') FROM marts.intent_memories "
                           f"WHERE NOT starts_with(memory_text, '{SENTINEL}')").fetchall()
    return {r[0] for r in rows}


@pytest.fixture(scope="module")
def wh(warehouse_settings, insert_events):
    settings = warehouse_settings("incremental")
    insert_events(settings, _day("2024-03-01") + _day("2024-03-02"))
    dbt_runner.build(settings)
    state = {"settings": settings, "insert": insert_events, "first": _snapshot(settings)}
    _tag_built_days(settings)
    return state


def test_new_day_rebuilds_only_that_day(wh):
    settings = wh["settings"]
    wh["insert"](settings, _day("2024-03-03"))
    dbt_runner.build(settings)
    assert _untagged_days(settings) == {"2024-03-03"}
    before = {r[0] for r in wh["first"]}
    after = {r[0] for r in _snapshot(settings) if str(r[3]) != "2024-03-03"}
    assert before == after  # ids of earlier days unchanged
    _tag_built_days(settings)


def test_late_event_rebuilds_its_day_and_duplicates_rebuild_nothing(wh):
    settings = wh["settings"]
    # bridges a's two sessions of 2024-03-02 (gaps of exactly 30 minutes)
    late = make_event("a", "2024-03-02 10:30:00", "search", "a bridging", batch_id="b2")
    # the same content as an existing 2024-03-01 event, loaded again: raw grows, staging does not
    again = _day("2024-03-01")[0][:8] + ("b3",) + _day("2024-03-01")[0][9:]
    wh["insert"](settings, [late, again])
    dbt_runner.build(settings)
    assert _untagged_days(settings) == {"2024-03-02"}
    with connect_read_only(settings) as con:
        n = con.execute("SELECT n_actions FROM marts.intent_memories WHERE user_id = 'a' "
                        "AND event_date = DATE '2024-03-02'").fetchall()
    assert n == [(4,)]
    _tag_built_days(settings)


def test_nothing_new_changes_nothing(wh):
    settings = wh["settings"]
    before = _snapshot(settings)
    result = dbt_runner.build(settings)
    assert not result.failures
    assert _snapshot(settings) == before
    assert _untagged_days(settings) == set()


def test_incremental_equals_full_refresh(wh):
    settings = wh["settings"]
    con = connect(settings)
    try:
        con.execute(f"UPDATE marts.intent_memories SET memory_text = substr(memory_text, {len(SENTINEL) + 1}) "
                    f"WHERE starts_with(memory_text, '{SENTINEL}')")
    finally:
        con.close()
    incremental = _snapshot(settings)
    dbt_runner.build(settings, full_refresh=True)
    assert _snapshot(settings) == incremental
    assert len(incremental) == 3 * 3 - 1  # a: 2 sessions a day except the bridged day; b: 1 a day
