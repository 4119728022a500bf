#!/usr/bin/env python
"""Benchmark: persona_daily end to end on a generated day (the steps of ``persona_tasks.daily.run_day``).

A "day" of synthetic events (``persona_tasks.synth.generate_events``, planted personas; not timed) is written to
``<work>/landing/<day>/events.parquet`` in the ``events`` format with the attributes mapping
``category, brand, price`` (as tests/test_induce.py). The generator keeps 40-minute gaps between a user's
sessions, so 1M events of 10k users (100 per user) do not fit into one calendar day: the events span
``--gen-days`` (4) days ending on the run day and all land in the run day's folder (a backlog delivered at once);
the run ingests them all, builds the memories of all four days and embeds, clusters and labels every memory up to
the end of the run day, i.e. the full 1M events' work. Then the steps of ``daily.run_day`` run in order, each in
its own Python subprocess so that wall time and peak RSS (``VmHWM`` of the step's process, ``ru_maxrss`` of its children)
are per step: ingest_landing, gate_raw, build (dbt), gate_memories, embed (MiniLM), cluster (all shards, in one
process, as run_day does), store_clusters, label (extractive), score, gate_personas, publish, serve. Settings:
``threads = 2`` (DuckDB, polars, torch), the defaults otherwise, a fresh warehouse in the work folder.

``--backend``: the ``[embedding] backend`` (``transformer`` = MiniLM itself, the default; ``onnx`` = MiniLM exported
to ONNX Runtime; ``static`` = word-piece vectors distilled from it, persona_tasks.static_embed). With the
transformer, embedding is the slow step on 2 CPU cores (tens of memories/s). A day whose embedding would take longer than ``--max-embed-minutes`` at the sampled
rate is therefore measured up to ``gate_memories``, plus the embedding rate on a
random sample of ``--embed-sample`` of its memory texts (``embed_rate``; encode only, model load excluded) and the
embed time extrapolated from it. A smaller day (``--small-events`` / ``--small-users``, every step measured)
gives the per-memory cost of the steps after embed; the 1M-day total is then extrapolated linearly in memories and
labelled as such in the output.

Usage::

    .venv/bin/python bench/bench_daily.py                                   # 1M events / 10k users + 100k / 1k
    .venv/bin/python bench/bench_daily.py --backend static --small-events 0 # 1M events, every step measured
    .venv/bin/python bench/bench_daily.py --events 20000 --users 200 --small-events 0   # quick check

Writes ``<out>/bench_daily.json`` and ``<out>/bench_daily.md`` (the tables for docs/performance.md).
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
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["ingest_landing", "gate_raw", "build", "gate_memories", "embed", "cluster", "store_clusters", "label",
         "score", "gate_personas", "publish", "serve"]
BEFORE_EMBED = STEPS[:4]


def vm_hwm_kb() -> int:
    """Peak RSS of this process since its exec (``VmHWM``). Not ``ru_maxrss``: on Linux that keeps the high-water mark
    of the forking parent (the bench, which held the generated events)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# --- child: one step in this process --------------------------------------------------------------------------

def child(step: str, day: str, state_path: Path, result_path: Path) -> None:
    from persona_tasks import daily
    from persona_tasks.config import load_settings

    settings = load_settings()
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    t0 = time.perf_counter()
    error = None
    try:
        if step == "ingest_landing":
            out = daily.ingest_landing(settings, day)
        elif step == "gate_raw":
            out = daily.gate_raw(settings, day, state["ingest_landing"])
        elif step == "build":
            out = daily.build(settings, day)
        elif step == "gate_memories":
            out = daily.gate_memories(settings, day, state["build"])
        elif step == "embed":
            out = daily.embed(settings, day)
        elif step == "cluster":
            n = settings.orchestration.n_shards
            out = [daily.cluster_shard(settings, day, k, n, state["embed"]) for k in range(n)]
        elif step == "store_clusters":
            out = daily.store_clusters(settings, day, state["cluster"], state["embed"])
        elif step == "label":
            out = daily.label(settings, day, "extractive")
        elif step in ("score", "gate_personas", "publish", "serve"):
            out = getattr(daily, step)(settings, day)
        elif step == "embed_rate":
            out = embed_rate(settings, day, int(os.environ["BENCH_EMBED_SAMPLE"]))
        else:
            raise SystemExit(f"unknown step {step}")
    except daily.GateError as exc:
        out, error = None, f"GateError: {exc.check}"
    seconds = time.perf_counter() - t0
    peak = max(vm_hwm_kb(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    result_path.write_text(json.dumps({"step": step, "seconds": seconds, "peak_rss_mb": peak, "out": out,
                                       "error": error}, default=str))


def embed_rate(settings, day: str, sample: int) -> dict:
    """Encode a random sample of the day's memory texts (model loaded first, not timed): memories/s."""
    from persona_tasks.days import day_end
    from persona_tasks.embed import embedder_from_settings
    from persona_tasks.warehouse import connect_read_only, query_pl

    con = connect_read_only(settings)
    try:
        n = query_pl(con, "SELECT count(*) AS n FROM marts.intent_memories WHERE started_at < $e",
                     {"e": day_end(datetime.fromisoformat(day).date())})["n"][0]
        texts = query_pl(con, f"SELECT memory_text FROM marts.intent_memories USING SAMPLE reservoir({int(sample)} "
                              "ROWS) REPEATABLE (7)")["memory_text"].to_list()
    finally:
        con.close()
    emb = embedder_from_settings(settings)
    t0 = time.perf_counter()
    emb.encode(texts[:8])  # warm-up (model load, first batch)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb.encode(texts)
    enc_s = time.perf_counter() - t0
    chars = sum(len(t) for t in texts) / max(1, len(texts))
    return {"memories_total": int(n), "sample": len(texts), "encode_s": enc_s, "load_s": load_s,
            "memories_per_s": len(texts) / enc_s, "mean_chars": chars,
            "batch_size": settings.embedding.batch_size, "device": settings.embedding.device}


# --- parent: one day, step by step -------------------------------------------------------------------------------

def run_step(step: str, work: Path, day: str, env: dict) -> dict:
    result = work / f"result_{step}.json"
    result.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", step, "--day", day, "--work", str(work)],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / f"log_{step}.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"step {step} failed ({proc.returncode}); log: {work / f'log_{step}.txt'}\n"
                         + proc.stderr[-3000:])
    res = json.loads(result.read_text())
    res["process_s"] = wall  # including interpreter start and imports
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    state[step] = res["out"]
    state_path.write_text(json.dumps(state, default=str))
    return res


def prepare_day(work: Path, n_events: int, n_users: int, day: str, n_shards: int, gen_days: int,
                backend: str = "transformer") -> tuple[dict, dict]:
    from persona_tasks.synth import generate_events, write_events

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    first = (datetime.fromisoformat(day) - timedelta(days=gen_days - 1)).date().isoformat()
    events = generate_events(n_events, n_users=n_users, seed=11, days=gen_days, start=first)
    path = write_events(events, work / "landing" / day / "events.parquet")
    gen = {"events": events.height, "first_event_day": first, "gen_days": gen_days, "users": events["user_id"].n_unique(), "seconds": time.perf_counter() - t0,
           "parquet_mb": path.stat().st_size / 2**20}
    del events
    cfg = work / "persona_etl.toml"
    cfg.write_text(
        f'warehouse = "{work / "wh" / "warehouse.duckdb"}"\nthreads = 2\n\n'
        f'[dbt]\ntarget_path = "{work / "dbt_target"}"\n\n'
        f'[embedding]\nbackend = "{backend}"\n\n'
        '[ingest.events]\nattributes = ["category", "brand", "price"]\n\n'
        f'[orchestration]\nlanding_dir = "{work / "landing"}"\nlanding_format = "events"\n'
        f'landing_source = "synth"\nn_shards = {n_shards}\n\n'
        # the backlog spans gen_days days before the run day: late events the raw gate must accept
        f'[gates]\nlateness_hours = {24 * gen_days}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_ETL_")}
    env.update(PERSONA_ETL_CONFIG=str(cfg), POLARS_MAX_THREADS="2", OMP_NUM_THREADS="2", MKL_NUM_THREADS="2",
               TOKENIZERS_PARALLELISM="false")
    return gen, env


def bench_day(label: str, n_events: int, n_users: int, day: str, args) -> dict:
    work = Path(args.work) / label
    gen, env = prepare_day(work, n_events, n_users, day, args.shards, args.gen_days, args.backend)
    print(f"[{label}] generated {gen['events']:,} events of {gen['users']:,} users in {gen['seconds']:.1f}s",
          flush=True)
    env["BENCH_EMBED_SAMPLE"] = str(args.embed_sample)
    steps: dict[str, dict] = {}
    for step in BEFORE_EMBED:
        steps[step] = run_step(step, work, day, env)
        print(f"[{label}] {step:15s} {steps[step]['seconds']:8.1f}s  {steps[step]['peak_rss_mb']:7.0f} MB",
              flush=True)
    rate = run_step("embed_rate", work, day, env)["out"]
    print(f"[{label}] embed_rate: {rate['memories_per_s']:.1f} memories/s on {rate['sample']} of "
          f"{rate['memories_total']:,} memories", flush=True)
    capped = rate["memories_total"] / rate["memories_per_s"] > 60 * args.max_embed_minutes
    if not capped:
        for step in STEPS[4:]:
            steps[step] = run_step(step, work, day, env)
            err = f"  {steps[step]['error']}" if steps[step]["error"] else ""
            print(f"[{label}] {step:15s} {steps[step]['seconds']:8.1f}s  {steps[step]['peak_rss_mb']:7.0f} MB{err}",
                  flush=True)
            if steps[step]["error"]:
                break
    out = {"label": label, "events": gen["events"], "users": gen["users"], "day": day, "generate": gen,
           "memories": rate["memories_total"], "embed_rate": rate, "embed_capped": capped,
           "steps": {k: {"seconds": round(v["seconds"], 2), "process_s": round(v["process_s"], 2),
                         "peak_rss_mb": round(v["peak_rss_mb"]), "error": v["error"]} for k, v in steps.items()},
           "outputs": {k: v["out"] for k, v in steps.items() if k not in ("cluster",)}}
    if not args.keep:
        shutil.rmtree(work / "wh", ignore_errors=True)
    return out


def bench_airflow(label: str, n_events: int, n_users: int, day: str, args) -> dict:
    """The same day through ``airflow dags test persona_daily <day>`` (real Airflow, SQLite metadata DB, tasks in
    one process one after the other): wall time of the command, each task's duration from the metadata DB, and
    the peak RSS of the Airflow process (``ru_maxrss`` of the children)."""
    from persona_tasks.config import load_settings
    from persona_tasks.local_airflow import LocalAirflow

    work = Path(args.work).resolve() / f"{label}_airflow"
    gen, env = prepare_day(work, n_events, n_users, day, args.shards, args.gen_days, args.backend)
    persona_env = {k: v for k, v in env.items() if k.startswith(("PERSONA_ETL_", "POLARS_", "OMP_", "MKL_",
                                                                  "TOKENIZERS_"))}
    old = os.environ.get("PERSONA_ETL_CONFIG")
    os.environ["PERSONA_ETL_CONFIG"] = env["PERSONA_ETL_CONFIG"]
    try:
        settings = load_settings()
    finally:
        if old is None:
            os.environ.pop("PERSONA_ETL_CONFIG")
        else:
            os.environ["PERSONA_ETL_CONFIG"] = old
    af = LocalAirflow.create(settings, work / "airflow", persona_env)
    print(f"[{label} airflow] generated {gen['events']:,} events; running airflow dags test persona_daily {day}",
          flush=True)
    _, seconds = af.dags_test("persona_daily", day)
    states = af.task_states("persona_daily", day)
    durations = af.task_durations("persona_daily", day)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    failed = {t: s for t, s in states.items() if s != "success"}
    if failed:
        raise SystemExit(f"airflow run not successful: {failed}; logs in {work / 'airflow'}")
    for t, d in durations.items():
        print(f"[{label} airflow] {t:22s} {d:8.1f}s", flush=True)
    print(f"[{label} airflow] dags test wall {seconds:.1f}s, peak RSS {peak_mb:.0f} MB", flush=True)
    if not args.keep:
        shutil.rmtree(work / "wh", ignore_errors=True)
    return {"label": label, "events": gen["events"], "users": gen["users"], "day": day, "generate": gen,
            "dags_test_s": round(seconds, 1), "peak_rss_mb": round(peak_mb), "tasks": durations}


def extrapolate(full: dict, small: dict | None) -> dict | None:
    """The capped day's total: measured steps up to gate_memories + embed from the sampled rate + the later steps
    of the small day scaled linearly by memories."""
    if not full["embed_capped"] or small is None or small["embed_capped"]:
        return None
    k = full["memories"] / small["memories"]
    steps = {s: {"seconds": full["steps"][s]["seconds"], "how": "measured"} for s in BEFORE_EMBED}
    steps["embed"] = {"seconds": round(full["memories"] / full["embed_rate"]["memories_per_s"], 1),
                      "how": f"{full['memories']:,} memories / {full['embed_rate']['memories_per_s']:.1f} per s "
                             "(sampled rate)"}
    for s in STEPS[5:]:
        if s in small["steps"]:
            steps[s] = {"seconds": round(small["steps"][s]["seconds"] * k, 1),
                        "how": f"small day x {k:.2f} (memories)"}
    total = sum(v["seconds"] for v in steps.values())
    return {"factor": k, "steps": steps, "total_s": round(total, 1),
            "total_without_embed_s": round(total - steps["embed"]["seconds"], 1)}


def markdown(res: dict) -> str:
    lines = [f"Machine: {res['machine']}; threads 2; {res['when']}.", ""]
    for d in res["days"]:
        lines += [f"### {d['label']}: {d['events']:,} events, {d['users']:,} users, {d['memories']:,} memories "
                  f"(day {d['day']})", "",
                  "| step | wall s (in step) | process s (with start-up) | peak RSS MB |", "|---|---:|---:|---:|"]
        for s, v in d["steps"].items():
            err = f" ({v['error']})" if v["error"] else ""
            lines.append(f"| {s}{err} | {v['seconds']:.1f} | {v['process_s']:.1f} | {v['peak_rss_mb']} |")
        tot = sum(v["seconds"] for v in d["steps"].values())
        tot_p = sum(v["process_s"] for v in d["steps"].values())
        lines.append(f"| **total of the steps run** | **{tot:.1f}** | **{tot_p:.1f}** | max "
                     f"{max(v['peak_rss_mb'] for v in d['steps'].values())} |")
        r = d["embed_rate"]
        lines += ["", f"Embedding rate ({res['backend']} backend, {r['device']}, batch {r['batch_size']}, sample of {r['sample']} "
                      f"memory texts, mean {r['mean_chars']:.0f} chars): **{r['memories_per_s']:.1f} memories/s**.",
                  ""]
        if d["embed_capped"]:
            lines += [f"Embed and the steps after it were **not run** on this day (cap: "
                      f"{res['max_embed_minutes']:g} minutes of embedding at the sampled rate; see the "
                      "extrapolation).", ""]
    for a in res.get("airflow", []):
        lines += [f"### {a['label']} under Airflow: `airflow dags test persona_daily {a['day']}`, {a['events']:,} "
                  f"events, {a['users']:,} users", "", "| task | seconds |", "|---|---:|"]
        lines += [f"| {t} | {d:.1f} |" for t, d in a["tasks"].items()]
        lines += [f"| **sum of tasks** | **{sum(a['tasks'].values()):.1f}** |",
                  f"| **`airflow dags test` wall** (with DAG parsing, metadata DB) | **{a['dags_test_s']:.1f}** |",
                  "", f"Peak RSS of the Airflow process: {a['peak_rss_mb']:,} MB.", ""]
    ex = res.get("extrapolated")
    if ex:
        lines += ["### Extrapolated end-to-end time of the large day (labelled per step)", "",
                  "| step | seconds | how |", "|---|---:|---|"]
        for s, v in ex["steps"].items():
            lines.append(f"| {s} | {v['seconds']:.1f} | {v['how']} |")
        lines += [f"| **total** | **{ex['total_s']:.0f}** | of which embed {ex['steps']['embed']['seconds']:.0f} |",
                  f"| total without embed | {ex['total_without_embed_s']:.0f} | |", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--small-events", type=int, default=100_000, help="0 = no small day")
    ap.add_argument("--small-users", type=int, default=1_000)
    ap.add_argument("--day", default="2026-01-05")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--gen-days", type=int, default=4,
                    help="the generator cannot fit 100 events/user into one day (40-minute session gaps): the "
                         "events span this many days ending on --day, all landed in that day's folder")
    ap.add_argument("--embed-sample", type=int, default=2000)
    ap.add_argument("--max-embed-minutes", type=float, default=15.0,
                    help="a day whose embedding would take longer (at the sampled rate) is measured up to "
                         "gate_memories plus the embedding rate")
    ap.add_argument("--backend", choices=["transformer", "static", "onnx"], default="transformer",
                    help="[embedding] backend: the model itself, the model exported to ONNX, or static vectors "
                    "distilled from it")
    ap.add_argument("--work", default=str(ROOT / "bench" / "out" / "daily_work"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--keep", action="store_true", help="keep the warehouses")
    ap.add_argument("--airflow-only", action="store_true",
                    help="run the day through `airflow dags test persona_daily` instead of step by step")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        work = Path(args.work)
        child(args.child, args.day, work / "state.json", work / f"result_{args.child}.json")
        return
    t0 = time.perf_counter()
    if args.airflow_only:
        airflow = [bench_airflow(f"{args.events // 1000}k", args.events, args.users, args.day, args)]
    else:
        airflow = []
    days = [] if args.airflow_only else [bench_day(f"{args.events // 1000}k", args.events, args.users, args.day, args)]
    if args.small_events and not args.airflow_only:
        days.append(bench_day(f"{args.small_events // 1000}k", args.small_events, args.small_users, args.day, args))
    res = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
                      f"{platform.python_version()}",
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip(),
           "max_embed_minutes": args.max_embed_minutes, "backend": args.backend, "days": days,
           "airflow": airflow,
           "extrapolated": extrapolate(days[0], days[1] if len(days) > 1 else None) if days else None,
           "bench_seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_daily.json").write_text(json.dumps(res, indent=2, default=str))
    md = markdown(res)
    (out / "bench_daily.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
