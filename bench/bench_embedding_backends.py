#!/usr/bin/env python
"""Benchmark: the embedding step's backends on CPU (issue 15 section 5): MiniLM in torch against the same model
exported to ONNX and run by ONNX Runtime, each in fp32 and int8, and by OpenVINO.

Memories: the first ``--n`` (default 2000) memories by ``(started_at, memory_id)`` of a fresh warehouse built in a
temporary folder from the bundled AOL sample (``data/aol/aol_sample.tsv.gz``: real ingest + dbt build, helpers of
bench/bench_embedding.py), or of ``--warehouse``. Their ``embedding_text`` (what persona_tasks.embed embeds) is
deduplicated as embed.py does (each distinct text encoded once) and encoded, in the same process, threads pinned to
``--threads`` (default 2), by:

  transformer        SentenceTransformerEmbedder, fp32 (the baseline: the default ``[embedding] backend``)
  transformer+int8   the same with ``quantize = true`` (torch int8 dynamic quantisation of nn.Linear)
  onnx               OnnxEmbedder (``backend = "onnx"``): the model exported once to ONNX, ONNX Runtime, fp32
  onnx+int8          the same with ``quantize = true`` (ONNX Runtime int8 dynamic quantisation of MatMul weights)
  openvino           OpenVinoEmbedder (``backend = "openvino"``): the fp32 export compiled by OpenVINO, in its default
                     precision for the CPU (bf16 where the CPU has bf16 instructions; the model_version says which)

Rounds interleave the variants (load from other processes hits them alike); each variant's fastest round counts.
memories/s = sample memories / encoding seconds (model load and the one-off export not counted; the export time
is reported apart); also each variant's CPU seconds per round (``time.process_time``, less sensitive than wall time
to other processes on a shared machine; CPU x base = baseline CPU seconds / variant CPU seconds). Quality: cosine
of each memory's vector to the baseline's (mean, min, share >= 0.99).

Usage::

    .venv/bin/python bench/bench_embedding_backends.py                    # n=2000, 2 threads, AOL sample
    .venv/bin/python bench/bench_embedding_backends.py --n 300 --repeat 1 --out /tmp/x.json   # quick look

Writes ``--out`` (default bench/results/embedding_backends_cpu.json).
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
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:  # run as a script from the checkout
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402

from bench_embedding import build_aol_warehouse, encode_timed, quality  # noqa: E402
from persona_tasks.config import load_settings  # noqa: E402
from persona_tasks.progress import set_threads  # noqa: E402

VARIANTS = ("transformer", "transformer+int8", "onnx", "onnx+int8", "openvino")


def read_texts(settings, n: int) -> list[str]:
    from persona_tasks.warehouse import connect_read_only, query_pl

    with connect_read_only(settings) as con:
        df = query_pl(con, "SELECT memory_id, embedding_text FROM marts.intent_memories "
                           f"ORDER BY started_at, memory_id LIMIT {int(n)}")
    return df["embedding_text"].fill_null("").to_list()


def make_embedder(name: str, models_dir: Path, threads: int, batch_size: int):
    from persona_tasks import embed as E

    quantize = name.endswith("+int8")
    if name == "openvino":
        return E.OpenVinoEmbedder(None, models_dir, batch_size=batch_size, threads=threads)
    if name.startswith("onnx"):
        return E.OnnxEmbedder(None, models_dir, batch_size=batch_size, threads=threads, quantize=quantize)
    return E.SentenceTransformerEmbedder(batch_size=batch_size, threads=threads, quantize=quantize)


def run(args) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench_embedding_backends_"))
    try:
        return _run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args, tmp: Path) -> dict[str, Any]:
    threads = args.threads
    set_threads(threads)
    if args.warehouse:
        settings = load_settings(warehouse=Path(args.warehouse), threads=threads)
        source = str(args.warehouse)
    else:
        t0 = time.perf_counter()
        settings = build_aol_warehouse(tmp, threads)
        source = f"data/aol/aol_sample.tsv.gz (ingest + dbt build: {time.perf_counter() - t0:.1f}s)"
    texts = read_texts(settings, args.n)
    uniq = list(dict.fromkeys(texts))
    inverse = np.array([{t: i for i, t in enumerate(uniq)}[t] for t in texts]) if texts else np.zeros(0, int)
    # a fresh models_dir unless given: the export is timed here, once
    models_dir = Path(args.models_dir) if args.models_dir else tmp / "models"
    names = [v for v in VARIANTS if v not in args.skip.split(",")]
    print(f"sample: {len(texts)} memories, {len(uniq)} distinct texts; threads={threads}; variants {names}",
          flush=True)
    embedders: dict[str, Any] = {}
    load_s: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        emb = make_embedder(name, models_dir, threads, args.batch_size)
        emb.encode(["warm up"])  # load (export, quantise) outside the timing
        load_s[name] = round(time.perf_counter() - t0, 2)
        embedders[name] = emb
        print(f"  {name}: {emb.model_version} loaded in {load_s[name]:.1f}s", flush=True)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    load: list[float] = []
    vectors: dict[str, np.ndarray] = {}
    for rnd in range(args.repeat):
        for name in names:
            set_threads(threads)
            c0 = time.process_time()
            out, secs = encode_timed(embedders[name], uniq, args.chunk)
            cpu[name].append(time.process_time() - c0)  # this process's CPU seconds (warm-up call included)
            vectors[name] = out[inverse]
            times[name].append(secs)
            load.append(os.getloadavg()[0])
            print(f"  round {rnd + 1} {name}: {len(texts) / secs:.1f} memories/s, {cpu[name][-1]:.1f} CPU s",
                  flush=True)
    base_name = names[0]
    base = vectors[base_name]
    rows = []
    for name in names:
        secs = min(times[name])
        rows.append({
            "variant": name, "model_version": embedders[name].model_version,
            "seconds": round(secs, 2), "seconds_all": [round(t, 2) for t in times[name]],
            "memories_per_s": round(len(texts) / secs, 1), "texts_per_s": round(len(uniq) / secs, 1),
            "speedup": round(min(times[base_name]) / secs, 2),
            # less sensitive to the other processes on a shared machine than wall time: CPU seconds per round
            "cpu_seconds_min": round(min(cpu[name]), 2), "cpu_seconds_all": [round(t, 2) for t in cpu[name]],
            "cpu_speedup": round(min(cpu[base_name]) / min(cpu[name]), 2),
            "load_seconds": load_s[name],  # the first load of an onnx variant includes its export
            **{k: round(v, 6) for k, v in quality(vectors[name], base).items()},
        })
    versions = {}
    try:
        import onnxruntime
        import openvino
        import torch

        versions = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                    "openvino": openvino.__version__}
    except ImportError:  # pragma: no cover
        pass
    return {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": threads,
                 "load_avg_1m": round(os.getloadavg()[0], 2),
                 "load_avg_1m_range": [round(min(load), 2), round(max(load), 2)] if load else None, "python": platform.python_version(), **versions},
        "source": source, "text_column": "embedding_text", "sample_memories": len(texts),
        "sample_distinct_texts": len(uniq), "repeat": args.repeat, "batch_size": args.batch_size,
        "chunk": args.chunk, "baseline": base_name, "rows": rows,
    }


def to_text(res: dict[str, Any]) -> str:
    lines = [f"{res['sample_memories']} memories ({res['sample_distinct_texts']} distinct texts), "
             f"{res['host']['threads']} threads, load avg {res['host']['load_avg_1m']} at the end; "
             f"fastest of {res['repeat']} interleaved rounds",
             f"{'variant':<18}{'memories/s':>11}{'x base':>8}{'CPU x base':>11}{'cos mean':>10}{'cos min':>9}"
             f"{'>=0.99':>8}{'load s':>8}"]
    for r in res["rows"]:
        lines.append(f"{r['variant']:<18}{r['memories_per_s']:>11.1f}{r['speedup']:>7.2f}x{r['cpu_speedup']:>10.2f}x"
                     f"{r['cos_mean']:>10.5f}{r['cos_min']:>9.5f}{r['share_cos_ge_0_99']:>8.1%}"
                     f"{r['load_seconds']:>8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="sample memories (first by started_at)")
    ap.add_argument("--warehouse", help="read marts.intent_memories from this warehouse (default: build the AOL "
                                        "sample)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=4096, help="texts per encode call (embed.py's write_chunk)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; each variant's fastest round counts")
    ap.add_argument("--skip", default="", help="comma-separated variants to skip (the first left is the baseline)")
    ap.add_argument("--models-dir", help="where the ONNX exports go (default: a temporary folder, so the export "
                                         "is timed)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "embedding_backends_cpu.json"))
    args = ap.parse_args(argv)
    res = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(to_text(res))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
