#!/usr/bin/env python
"""Benchmark: ingest + dbt build of intent memories vs raw DuckDB, polars lazy and pandas.

For each size N (events): generate N synthetic events with planted personas (``persona_tasks.synth``, not timed),
write them to Parquet, then time, each in a fresh Python subprocess (so peak RSS is per implementation):

  ingest          ``ingest_files(settings, "events", [parquet])`` into a fresh warehouse
  dbt build       ``dbt_runner.build(settings, full_refresh=True)`` (models + tests); dbt's fixed start-up
                  (wall time minus the sum of per-node times in run_results.json) is reported apart
  dbt no-op       a second ``build(settings)`` on the up-to-date warehouse (incremental, nothing new)
  raw DuckDB      the same sessionization + aggregation as ONE SQL statement, ``CREATE TABLE .. AS`` in a copy of
                  the warehouse after ingest, reading raw.events (the floor: same input and engine as dbt)
  DuckDB Parquet  the same SQL reading the Parquet export of raw.events into an in-memory table
  polars lazy     ``scan_parquet`` of that export, sort / shift / cum_sum / group_by, collected
  pandas          ``read_parquet`` of that export, vectorised sort / shift / cumsum / groupby (the hand-written way)

All implementations compute, from raw.events (event_id, user_id, event_ts, event_type, item_id, text, source),
the semantics of docs/ARCHITECTURE.md: per user, events ordered by (event_ts, event-type rank, event_id), the rank
putting a search before any other type at equal timestamps (dbt macro event_order_rank); a new session when the
gap is strictly longer than ``session_gap_minutes`` or at a UTC midnight; one memory per session with user_id,
session_id, started_at, ended_at, n_actions, event_types (distinct, first occurrence order), memory_text (one
``"<verb>: <text>"`` part per action with PII masked, consecutive duplicates collapsed, joined by ``"; "``, capped
at ``memory_text_max_chars`` with ``…``) and event_ids. The bench checks that every implementation gives the same
number of memories and the same multiset of (user_id, started_at, n_actions) (and reports whether memory_text,
event_types and event_ids agree too).

Usage::

    .venv/bin/python bench/bench_memories.py                      # sizes 1,000,000 and 10,000,000
    .venv/bin/python bench/bench_memories.py --sizes 20000 --out bench/out --repeat 3
    .venv/bin/python bench/bench_memories.py --skip pandas,dbt_noop

Writes ``<out>/bench_memories.json`` (and a timestamped copy). Threads: ``settings.threads`` for DuckDB, dbt's
DuckDB and polars (``POLARS_MAX_THREADS``); pandas is single-threaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from the checkout
    sys.path.insert(0, str(ROOT))

STEPS = ("ingest", "dbt_build", "dbt_noop", "duckdb_sql", "duckdb_parquet", "polars_lazy", "pandas")
BASELINES = ("duckdb_sql", "duckdb_parquet", "polars_lazy", "pandas")
LABELS = {
    "ingest": "ingest (events format)",
    "dbt_build": "dbt build (full refresh)",
    "dbt_build_nodes": "  dbt build minus start-up",
    "dbt_noop": "dbt build, no-op (up to date)",
    "duckdb_sql": "raw DuckDB SQL (floor)",
    "duckdb_parquet": "raw DuckDB SQL on Parquet",
    "polars_lazy": "polars lazy",
    "pandas": "pandas (vectorised)",
}
RAW_COLUMNS = ["event_id", "user_id", "event_ts", "event_type", "item_id", "text", "source"]

# --------------------------------------------------------------------------------------------------------------
# The shared semantics, written three times. Verbs of memory_text parts and the PII masks (applied in this order).
# --------------------------------------------------------------------------------------------------------------
VERBS = {
    "search": "searched", "click": "clicked", "view": "viewed", "like": "liked",
    "cart": "added to cart", "purchase": "purchased", "checkout": "checked out", "offer": "offered",
    "rating": "rated", "tag": "tagged",
}
# Tie-break of equal timestamps (dbt_project/macros/ordering.sql): a search (rank 0) before every other type (1).
SEARCH_RANK, OTHER_RANK = 0, 1
PII_MASKS = [
    (r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}", "[email]"),
    (r"\+?[0-9][0-9 ().-]{7,}[0-9]", "[phone]"),
    (r"[0-9]{6,}", "[number]"),
]


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def memories_sql(source: str, gap_minutes: int, max_chars: int) -> str:
    """One SELECT computing intent memories from ``source`` (a table name or ``read_parquet(...)``)."""
    verb = "CASE event_type " + " ".join(f"WHEN {_sql_str(k)} THEN {_sql_str(v)}" for k, v in VERBS.items())
    verb += " ELSE event_type END"
    text = "coalesce(text, item_id, '')"
    for pattern, repl in PII_MASKS:
        text = f"regexp_replace({text}, {_sql_str(pattern)}, {_sql_str(repl)}, 'g')"
    return f"""
WITH ev AS (
    SELECT event_id, user_id, event_ts, event_type, source, {verb} || ': ' || {text} AS part,
        CASE WHEN event_type = 'search' THEN {SEARCH_RANK} ELSE {OTHER_RANK} END AS type_rank
    FROM {source}
), lagged AS (
    SELECT *,
        lag(event_ts) OVER w AS prev_ts,
        lag(part) OVER w AS prev_part
    FROM ev
    WINDOW w AS (PARTITION BY user_id ORDER BY event_ts, type_rank, event_id)
), flagged AS (
    SELECT *,
        prev_ts IS NULL
            OR event_ts - prev_ts > INTERVAL {int(gap_minutes)} MINUTE
            OR CAST(event_ts AS DATE) <> CAST(prev_ts AS DATE) AS is_new
    FROM lagged
), numbered AS (
    SELECT *,
        sum(CAST(is_new AS INTEGER)) OVER (PARTITION BY user_id ORDER BY event_ts, type_rank, event_id
                                           ROWS UNBOUNDED PRECEDING) AS session_no
    FROM flagged
), grouped AS (
    SELECT
        user_id,
        min(event_ts) AS started_at,
        max(event_ts) AS ended_at,
        CAST(count(*) AS INTEGER) AS n_actions,
        list(event_id ORDER BY event_ts, type_rank, event_id) AS event_ids,
        list(event_type ORDER BY event_ts, type_rank, event_id) AS all_types,
        string_agg(part, '; ' ORDER BY event_ts, type_rank, event_id)
            FILTER (WHERE is_new OR part IS DISTINCT FROM prev_part) AS full_text,
        first(source) AS source
    FROM numbered
    GROUP BY user_id, session_no
)
SELECT
    event_ids[1] AS memory_id,
    user_id,
    event_ids[1] AS session_id,
    CAST(started_at AS DATE) AS event_date,
    started_at,
    ended_at,
    n_actions,
    list_filter(all_types, lambda x, i: list_position(all_types, x) = i) AS event_types,
    CASE WHEN length(full_text) > {int(max_chars)} THEN left(full_text, {int(max_chars) - 1}) || '…'
         ELSE full_text END AS memory_text,
    event_ids,
    source
FROM grouped
"""


def run_duckdb(db: str | None, parquet: str | None, threads: int, gap: int, max_chars: int) -> Any:
    """The floor: one CREATE TABLE .. AS in ``db`` (reading raw.events) or in memory (reading ``parquet``)."""
    import duckdb

    con = duckdb.connect(db or ":memory:", config={"threads": threads})
    con.execute("SET TimeZone = 'UTC'")
    source = "raw.events" if db else f"read_parquet({_sql_str(parquet)})"
    con.execute("CREATE OR REPLACE TABLE bench_memories AS " + memories_sql(source, gap, max_chars))
    return con


def run_polars(parquet: str, gap: int, max_chars: int) -> Any:
    import polars as pl

    ts = pl.col("event_ts")
    text = pl.coalesce("text", "item_id", pl.lit(""))
    for pattern, repl in PII_MASKS:
        text = text.str.replace_all(pattern, repl)
    part = pl.col("event_type").replace_strict(VERBS, default=pl.col("event_type")) + ": " + text
    new = (
        (pl.col("user_id") != pl.col("user_id").shift(1))
        | ((ts - ts.shift(1)) > pl.duration(minutes=gap))
        | (ts.dt.date() != ts.shift(1).dt.date())
    ).fill_null(True)
    full_text = pl.col("part").filter(pl.col("keep")).str.join("; ")
    return (
        pl.scan_parquet(parquet)
        .select(RAW_COLUMNS)
        .with_columns(type_rank=pl.when(pl.col("event_type") == "search").then(SEARCH_RANK).otherwise(OTHER_RANK))
        .sort("user_id", "event_ts", "type_rank", "event_id")
        .with_columns(part=part, new=new)
        .with_columns(
            keep=pl.col("new") | pl.col("part").ne_missing(pl.col("part").shift(1)),
            session_no=pl.col("new").cum_sum(),
        )
        .group_by("session_no", maintain_order=True)
        .agg(
            pl.col("user_id").first(),
            pl.col("event_id").first().alias("session_id"),
            ts.min().alias("started_at"),
            ts.max().alias("ended_at"),
            pl.len().cast(pl.Int32).alias("n_actions"),
            pl.col("event_type").unique(maintain_order=True).alias("event_types"),
            full_text.alias("memory_text"),
            pl.col("event_id").alias("event_ids"),
            pl.col("source").first(),
        )
        .with_columns(
            memory_id=pl.col("session_id"),
            event_date=pl.col("started_at").dt.date(),
            memory_text=pl.when(pl.col("memory_text").str.len_chars() > max_chars)
            .then(pl.col("memory_text").str.slice(0, max_chars - 1) + "…")
            .otherwise(pl.col("memory_text")),
        )
        .drop("session_no")
        .collect()
    )


def run_pandas(parquet: str, gap: int, max_chars: int) -> Any:
    import numpy as np
    import pandas as pd

    df = pd.read_parquet(parquet, columns=RAW_COLUMNS)
    df["type_rank"] = np.where(df["event_type"] == "search", SEARCH_RANK, OTHER_RANK)
    df = df.sort_values(["user_id", "event_ts", "type_rank", "event_id"], ignore_index=True)
    text = df["text"].fillna(df["item_id"]).fillna("")
    for pattern, repl in PII_MASKS:
        text = text.str.replace(pattern, repl, regex=True)
    df["part"] = df["event_type"].map(VERBS).fillna(df["event_type"]) + ": " + text
    ts = df["event_ts"]
    day = ts.dt.floor("D")
    new = df["user_id"].ne(df["user_id"].shift()) | (ts.diff() > pd.Timedelta(minutes=gap)) | day.ne(day.shift())
    keep = new | df["part"].ne(df["part"].shift())
    df["session_no"] = new.cumsum()
    g = df.groupby("session_no", sort=False)
    out = g.agg(
        user_id=("user_id", "first"),
        session_id=("event_id", "first"),
        started_at=("event_ts", "min"),
        ended_at=("event_ts", "max"),
        n_actions=("event_id", "size"),
        event_ids=("event_id", list),
        source=("source", "first"),
    )
    first_types = df.drop_duplicates(["session_no", "event_type"])
    out["event_types"] = first_types.groupby("session_no", sort=False)["event_type"].agg(list)
    out["memory_text"] = df.loc[keep].groupby("session_no", sort=False)["part"].agg("; ".join)
    long = out["memory_text"].str.len() > max_chars
    out.loc[long, "memory_text"] = out.loc[long, "memory_text"].str.slice(0, max_chars - 1) + "…"
    out["memory_id"] = out["session_id"]
    out["event_date"] = out["started_at"].dt.floor("D")
    out["n_actions"] = out["n_actions"].astype("int32")
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------------
# child processes: one timed step each; prints one line "RESULT {json}" on stdout
# --------------------------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM) and of any waited-for children, in MiB.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries that high-water mark over from the forking parent
    across exec, so every child would report at least the parent's size.
    """
    own = 0.0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                own = int(line.split()[1]) / 1024.0  # kB
    except OSError:  # not Linux: fall back to getrusage (KiB on Linux, bytes on macOS)
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024.0)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return max(own, kids)


def _rss_now_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _settings(spec: dict) -> Any:
    """The deployment's settings with this run's warehouse, threads, attribute mapping and dbt target folder."""
    from persona_tasks.config import load_settings

    base = load_settings()
    events = base.ingest.events.model_copy(update={"attributes": spec["attributes"]})
    return base.model_copy(update={
        "warehouse": Path(spec["warehouse"]),
        "threads": spec["threads"],
        "ingest": base.ingest.model_copy(update={"events": events}),
        "dbt": base.dbt.model_copy(update={"target_path": Path(spec["dbt_target"])}),
    })


def _write_result_polars(df: Any, path: str) -> None:
    import polars as pl

    cols = ["user_id", "started_at", "ended_at", "n_actions", "event_types", "memory_text", "event_ids"]
    df.select(
        pl.col("user_id").cast(pl.String),
        pl.col("started_at").cast(pl.Datetime("us")),
        pl.col("ended_at").cast(pl.Datetime("us")),
        pl.col("n_actions").cast(pl.Int64),
        pl.col("event_types").cast(pl.List(pl.String)).list.join(","),
        pl.col("memory_text").cast(pl.String),
        pl.col("event_ids").cast(pl.List(pl.String)),
    ).select(cols).write_parquet(path)


def _dbt_run_results(spec: dict) -> dict:
    path = Path(spec["dbt_target"]) / "run_results.json"
    if not path.exists():
        return {}
    rr = json.loads(path.read_text())
    nodes = [
        {"node": r.get("unique_id"), "status": r.get("status"), "seconds": float(r.get("execution_time") or 0.0)}
        for r in rr.get("results", [])
    ]
    return {"dbt_elapsed_s": rr.get("elapsed_time"), "nodes": nodes, "nodes_s": sum(n["seconds"] for n in nodes)}


def child(impl: str, spec: dict) -> dict:
    threads, gap, max_chars = spec["threads"], spec["gap_minutes"], spec["max_chars"]
    os.environ["POLARS_MAX_THREADS"] = str(threads)  # before polars is imported
    out: dict[str, Any] = {"impl": impl}
    if impl in ("ingest", "dbt_build", "dbt_noop"):
        settings = _settings(spec)
        if impl == "ingest":
            from persona_tasks.ingest import ingest_files

            fn = lambda: ingest_files(settings, "events", [Path(spec["events_parquet"])])  # noqa: E731
        else:
            from persona_tasks.dbt_runner import build

            full = impl == "dbt_build"
            fn = lambda: build(settings, full_refresh=full)  # noqa: E731
    elif impl == "duckdb_sql":
        import duckdb  # noqa: F401  (imports are not timed)

        fn = lambda: run_duckdb(spec["floor_db"], None, threads, gap, max_chars)  # noqa: E731
    elif impl == "duckdb_parquet":
        import duckdb  # noqa: F401,F811

        fn = lambda: run_duckdb(None, spec["raw_parquet"], threads, gap, max_chars)  # noqa: E731
    elif impl == "polars_lazy":
        import polars  # noqa: F401

        fn = lambda: run_polars(spec["raw_parquet"], gap, max_chars)  # noqa: E731
    elif impl == "pandas":
        import pandas  # noqa: F401
        import pyarrow.parquet  # noqa: F401  (pandas' Parquet reader)

        fn = lambda: run_pandas(spec["raw_parquet"], gap, max_chars)  # noqa: E731
    else:
        raise SystemExit(f"unknown implementation {impl}")
    out["rss_before_mb"] = round(_rss_now_mb(), 1)
    t0 = time.perf_counter()
    res = fn()
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)

    # not timed: the result, for the cross-check
    result_path = spec.get("result_path")
    if impl in ("dbt_build", "dbt_noop"):
        out.update(_dbt_run_results(spec))
    if impl == "ingest":
        t = res.totals() if hasattr(res, "totals") else None
        if t is not None:
            out["rows_accepted"], out["rows_rejected"] = t.rows_accepted, t.rows_rejected
    elif impl == "dbt_build" and result_path:
        import duckdb as ddb

        con = ddb.connect(spec["warehouse"], read_only=True)
        _write_result_polars(con.sql("SELECT * FROM marts.intent_memories").pl(), result_path)
        con.close()
    elif impl in ("duckdb_sql", "duckdb_parquet") and result_path:
        _write_result_polars(res.sql("SELECT * FROM bench_memories").pl(), result_path)
        res.close()
    elif impl == "polars_lazy" and result_path:
        _write_result_polars(res, result_path)
    elif impl == "pandas" and result_path:
        import polars as pl

        _write_result_polars(pl.from_pandas(res), result_path)
    return out


# --------------------------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------------------------
def _run_child(impl: str, spec: dict, spec_path: Path) -> dict:
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--spec", str(spec_path)],
        capture_output=True, text=True, cwd=str(ROOT),
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"impl": impl, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def _available(module: str, attr: str) -> bool:
    try:
        mod = __import__(module, fromlist=[attr])
    except Exception:  # noqa: BLE001 - any import problem means "not ready"
        return False
    return hasattr(mod, attr)


def _prepare_without_ingest(settings: Any, events_parquet: Path) -> None:
    """Fallback while persona_tasks.ingest is missing: raw.events straight from the Parquet (not timed)."""
    from persona_tasks.warehouse import connect

    try:
        from persona_tasks.ingest.common import event_id_sql

        event_id = event_id_sql("events")
    except Exception:  # noqa: BLE001
        event_id = ("md5(concat_ws(chr(31), 'events', user_id, strftime(event_ts, '%Y-%m-%dT%H:%M:%S'), "
                    "event_type, coalesce(item_id, ''), coalesce(text, '')))")
    attrs = ", ".join(f"{_sql_str(a)}: {a}" for a in settings.ingest.events.attributes)
    with connect(settings) as con:
        con.execute(f"""
            INSERT INTO raw.events
            SELECT {event_id},
                   user_id, event_ts, event_type, item_id, text, to_json({{{attrs}}}), 'events', 'bench',
                   now()::TIMESTAMP
            FROM read_parquet({_sql_str(str(events_parquet))})
        """)


def _export_raw(settings: Any, raw_parquet: Path, floor_db: Path) -> int:
    import duckdb

    con = duckdb.connect(str(settings.warehouse), config={"threads": settings.threads})
    con.execute("SET TimeZone = 'UTC'")
    n = con.execute("SELECT count(*) FROM raw.events").fetchone()[0]
    con.execute(
        f"COPY (SELECT {', '.join(RAW_COLUMNS)} FROM raw.events) TO {_sql_str(str(raw_parquet))} "
        "(FORMAT parquet, COMPRESSION zstd)"
    )
    con.execute("CHECKPOINT")
    con.close()
    shutil.copyfile(settings.warehouse, floor_db)
    return n


def _compare(results: dict[str, Path]) -> dict:
    """Same memories everywhere? Keys (user_id, started_at, n_actions) must agree; other columns reported."""
    import polars as pl

    frames = {k: pl.read_parquet(p) for k, p in results.items() if p.exists()}
    if not frames:
        return {}
    key = ["user_id", "started_at", "n_actions"]
    ref_name = "duckdb_sql" if "duckdb_sql" in frames else next(iter(frames))
    ref = frames[ref_name].sort(key)
    report: dict[str, Any] = {"reference": ref_name, "n_memories": {k: f.height for k, f in frames.items()}}
    same_keys, same_cols = {}, {}
    for name, f in frames.items():
        f = f.sort(key)
        same_keys[name] = f.height == ref.height and f.select(key).equals(ref.select(key))
        if same_keys[name]:
            same_cols[name] = {
                c: bool(f[c].equals(ref[c])) for c in ("ended_at", "event_types", "memory_text", "event_ids")
            }
    report["same_keys"] = same_keys
    report["same_columns"] = same_cols
    report["ok"] = all(same_keys.values())
    return report


def _fmt_row(label: str, r: dict | None, n: int, floor_s: float | None, extra: str = "") -> str:
    if r is None:
        return f"{label:<32} {'skipped':>9}"
    if "error" in r:
        return f"{label:<32} {'FAILED':>9}  {r['error'][:150]}"
    s = r["seconds"]
    ratio = f"{s / floor_s:.2f}x" if floor_s else "-"
    peak = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-"
    return f"{label:<32} {s:>9.2f} {n / s:>12,.0f} {ratio:>9} {peak:>9}  {extra}"


def markdown(results: list[dict], meta: dict) -> str:
    """The results as the tables of docs/performance.md."""
    v = meta["versions"]
    lines = [
        f"Machine: {meta['machine'].get('cpus')} CPUs, {meta['machine'].get('memory_gb')} GB RAM, "
        f"{meta['machine'].get('platform')}; DuckDB {v['duckdb']}, polars {v['polars']}, pandas {v['pandas']}, "
        f"dbt-core {v['dbt-core']}; threads = {meta['settings']['threads']}; best of {meta['repeat']} runs; "
        f"{meta['started_at'][:10]}.",
    ]
    for res in results:
        n, best = res["n_events"], res["best"]
        floor = best.get("duckdb_sql")
        floor_s = floor["seconds"] if floor and "error" not in floor else None
        n_mem = (res.get("check") or {}).get("n_memories", {})
        mems = next(iter(n_mem.values()), None)
        lines += ["", f"**{n:,} events** ({res['n_users']:,} users, "
                  f"{mems if mems is None else format(mems, ',')} memories)", "",
                  "| step | seconds | events/s | vs raw DuckDB | peak RSS (MB) |", "|---|---:|---:|---:|---:|"]

        def row(label: str, s: float | None, peak: float | None, rate: bool = True, ratio: bool = True) -> None:
            cells = [
                "–" if s is None else f"{s:.2f}",
                f"{n / s:,.0f}" if s and rate else "–",
                f"{s / floor_s:.2f}x" if s and ratio and floor_s else "–",
                "–" if peak is None else f"{peak:,.0f}",
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")

        for impl in STEPS:
            r = best.get(impl)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {LABELS[impl].strip()} | failed | | | |")
                continue
            row(LABELS[impl].strip(), r["seconds"], r.get("peak_rss_mb"),
                ratio=impl not in ("ingest",), rate=impl != "dbt_noop")
            if impl == "dbt_build" and "nodes_s" in r:
                row("&nbsp;&nbsp;dbt start-up (fixed)", r["seconds"] - r["nodes_s"], None, rate=False, ratio=False)
                row("&nbsp;&nbsp;dbt build minus start-up", r["nodes_s"], None)
        check = res.get("check") or {}
        if check:
            lines += ["", "Cross-check: " + ("same number of memories and the same (user_id, started_at, n_actions) "
                                              "multiset in every implementation" if check.get("ok")
                                              else f"MISMATCH {check.get('same_keys')}") + "."]
        t = res.get("targets") or {}
        if "dbt_vs_floor" in t:
            extra = (f" ({t['dbt_minus_startup_vs_floor']:.2f}x without start-up)"
                     if "dbt_minus_startup_vs_floor" in t else "")
            lines.append(f"dbt build = {t['dbt_vs_floor']:.2f}x the floor{extra}"
                         + (f"; faster than pandas: {'yes' if t['dbt_faster_than_pandas'] else 'NO'}"
                            if "dbt_faster_than_pandas" in t else "") + ".")
    return "\n".join(lines) + "\n"


def bench_size(n: int, args: argparse.Namespace, settings: Any) -> dict:
    from persona_tasks import synth

    d = Path(args.out) / f"n{n}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    events_parquet, raw_parquet = d / "events.parquet", d / "raw_events.parquet"
    warehouse, floor_db = d / "warehouse.duckdb", d / "floor.duckdb"
    t0 = time.perf_counter()
    df = synth.generate_events(n, seed=args.seed, days=args.days)
    gen_s = time.perf_counter() - t0
    synth.write_events(df.select("user_id", "event_ts", "event_type", "item_id", "text", *synth.EVENTS_MAPPING_ATTRIBUTES),
                       events_parquet)
    n_users, n_sessions = df["user_id"].n_unique(), df["planted_session"].n_unique()
    del df
    print(f"\n== {n:,} events, {n_users:,} users, {n_sessions:,} planted sessions "
          f"(generated in {gen_s:.1f} s, not timed)", flush=True)

    spec = {
        "warehouse": str(warehouse), "floor_db": str(floor_db), "events_parquet": str(events_parquet),
        "raw_parquet": str(raw_parquet), "threads": settings.threads, "gap_minutes": settings.session_gap_minutes,
        "max_chars": settings.memory_text_max_chars, "attributes": synth.EVENTS_MAPPING_ATTRIBUTES,
        "dbt_target": str(d / "dbt_target"),
    }
    wh_settings = settings.model_copy(update={"warehouse": warehouse})
    runs: dict[str, list[dict]] = {}
    notes: list[str] = []
    skip = set(args.skip)
    have_ingest = _available("persona_tasks.ingest", "ingest_files")
    have_dbt = _available("persona_tasks.dbt_runner", "build")

    def timed(impl: str, repeat: int, result: bool = True) -> None:
        for i in range(repeat):
            s = dict(spec, result_path=str(d / f"result_{impl}.parquet") if result and i == 0 else None)
            r = _run_child(impl, s, d / "spec.json")
            runs.setdefault(impl, []).append(r)
            msg = r.get("error") or f"{r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB"
            print(f"  {impl} [{i + 1}/{repeat}]: {msg}", flush=True)
            if "error" in r:
                break

    if have_ingest and "ingest" not in skip:
        timed("ingest", 1, result=False)
    if "error" in (runs.get("ingest") or [{}])[-1] or not runs.get("ingest"):
        why = "failed" if runs.get("ingest") else ("skipped" if "ingest" in skip else "not available")
        notes.append(f"ingest {why}: raw.events loaded by the bench's own SQL (event_id may differ from the loader's)")
        warehouse.unlink(missing_ok=True)
        _prepare_without_ingest(wh_settings, events_parquet)
    n_raw = _export_raw(wh_settings, raw_parquet, floor_db)
    if n_raw != n:
        notes.append(f"raw.events holds {n_raw:,} rows for {n:,} generated events")

    if have_dbt and "dbt_build" not in skip:
        timed("dbt_build", args.repeat)
        if "dbt_noop" not in skip and "error" not in runs["dbt_build"][-1]:
            timed("dbt_noop", 1, result=False)
    elif not have_dbt:
        notes.append("dbt build not available (persona_tasks.dbt_runner.build missing)")
    for impl in BASELINES:
        if impl not in skip:
            timed(impl, args.repeat)

    best = {k: min((r for r in v if "error" not in r), key=lambda r: r["seconds"], default=v[-1]) for k, v in runs.items()}
    check = _compare({k: d / f"result_{k}.parquet" for k in ("dbt_build", *BASELINES) if k in runs})
    floor = best.get("duckdb_sql")
    floor_s = floor["seconds"] if floor and "error" not in floor else None

    print(f"\n{'step':<32} {'seconds':>9} {'events/s':>12} {'vs floor':>9} {'peak MB':>9}")
    for impl in STEPS:
        if impl not in best:
            continue
        r = best[impl]
        extra = ""
        if impl in ("dbt_build", "dbt_noop") and "nodes_s" in r and "error" not in r:
            extra = f"start-up {r['seconds'] - r['nodes_s']:.2f} s, nodes {r['nodes_s']:.2f} s ({len(r['nodes'])})"
        print(_fmt_row(LABELS[impl], r, n, None if impl == "ingest" else floor_s, extra))
        if impl == "dbt_build" and "nodes_s" in r and "error" not in r:
            print(_fmt_row(LABELS["dbt_build_nodes"], dict(r, seconds=r["nodes_s"]), n, floor_s))
    if check:
        counts = sorted(set(check["n_memories"].values()))
        print(f"check: memories per implementation {check['n_memories']}; same (user_id, started_at, n_actions): "
              f"{'OK' if check['ok'] else 'MISMATCH ' + str(check['same_keys'])}")
        for name, cols in check["same_columns"].items():
            diff = [c for c, same in cols.items() if not same]
            if diff:
                print(f"  {name}: differs from {check['reference']} in {', '.join(diff)}")
        if len(counts) > 1:
            notes.append("implementations disagree on the number of memories")
    targets = {}
    dbt = best.get("dbt_build")
    if floor_s and dbt and "error" not in dbt:
        targets["dbt_vs_floor"] = dbt["seconds"] / floor_s
        if "nodes_s" in dbt:
            targets["dbt_minus_startup_vs_floor"] = dbt["nodes_s"] / floor_s
        pd_r = best.get("pandas")
        if pd_r and "error" not in pd_r:
            targets["dbt_faster_than_pandas"] = dbt["seconds"] < pd_r["seconds"]
    for note in notes:
        print("note:", note)
    if not args.keep:
        for p in (events_parquet, raw_parquet, warehouse, floor_db, *d.glob("result_*.parquet"), *d.glob("*.wal")):
            Path(p).unlink(missing_ok=True)
    return {
        "n_events": n, "n_users": n_users, "n_planted_sessions": n_sessions, "raw_events": n_raw,
        "generate_s": gen_s, "runs": runs, "best": best, "check": check, "targets": targets, "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000000,10000000", help="comma-separated event counts")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"), help="results folder (JSON + scratch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--days", type=int, default=7, help="days the synthetic events span")
    p.add_argument("--repeat", type=int, default=1, help="runs per timed step (best is reported; ingest once)")
    p.add_argument("--skip", default="", help=f"comma-separated steps to skip, of: {','.join(STEPS)}")
    p.add_argument("--keep", action="store_true", help="keep the generated files, warehouses and results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        res = child(args.child, json.loads(Path(args.spec).read_text()))
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    args.skip = [s for s in args.skip.split(",") if s]
    unknown = set(args.skip) - set(STEPS)
    if unknown:
        p.error(f"unknown steps to skip: {sorted(unknown)}")
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s]

    from persona_tasks.config import load_settings

    settings = load_settings()
    import duckdb
    import pandas
    import polars

    try:
        import dbt.version as dbt_version

        dbt_v = dbt_version.__version__
    except Exception:  # noqa: BLE001
        dbt_v = None
    Path(args.out).mkdir(parents=True, exist_ok=True)
    meta = {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"duckdb": duckdb.__version__, "polars": polars.__version__, "pandas": pandas.__version__,
                     "dbt-core": dbt_v},
        "settings": {"threads": settings.threads, "session_gap_minutes": settings.session_gap_minutes,
                     "memory_text_max_chars": settings.memory_text_max_chars},
        "seed": args.seed, "days": args.days, "repeat": args.repeat,
    }
    try:
        import psutil

        meta["machine"]["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001
        pass
    print(f"bench_memories: sizes {sizes}, threads {settings.threads}, {os.cpu_count()} CPUs, "
          f"duckdb {duckdb.__version__}, polars {polars.__version__}, pandas {pandas.__version__}, dbt {dbt_v}")
    results = [bench_size(n, args, settings) for n in sizes]
    doc = {"bench": "memories", **meta, "sizes": results}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for name in ("bench_memories.json", f"bench_memories_{stamp}.json"):
        (Path(args.out) / name).write_text(json.dumps(doc, indent=2, default=str))
    (Path(args.out) / "bench_memories.md").write_text(markdown(results, meta))
    print(f"\nresults: {Path(args.out) / 'bench_memories.json'}, {Path(args.out) / 'bench_memories.md'}")
    ok = all(r["check"].get("ok", True) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
