#!/usr/bin/env python
"""Benchmark: the gates' Data Docs build time as gate runs accumulate, with and without pruning (issue 14, s. 4).

GX rebuilds the site's index from every stored validation result, so without a bound each gate run gets slower.
``persona_tasks.gates.site.prune`` keeps the newest ``[gates] docs_keep_runs`` results per suite. This bench
ingests one generated day (``synth.generate_events``) into a fresh warehouse and runs the raw gate
(``daily.gate_raw``: load, GX validation, results table, Data Docs) ``--runs`` times per setting, once with
``docs_keep_runs = --keep`` and once with a bound larger than the runs (no pruning in effect), each in its own GX
project; per run it records the gate's own timings (load, validate, Data Docs build) from its output.

Usage: python bench/bench_gates_docs.py [--runs 60] [--keep 10] [--events 20000]
Writes bench/results/gates_docs_build.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DAY = "2026-03-02"


def series(base: Path, keep: int, runs: int, events: int) -> dict:
    from persona_tasks import daily
    from persona_tasks.config import load_settings
    from persona_tasks.gates.runner import RunInfo
    from persona_tasks.synth import generate_events, write_events

    landing = base / "landing"
    write_events(generate_events(events, n_users=max(1, events // 10), seed=5, days=1, start=DAY), landing / DAY / "events.parquet")
    settings = load_settings(warehouse=base / "wh" / "warehouse.duckdb", threads=2,
                             gates={"docs_keep_runs": keep},
                             orchestration={"landing_dir": str(landing), "landing_format": "events",
                                            "landing_source": "synth"})
    ingested = daily.ingest_landing(settings, DAY)
    rows = []
    for i in range(runs):
        t0 = time.perf_counter()
        out = daily.gate_raw(settings, DAY, ingested, RunInfo(run_id=f"bench__{i:04d}"))
        rows.append({"run": i + 1, "wall_s": round(time.perf_counter() - t0, 3), **out["timings_s"]})
        print(f"keep {keep:5d} run {i + 1:3d}: {rows[-1]['wall_s']:.2f} s (data docs {out['timings_s']['docs_s']:.2f} s)",
              flush=True)
    pages = sum(1 for _ in (base / "wh" / "quality" / "docs" / "validations").rglob("*.html"))
    tail = rows[-10:]
    return {"keep": keep, "runs": runs, "checks": out["checks"], "pages_at_end": pages, "rows": rows,
            "first10_docs_s_median": statistics.median(r["docs_s"] for r in rows[:10]),
            "last10_docs_s_median": statistics.median(r["docs_s"] for r in tail),
            "last10_wall_s_median": statistics.median(r["wall_s"] for r in tail),
            "last10_validate_s_median": statistics.median(r["validate_s"] for r in tail)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--keep", type=int, default=10)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gates_docs_build.json")
    args = ap.parse_args()
    res = {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, Python {platform.python_version()}",
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip(),
           "events": args.events, "gate": "gate_raw", "series": []}
    for keep in (args.keep, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="bench_gates_docs_") as tmp:
            res["series"].append(series(Path(tmp), keep, args.runs, args.events))
    pruned, unbounded = res["series"]
    res["pruned_vs_unbounded_last10_docs"] = round(pruned["last10_docs_s_median"] / unbounded["last10_docs_s_median"], 3)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"keep {pruned['keep']}: last 10 runs' Data Docs build {pruned['last10_docs_s_median']:.2f} s (first 10: "
          f"{pruned['first10_docs_s_median']:.2f} s); unbounded: {unbounded['last10_docs_s_median']:.2f} s. "
          f"Wrote {args.out}")


if __name__ == "__main__":
    main()
