"""Planted-persona recovery (ARI) of the default clustering on the two memory texts, over merge thresholds.

Issue 11: the embedded text changed from ``memory_text`` (with ``searched:`` / ``clicked:`` parts) to
``embedding_text`` (what the user meant). Cosines between plain texts are lower, so the clustering's same-intent
merge threshold (``[clustering] merge_min_similarity``) may want another value. This measures mean per-user ARI
on ``persona_tasks.synth.generate_memories`` (the evaluation's planted check: 100 users, 10-40 memories, seed 0)
for both texts and several thresholds; the AOL side of the choice is the evaluation (docs/results.md).

Usage: python bench/tune_clustering_text.py [--users 100]  -> bench/results/clustering_text_merge.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from persona_tasks.config import load_settings  # noqa: E402
from persona_tasks.embed import embedder_from_settings  # noqa: E402
from persona_tasks.evaluate import encode_distinct, planted_scores  # noqa: E402
from persona_tasks.progress import set_threads  # noqa: E402
from persona_tasks.synth import generate_memories  # noqa: E402

THRESHOLDS = (None, 0.15, 0.2, 0.25, 0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "clustering_text_merge.json")
    args = ap.parse_args()
    settings = load_settings()
    set_threads(settings.threads)
    embedder = embedder_from_settings(settings)
    mem = generate_memories(args.users, (10, 40), seed=args.seed).sort("user_id", "started_at", "memory_id")
    t0 = time.perf_counter()
    out = {"users": args.users, "seed": args.seed, "model_version": embedder.model_version,
           "default_merge_min_similarity": settings.clustering.merge_min_similarity, "rows": []}
    for text in ("memory_text", "embedding_text"):
        vec = encode_distinct(embedder, mem[text].to_list())
        for merge in THRESHOLDS:
            cl = settings.clustering.model_copy(update={"merge_min_similarity": merge})
            r = planted_scores(mem, vec, cl)
            out["rows"].append({"text": text, "merge_min_similarity": merge, **r})
            print(f"{text:15s} merge {merge!s:5s}: ARI {r['ari']:.3f} NMI {r['nmi']:.3f} "
                  f"clusters/user {r['clusters_per_user']:.2f}", flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
