"""``quality_check_results``: one row per check per gate run, kept across runs and retries (history for on-call).

Never holds query text or persona text: observed values are numbers, counts, sets of codes; unexpected rows are
named by their ids only (event_id, memory_id, persona_id, batch_id, user_id), at most five.
The two on-call questions are one query each (docs/oncall.md; tests run them on a real warehouse).
"""

from __future__ import annotations

from datetime import date

import duckdb

from persona_tasks.warehouse import table_exists

RESULTS_DDL = """
CREATE TABLE IF NOT EXISTS quality_check_results (
    dag_run_id       VARCHAR,              -- Airflow run id (local__<time> outside Airflow)
    run_date         DATE      NOT NULL,   -- the data day of the run
    try_number       INTEGER,
    gate             VARCHAR   NOT NULL,   -- gate_raw | gate_memories | gate_personas
    check_name       VARCHAR   NOT NULL,   -- docs/oncall.md#<check_name>
    expectation_type VARCHAR   NOT NULL,   -- the Great Expectations expectation
    column_name      VARCHAR,              -- column(s) it validates, comma separated
    severity         VARCHAR   NOT NULL,   -- block | warn (as applied: an override turns block into warn)
    success          BOOLEAN   NOT NULL,
    exempt           BOOLEAN   NOT NULL,   -- passed because it did not apply (no history, no LLM run)
    observed_value   VARCHAR,              -- JSON: the metric, or the share of unexpected rows
    threshold        VARCHAR,              -- JSON: the expectation's bounds (min_value, max_value, mostly, ...)
    unexpected_count BIGINT,
    unexpected_ids   VARCHAR[],            -- up to 5 ids of unexpected rows (never text)
    overridden_by    VARCHAR,              -- set when an audited override (quality_overrides) applied
    override_reason  VARCHAR,
    docs_page        VARCHAR,              -- the Data Docs page of the validation
    checked_at       TIMESTAMP NOT NULL    -- UTC
);
"""

COLUMNS = ("dag_run_id", "run_date", "try_number", "gate", "check_name", "expectation_type", "column_name",
           "severity", "success", "exempt", "observed_value", "threshold", "unexpected_count", "unexpected_ids",
           "overridden_by", "override_reason", "docs_page", "checked_at")

# "What failed last night": the latest try of every check of the latest run date that failed.
FAILED_LAST_NIGHT_SQL = """
SELECT gate, check_name, severity, observed_value, threshold, unexpected_count, unexpected_ids, overridden_by,
       docs_page, checked_at
FROM (SELECT *, row_number() OVER (PARTITION BY gate, check_name ORDER BY checked_at DESC) AS latest
      FROM quality_check_results
      WHERE run_date = (SELECT max(run_date) FROM quality_check_results))
WHERE latest = 1 AND NOT success
ORDER BY severity, gate, check_name
""".strip()

# "Since when has this check failed" ($check): the first run date of its current run of failed days (each day
# judged by its latest try); NULL when its latest day passed.
FAILING_SINCE_SQL = """
WITH daily AS (
    SELECT run_date, arg_max(success, checked_at) AS success
    FROM quality_check_results WHERE check_name = $check GROUP BY run_date)
SELECT min(run_date) AS failing_since, count(*) AS days_failing, max(run_date) AS last_failed
FROM daily
WHERE NOT success AND run_date > coalesce((SELECT max(run_date) FROM daily WHERE success), DATE '0001-01-01')
""".strip()


def ensure_table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(RESULTS_DDL)


def write_results(con: duckdb.DuckDBPyConnection, rows: list[dict]) -> int:
    """Append one gate run's rows (one transaction)."""
    import polars as pl

    from persona_tasks.warehouse import transaction

    ensure_table(con)
    if not rows:
        return 0
    frame = pl.DataFrame([{k: r.get(k) for k in COLUMNS} for r in rows],
                         schema={"dag_run_id": pl.String, "run_date": pl.Date, "try_number": pl.Int32,
                                 "gate": pl.String, "check_name": pl.String, "expectation_type": pl.String,
                                 "column_name": pl.String, "severity": pl.String, "success": pl.Boolean,
                                 "exempt": pl.Boolean, "observed_value": pl.String, "threshold": pl.String,
                                 "unexpected_count": pl.Int64, "unexpected_ids": pl.List(pl.String),
                                 "overridden_by": pl.String, "override_reason": pl.String,
                                 "docs_page": pl.String, "checked_at": pl.Datetime("us")})
    con.register("_qcr", frame.to_arrow())
    try:
        with transaction(con):
            con.execute("INSERT INTO quality_check_results BY NAME SELECT * FROM _qcr")
    finally:
        con.unregister("_qcr")
    return frame.height


def failed_last_night(con: duckdb.DuckDBPyConnection):
    import polars as pl

    from persona_tasks.warehouse import query_pl

    return query_pl(con, FAILED_LAST_NIGHT_SQL) if table_exists(con, "quality_check_results") else pl.DataFrame()


def failing_since(con: duckdb.DuckDBPyConnection, check: str) -> tuple[date | None, int, date | None]:
    """``(first failed run date of the current streak, days failing, last failed day)``; (None, 0, None) when the
    check's latest day passed (or it never ran)."""
    if not table_exists(con, "quality_check_results"):
        return None, 0, None
    since, n, last = con.execute(FAILING_SINCE_SQL, {"check": check}).fetchall()[0]
    return since, int(n or 0), last
