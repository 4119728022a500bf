#!/usr/bin/env python
"""Other plans for the intent-memories build at 10M events, timed against the dbt mart's own SQL (issue 15 section 6).

Why: the dbt build is 3.7x polars lazy at 10,000,000 events (docs/performance.md "Intent memories"), against a
1.5x target. This bench times, in one process on one copy of the warehouse, the pieces a faster plan would be made
of and two whole other plans, so the answer "which plan could reach 1.5x" rests on figures of one run:

* ``mart_sql``: the mart's compiled SQL (dbt's ``target/compiled`` of ``intent_memories``, full refresh) as one
  ``CREATE TABLE .. AS``: the work of the dbt model without dbt's start-up and tests (the baseline of the ratios);
* pieces: ``rows_table`` (staging's per-event expressions, no window: scan, normalising, PII masking, JSON
  attributes, the action texts, materialised), ``sort_all`` (those rows ordered by user and event order once),
  ``window`` (one window like staging's), ``group_lists`` (one hash aggregate collecting each user-day's actions);
* ``list_plan``: no window at all: each user-day's actions collected once, ordered, deduplicated and cut into
  sessions with list functions, unnested (without the texts: a lower bound of that plan);
* ``polars_in_dbt``: what a dbt Python model using polars would do: DuckDB's per-event rows, ordered, read as
  Arrow into polars; sessions numbered (shift, cum_sum) and aggregated in order there; the sessions (texts joined,
  ids as one string) written back to DuckDB, which makes the ids (md5) and lists;
* ``polars_lazy``: bench_memories' polars baseline on the Parquet export (what the 1.5x target is against).

Input: a folder kept by ``bench/bench_memories.py --keep`` (warehouse.duckdb after ingest, raw_events.parquet).
Usage: python bench/bench_memories_plans.py bench/out/n10000000 [--out bench/results/memories_plans_10m.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_memories import _peak_rss_mb, _settings, run_polars  # noqa: E402

ROW_COLUMNS = "source, user_id, event_ts, event_order_rank, event_id, event_type, action_text, content_text"
EVENT_ORDER = "source, user_id, event_ts, event_order_rank, event_id"


def _compiled(target: Path, model: str) -> str:
    found = sorted(target.glob(f"compiled/**/{model}.sql"))
    if not found:
        raise SystemExit(f"no compiled SQL of {model} under {target}")
    return found[0].read_text()


def list_plan_sql(gap_us: int) -> str:
    """Sessions without a window: one aggregate per user-day, ordered and cut with list functions."""
    return f"""
with days as (
    select source, user_id, event_date,
        list(struct_pack(k := struct_pack(ts := event_ts, r := event_order_rank, id := event_id),
                         event_ts := event_ts, event_id := event_id, event_type := event_type,
                         action_text := action_text, content_text := content_text)) as evs
    from bench_rows group by all
), ordered as (
    select source, user_id, event_date, list_select(evs, list_grade_up(list_transform(evs, lambda e: e.k))) as evs
    from days
), dedup as (
    select source, user_id, event_date,
        list_filter(evs, lambda e, i: i = 1 or e.event_id <> evs[i - 1].event_id) as evs
    from ordered
), cut as (
    select source, user_id, event_date, evs,
        list_filter(range(1, len(evs) + 1), lambda i: i = 1
                    or epoch_us(evs[i].event_ts) - epoch_us(evs[i - 1].event_ts) > {gap_us}) as starts
    from dedup
), sessions as (
    select source, user_id, event_date,
        unnest(list_transform(starts, lambda s, j: list_slice(evs, s, coalesce(starts[j + 1] - 1, len(evs)))))
            as actions
    from cut
)
select source, user_id, event_date, actions[1].event_ts as started_at, actions[-1].event_ts as ended_at,
    len(actions) as n_actions,
    list_transform(actions, lambda a: a.event_id) as event_ids,
    list_transform(actions, lambda a: a.event_type) as types_in_order,
    list_transform(actions, lambda a: a.action_text) as parts,
    list_filter(list_transform(actions, lambda a: a.content_text), lambda c: c is not null) as content_parts
from sessions
"""


def polars_in_dbt(con, gap_us: int, max_chars: int) -> dict:
    """The work of a dbt Python model on polars, in its three parts (seconds each)."""
    import polars as pl

    t0 = time.perf_counter()
    df = con.sql(f"select {ROW_COLUMNS} from staging.bench_event_rows order by {EVENT_ORDER}").pl()
    t1 = time.perf_counter()
    ts = pl.col("event_ts")
    first = (pl.col("user_id").ne_missing(pl.col("user_id").shift(1))
             | pl.col("source").ne_missing(pl.col("source").shift(1))
             | ts.dt.date().ne_missing(ts.shift(1).dt.date()))
    start = first | ((ts - ts.shift(1)).dt.total_microseconds() > gap_us)
    sessions = (
        df.lazy()
        .filter(pl.col("event_id").ne_missing(pl.col("event_id").shift(1)))
        .with_columns(start=start)
        .with_columns(session_no=pl.col("start").cum_sum(),
                      keep=pl.col("start") | pl.col("action_text").ne_missing(pl.col("action_text").shift(1)))
        .group_by("session_no", maintain_order=True)
        .agg(pl.col("source").first(), pl.col("user_id").first(), ts.first().alias("started_at"),
             ts.last().alias("ended_at"), pl.len().alias("n_actions"),
             pl.col("event_id").str.join(",").alias("event_ids"),
             pl.col("event_type").unique(maintain_order=True).str.join(",").alias("event_types"),
             pl.col("action_text").filter(pl.col("keep")).str.join("; ").alias("full_text"),
             pl.col("content_text").drop_nulls().unique(maintain_order=True).str.join("; ").alias("content_joined"))
        .drop("session_no")
        .collect()
    )
    del df
    t2 = time.perf_counter()
    con.register("bench_sessions", sessions)
    cut = max_chars - 1
    con.execute(f"""
        create or replace temp table bench_polars_mart as
        select md5(concat_ws(chr(31), 'memory', sid, '1')) as memory_id, user_id, sid as session_id,
            cast(started_at as date) as event_date, started_at, ended_at, cast(n_actions as integer) as n_actions,
            string_split(event_types, ',') as event_types,
            case when length(full_text) > {max_chars} then left(full_text, {cut}) || '…' else full_text end
                as memory_text,
            case when length(et) > {max_chars} then left(et, {cut}) || '…' else et end as embedding_text,
            string_split(event_ids, ',') as event_ids, source
        from (select *, coalesce(nullif(content_joined, ''), full_text) as et,
                     md5(concat_ws(chr(31), 'session', source, user_id,
                                   strftime(started_at, '%Y-%m-%dT%H:%M:%S.%f'))) as sid
              from bench_sessions)""")
    con.unregister("bench_sessions")
    t3 = time.perf_counter()
    n = con.execute("select count(*) from bench_polars_mart").fetchone()[0]
    return {"read_sorted_s": t1 - t0, "polars_s": t2 - t1, "write_back_s": t3 - t2, "seconds": t3 - t0,
            "memories": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "memories_plans.json")
    args = ap.parse_args()
    spec = json.loads((args.folder / "spec.json").read_text())
    os.environ["POLARS_MAX_THREADS"] = str(spec["threads"])
    import duckdb

    from persona_tasks.dbt_runner import build, run_dbt

    tmp = Path(tempfile.mkdtemp(prefix="memplans-"))
    try:
        db = tmp / "warehouse.duckdb"
        shutil.copy(args.folder / "warehouse.duckdb", db)
        spec = dict(spec, warehouse=str(db), dbt_target=str(tmp / "dbt_target"))
        settings = _settings(spec)
        build(settings, full_refresh=True, select="stg_events int_sessions")  # the views, and the compiled SQL
        target = tmp / "dbt_target"
        run_dbt(settings, "compile", ["--select", "intent_memories"])
        staging = _compiled(target, "stg_events")
        rows_sql = (staging.replace("lag(event_id) over user_day", "cast(null as varchar)")
                    .replace("lag(event_ts) over user_day", "cast(null as timestamp)"))
        if rows_sql == staging:
            raise SystemExit("stg_events has no dedup window to remove: update bench_memories_plans.py")
        mart_sql = _compiled(target, "intent_memories")
        gap_us = int(spec["gap_minutes"]) * 60 * 1_000_000
        con = duckdb.connect(str(db), config={"threads": spec["threads"]})
        con.execute("SET TimeZone = 'UTC'")
        con.execute("create or replace view staging.bench_event_rows as " + rows_sql)
        steps: dict[str, dict] = {}
        n_events = con.execute("select count(*) from raw.events").fetchone()[0]

        def timed(name: str, sql: str) -> None:
            t = time.perf_counter()
            con.execute(sql)
            steps[name] = {"seconds": time.perf_counter() - t}
            print(f"{name:16s} {steps[name]['seconds']:7.2f} s", flush=True)

        timed("mart_sql", "create or replace temp table bench_mart as " + mart_sql)
        timed("rows_table", f"create or replace temp table bench_rows as select {ROW_COLUMNS}, event_date "
                            "from staging.bench_event_rows")
        timed("sort_all", f"create or replace temp table bench_sorted as select * from bench_rows "
                          f"order by {EVENT_ORDER}")
        con.execute("drop table bench_sorted")
        timed("window", "create or replace temp table bench_window as select *, lag(event_ts) over "
                        "(partition by source, user_id, event_date order by event_ts, event_order_rank, event_id) "
                        "as previous_event_ts from bench_rows")
        con.execute("drop table bench_window")
        timed("group_lists", "create or replace temp table bench_groups as select source, user_id, event_date, "
                             "list(struct_pack(event_ts := event_ts, event_id := event_id, event_type := event_type, "
                             "action_text := action_text, content_text := content_text)) as evs "
                             "from bench_rows group by all")
        con.execute("drop table bench_groups")
        timed("list_plan", "create or replace temp table bench_list_plan as " + list_plan_sql(gap_us))
        steps["list_plan"]["memories"] = con.execute("select count(*) from bench_list_plan").fetchone()[0]
        con.execute("drop table bench_list_plan")
        con.execute("drop table bench_rows")
        steps["polars_in_dbt"] = polars_in_dbt(con, gap_us, int(spec["max_chars"]))
        print("polars_in_dbt   ", {k: round(v, 2) for k, v in steps["polars_in_dbt"].items()}, flush=True)
        same = con.execute("""select count(*) from bench_mart m full join bench_polars_mart p using (memory_id)
                              where m.memory_text is distinct from p.memory_text
                                 or m.embedding_text is distinct from p.embedding_text
                                 or m.event_ids is distinct from p.event_ids
                                 or m.event_types is distinct from p.event_types""").fetchone()[0]
        steps["polars_in_dbt"]["rows_differing_from_mart"] = same
        n_mart = con.execute("select count(*) from bench_mart").fetchone()[0]
        con.close()
        t = time.perf_counter()
        run_polars(spec["raw_parquet"], int(spec["gap_minutes"]), int(spec["max_chars"]))
        steps["polars_lazy"] = {"seconds": time.perf_counter() - t}
        print(f"{'polars_lazy':16s} {steps['polars_lazy']['seconds']:7.2f} s", flush=True)
        base = steps["mart_sql"]["seconds"]
        res = {"bench": "memories_plans", "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "n_events": n_events, "threads": spec["threads"], "memories": n_mart,
               "steps": steps, "vs_mart_sql": {k: v["seconds"] / base for k, v in steps.items()},
               "vs_polars_lazy": {k: v["seconds"] / steps["polars_lazy"]["seconds"] for k, v in steps.items()},
               "peak_rss_mb": round(_peak_rss_mb(), 1), "load_avg_1m_end": round(os.getloadavg()[0], 2)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
