"""Suite of ``gate_memories``: the dbt build and the day's intent memories (marts.intent_memories).

Frames: ``day`` (one row: dbt test status, the day's actions against those its memories hold, memory counts),
``memories`` (one row per memory of the day: ids and text lengths, never the text) and ``users`` (memories per
user of the day). The hand-written gate's checks keep their names and meaning (dbt_tests, actions_reconcile,
memory_text, memories_exist).
"""

from __future__ import annotations

from datetime import date
from typing import Any

from persona_tasks.config import Settings
from persona_tasks.days import day_end
from persona_tasks.gates.checks import Check, Entry, Suite, metric

GATE = "gate_memories"


def _gx():
    import great_expectations as gx

    return gx.expectations


def _entry(means: str, look: str, do: str, sql: tuple[str, ...] = ()) -> Entry:
    return Entry(GATE, means, look, do, sql)


CHECKS: tuple[Check, ...] = (
    Check("dbt_tests", "day",
          lambda s, d: _gx().ExpectColumnValuesToBeInSet(column="dbt_status", value_set=["passed"]),
          "block", "the dbt build ran its tests and none failed",
          _entry("A dbt model or test failed, or the build ran no tests.",
                 "The `build` and `gate_memories` task logs name the failing nodes; reproduce with "
                 "`persona-etl build` against a copy of the warehouse.",
                 "A failing test on new data: find the offending rows with the test's SQL "
                 "(dbt_project/target/compiled), fix the source or the model, then clear `build`.")),
    Check("actions_reconcile", "day",
          lambda s, d: _gx().ExpectColumnPairValuesToBeEqual(column_A="actions", column_B="actions_in_memories"),
          "block", "the day's valid actions = the actions its memories hold",
          _entry("The day's valid actions are not each in exactly one intent memory of that day.",
                 "The day's valid actions against the actions its memories hold:",
                 "A sessionisation bug or late events for a day already built: run `persona-etl build "
                 "--full-refresh` on a copy, compare, and file a bug with the counts.",
                 ("SELECT (SELECT count(*) FROM staging.stg_events WHERE event_date = $d) AS actions, "
                  "(SELECT sum(n_actions) FROM marts.intent_memories WHERE event_date = $d) AS in_memories",))),
    Check("memory_text", "memories",
          lambda s, d: _gx().ExpectColumnValuesToBeBetween(column="min_text_chars", min_value=1),
          "block", "every memory of the day has a display and an embedded text",
          _entry("Some of the day's memories have an empty text, display (`memory_text`) or embedded "
                 "(`embedding_text`): nothing to embed or label.",
                 "The memories without text (the check's unexpected_ids name up to five):",
                 "Usually events with no query, item or title: fix the `[ingest]` mapping of the text fields, "
                 "then clear `ingest_landing`.",
                 ("SELECT memory_id, n_actions FROM marts.intent_memories WHERE event_date = $d AND "
                  "(coalesce(trim(memory_text), '') = '' OR coalesce(trim(embedding_text), '') = '')",))),
    Check("memory_text_length", "memories",
          lambda s, d: _gx().ExpectColumnValuesToBeBetween(column="memory_text_chars",
                                                           min_value=s.gates.min_memory_text_chars,
                                                           max_value=s.memory_text_max_chars),
          "warn", "memory_text length within [gates] min_memory_text_chars..memory_text_max_chars",
          _entry("A memory's display text is shorter than `[gates] min_memory_text_chars` or longer than "
                 "`memory_text_max_chars` (the dbt model caps it: a longer one means the cap broke).",
                 "Lengths of the day's memories:",
                 "A broken cap is a dbt model bug: fix dbt_project/models, clear `build`. Short texts: check "
                 "the `[ingest]` mapping of the text fields.",
                 ("SELECT min(length(memory_text)) AS shortest, max(length(memory_text)) AS longest, count(*) "
                  "FROM marts.intent_memories WHERE event_date = $d",))),
    Check("memories_exist", "day",
          lambda s, d: metric("memories", min_value=1),
          "block", "the day has intent memories (with allow_empty_day: some up to the day)",
          _entry("No intent memory for the day (or none at all up to it).", "Whether raw events of the day exist:",
                 "If raw events exist, the build filtered them all (check `staging.stg_events`); otherwise see "
                 "landing_files.",
                 ("SELECT count(*) FROM raw.events WHERE event_ts::DATE = $d",))),
    Check("memories_per_user", "users",
          lambda s, d: _gx().ExpectColumnValuesToBeBetween(column="memories", min_value=1,
                                                           max_value=s.gates.max_memories_per_user),
          "warn", "memories per user of the day at most [gates] max_memories_per_user",
          _entry("A user has more memories on the day than `[gates] max_memories_per_user`: a bot, a shared "
                 "account or a sessionisation bug (every action its own session).",
                 "The users with the most memories of the day (ids only):",
                 "A bot: add it to the ingest's exclusions upstream and rerun the day; a real heavy user: raise "
                 "the bound.",
                 ("SELECT user_id, count(*) AS memories, sum(n_actions) AS actions FROM marts.intent_memories "
                  "WHERE event_date = $d GROUP BY 1 ORDER BY 2 DESC LIMIT 10",))),
)


def dbt_status(built: dict) -> str:
    if built.get("failures"):
        return f"failed: {len(built['failures'])} node(s)"
    if not built.get("tests"):
        return "no tests ran"
    return "passed"


def load(settings: Settings, con, day: date, built: dict | None) -> tuple[dict, dict[str, Any]]:
    import pandas as pd

    built = built or {}
    memories = con.sql("""
        SELECT memory_id, user_id, n_actions,
               length(coalesce(trim(memory_text), '')) AS memory_text_chars,
               length(coalesce(trim(embedding_text), '')) AS embedding_text_chars,
               least(length(coalesce(trim(memory_text), '')), length(coalesce(trim(embedding_text), '')))
                   AS min_text_chars
        FROM marts.intent_memories WHERE event_date = $d ORDER BY memory_id""", params={"d": day}).df()
    users = (memories.groupby("user_id", as_index=False).size().rename(columns={"size": "memories"})
             if len(memories) else pd.DataFrame({"user_id": pd.Series(dtype=object),
                                                 "memories": pd.Series(dtype="int64")}))
    n_events = con.execute("SELECT count(*) FROM staging.stg_events WHERE event_date = $d", {"d": day}).fetchall()[0][0]
    n_total = con.execute("SELECT count(*) FROM marts.intent_memories WHERE started_at < $e",
                          {"e": day_end(day)}).fetchall()[0][0]
    n_mem, n_actions = len(memories), int(memories["n_actions"].sum()) if len(memories) else 0
    counted = int(n_total) if settings.orchestration.allow_empty_day else n_mem
    day_frame = pd.DataFrame([{"dbt_status": dbt_status(built), "dbt_tests": int(built.get("tests") or 0),
                               "actions": int(n_events), "actions_in_memories": n_actions,
                               "memories": counted, "memories_of_day": n_mem, "memories_up_to_day": int(n_total)}])
    facts = {"memories": n_mem, "users": int(memories["user_id"].nunique()) if n_mem else 0,
             "actions": n_actions, "events": int(n_events), "memories_up_to_day": int(n_total),
             "dbt_tests": built.get("tests")}
    return {"day": day_frame, "memories": memories, "users": users}, facts


SUITE = Suite(gate=GATE, frames={"day": None, "memories": "memory_id", "users": "user_id"}, checks=CHECKS,
              load=load)
