"""Suite of ``gate_raw``: the day's ingested batches, before anything is built from them.

Frames: ``batches`` (one row per ingested batch, joined to the ledger and to its stored/quarantined rows),
``day`` (one row of the day's totals and its volume against the trailing published days), ``events`` (the raw
events of the day's batches: ids, user, time and type only, never text) and ``schema`` (raw.events' columns).
The checks of the hand-written gate keep their names and meaning (landing_files, ledger_complete, reconciliation,
quarantine_count, events_count, rows_read, rejected_share).
"""

from __future__ import annotations

import statistics
from datetime import date, datetime, timedelta
from typing import Any

from persona_tasks.config import Settings
from persona_tasks.days import day_end
from persona_tasks.gates.checks import Check, Entry, Suite, metric
from persona_tasks.warehouse import table_exists

GATE = "gate_raw"

# raw.events as the warehouse contract defines it (persona_tasks/warehouse.py RAW_SCHEMA_DDL)
RAW_EVENTS_CONTRACT = {
    "event_id": "VARCHAR", "user_id": "VARCHAR", "event_ts": "TIMESTAMP", "event_type": "VARCHAR",
    "item_id": "VARCHAR", "text": "VARCHAR", "attributes": "JSON", "source": "VARCHAR", "batch_id": "VARCHAR",
    "ingested_at": "TIMESTAMP",
}
REQUIRED = ("event_id", "user_id", "event_ts", "event_type", "batch_id")


def _gx():
    import great_expectations as gx

    return gx.expectations


_LEDGER_SQL = ("SELECT * FROM raw.ingest_batches WHERE batch_id IN (SELECT DISTINCT batch_id FROM raw.events "
               "WHERE event_ts::DATE = $d) ORDER BY ingested_at DESC",)
_LEDGER_LOOK = ("The check's unexpected_ids (quality_check_results) name the failing batches; the ledger rows of "
                "the day's batches:")
_LEDGER_DO = ("A bookkeeping mismatch is a bug or a second writer: check that the `warehouse_writer` pool has one "
              "slot and nothing else writes the warehouse, then clear `ingest_landing` (idempotent). If it fails "
              "again, file a bug with the batch_id; do not publish by hand.")
_EVENTS_LOOK = "The offending events by type and day (ids only; the check's unexpected_ids name up to five):"
_EVENTS_SQL = ("SELECT event_type, event_ts::DATE AS day, count(*) AS n FROM raw.events WHERE batch_id IN "
               "(SELECT batch_id FROM raw.events WHERE event_ts::DATE = $d) GROUP BY ALL ORDER BY n DESC LIMIT 20",)


def _entry(means: str, look: str, do: str, sql: tuple[str, ...] = ()) -> Entry:
    return Entry(GATE, means, look, do, sql)


CHECKS: tuple[Check, ...] = (
    Check("landing_files", "day",
          lambda s, d: metric("batches", min_value=0 if s.orchestration.allow_empty_day else 1),
          "block", "the day has landing files (ingested batches)",
          _entry("No landing file for the run date in `[orchestration] landing_dir` (`<landing_dir>/<day>/`).",
                 "The landing folder or bucket of that day; the upstream export's own logs.",
                 "Deliver the day's files, then clear `ingest_landing`. A day that is empty by design: set "
                 "`[orchestration] allow_empty_day = true`.")),
    Check("ledger_complete", "batches",
          lambda s, d: _gx().ExpectColumnValuesToBeInSet(column="in_ledger", value_set=[True]),
          "block", "every ingested batch has a ledger row (raw.ingest_batches)",
          _entry("An ingested batch has no row in the ledger `raw.ingest_batches`.", _LEDGER_LOOK, _LEDGER_DO,
                 _LEDGER_SQL)),
    Check("reconciliation", "batches",
          lambda s, d: _custom().ExpectColumnToEqualSumOfColumns(
              column_list=["rows_read", "rows_accepted", "rows_rejected"], ignore_row_if="any_value_is_missing"),
          "block", "per batch, rows_read = rows_accepted + rows_rejected (custom expectation)",
          _entry("A batch's rows_read differs from rows_accepted + rows_rejected.", _LEDGER_LOOK, _LEDGER_DO,
                 _LEDGER_SQL)),
    Check("quarantine_count", "batches",
          lambda s, d: _gx().ExpectColumnPairValuesToBeEqual(column_A="quarantined", column_B="rows_rejected",
                                                             ignore_row_if="either_value_is_missing"),
          "block", "per batch, rows in raw.events_rejected = the ledger's rows_rejected",
          _entry("A batch's rows in `raw.events_rejected` differ from its ledger count.", _LEDGER_LOOK, _LEDGER_DO,
                 _LEDGER_SQL)),
    Check("events_count", "batches",
          lambda s, d: _gx().ExpectColumnPairValuesToBeEqual(column_A="events_stored", column_B="events_new",
                                                             ignore_row_if="either_value_is_missing"),
          "block", "per batch, rows in raw.events = the ledger's events_new",
          _entry("A batch's rows in `raw.events` differ from its ledger's events_new.", _LEDGER_LOOK, _LEDGER_DO,
                 _LEDGER_SQL)),
    Check("rows_read", "day",
          lambda s, d: metric("rows_read", min_value=0 if s.orchestration.allow_empty_day else 1),
          "block", "the day's landing files hold rows",
          _entry("The day's landing files hold no rows.", "The files of `<landing_dir>/<day>/` (sizes, headers).",
                 "Ask upstream for the real export, replace the files, clear `ingest_landing`.")),
    Check("rejected_share", "day",
          lambda s, d: metric("rejected_share", max_value=s.orchestration.max_rejected_share),
          "block", "rejected rows / rows read at most [orchestration] max_rejected_share",
          _entry("More of the day's rows were rejected than `[orchestration] max_rejected_share` allows.",
                 "The rejected rows by file, field and reason (file and line name each row; `raw_record` holds it "
                 "for replay):",
                 "One field and reason dominating is usually a changed export (a renamed column, a new timestamp "
                 "format): fix the export or the `[ingest]` mapping, then clear `ingest_landing`. Raise "
                 "`max_rejected_share` only when the rejects are expected.",
                 ("SELECT file, field, reason, count(*) AS n FROM raw.events_rejected WHERE rejected_at >= $d "
                  "GROUP BY ALL ORDER BY n DESC",))),
    Check("duplicate_share", "day",
          lambda s, d: metric("duplicate_share", max_value=s.gates.max_duplicate_share),
          "warn", "events already in raw.events / accepted events at most [gates] max_duplicate_share",
          _entry("Many of the day's events were already in the warehouse: the export resends older data (a "
                 "duplicated or overlapping file).",
                 "The day's batches with their new and duplicate counts:",
                 "Ask upstream whether the export overlaps the previous days; duplicates add nothing (same content "
                 "= same event_id), so the run is safe, but the day may be missing its own data (see volume).",
                 ("SELECT batch_id, file, rows_accepted, events_new, events_duplicate FROM raw.ingest_batches "
                  "WHERE batch_id IN (SELECT batch_id FROM raw.events WHERE event_ts::DATE = $d) "
                  "ORDER BY events_duplicate DESC",))),
    Check("volume", "day",
          lambda s, d: metric("volume_ratio", min_value=s.gates.volume_min_ratio, max_value=s.gates.volume_max_ratio,
                              exempt_when_null=True),
          "block", "the day's events / median of the trailing published days' events within [gates] "
                   "volume_min_ratio..volume_max_ratio (exempt without history)",
          _entry("The day's event count is far from the median of the last `[gates] volume_history_days` "
                 "published days (a partial or duplicated export, a lost source, a bot).",
                 "Events per day for the last two weeks:",
                 "A partial export: ask upstream for the complete day and clear `ingest_landing`. A real change "
                 "(a new source, a holiday): override this check for the day (`persona-etl gate override`) and "
                 "adjust `[gates] volume_min_ratio` / `volume_max_ratio` if it persists.",
                 ("SELECT event_ts::DATE AS day, count(*) AS events FROM raw.events WHERE event_ts::DATE "
                  "BETWEEN $d::DATE - INTERVAL 14 DAY AND $d GROUP BY 1 ORDER BY 1",))),
    Check("raw_columns", "schema",
          lambda s, d: _gx().ExpectColumnDistinctValuesToEqualSet(column="column_name",
                                                                  value_set=list(RAW_EVENTS_CONTRACT)),
          "block", "raw.events has exactly the contract's columns",
          _entry("raw.events' columns differ from the contract (persona_tasks/warehouse.py).",
                 "The table's columns:",
                 "Someone altered the table or a migration is missing: restore the contract's columns (a copy of "
                 "the warehouse first), never adapt the gate.",
                 ("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = 'raw' "
                  "AND table_name = 'events' ORDER BY ordinal_position",))),
    Check("raw_types", "schema",
          lambda s, d: _gx().ExpectColumnDistinctValuesToEqualSet(
              column="column_type", value_set=[f"{c} {t}" for c, t in RAW_EVENTS_CONTRACT.items()]),
          "block", "raw.events' column types are the contract's",
          _entry("A column of raw.events has another type than the contract's.", "The table's columns:",
                 "As for raw_columns: restore the contract's type on a copy, then the warehouse.",
                 ("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = 'raw' "
                  "AND table_name = 'events' ORDER BY ordinal_position",))),
    *(Check(f"not_null_{col}", "events",
            (lambda c: lambda s, d: _gx().ExpectColumnValuesToNotBeNull(column=c))(col),
            "block", f"{col} is set on every event of the day's batches",
            _entry(f"Events of the day have no `{col}` (a required field of the contract).", _EVENTS_LOOK,
                   "Ingest enforces the contract, so this is a bug or a hand-written row: file a bug with the "
                   "event_ids, delete the rows on a copy, clear `ingest_landing`.", _EVENTS_SQL))
      for col in REQUIRED),
    Check("event_types", "events",
          lambda s, d: _gx().ExpectColumnValuesToBeInSet(column="event_type", value_set=list(s.ingest.event_types)),
          "block", "event_type in [ingest] event_types",
          _entry("Events of the day have an event_type outside `[ingest] event_types`.", _EVENTS_LOOK,
                 "Ingest rejects unknown types, so the setting changed after ingest or a row was written by hand: "
                 "align `[ingest] event_types` (and `event_type_map`) and reingest.", _EVENTS_SQL)),
    Check("event_ts_in_interval", "events",
          lambda s, d: _gx().ExpectColumnValuesToBeBetween(
              column="event_ts", min_value=datetime.combine(d, datetime.min.time())
              - timedelta(hours=s.gates.lateness_hours), max_value=day_end(d), strict_max=True),
          "block", "event_ts inside the run's day, or at most [gates] lateness_hours before it",
          _entry("Events of the day's files lie outside the run's data interval (later than the day, or earlier "
                 "than `[gates] lateness_hours` before it): a wrong file in the day's folder or a timezone bug.",
                 _EVENTS_LOOK,
                 "Move the file to the folder of its day (or fix the export's timezone), then clear "
                 "`ingest_landing`; raise `[gates] lateness_hours` when late events are expected.", _EVENTS_SQL)),
)


def _custom():
    import persona_tasks.gates.custom as custom

    return custom


def published_days(con, day: date, n: int) -> list[date]:
    """The last ``n`` run dates before ``day`` that were published."""
    if not table_exists(con, "induction_runs", "personas"):
        return []
    rows = con.execute("SELECT DISTINCT run_date FROM personas.induction_runs WHERE published_at IS NOT NULL AND "
                       "run_date < $d ORDER BY run_date DESC LIMIT $n", {"d": day, "n": n}).fetchall()
    return [r[0] for r in rows]


def events_per_day(con, days: list[date]) -> dict[date, int]:
    if not days:
        return {}
    rows = con.execute("SELECT event_ts::DATE AS day, count(*) FROM raw.events WHERE event_ts >= $lo AND "
                       "event_ts < $hi AND list_contains($days, event_ts::DATE) GROUP BY 1",
                       {"lo": min(days), "hi": day_end(max(days)), "days": days}).fetchall()
    got = {r[0]: int(r[1]) for r in rows}
    return {d: got.get(d, 0) for d in days}


def load(settings: Settings, con, day: date, ingested: dict | None) -> tuple[dict, dict[str, Any]]:
    import pandas as pd
    import pyarrow as pa

    cfg, g = settings.orchestration, settings.gates
    ids = sorted(set((ingested or {}).get("batch_ids") or []))
    batches = con.sql("""
        SELECT i.batch_id, b.batch_id IS NOT NULL AS in_ledger, b.rows_read, b.rows_accepted, b.rows_rejected,
               b.events_new, b.events_duplicate,
               (SELECT count(*) FROM raw.events_rejected r WHERE r.batch_id = i.batch_id) AS quarantined,
               (SELECT count(*) FROM raw.events e WHERE e.batch_id = i.batch_id) AS events_stored
        FROM (SELECT unnest($ids::VARCHAR[]) AS batch_id) i LEFT JOIN raw.ingest_batches b USING (batch_id)
        ORDER BY i.batch_id""", params={"ids": ids}).df()
    events = con.sql("SELECT event_id, user_id, event_ts, event_type, batch_id FROM raw.events "
                     "WHERE list_contains($ids::VARCHAR[], batch_id)", params={"ids": ids}).fetch_arrow_table()
    # Arrow-backed strings (no Python object per value) and nanosecond timestamps: GX's pandas engine compares
    # datetime64[ns] columns vectorised, any other unit value by value (1M events: 6 s -> well under 1 s)
    events = events.to_pandas(types_mapper={pa.string(): pd.ArrowDtype(pa.string())}.get)
    events["event_ts"] = events["event_ts"].astype("datetime64[ns]")
    schema = con.sql("SELECT column_name, data_type, column_name || ' ' || data_type AS column_type "
                     "FROM information_schema.columns WHERE table_schema = 'raw' AND table_name = 'events' "
                     "ORDER BY ordinal_position").df()
    read = int(batches["rows_read"].fillna(0).sum())
    accepted = int(batches["rows_accepted"].fillna(0).sum())
    rejected = int(batches["rows_rejected"].fillna(0).sum())
    new, dup = int(batches["events_new"].fillna(0).sum()), int(batches["events_duplicate"].fillna(0).sum())
    n_day = events_per_day(con, [day])[day]
    history = events_per_day(con, published_days(con, day, g.volume_history_days))
    median = statistics.median(history.values()) if history else None
    exempt = len(history) < g.volume_min_history_days or not median or (cfg.allow_empty_day and not ids)

    day_frame = pd.DataFrame([{
        "batches": len(ids), "rows_read": read, "rows_accepted": accepted, "rows_rejected": rejected,
        "rejected_share": rejected / read if read else 0.0,
        "duplicate_share": dup / (new + dup) if new + dup else 0.0,
        "events": n_day, "history_days": len(history), "history_median": median,
        "volume_ratio": None if exempt else n_day / median,
    }]).astype({"history_median": "float64", "volume_ratio": "float64"})
    facts = {"batches": len(ids), "rows_read": read, "rows_accepted": accepted, "rows_rejected": rejected,
             "rejected_share": round(rejected / read, 6) if read else 0.0, "events": n_day,
             "volume_ratio": None if exempt else round(n_day / median, 4), "history_days": len(history)}
    return {"batches": batches, "day": day_frame, "events": events, "schema": schema}, facts


SUITE = Suite(gate=GATE, frames={"batches": "batch_id", "day": None, "events": "event_id", "schema": None},
              checks=CHECKS, load=load)
