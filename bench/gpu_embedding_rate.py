#!/usr/bin/env python
"""Embedding throughput of the memory embedder (all-MiniLM-L6-v2) on a GPU vs the same machine's CPU, in one
run: memories/s per device, dtype and batch size, and the cosine of GPU vectors to CPU fp32 vectors.

Self-contained (sentence-transformers and torch only) so it runs on the lent GPU machine, where the project's
warehouse dependencies are not installed. Texts: memory texts of the synthetic clusters written by
``bench/bench_labelling.py --write-inputs`` (realistic mart-style memory texts, no personal data), repeated to
``--n``. The model directory may hold fp16 weights (so it fits one transfer); every run casts to its dtype.

    python bench/gpu_embedding_rate.py --model DIR --inputs label_inputs.json --n 50000 --out OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--inputs", type=Path, required=True)
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--cpu-n", type=int, default=2000)
    ap.add_argument("--cpu-threads", type=int, default=8)
    ap.add_argument("--batch-sizes", default="64,256,1024")
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    texts = [t for c in json.loads(args.inputs.read_text()) for t in c["memory_texts"]]
    texts = (texts * (args.n // len(texts) + 1))[: args.n]
    torch.set_num_threads(args.cpu_threads)
    rows: list[dict] = []

    def run(device: str, dtype: torch.dtype, batch: int, data: list[str]) -> np.ndarray:
        model = SentenceTransformer(str(args.model), device=device, local_files_only=True).to(dtype)
        model.encode(data[:batch], batch_size=batch)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        vecs = model.encode(data, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
        if device == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - t0
        row = dict(device=device, dtype=str(dtype).removeprefix("torch."), batch=batch, texts=len(data),
                   seconds=round(s, 2), memories_per_s=round(len(data) / s, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
        return vecs.astype(np.float32)

    base = run("cpu", torch.float32, 64, texts[: args.cpu_n])
    if torch.cuda.is_available():
        for dtype in (torch.float16, torch.float32):
            for b in [int(x) for x in args.batch_sizes.split(",")]:
                vecs = run("cuda", dtype, b, texts)
            cos = (vecs[: args.cpu_n] * base).sum(1)
            rows[-1]["cosine_to_cpu_fp32_mean_min"] = [round(float(cos.mean()), 5), round(float(cos.min()), 5)]
            print("cosine to CPU fp32:", rows[-1]["cosine_to_cpu_fp32_mean_min"], flush=True)
    cpu = rows[0]["memories_per_s"]
    best = max(rows, key=lambda r: r["memories_per_s"])
    result = dict(gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  torch=torch.__version__, cpu_threads=args.cpu_threads, rows=rows,
                  best_vs_cpu=round(best["memories_per_s"] / cpu, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_embedding_rate.json").write_text(json.dumps(result, indent=1))
    print(f"best {best['memories_per_s']} memories/s ({best['device']} {best['dtype']} batch {best['batch']}): "
          f"{result['best_vs_cpu']}x the CPU ({args.cpu_threads} threads) in the same run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
