"""Decoding arms of the LLM labeller on real clusters: fallback, problems, quality and cost (issue 12).

Clusters: the configured clustering of the *history* memories (persona_tasks.evaluate's split: evaluation futures
are never shown) of a fixed sample of users (first by md5 of user_id) of the bundled AOL sample and of MovieLens
(one memory per rated movie), every cluster of a sampled user until at least ``--aol-clusters`` /
``--movielens-clusters``; the labellers see the texts with k-anonymous masking, as in the pipeline.

Arms: ``extractive`` (the baseline), and the LLM labeller with ``[labelling] decoding`` = ``free`` (the three lines
written freely, up to ``max_attempts`` tries, then the extractive fallback), ``constrained`` (llguidance grammar:
label and description from the cluster's own words and the closed function-word list) and ``skeleton``
(constrained, with the extractive key terms in the prompt). Per arm: fallback rate, validation problems per type
(counted over every attempt), mean cohesion / alignment / truthfulness / objective of the personas
(persona_tasks.quality, the same scorer as the pipeline), seconds per persona.

Usage: python bench/bench_labelling_arms.py --warehouse W [--arms free,constrained,skeleton] [--threads 1]
    [--model gemma3-270m] [--batch-size 16] [--subset 30] [--clusters-cache warehouse/arms_clusters.pkl]
Writes bench/results/labelling_arms_<model>[_subsetN].json (needs a warehouse with both samples ingested and built:
``persona-etl ingest --format aol data/aol/aol_sample.tsv.gz``, ``ingest --format movielens data/movielens``,
``build``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from persona_tasks import evaluate as E  # noqa: E402
from persona_tasks.config import load_settings  # noqa: E402
from persona_tasks.embed import embedder_from_settings  # noqa: E402
from persona_tasks.labelling import ExtractiveLabeller  # noqa: E402
from persona_tasks.labelling.privacy import PublicTerms, mask_clusters  # noqa: E402
from persona_tasks.sampling import stable_sample  # noqa: E402
from persona_tasks.warehouse import connect  # noqa: E402


def sample_clusters(settings, con, source: str, n_clusters: int, embedder):
    """(history, hvec, assignments, clusters) for the first users by md5 until ``n_clusters`` clusters."""
    mem, gran = E.load_dataset(con, source, settings.evaluation, settings.memory_text_max_chars)
    history, _ = E.split_history_future(mem, settings.evaluation.future_fraction, settings.evaluation.min_memories)
    users = stable_sample(history["user_id"].to_list(), None)
    # cluster a generous prefix of users (cheap), then keep whole users until the target is reached
    pick = users[: max(40, n_clusters)]
    history = history.filter(pl.col("user_id").is_in(pick)).sort("user_id", "started_at", "memory_id")
    hvec = E.memory_vectors(settings, con, history, gran, embedder)
    assignments = E.cluster_history(settings, history, hvec).assignments
    clusters = E.cluster_inputs(history, assignments)
    order = {u: i for i, u in enumerate(pick)}
    clusters.sort(key=lambda c: (order[c.user_id], int(c.cluster_id)))
    keep, seen = [], set()
    for c in clusters:
        if len(keep) >= n_clusters and c.user_id not in seen:
            break
        keep.append(c)
        seen.add(c.user_id)
    return history, hvec, assignments, keep


def load_or_sample(settings, args, embedder) -> dict:
    """Per dataset (history, hvec, assignments, clusters), sampled once and kept in ``--clusters-cache`` (the
    embedding and clustering then need not be redone for every model or arm)."""
    import pickle

    cache = args.clusters_cache
    key = {"aol": args.aol_clusters, "movielens": args.movielens_clusters, "embedding": embedder.model_version}
    if cache is not None and cache.is_file():
        saved = pickle.loads(cache.read_bytes())
        if saved["key"] == key:
            print(f"clusters from {cache}", flush=True)
            return saved["data"]
    with connect(settings) as con:
        data = {src: sample_clusters(settings, con, src, n, embedder)
                for src, n in (("aol", args.aol_clusters), ("movielens", args.movielens_clusters)) if n}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps({"key": key, "data": data}))
    return data


def subset(data: tuple, n: int | None) -> tuple:
    """The first ``n`` clusters of a dataset's sample (whole users, in the sample's fixed order)."""
    history, hvec, assignments, clusters = data
    if n is None or n >= len(clusters):
        return data
    keep, seen = [], set()
    for c in clusters:
        if len(keep) >= n and c.user_id not in seen:
            break
        keep.append(c)
        seen.add(c.user_id)
    return history, hvec, assignments, keep


def run_arm(settings, arm: str, clusters, terms, history, hvec, assignments, embedder, llm_parts=None) -> dict:
    masked = mask_clusters(clusters, terms)
    t0 = time.perf_counter()
    stats = None
    if arm == "extractive":
        labels = ExtractiveLabeller(settings).label(masked)
    else:
        from persona_tasks.labelling import LLMLabeller

        s = settings.model_copy(update={"labelling": settings.labelling.model_copy(update={"decoding": arm})})
        model, tok, version = llm_parts
        lab = LLMLabeller(s, model=model, tokenizer=tok, model_version=version)
        labels = lab.label(masked)
        stats = lab.stats.as_dict()
    seconds = time.perf_counter() - t0
    vecs = embedder.encode([f"{p.label}. {p.description}" for p in labels])
    hp = E.HistoryPersonas(clusters, labels, vecs)
    for i, c in enumerate(clusters):
        hp.by_user.setdefault(c.user_id, []).append(i)
    q = E.persona_quality(settings, history, hvec, assignments, hp, embedder)
    n_fb = sum(bool(p.fallback) for p in labels)
    out = {"arm": arm, "clusters": len(clusters), "personas": len(labels), "fallbacks": n_fb,
           "fallback_rate": n_fb / max(len(labels), 1), "seconds": round(seconds, 1),
           "seconds_per_persona": round(seconds / max(len(labels), 1), 3), "quality": q,
           "examples": [{"label": p.label, "description": p.description, "fallback": bool(p.fallback)}
                        for p in labels[:6]]}
    if stats:
        out.update(problems=stats["problems"], repairs=stats["repairs"], prompts=stats["prompts"],
                   prompts_per_s=stats["prompts_per_s"], tokens_per_s=stats["tokens_per_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warehouse", type=Path, required=True)
    ap.add_argument("--arms", default="extractive,free,constrained,skeleton")
    ap.add_argument("--aol-clusters", type=int, default=100)
    ap.add_argument("--movielens-clusters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="[labelling] model (smollm2-135m, gemma3-270m); default: config")
    ap.add_argument("--batch-size", type=int, default=None, help="[labelling] batch_size; default: config")
    ap.add_argument("--subset", type=int, default=None,
                    help="label only the first N clusters of each dataset's sample (whole users): a smaller set "
                         "for the slower arms/models; the sample itself stays the same")
    ap.add_argument("--clusters-cache", type=Path, default=None,
                    help="pickle of the sampled clusters (written once, then read; local, never committed)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another [labelling] setting for every arm, e.g. phrases_per_sentence=1 (repeatable)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(warehouse=args.warehouse, threads=args.threads)
    lab_update = {k: v for k, v in (("model", args.model), ("batch_size", args.batch_size)) if v is not None}
    overrides = {}
    for kv in args.set:
        key, _, value = kv.partition("=")
        try:
            overrides[key] = json.loads(value)  # numbers, true/false, lists
        except ValueError:
            overrides[key] = value  # a plain string ("cited")
    lab_update.update(overrides)
    if lab_update:
        settings = settings.model_copy(update={"labelling": settings.labelling.model_copy(update=lab_update)})
    embedder = embedder_from_settings(settings)
    arms = args.arms.split(",")
    llm_parts = None
    if any(a != "extractive" for a in arms):
        from persona_tasks.labelling import load_causal_lm

        llm_parts = load_causal_lm(settings)
    res = {"model": settings.labelling.model, "model_version": llm_parts[2] if llm_parts else None,
           "embedding": embedder.model_version, "threads": args.threads, "batch_size": settings.labelling.batch_size,
           "max_attempts": settings.labelling.max_attempts, "max_new_tokens": settings.labelling.max_new_tokens,
           "subset": args.subset, "labelling_overrides": overrides, "datasets": {}}
    t0 = time.perf_counter()
    data = {src: subset(d, args.subset) for src, d in load_or_sample(settings, args, embedder).items()}
    for src, (history, hvec, assignments, clusters) in data.items():
        terms = PublicTerms.from_texts(history["user_id"], history["text"], settings.labelling.min_term_users)
        res["datasets"][src] = {"clusters": len(clusters), "users": len({c.user_id for c in clusters}), "arms": {}}
        for arm in arms:
            r = run_arm(settings, arm, clusters, terms, history, hvec, assignments, embedder, llm_parts)
            res["datasets"][src]["arms"][arm] = r
            q = r["quality"]
            print(f"{src:9s} {arm:11s} fallback {r['fallback_rate']:.3f}  objective {q.get('objective', np.nan):.3f} "
                  f"truthfulness {q.get('truthfulness', np.nan):.3f} alignment {q.get('alignment', np.nan):.3f}  "
                  f"{r['seconds_per_persona']:.2f} s/persona  problems {r.get('problems', {})}", flush=True)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    name = (res["model_version"] or "extractive").split("@")[0].replace(".", "_")
    if args.subset:
        name += f"_subset{args.subset}"
    path = args.out or ROOT / "bench" / "results" / f"labelling_arms_{name}.json"
    path.write_text(json.dumps(res, indent=2, default=float) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
