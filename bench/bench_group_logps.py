"""One groupwise DPO step's log-probabilities, two ways, in the same run: K full prompt+completion rows per group
(``sequence_logps``, what the trainer did before) against each prompt run once with its keys and values reused for
the K completions (``group_logps``, what ``GroupDPOTrainer`` does now). Each way: the policy's forward and backward
through a LoRA adapter and the reference's forward with the adapter disabled, as in a training step. Prints seconds
per group, tokens through the model, the ratio, and the largest difference of the summed log-probs.

Usage: python bench/bench_group_logps.py --groups <retrain dir>/groups [--n 8] [--threads 2] [--out JSON]
(``--groups``: a build of ``bench_training.py --build`` or ``persona-etl train``; docs/training.md.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=Path, required=True)
    ap.add_argument("--n", type=int, default=8, help="groups timed (one group per step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import use_adapter

    from persona_tasks.config import load_settings
    from persona_tasks.labelling.model import load_causal_lm
    from persona_tasks.progress import set_threads
    from persona_tasks.train.groups import read_build
    from persona_tasks.train.trainer import DataCollatorForGroups, group_logps, sequence_logps, tokenize_group

    s = load_settings(threads=args.threads)
    set_threads(args.threads)
    t = s.training
    model, tok, version = load_causal_lm(s, adapter=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = get_peft_model(model, LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha,
                                             target_modules=list(t.lora_target_modules), init_lora_weights=False))
    model.train()
    groups = read_build(args.groups).training_groups()[: args.n]
    collate = DataCollatorForGroups(tok.pad_token_id, t.max_length)
    batches = [collate([{**tokenize_group(tok, g["prompt"], g["completions"]), "ranks": g["ranks"]}])
               for g in groups]

    def full_rows(batch):
        rows, cms = [], []
        prompt = batch["prompt_ids"][0, : int(batch["prompt_length"][0])].tolist()
        for ids, att in zip(batch["completion_ids"], batch["completion_attention"]):
            comp = ids[: int(att.sum())].tolist()
            rows.append(prompt + comp)
            cms.append([0] * len(prompt) + [1] * len(comp))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        att, cm = torch.zeros_like(ids), torch.zeros_like(ids)
        for n, (r, m) in enumerate(zip(rows, cms)):
            ids[n, : len(r)], att[n, : len(r)], cm[n, : len(m)] = torch.tensor(r), 1, torch.tensor(m)
        return ids, att, cm

    def step(batch, way):
        model.zero_grad(set_to_none=True)
        if way == "full_rows":
            ids, att, cm = full_rows(batch)
            policy = sequence_logps(model, ids, att, cm)
            with torch.no_grad(), use_adapter(model, None):
                sequence_logps(model, ids, att, cm)
            tokens = 2 * int(att.sum())
        else:
            policy = group_logps(model, batch).flatten()[: batch["completion_ids"].shape[0]]
            with torch.no_grad(), use_adapter(model, None):
                group_logps(model, batch)
            tokens = 2 * (int(batch["prompt_length"][0]) + int(batch["completion_attention"].sum()))
        policy.sum().backward()
        return policy.detach(), tokens

    step(batches[0], "full_rows")  # warm-up (allocator, kernels)
    step(batches[0], "shared_prompt")
    res = {"model": version, "threads": args.threads, "groups": len(batches),
           "k": [int(b["completion_ids"].shape[0]) for b in batches],
           "prompt_tokens": [int(b["prompt_length"][0]) for b in batches],
           "completion_tokens_mean": round(sum(float(b["completion_attention"].sum(1).float().mean())
                                               for b in batches) / len(batches), 1)}
    logps = {}
    for way in ("full_rows", "shared_prompt"):
        t0 = time.perf_counter()
        tokens = 0
        out = []
        for b in batches:
            lp, n = step(b, way)
            out.append(lp)
            tokens += n
        sec = time.perf_counter() - t0
        logps[way] = torch.cat(out)
        res[way] = {"seconds": round(sec, 2), "seconds_per_group": round(sec / len(batches), 3), "tokens": tokens}
        print(f"{way:14s} {sec / len(batches):6.2f} s per group  {tokens:7d} tokens", flush=True)
    res["speedup"] = round(res["full_rows"]["seconds"] / res["shared_prompt"]["seconds"], 2)
    res["token_ratio"] = round(res["full_rows"]["tokens"] / res["shared_prompt"]["tokens"], 2)
    res["max_abs_logp_difference"] = float((logps["full_rows"] - logps["shared_prompt"]).abs().max())
    print(f"speedup {res['speedup']}x (tokens {res['token_ratio']}x), largest log-prob difference "
          f"{res['max_abs_logp_difference']:.2e}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
