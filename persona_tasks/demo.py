"""`make demo`: the main job on the bundled AOL sample, end to end, then where to look.

Safe to run again: a second ingest of the same file adds nothing and the incremental build only
touches days with new events.
"""

from __future__ import annotations

import logging
import time

from persona_tasks.config import load_settings

EXAMPLE_SQL = (
    "SELECT user_id, started_at, n_actions, memory_text\n"
    "FROM marts.intent_memories\n"
    "WHERE user_id = (SELECT min(user_id) FROM marts.intent_memories)\n"
    "ORDER BY started_at LIMIT 5"
)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from persona_tasks.dbt_runner import build
    from persona_tasks.ingest import ingest_files
    from persona_tasks.warehouse import connect_read_only, query_pl, query_row

    settings = load_settings()
    sample = settings.project_dir / "data" / "aol" / "aol_sample.tsv.gz"
    t0 = time.perf_counter()
    report = ingest_files(settings, "aol", [sample])
    t = report.totals()
    print(f"\ningest {sample.name}: rows read {t.rows_read}, accepted {t.rows_accepted}, rejected {t.rows_rejected}"
          + (" (already ingested: nothing added)" if all(f.skipped for f in report.files) else ""))
    build(settings)
    with connect_read_only(settings) as con:
        n_mem, n_users, n_events = query_row(
            con,             "SELECT count(*), count(DISTINCT user_id), sum(n_actions) FROM marts.intent_memories")
        example = query_pl(con, EXAMPLE_SQL)
    print(f"\nintent memories: {n_mem} for {n_users} users from {n_events} events "
          f"({time.perf_counter() - t0:.1f}s)")
    print(f"warehouse: {settings.warehouse}")
    print("tables: raw.events, raw.events_rejected, raw.ingest_batches, staging.stg_events, "
          "intermediate.int_sessions, marts.intent_memories")
    print("\nexample query (persona-etl sql \"...\"):\n" + EXAMPLE_SQL)
    import polars as pl

    with pl.Config(tbl_rows=5, fmt_str_lengths=70, tbl_width_chars=160):
        print(example)


if __name__ == "__main__":
    main()
