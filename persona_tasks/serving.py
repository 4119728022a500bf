"""The analysts' read-only serving copy of the published tables, swapped in atomically.

DuckDB has one writer per file, and while the DAG writes the warehouse no other process can open it, not even
read-only. So after each successful run ``publish_serving`` copies the published tables (``[serving] tables``)
into a new DuckDB file beside the serving copy, recreates the views there, checkpoints and closes it, and then
``os.replace``-s it over the serving copy. Analysts open the serving copy (read-only); a query that is running
keeps reading the file it opened, a new connection sees the new run; nobody ever sees half a run, and nobody
blocks the DAG. A run that fails before publishing never reaches this step, so the copy stays as it was.

``table_checksum`` gives an order-independent checksum of a table's rows (for idempotency checks).
"""

from __future__ import annotations

import logging
import os
import re
import time
from datetime import date, datetime, timezone
from pathlib import Path

import duckdb

from persona_tasks.config import Settings
from persona_tasks.errors import PersonaEtlError
from persona_tasks.publish import VIEWS  # the warehouse's views, recreated in the copy over the copied tables

log = logging.getLogger(__name__)



def serving_path(settings: Settings) -> Path:
    p = settings.serving.path
    if p is None:
        return Path(settings.warehouse).parent / "serving" / "personas_serving.duckdb"
    return p if p.is_absolute() else settings.project_dir / p


def _split(table: str) -> tuple[str, str]:
    parts = table.split(".")
    if len(parts) != 2 or not all(x.replace("_", "").isalnum() for x in parts):
        raise PersonaEtlError(f"serving table {table!r}: use schema.table")
    return parts[0], parts[1]


def publish_serving(settings: Settings, run_date: date | None = None) -> dict:
    """Copy ``[serving] tables`` from the warehouse into a new file and swap it in by rename; returns counts."""
    from persona_tasks.warehouse import connect

    t0 = time.perf_counter()
    dest = serving_path(settings)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    for p in (tmp, Path(str(tmp) + ".wal")):
        p.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    con = connect(settings)
    try:
        con.execute(f"ATTACH '{tmp}' AS serving_new")
        try:
            for table in settings.serving.tables:
                schema, name = _split(table)
                con.execute(f"CREATE SCHEMA IF NOT EXISTS serving_new.{schema}")
                con.execute(f"CREATE TABLE serving_new.{schema}.{name} AS SELECT * FROM {schema}.{name}")
                counts[table] = con.execute(f"SELECT count(*) FROM serving_new.{schema}.{name}").fetchall()[0][0]
        finally:
            con.execute("DETACH serving_new")
    finally:
        con.close()
    out = duckdb.connect(str(tmp))
    try:
        out.execute("SET TimeZone = 'UTC'")
        copied = set(settings.serving.tables)
        for view, sql in VIEWS.items():
            # a view is recreated when every table it reads was copied
            reads = set(re.findall(r"\b(personas\.\w+)\b", sql)) - set(VIEWS)
            if reads <= copied:
                out.execute(f"CREATE OR REPLACE VIEW {view} AS {sql}")
        out.execute("CREATE SCHEMA IF NOT EXISTS ops")
        out.execute("CREATE TABLE ops.serving_info (run_date DATE, published_at TIMESTAMP, source_warehouse "
                    "VARCHAR, tables VARCHAR[])")
        out.execute("INSERT INTO ops.serving_info VALUES ($d, $t, $w, $tables)",
                    {"d": run_date, "t": datetime.now(timezone.utc).replace(tzinfo=None),
                     "w": str(settings.warehouse), "tables": list(settings.serving.tables)})
        out.execute("CHECKPOINT")
    finally:
        out.close()
    os.replace(tmp, dest)
    result = {"serving_path": str(dest), "run_date": run_date.isoformat() if run_date else None,
              "rows": counts, "seconds": round(time.perf_counter() - t0, 2)}
    log.info("serving copy %s: %s", dest, counts)
    return result


def connect_serving(settings: Settings) -> duckdb.DuckDBPyConnection:
    """Open the serving copy read-only (what analysts do)."""
    p = serving_path(settings)
    if not p.exists():
        raise FileNotFoundError(f"serving copy {p} does not exist yet: it is written after the first successful run")
    con = duckdb.connect(str(p), read_only=True)
    con.execute("SET TimeZone = 'UTC'")
    return con


def table_checksum(con: duckdb.DuckDBPyConnection, table: str, exclude: tuple[str, ...] = ()) -> tuple[int, int]:
    """``(row count, order-independent checksum of the rows)`` over every column except ``exclude``."""
    schema, name = _split(table)
    cols = [r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = $s AND table_name = $t "
        "ORDER BY ordinal_position", {"s": schema, "t": name}).fetchall() if r[0] not in exclude]
    if not cols:
        raise PersonaEtlError(f"{table}: no such table (or no column left)")
    row = ", ".join(f'"{c}"' for c in cols)
    n, h = con.execute(f"SELECT count(*), coalesce(sum(hash({row})::HUGEINT), 0) FROM {schema}.{name}").fetchall()[0]
    return int(n), int(h)
