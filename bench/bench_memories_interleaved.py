#!/usr/bin/env python
"""dbt build of intent memories from one or more checkouts against polars lazy, interleaved round by round.

Why: bench/bench_memories.py runs each step's repeats back to back, so on a shared machine a change of load
between steps moves the ratios. Here every round times each checkout's ``dbt build --full-refresh`` and then
polars on the same input, so a ratio within a round compares steps run under the same load; the best round of
each step is reported as well.

Input: a folder left by ``bench/bench_memories.py --keep`` (its ``warehouse.duckdb`` after ingest, before any dbt
build, and ``raw_events.parquet``). Each timed step is bench_memories' own child process (``--child``), run from
the checkout it measures, on a fresh copy of that warehouse. The first round also writes every result and checks
each dbt build against polars with bench_memories' cross-check.

Usage::

    git archive <commit> | tar -x -C /tmp/before     # a checkout to compare with (optional)
    .venv/bin/python bench/bench_memories.py --sizes 10000000 --keep \
        --skip dbt_build,dbt_noop,duckdb_sql,duckdb_parquet,polars_lazy,pandas
    .venv/bin/python bench/bench_memories_interleaved.py bench/out/n10000000 --checkout before=/tmp/before \
        --checkout after=. --rounds 2 --out bench/results/memories_dbt_vs_polars_10m.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _child(checkout: Path, impl: str, spec: dict, spec_path: Path) -> dict:
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(checkout))
    load_before = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, str(checkout / "bench" / "bench_memories.py"), "--child", impl,
                           "--spec", str(spec_path)], capture_output=True, text=True, cwd=str(checkout), env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out.pop("nodes", None)
            out["load_avg_1m_before"] = round(load_before, 2)
            out["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    raise SystemExit(f"{impl} in {checkout} failed (exit {proc.returncode}): " + " | ".join(tail))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", help="a size folder kept by bench_memories.py --keep "
                                  "(warehouse.duckdb, raw_events.parquet)")
    p.add_argument("--checkout", action="append", required=True, help="NAME=PATH of a checkout whose dbt build to time")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from bench.bench_memories import _compare
    from persona_tasks import synth
    from persona_tasks.config import load_settings

    settings = load_settings()
    folder = Path(args.folder).resolve()
    pristine = folder / "warehouse.duckdb"
    checkouts = {}
    for item in args.checkout:
        name, _, path = item.partition("=")
        checkouts[name] = Path(path).resolve()
    work = folder / "interleaved"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    base = {
        "threads": settings.threads, "gap_minutes": settings.session_gap_minutes,
        "max_chars": settings.memory_text_max_chars, "attributes": list(synth.EVENTS_MAPPING_ATTRIBUTES),
        "raw_parquet": str(folder / "raw_events.parquet"), "floor_db": None, "events_parquet": None,
    }
    import duckdb

    with duckdb.connect(str(pristine), read_only=True) as con:
        n_events = con.execute("SELECT count(*) FROM raw.events").fetchall()[0][0]
    rounds = []
    results: dict[str, Path] = {}
    for r in range(args.rounds):
        row = {}
        for name, checkout in checkouts.items():
            wh = work / f"{name}.duckdb"
            shutil.copyfile(pristine, wh)
            res = work / f"result_{name}.parquet"
            spec = dict(base, warehouse=str(wh), dbt_target=str(work / f"target_{name}"),
                        result_path=str(res) if r == 0 else None)
            row[name] = _child(checkout, "dbt_build", spec, work / "spec.json")
            if r == 0:
                results[f"dbt_build_{name}"] = res
            print(f"round {r + 1} dbt build {name}: {row[name]['seconds']:.2f} s "
                  f"(load {row[name]['load_avg_1m_before']})", flush=True)
        res = work / "result_polars.parquet"
        spec = dict(base, warehouse=None, dbt_target=None, result_path=str(res) if r == 0 else None)
        row["polars_lazy"] = _child(ROOT, "polars_lazy", spec, work / "spec.json")
        if r == 0:
            results["polars_lazy"] = res
        print(f"round {r + 1} polars lazy: {row['polars_lazy']['seconds']:.2f} s", flush=True)
        for name in checkouts:
            row[f"dbt_{name}_vs_polars"] = row[name]["seconds"] / row["polars_lazy"]["seconds"]
        rounds.append(row)
    check = _compare({k: results[k] for k in ["polars_lazy", *[k for k in results if k != "polars_lazy"]]})
    best = {k: min(rd[k]["seconds"] for rd in rounds) for k in [*checkouts, "polars_lazy"]}
    doc = {
        "bench": "memories_interleaved",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_events": n_events, "threads": settings.threads, "rounds": rounds,
        "checkouts": {k: str(v) for k, v in checkouts.items()},
        "best_seconds": best,
        "best_vs_polars": {k: best[k] / best["polars_lazy"] for k in checkouts},
        "check": check,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2, default=str))
    print(json.dumps({"best_seconds": best, "best_vs_polars": doc["best_vs_polars"], "check_ok": check.get("ok"),
                      "same_columns": check.get("same_columns")}, indent=1))
    return 0 if check.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
