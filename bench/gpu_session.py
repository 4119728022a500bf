#!/usr/bin/env python
"""One GPU session's work, on a machine with torch/transformers/peft but no warehouse (issues 12 and 13).

Everything it reads was prepared on the CPU machine and travels in ``--inputs``:
- ``throughput.json``: synthetic planted clusters (``bench/bench_labelling.py --write-inputs``);
- ``label/*.json``: cluster inputs exported by ``persona-etl evaluate --export-llm-inputs`` (the evaluation's LLM
  sample) and ``bench/bench_training.py --export-gpu`` (the training build's held-out clusters), as the labeller
  sees them (``persona_tasks.labelling.replay``);
- ``candidates/*.json``: training clusters (``bench/bench_training.py --export-gpu``);
- ``groups.json``: the preference groups built from those candidates (a second run).

Steps, each written to ``--out`` as soon as it is done (a run cut short still returns what it finished; a step
that would start too close to ``--budget-s`` is skipped):
1. the base model labels every ``label/*.json`` and ``label_base/*.json`` file (``labels_base_<name>.json``), and
   samples K candidates per cluster of every ``candidates/*.json`` file (``candidates_<name>.json``; the preference
   groups are validated, scored and ranked on the CPU machine: ``bench_training.py --build-from-gpu``);
2. per training arm: ``train_arm`` on the groups (CUDA, bf16), then the merged adapter labels every
   ``label/*.json`` file (``labels_<arm>_<name>.json``); the adapters are kept;
3. labelling throughput of the decoding arms (default ``skeleton`` and ``free``) per batch size.
The labels come back to the CPU machine, where ``ReplayLabeller`` lets the evaluation and the held-out scoring use
them (``persona-etl evaluate --llm-labels``, ``bench/bench_training.py --replay``).

Usage: python bench/gpu_session.py --inputs DIR --out DIR [--arms groupwise,pairwise,sft] [--budget-s 420]
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

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpu_session")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arms", default="groupwise,pairwise,sft")
    ap.add_argument("--decodings", default="skeleton,free")
    ap.add_argument("--batch-sizes", default="64,256,1024")
    ap.add_argument("--label-batch", type=int, default=256)
    ap.add_argument("--label-dtype", default="fp32")
    ap.add_argument("--throughput-clusters", type=int, default=0, help="0 = all")
    ap.add_argument("--steps", type=int, default=0, help="optimiser steps per arm (0 = [training] epochs decide)")
    ap.add_argument("--epochs", type=float, default=None)
    ap.add_argument("--learning-rate", type=float, default=None)
    ap.add_argument("--groups-per-batch", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip steps that would start after this")
    ap.add_argument("--skip", default="", help="comma list of steps to skip: base,candidates,train,throughput")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))

    import torch

    from persona_tasks.config import load_settings
    from persona_tasks.labelling.llm import LLMLabeller
    from persona_tasks.labelling.model import load_causal_lm
    from persona_tasks.labelling.replay import label_inputs_file, read_inputs

    summary: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
                     "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                     "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "cpu_count": os.cpu_count(), "steps": {}}
    try:
        import transformers

        summary["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass

    def save() -> None:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    base = load_settings()
    lab = base.labelling.model_copy(update={"batch_size": args.label_batch, "dtype": args.label_dtype})
    settings = base.model_copy(update={"labelling": lab})
    model, tok, version = load_causal_lm(settings, adapter=False)
    summary["model_version"] = version
    save()

    files = sorted((args.inputs / "label").glob("*.json"))
    base_only = sorted((args.inputs / "label_base").glob("*.json"))

    def label_all(m, tag: str) -> None:
        lab = LLMLabeller(settings, model=m, tokenizer=tok, model_version=version if tag == "base"
                          else f"{version}+gpu-{tag}")
        for f in files + (base_only if tag == "base" else []):
            if left() < 20:
                log.warning("budget: labels %s %s skipped", tag, f.stem)
                continue
            lab.stats = type(lab.stats)()
            st = label_inputs_file(f, args.out / f"labels_{tag}_{f.stem}.json", lab, meta={"arm": tag})
            summary["steps"].setdefault("labels", {})[f"{tag}:{f.stem}"] = st
            log.info("labels %s %s: %d clusters in %.1fs, fallback %.3f", tag, f.stem, st["clusters"], st["wall_s"],
                     st.get("fallback_rate", 0))
            save()

    # 1. the base model's labels
    if "base" not in skip:
        label_all(model, "base")

    # 1b. sampled candidates for preference groups (scored and ranked on the CPU machine: bench_training.py
    #     --build-from-gpu), as build_groups_step samples them: training temperature, K sequences per prompt
    cand_files = sorted((args.inputs / "candidates").glob("*.json"))
    if "candidates" not in skip and cand_files:
        from persona_tasks.labelling.replay import write_candidates
        from persona_tasks.train.pipeline import candidate_labeller

        k = settings.training.num_candidates
        gen = candidate_labeller(settings, model, tok, version)
        for f in cand_files:
            if left() < 30:
                log.warning("budget: candidates %s skipped", f.stem)
                continue
            gen.stats = type(gen.stats)()
            st = write_candidates(f, args.out / f"candidates_{f.stem}.json", gen, k, settings.training.seed)
            summary["steps"].setdefault("candidates", {})[f.stem] = st
            log.info("candidates %s: %d clusters, %d candidates (%d valid) in %.1fs", f.stem, st["clusters"],
                     st["candidates"], st["valid"], st["wall_s"])
            save()

    # 2. training arms, then their labels
    if "train" not in skip and (args.inputs / "groups.json").exists():
        from peft import PeftModel

        from persona_tasks.train.trainer import train_arm

        groups = json.loads((args.inputs / "groups.json").read_text())
        upd = {"max_steps": args.steps or None, "save_steps": 100_000}
        if args.epochs is not None:
            upd["epochs"] = args.epochs
        if args.learning_rate is not None:
            upd["learning_rate"] = args.learning_rate
        if args.groups_per_batch is not None:
            upd["groups_per_batch"] = args.groups_per_batch
        ts = settings.model_copy(update={"training": settings.training.model_copy(update=upd)})
        summary["training"] = {k: getattr(ts.training, k) for k in ("epochs", "max_steps", "learning_rate",
                                                                      "groups_per_batch", "beta", "lora_r")}
        summary["training"]["groups"] = len(groups)
        for arm in args.arms.split(","):
            if left() < 90:
                log.warning("budget: arm %s skipped", arm)
                continue
            res = train_arm(ts, arm, groups, Path("/tmp/gpu_train") / arm)
            d = res.as_dict()
            logs = [h for h in res.log_history if "loss" in h]
            d["first_log"], d["last_log"] = (logs[0], logs[-1]) if logs else (None, None)
            d["log_history"] = logs
            summary["steps"].setdefault("train", {})[arm] = d
            save()
            if res.adapter_dir is not None:
                import shutil

                shutil.make_archive(str(args.out / f"adapter_{arm}"), "gztar", res.adapter_dir)
                fresh, _, _ = load_causal_lm(settings, adapter=False)
                merged = PeftModel.from_pretrained(fresh, str(res.adapter_dir)).merge_and_unload().eval()
                label_all(merged, arm)
                del merged, fresh
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
    # 3. throughput per decoding arm and batch size
    if "throughput" not in skip and (args.inputs / "throughput.json").exists():
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_labelling import run_llm

        clusters = read_inputs(args.inputs / "throughput.json")
        if args.throughput_clusters:
            clusters = clusters[: args.throughput_clusters]
        rows = []
        for dec in args.decodings.split(","):
            for bs in [int(b) for b in args.batch_sizes.split(",")]:
                if left() < 60:
                    log.warning("budget: throughput %s batch %d skipped", dec, bs)
                    continue
                s = settings.model_copy(update={"labelling": settings.labelling.model_copy(update={"decoding": dec})})
                row = run_llm(s, clusters, model, tok, version, bs)
                row.update(decoding=dec, batch_size=bs, dtype=args.label_dtype)
                rows.append(row)
                log.info("throughput %s batch %d: %.1f clusters/s, %.1f prompts/s, fallback %.3f", dec, bs,
                         row["clusters_per_s"], row["prompts_per_s"], row["fallback_rate"])
                summary["steps"]["throughput"] = rows
                save()

    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    save()
    print(json.dumps({k: v for k, v in summary.items() if k != "steps"}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
