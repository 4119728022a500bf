"""The DuckDB warehouse: connections and the raw-layer contract.

DuckDB allows one writer process per file, so every writer goes through ``connect`` (which also
applies the configured thread count) and analysts' reads go through ``connect_read_only``.
Timestamps are stored as naive ``TIMESTAMP`` values meaning UTC.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import polars as pl

from persona_tasks.config import Settings

RAW_SCHEMA_DDL = """
CREATE SCHEMA IF NOT EXISTS raw;

-- One row per user action, in every source's common shape. Append-only; event_id is a
-- deterministic hash of the source and the row's content, so re-ingesting a file adds nothing.
CREATE TABLE IF NOT EXISTS raw.events (
    event_id     VARCHAR   NOT NULL,
    user_id      VARCHAR   NOT NULL,
    event_ts     TIMESTAMP NOT NULL,   -- UTC
    event_type   VARCHAR   NOT NULL,
    item_id      VARCHAR,
    text         VARCHAR,               -- query or item title (personal data: never logged)
    attributes   JSON,                  -- url, category, brand, price, rating, ...
    source       VARCHAR   NOT NULL,
    batch_id     VARCHAR   NOT NULL,
    ingested_at  TIMESTAMP NOT NULL
);

-- Rows that broke the contract, kept with where they came from and why.
CREATE TABLE IF NOT EXISTS raw.events_rejected (
    rejected_id  VARCHAR   NOT NULL,    -- hash of file content digest + line: stable across reruns
    source       VARCHAR   NOT NULL,
    file         VARCHAR   NOT NULL,
    line         BIGINT    NOT NULL,    -- 1-based physical line (CSV/TSV/JSONL) or row number (Parquet)
    field        VARCHAR   NOT NULL,
    reason       VARCHAR   NOT NULL,
    raw_record   VARCHAR,               -- the offending record as read, for repair and replay
    batch_id     VARCHAR   NOT NULL,
    rejected_at  TIMESTAMP NOT NULL
);

-- One row per ingested file: the reconciliation ledger (rows_read = rows_accepted + rows_rejected).
CREATE TABLE IF NOT EXISTS raw.ingest_batches (
    batch_id          VARCHAR   NOT NULL,
    source            VARCHAR   NOT NULL,
    format            VARCHAR   NOT NULL,
    file              VARCHAR   NOT NULL,
    file_sha256       VARCHAR   NOT NULL,
    rows_read         BIGINT    NOT NULL,
    rows_accepted     BIGINT    NOT NULL,
    rows_rejected     BIGINT    NOT NULL,
    events_new        BIGINT    NOT NULL,
    events_duplicate  BIGINT    NOT NULL,
    ingested_at       TIMESTAMP NOT NULL
);
"""


def connect(settings: Settings, path: Path | None = None) -> duckdb.DuckDBPyConnection:
    """Open the warehouse for writing (creating its folder and the raw schema if needed)."""
    db = Path(path or settings.warehouse)
    db.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(db), config={"threads": settings.threads})
    _utc(con)
    con.execute(RAW_SCHEMA_DDL)
    return con


def connect_read_only(settings: Settings, path: Path | None = None) -> duckdb.DuckDBPyConnection:
    """Open the warehouse read-only (fails with a clear error if it does not exist yet)."""
    db = Path(path or settings.warehouse)
    if not db.exists():
        raise FileNotFoundError(
            f"warehouse {db} does not exist yet: run `persona-etl ingest` and `persona-etl build` first"
        )
    con = duckdb.connect(str(db), read_only=True, config={"threads": settings.threads})
    _utc(con)
    return con


def _utc(con: duckdb.DuckDBPyConnection) -> None:
    # DuckDB 2.0 refuses "TimeZone" in connect(config=...) ("icu extension needs to be loaded") although icu is
    # built in; setting it once the connection is open works.
    con.execute("SET TimeZone = 'UTC'")


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """All-or-nothing writes: commit on success, roll back on any error (a failed step leaves no half rows)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def query_pl(con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None) -> pl.DataFrame:
    """A query's result as a polars frame (over Arrow). DuckDB 2.0's ``execute`` has no ``.pl()``."""
    return con.sql(sql, params=params).pl() if params else con.sql(sql).pl()


def query_row(con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None) -> tuple:
    """The first row of a query (the whole result is fetched: DuckDB 2.0 refuses new work on a connection
    while an ``execute`` result is only partly read)."""
    rows = con.execute(sql, params).fetchall() if params else con.execute(sql).fetchall()
    return rows[0] if rows else ()


def table_exists(con: duckdb.DuckDBPyConnection, table: str, schema: str = "main") -> bool:
    """Whether ``schema.table`` exists (a table or a view)."""
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = $s AND "
                            "table_name = $t", {"s": schema, "t": table}).fetchall()[0][0])
