"""What should a persona hold, and how should a profile of several personas score a candidate?

Issue 11 section 2: on the evaluation's protocol (persona_tasks.evaluate, negatives as configured), compare
profile variants built from the SAME history clustering and the same extractive personas:

* ``text``: one vector per persona, "label. description" (the evaluation's multi-persona row);
* ``label`` / ``terms``: the label only / the key terms only;
* ``text+evidence<k>``: the persona text vector plus its k most central evidence memories (what a published
  persona links to: personas.persona_evidence);
* ``centroid``: the cluster centroids (multi-centroid), ``centroid+text``: both per persona;
* ``nearest``: every history memory (no persona at all).

Prints Hit@10 overall / on repeat / on novel futures and writes bench/results/persona_profiles_<dataset>.json.
Usage: python bench/explore_persona_profiles.py [--dataset aol] [--max-users N]
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
from persona_tasks.sampling import stable_sample  # noqa: E402
from persona_tasks.labelling.privacy import PublicTerms, mask_clusters  # noqa: E402
from persona_tasks.progress import set_threads  # noqa: E402
from persona_tasks.warehouse import connect  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="aol")
    ap.add_argument("--max-users", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    settings = load_settings()
    cfg = settings.evaluation
    set_threads(settings.threads)
    embedder = embedder_from_settings(settings)
    t0 = time.perf_counter()
    with connect(settings) as con:
        memories, gran = E.load_dataset(con, args.dataset, cfg, settings.memory_text_max_chars)
        if args.max_users:
            memories = memories.filter(pl.col("user_id").is_in(stable_sample(memories["user_id"].to_list(),
                                                                                args.max_users)))
        history, future = E.split_history_future(memories, cfg.future_fraction, cfg.min_memories)
        vec = E.memory_vectors(settings, con, pl.concat([history, future]), gran, embedder)
    hvec, fvec = vec[:history.height], vec[history.height:]
    blocks = E._blocks(future["user_id"])
    hblocks = {u: (a, b) for u, a, b in E._blocks(history["user_id"])}
    own = E.user_texts(history, future) if cfg.negatives == "unseen" else None
    neg = E.sample_negatives(future["user_id"], cfg.n_negatives, cfg.seed,
                             future["text"] if own else None, own)
    clustering = E.cluster_history(settings, history, hvec)
    clusters = E.cluster_inputs(history, clustering.assignments)
    terms = PublicTerms.from_texts(history["user_id"], history["text"], settings.labelling.min_term_users)
    labels = ExtractiveLabeller(settings).label(mask_clusters(clusters, terms))
    row_of = {m: i for i, m in enumerate(history["memory_id"].to_list())}

    def enc(texts: list[str]) -> np.ndarray:
        return E.normalise(E.encode_distinct(embedder, texts))

    text_vecs = enc([f"{p.label}. {p.description}" for p in labels])
    label_vecs = enc([p.label for p in labels])
    term_texts = [p.description.split(" mostly about ", 1)[-1].rstrip(".") for p in labels]
    term_vecs = enc(term_texts)
    masked = mask_clusters(clusters, terms)
    rep_texts = {k: enc([f"{p.label}. " + "; ".join(c.memory_texts[:k]) for p, c in zip(labels, masked)])
                 for k in (3, 5, 10)}
    full_rep = enc([f"{p.label}. {p.description} Examples: " + "; ".join(c.memory_texts[:5])
                    for p, c in zip(labels, masked)])
    centroids = np.stack([E.normalise(hvec[[row_of[m] for m in c.memory_ids]].mean(axis=0)) for c in clusters])
    by_user: dict[str, list[int]] = {}
    for i, c in enumerate(clusters):
        by_user.setdefault(c.user_id, []).append(i)

    def per_persona(build) -> dict[str, np.ndarray]:
        return {u: np.concatenate([build(i) for i in idx]) for u, idx in by_user.items()}

    def evidence(i: int, k: int) -> np.ndarray:
        return hvec[[row_of[m] for m in clusters[i].memory_ids[:k]]]

    variants = {
        "text": per_persona(lambda i: text_vecs[i:i + 1]),
        "label": per_persona(lambda i: label_vecs[i:i + 1]),
        "terms": per_persona(lambda i: term_vecs[i:i + 1]),
        **{f"label+examples{k}": per_persona(lambda i, k=k: rep_texts[k][i:i + 1]) for k in rep_texts},
        "text+examples5": per_persona(lambda i: full_rep[i:i + 1]),
        "centroid": per_persona(lambda i: centroids[i:i + 1]),
        "centroid+text": per_persona(lambda i: np.concatenate([centroids[i:i + 1], text_vecs[i:i + 1]])),
        **{f"text+evidence{k}": per_persona(lambda i, k=k: np.concatenate([text_vecs[i:i + 1], evidence(i, k)]))
           for k in (1, 3, 5, 10)},
        **{f"evidence{k}": per_persona(lambda i, k=k: evidence(i, k)) for k in (3, 5)},
        "text+evidence_all": per_persona(lambda i: np.concatenate([text_vecs[i:i + 1],
                                                                    evidence(i, len(clusters[i].memory_ids))])),
        "nearest": {u: hvec[a:b] for u, (a, b) in hblocks.items()},
    }
    # soft scorers: tau * logsumexp(cos / tau) over the profile's vectors (a kernel density: a candidate near many
    # of a persona's memories scores above one near a single memory)
    soft = {f"lse{tau}:{name}": (variants[name], tau) for name in ("nearest", "text+evidence_all", "text+evidence10")
            for tau in (0.02, 0.05)}
    hist_pairs = history.select("user_id", "text").unique().with_columns(_rep=pl.lit(True))
    repeat = future.select("user_id", "text").join(hist_pairs, on=["user_id", "text"], how="left",
                                                   maintain_order="left")["_rep"].fill_null(False).to_numpy()
    n_vec = {k: float(np.mean([v.shape[0] for v in prof.values()])) for k, prof in variants.items()}
    out = {"dataset": args.dataset, "negatives": cfg.negatives, "n_users": len(by_user), "n_future": future.height,
           "personas_per_user": len(clusters) / max(len(hblocks), 1), "variants": {}}
    print(f"{args.dataset}: {len(hblocks)} users, {len(clusters)} personas, {future.height} futures "
          f"({int(repeat.sum())} repeat), negatives {cfg.negatives}")
    print(f"{'variant':18s} {'vectors/user':>12s} {'Hit@10':>7s} {'repeat':>7s} {'novel':>7s}")
    def rank_soft(prof, tau):
        n, k = neg.shape
        pos, ng = np.zeros(n), np.zeros((n, k))
        for u, a, b in blocks:
            P = prof.get(u)
            if P is None or not P.shape[0]:
                continue
            cand = np.concatenate([np.arange(a, b)[:, None], neg[a:b]], axis=1)
            uniq, inv = np.unique(cand, return_inverse=True)
            sims = (fvec[uniq] @ P.T) / tau
            m = sims.max(axis=1, keepdims=True)
            sc = np.round((tau * (m[:, 0] + np.log(np.exp(sims - m).sum(axis=1)))).astype(np.float64), 6)
            s2 = sc[inv.reshape(cand.shape)]
            pos[a:b], ng[a:b] = s2[:, 0], s2[:, 1:]
        return pos, ng

    for name in soft:
        n_vec[name] = n_vec[name.split(":", 1)[1]]
    for name, prof in list(variants.items()) + list(soft.items()):
        if name in soft:
            pos, ng = rank_soft(*prof)
        else:
            pos, ng = E.rank_futures(prof, fvec, blocks, neg)
        h = E.per_query_metrics(pos, ng)["hit@10"]
        r = {"hit@10": float(h.mean()), "repeat": float(h[repeat].mean()), "novel": float(h[~repeat].mean()),
             "vectors_per_user": n_vec[name]}
        out["variants"][name] = r
        print(f"{name:18s} {n_vec[name]:12.1f} {100 * r['hit@10']:7.2f} {100 * r['repeat']:7.2f} "
              f"{100 * r['novel']:7.2f}")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    path = args.out or ROOT / "bench" / "results" / f"persona_profiles_{args.dataset}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
