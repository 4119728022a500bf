"""Regenerate the figures of docs/performance.md from the benchmark results in bench/results/.

docs/performance.md is prose written by people around *generated blocks*: every table of measured figures sits
between ``<!-- bench:KIND:FILE:start -->`` and ``<!-- bench:KIND:FILE:end -->`` and is rendered here from
``bench/results/FILE.json`` by the renderer of KIND, so a figure cannot drift from its raw result and a benchmark
re-run updates the document by running this script (tests/test_performance_doc.py checks that the committed
document equals the rendering).

Kinds: ``clustering`` (bench/bench_clustering.py), ``clustering_text`` (bench/tune_clustering_text.py),
``labelling`` (bench/bench_labelling.py), ``labelling_arms`` (bench/bench_labelling_arms.py), ``embedding_gpu`` (bench/gpu_embedding_rate.py), ``daily_airflow`` /
``daily_steps`` (bench/bench_daily.py), ``memories`` (bench/bench_memories.py). To add a section: write its prose
with an empty block ``<!-- bench:KIND:FILE:start -->`` / ``<!-- bench:KIND:FILE:end -->`` and run this script
(a new KIND is a function below, registered in RENDERERS).

Usage: python bench/render_performance.py [--check]   (--check: exit 1 when the document is out of date)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
RESULTS = ROOT / "bench" / "results"
BLOCK = re.compile(r"(<!-- bench:(\w+):([\w.-]+):start -->\n)(.*?)(<!-- bench:\2:\3:end -->)", re.S)


def _f(v, nd=2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def render_clustering(d: dict) -> str:
    names = {"naive_umap_hdbscan": "naive UMAP + HDBSCAN loop", "umap_hdbscan": "umap_hdbscan (our rules)"}
    default = d.get("verdict", {}).get("default")
    out = [f"Raw: `bench/results/{d['_file']}` ({d['created_at'][:10]}, {d['machine']['cpus']} cores, threads = "
           f"{d['threads']}; pool of {d['pool']['distinct_texts']:,} distinct texts embedded at "
           f"{d['pool']['texts_per_s']} texts/s)."]
    for part, title in (("resampled", "resampled"), ("exact", "every text embedded (exact)")):
        r = d["results"].get(part)
        if not r:
            continue
        out += ["", f"{r['users']:,} users, {r['memories']:,} memories, {title}:", "",
                "| method | seconds | users/s | speed-up | ARI | NMI | cohesion | coverage | clusters/user | "
                "ARI k=1 | ARI k>1 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in r["methods"].items():
            label = names.get(name, name) + (" (default)" if name == default else "")
            out.append(f"| {label} | {m['seconds']:.2f} | {m['users_per_s']:.0f} | {m['speedup_vs_naive']:.1f}x | "
                       f"{m['ari']:.3f} | {m['nmi']:.3f} | {m['cohesion']:.3f} | {m['coverage']:.3f} | "
                       f"{m['clusters_per_user']:.2f} | {m['ari_single_persona_users']:.3f} | "
                       f"{m['ari_multi_persona_users']:.3f} |")
    v = d.get("verdict")
    if v:
        out += ["", f"Verdict: default `{v['default']}` {v['speedup']}x faster than the naive loop, ARI "
                    f"{v['ari_default']:.3f} vs {v['ari_naive']:.3f}: the claim (>= 10x, ARI no lower) "
                    f"{'holds' if v['holds'] else 'does not hold'}."]
    return "\n".join(out)


def render_clustering_text(d: dict) -> str:
    out = [f"Raw: `bench/results/{d['_file']}` ({d['users']} synthetic users, seed {d['seed']}, "
           f"{d['model_version']}; the default merge threshold is {d['default_merge_min_similarity']}).", "",
           "| text embedded | merge_min_similarity | ARI | NMI | clusters/user (planted) |", "|---|---:|---:|---:|---:|"]
    for r in d["rows"]:
        out.append(f"| {r['text']} | {r['merge_min_similarity'] if r['merge_min_similarity'] is not None else 'off'} | "
                   f"{r['ari']:.3f} | {r['nmi']:.3f} | {r['clusters_per_user']:.2f} ({r['planted_per_user']:.2f}) |")
    return "\n".join(out)


def render_labelling(d: dict) -> str:
    dev = d.get("cuda") or f"CPU ({d.get('cpu_threads')} threads)"
    out = [f"Raw: `bench/results/{d['_file']}` ({dev}, torch {d['torch']}, {d['clusters']} clusters).", "",
           "| device | dtype | batch | clusters | prompts/s | generated tokens/s | fallback rate | wall s |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in d["runs"]:
        fb = r.get("fallback_rate")
        if fb is None and r.get("personas"):
            fb = r.get("fallbacks", 0) / r["personas"]
        out.append(f"| {r.get('device', 'cpu')} | {r.get('dtype', 'fp32')} | {r.get('batch_size', r.get('batch', '?'))} | "
                   f"{r['clusters']} | {_f(r.get('prompts_per_s'), 3)} | {_f(r.get('tokens_per_s'), 1)} | {_f(fb, 3)} | "
                   f"{_f(r.get('wall_s'), 1)} |")
    e = d.get("extractive")
    if e:
        out += ["", f"Extractive labeller on the same clusters: {e['clusters_per_s']:.1f} clusters/s "
                    f"({e['wall_s']:.3f} s)."]
    return "\n".join(out)


def render_labelling_arms(d: dict) -> str:
    """bench/bench_labelling_arms.py: one row per dataset and decoding arm."""
    out = [f"Raw: `bench/results/{d['_file']}` (model {d['model_version']}, embedder {d['embedding']}, "
           f"{d['threads']} threads, batch {d['batch_size']}, up to {d['max_attempts']} attempts, "
           f"{d['max_new_tokens']} new tokens).", "",
           "| dataset | arm | clusters | fallback rate | objective | truthfulness | alignment | cohesion | "
           "s per persona | problems (all attempts) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for src, ds in d["datasets"].items():
        for arm, r in ds["arms"].items():
            q = r["quality"]
            probs = ", ".join(f"{k} {v}" for k, v in sorted(r.get("problems", {}).items(), key=lambda kv: -kv[1]))
            out.append(f"| {src} | {arm} | {r['clusters']} | {r['fallback_rate']:.3f} | {_f(q.get('objective'), 3)} | "
                       f"{_f(q.get('truthfulness'), 3)} | {_f(q.get('alignment'), 3)} | {_f(q.get('cohesion'), 3)} | "
                       f"{r['seconds_per_persona']:.2f} | {probs or '-'} |")
    return "\n".join(out)


def render_embedding_gpu(d: dict) -> str:
    out = [f"Raw: `bench/results/{d['_file']}` ({d['gpu']}, torch {d['torch']}, CPU side {d['cpu_threads']} "
           "threads).", "", "| device | dtype | batch | texts | seconds | memories/s |", "|---|---|---:|---:|---:|---:|"]
    for r in d["rows"]:
        out.append(f"| {r['device']} | {r['dtype']} | {r['batch']} | {r['texts']:,} | {r['seconds']:.2f} | "
                   f"{r['memories_per_s']:,.1f} |")
    out += ["", f"Best GPU rate / best CPU rate on that machine: {d['best_vs_cpu']}x."]
    return "\n".join(out)


def _daily_rows(day: dict, durations: dict) -> list[str]:
    rows = ["| task | seconds |", "|---|---:|"]
    for task, s in durations.items():
        sec = s["seconds"] if isinstance(s, dict) else s
        rows.append(f"| {task} | {sec:.1f} |")
    return rows


def render_daily_airflow(d: dict) -> str:
    out = [f"Raw: `bench/results/{d['_file']}` ({d['when']}, {d['machine']}, embedding backend {d['backend']})."]
    for run in d["airflow"]:
        out += ["", f"{run['events']:,} events, {run['users']:,} users, day {run['day']}: `airflow dags test "
                    f"persona_daily` {run['dags_test_s']:.1f} s wall, peak RSS {run['peak_rss_mb']:,} MB. Per task "
                    "(from the metadata DB):", "", *_daily_rows(run, run["tasks"])]
    return "\n".join(out)


def render_daily_steps(d: dict) -> str:
    out = [f"Raw: `bench/results/{d['_file']}` ({d['when']}, {d['machine']}, embedding backend {d['backend']})."]
    for day in d["days"]:
        total = sum(s["seconds"] for s in day["steps"].values())
        peak = max(s.get("peak_rss_mb", 0) for s in day["steps"].values())
        out += ["", f"{day['events']:,} events, {day['users']:,} users, {day['memories']:,} memories, day "
                    f"{day['day']}: steps in their own processes {total:.1f} s, largest step RSS {peak:,} MB.", "",
                "| step | seconds | peak RSS MB |", "|---|---:|---:|"]
        for name, s in day["steps"].items():
            out.append(f"| {name} | {s['seconds']:.1f} | {s.get('peak_rss_mb', 0):,} |")
    return "\n".join(out)


def _bench_module(name: str):
    """A bench/ script as a module (its ``markdown`` renders its own tables)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def render_memories(d: dict) -> str:
    """bench/bench_memories.py's own tables (its ``markdown``) of the saved results."""
    meta = {k: v for k, v in d.items() if k != "sizes"}
    return f"Raw: `bench/results/{d['_file']}`.\n\n" + _bench_module("bench_memories").markdown(d["sizes"], meta)


RENDERERS = {
    "clustering": render_clustering, "clustering_text": render_clustering_text, "labelling": render_labelling,
    "labelling_arms": render_labelling_arms,
    "embedding_gpu": render_embedding_gpu, "daily_airflow": render_daily_airflow, "daily_steps": render_daily_steps,
    "memories": render_memories,
}


def render(text: str, results: Path = RESULTS) -> str:
    """``text`` with every generated block re-rendered from its results file (a missing file: "not measured")."""
    def block(m: re.Match) -> str:
        kind, name = m.group(2), m.group(3)
        path = results / f"{name}.json"
        if kind not in RENDERERS:
            raise SystemExit(f"docs/performance.md: unknown block kind {kind!r} (known: {sorted(RENDERERS)})")
        if not path.exists():
            body = f"Not measured: bench/results/{name}.json is absent."
        else:
            data = json.loads(path.read_text())
            data["_file"] = path.name
            body = RENDERERS[kind](data)
        return m.group(1) + body.rstrip() + "\n" + m.group(5)

    return BLOCK.sub(block, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/performance.md is out of date")
    args = ap.parse_args()
    old = DOC.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("docs/performance.md is out of date: run python bench/render_performance.py")
            sys.exit(1)
        print("docs/performance.md is up to date")
        return
    DOC.write_text(new)
    print(f"wrote {DOC} ({len(BLOCK.findall(new))} generated blocks)")


if __name__ == "__main__":
    main()
