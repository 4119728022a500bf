#!/usr/bin/env python
"""Benchmark: embedding throughput of intent memories (all-MiniLM-L6-v2, CPU) and the quality of faster options.

Memories: ``marts.intent_memories`` of a warehouse given with ``--warehouse``, or (default) of a fresh warehouse
built in a temporary folder from the bundled AOL sample (``data/aol/aol_sample.tsv.gz``: real ingest + dbt build).
The bench takes the first ``--n`` memories by ``(started_at, memory_id)`` (a contiguous slice of time, like a daily
run) and times, in the same process on the same texts (threads pinned to ``settings.threads``):

  baseline            every memory encoded (fp32, the model's own max_seq_length: 256): the cost per memory
                      without deduplication
  dedup               each distinct text encoded once, vectors fanned out to its memories (what embed.py does)
  dedup+seq<C>        the same with ``[embedding] max_seq_length = C`` (default C = 128)
  dedup+int8          the same with ``[embedding] quantize = true`` (int8 dynamic quantisation of nn.Linear)
  dedup+int8+seq<C>   both
  embed_memories      the real pipeline (``persona_tasks.embed.embed_memories``, default settings) into a temporary
                      warehouse: dedup plus the DuckDB reads and writes

memories/s is sample memories / encoding seconds (model load not counted: it is once per process). Quality: cosine
of each memory's vector to its baseline vector (mean, min, share >= 0.99), and for the capped variants the share
of texts that the cap actually truncates. Also reported, over all memories of the warehouse: the duplicate share
(memories whose text another memory also has: what dedup saves over a whole backfill) and the share whose text was
already seen on an earlier day (what a daily run copies from ``personas.memory_embeddings`` instead of encoding),
and the word-piece length distribution.

Usage::

    .venv/bin/python bench/bench_embedding.py                       # n=2000, AOL sample
    .venv/bin/python bench/bench_embedding.py --n 500 --cap 128 --warehouse warehouse/warehouse.duckdb

Writes ``<out>/bench_embedding.json`` and ``<out>/bench_embedding.md`` (default out: bench/out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from the checkout
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from persona_tasks.config import PROJECT_DIR, load_settings  # noqa: E402
from persona_tasks.progress import set_threads  # noqa: E402


def build_aol_warehouse(folder: Path, threads: int):
    from persona_tasks.dbt_runner import build
    from persona_tasks.ingest import ingest_files

    settings = load_settings(warehouse=folder / "wh.duckdb", threads=threads)
    ingest_files(settings, "aol", [PROJECT_DIR / "data" / "aol" / "aol_sample.tsv.gz"])
    build(settings)
    return settings


def read_memories(settings) -> pl.DataFrame:
    from persona_tasks.warehouse import connect_read_only, query_pl

    with connect_read_only(settings) as con:
        return query_pl(con, "SELECT memory_id, started_at, memory_text FROM marts.intent_memories "
                             "ORDER BY started_at, memory_id")


def corpus_stats(mem: pl.DataFrame, tokenizer, caps: list[int]) -> dict[str, Any]:
    texts = mem["memory_text"].fill_null("")
    n = mem.height
    n_distinct = texts.n_unique()
    # a memory whose text an earlier day already had: a daily run copies its vector instead of encoding it
    day = mem["started_at"].dt.date()
    first_day = pl.DataFrame({"t": texts, "d": day}).group_by("t").agg(pl.col("d").min().alias("d0"))
    seen_before = pl.DataFrame({"t": texts, "d": day}).join(first_day, on="t", how="left")
    seen_before = seen_before["d"] > seen_before["d0"]
    lens = np.array([len(ids) for ids in tokenizer(texts.to_list(), add_special_tokens=True)["input_ids"]])
    return {
        "memories": n,
        "distinct_texts": n_distinct,
        "duplicate_share": round(1 - n_distinct / n, 4) if n else 0.0,
        "text_seen_on_earlier_day_share": round(float(seen_before.mean()), 4) if n else 0.0,
        "days": int(day.n_unique()),
        "chars": {"p50": int(texts.str.len_chars().median()), "max": int(texts.str.len_chars().max())},
        "word_pieces": {f"p{p}": int(np.percentile(lens, p)) for p in (50, 90, 95, 99)} | {"max": int(lens.max())},
        "truncated_share": {str(c): round(float((lens > c).mean()), 4) for c in caps},
    }


def encode_timed(embedder, texts: list[str], chunk: int) -> tuple[np.ndarray, float]:
    embedder.encode(texts[:8])  # warm-up (first call allocates)
    t0 = time.perf_counter()
    parts = [embedder.encode(texts[i:i + chunk]) for i in range(0, len(texts), chunk)]
    return np.concatenate(parts), time.perf_counter() - t0


def quality(vecs: np.ndarray, base: np.ndarray) -> dict[str, float]:
    cos = np.sum(vecs * base, axis=1) / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(base, axis=1))
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "share_cos_ge_0_99": float((cos >= 0.99).mean())}


def run(args) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench_embedding_"))
    try:
        return _run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args, tmp: Path) -> dict[str, Any]:
    from persona_tasks import embed as E

    threads = args.threads or load_settings().threads
    set_threads(threads)
    if args.warehouse:
        settings = load_settings(warehouse=Path(args.warehouse), threads=threads)
        source = str(args.warehouse)
    else:
        t0 = time.perf_counter()
        settings = build_aol_warehouse(tmp, threads)
        source = f"data/aol/aol_sample.tsv.gz (ingest + dbt build: {time.perf_counter() - t0:.1f}s)"
    mem = read_memories(settings)
    sample = mem.head(args.n)
    texts = sample["memory_text"].fill_null("").to_list()
    uniq = sample["memory_text"].fill_null("").unique(maintain_order=True)
    inverse = sample["memory_text"].fill_null("").to_frame("t").join(
        uniq.to_frame("t").with_row_index("i"), on="t", how="left", maintain_order="left")["i"].to_numpy()

    def embedder(**kw):
        return E.SentenceTransformerEmbedder(batch_size=args.batch_size, threads=threads, **kw)

    fp32 = embedder()
    native = fp32.model.max_seq_length
    stats = corpus_stats(mem, fp32.model.tokenizer, sorted({args.cap, native}))
    sample_lens = np.array([len(x) for x in fp32.model.tokenizer(texts, add_special_tokens=True)["input_ids"]])
    print(f"memories: {stats['memories']} in the warehouse, sample {len(texts)} ({len(uniq)} distinct texts); "
          f"threads={threads}", flush=True)

    from persona_tasks.warehouse import connect

    # (name, embedder, texts sent, index of each sample memory's vector in the output, word-piece cap)
    variants: list[tuple[str, Any, list[str], np.ndarray, int | None]] = [
        ("baseline", fp32, texts, np.arange(len(texts)), None), ("dedup", fp32, uniq.to_list(), inverse, None)]
    for name, kw in [(f"dedup+seq{args.cap}", {"max_seq_length": args.cap}), ("dedup+int8", {"quantize": True}),
                     (f"dedup+int8+seq{args.cap}", {"max_seq_length": args.cap, "quantize": True})]:
        if name not in args.skip.split(","):
            emb = embedder(**kw)
            emb.model  # load (and quantise) outside the timing
            variants.append((name, emb, uniq.to_list(), inverse, kw.get("max_seq_length")))
    times: dict[str, list[float]] = {v[0]: [] for v in variants} | {"embed_memories": []}
    vectors: dict[str, np.ndarray] = {}
    e2e_report = None
    # rounds interleave the variants, so load from other processes hits them alike; the fastest round counts
    for rnd in range(args.repeat):
        for name, emb, sent, idx, _cap in variants:
            out, secs = encode_timed(emb, sent, args.chunk)
            vectors[name] = out[idx]
            times[name].append(secs)
            print(f"  round {rnd + 1} {name}: {len(texts) / secs:.1f} memories/s", flush=True)
        # the real pipeline, default settings, into a fresh warehouse
        e2e = load_settings(warehouse=tmp / f"e2e{rnd}.duckdb", threads=threads)
        with connect(e2e) as con:
            e2e_report = E.embed_memories(e2e, con, sample.select("memory_id", "memory_text"), fp32)
            stored = E.load_embeddings(con, fp32.model_version)
        order = sample.select("memory_id").with_row_index("i").join(stored, on="memory_id", how="left")
        vectors["embed_memories"] = E.embeddings_to_numpy(order.sort("i")["embedding"])
        times["embed_memories"].append(e2e_report.seconds)
        print(f"  round {rnd + 1} embed_memories: {len(texts) / e2e_report.seconds:.1f} memories/s", flush=True)
    base = vectors["baseline"]
    rows: list[dict[str, Any]] = []
    for name, emb, sent, _idx, cap in variants + [("embed_memories", fp32, [None] * e2e_report.n_texts_encoded,
                                                    None, None)]:
        row = {"variant": name, "model_version": emb.model_version, "texts_encoded": len(sent),
               "seconds": min(times[name]), "seconds_all": [round(t, 2) for t in times[name]],
               **quality(vectors[name], base)}
        if cap is not None:
            cut = sample_lens > cap
            row["truncated_share"] = float(cut.mean())
            row["cos_min_truncated"] = quality(vectors[name][cut], base[cut])["cos_min"] if cut.any() else 1.0
        rows.append(row)
    for r in rows:
        r["memories_per_s"] = round(len(texts) / r["seconds"], 2)
        r["speedup"] = round(rows[0]["seconds"] / r["seconds"], 2)
        r["seconds"] = round(r["seconds"], 2)
    return {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": threads,
                 "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version()},
        "source": source, "sample_memories": len(texts), "sample_distinct_texts": len(uniq),
        "sample_duplicate_share": round(1 - len(uniq) / max(len(texts), 1), 4),
        "repeat": args.repeat, "batch_size": args.batch_size, "chunk": args.chunk,
        "model_max_seq_length": native, "cap": args.cap,
        "warehouse_stats": stats, "rows": rows,
    }


def to_markdown(res: dict[str, Any]) -> str:
    st = res["warehouse_stats"]
    lines = [
        f"# Embedding throughput ({res['when']})", "",
        f"Source: {res['source']}; host: {res['host']['cpus']} CPUs, {res['host']['threads']} threads, "
        f"load average {res['host']['load_avg_1m']} at the end (shared machine: compare ratios within this run). "
        f"{res['repeat']} interleaved rounds, fastest round per variant.",
        f"Sample: first {res['sample_memories']} memories by started_at, {res['sample_distinct_texts']} distinct texts "
        f"(duplicate share {res['sample_duplicate_share']:.1%}); batch size {res['batch_size']}.",
        f"Whole warehouse: {st['memories']} memories, {st['distinct_texts']} distinct texts (duplicate share "
        f"{st['duplicate_share']:.1%}; text already seen on an earlier day of the {st['days']}: "
        f"{st['text_seen_on_earlier_day_share']:.1%}); "
        f"word pieces p50/p90/p99/max = {st['word_pieces']['p50']}/{st['word_pieces']['p90']}/"
        f"{st['word_pieces']['p99']}/{st['word_pieces']['max']} (model max_seq_length {res['model_max_seq_length']}); "
        f"share truncated at " + ", ".join(f"{c}: {s:.1%}" for c, s in st["truncated_share"].items()) + ".", "",
        "| variant | texts encoded | seconds | memories/s | speed-up | cos mean | cos min | share cos>=0.99 | truncated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        trunc = f"{r['truncated_share']:.1%} (min cos {r['cos_min_truncated']:.4f})" if "truncated_share" in r else ""
        lines.append(f"| {r['variant']} | {r['texts_encoded']} | {r['seconds']:.1f} | {r['memories_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['cos_mean']:.5f} | {r['cos_min']:.5f} | {r['share_cos_ge_0_99']:.1%} | "
                     f"{trunc} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="sample memories (first by started_at)")
    ap.add_argument("--warehouse",
                    help="read marts.intent_memories from this warehouse (default: build the AOL sample)")
    ap.add_argument("--cap", type=int, default=128, help="max_seq_length of the capped variants")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=4096, help="texts per encode call (embed.py's write_chunk)")
    ap.add_argument("--threads", type=int, default=0, help="default: settings.threads")
    ap.add_argument("--skip", default="", help="comma-separated variant names to skip")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; each variant's fastest round counts")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args(argv)
    res = run(args)
    md = to_markdown(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_embedding.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "bench_embedding.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
