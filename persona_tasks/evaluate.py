"""Future-interaction prediction: do personas induced from a user's history pick out that user's future memories?

The protocol (stated again, with the measured numbers, in docs/results.md, which ``write_results_doc`` renders
from the dict ``evaluate`` returns):

1. **Memories.** One dataset per ``source`` of the warehouse. AOL (and any other source): the rows of
   ``marts.intent_memories`` (sessions, 30-minute gap). MovieLens: an evaluation-side regrouping of
   ``staging.stg_events`` (``[evaluation] movielens_granularity``): ``movie`` (default) = one memory per rating of
   at least ``movielens_min_rating`` (text ``Title (year) [genres]``, the rating value dropped), ``day`` =
   one memory per user and UTC day of such ratings, ``session`` = the mart as built.
2. **Split.** Per user, memories in time order (``started_at``, then ``memory_id``); the last
   ``max(1, floor(future_fraction * n))`` are the future, the rest the history; users with fewer than
   ``min_memories`` memories are left out (``split_history_future``).
3. **Personas from history only.** The history embeddings (all-MiniLM-L6-v2, the pipeline's embedder) are
   clustered per user with the configured strategy (``persona_tasks.cluster.cluster_frame``), each cluster is
   labelled (extractive for every user; the LLM labeller for a stable md5 sample of ``llm_max_users`` users) and
   each persona is embedded as ``"label. description"`` with the same embedder (``induce_history_personas``).
   The labellers see the history with words fewer than ``[labelling] min_term_users`` users wrote masked, as in
   the pipeline (``labelling.privacy``).
4. **Candidates.** Each future memory is ranked against ``n_negatives`` negatives drawn without replacement, with a
   fixed seed, from the future memories of *other* users (``sample_negatives``).
5. **Scores.** A method scores a candidate by the maximum cosine of its embedding to any vector of the user's
   profile: persona text embeddings (multi-persona), cluster centroids (multi-centroid), one persona of all history
   (single persona), the history centroid, every history memory (nearest memory), the last history memory (most
   recent); popularity scores by how often the candidate's item (AOL: memory text; MovieLens: movie) occurs in all
   evaluated users' histories; random by a seeded uniform draw.
6. **Metrics** (``ranking_metrics``): Hit@1, Hit@10 and MRR of the future memory's rank among the 1 + negatives
   candidates, averaged over future memories. Ties are broken uniformly at random *in expectation* (a candidate
   tied with e negatives and below g of them has rank uniform on g+1 .. g+e+1), so results are deterministic and
   a constant scorer gets exactly the random expectation.

Quality (``persona_tasks.quality.score_user``), coverage, personas per user, the LLM fallback rate and the
recovery of planted personas on ``persona_tasks.synth`` logs (ARI / NMI, ``planted_recovery``) are reported too.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
from scipy.special import digamma

from persona_tasks.config import EvaluationSettings, Settings
from persona_tasks.errors import PersonaEtlError
from persona_tasks.progress import Progress, set_threads
from persona_tasks.warehouse import query_pl
from persona_tasks.sampling import stable_sample

log = logging.getLogger(__name__)

KS = (1, 10)

# (key, table name): rows of docs/results.md, in this order
METHODS: tuple[tuple[str, str], ...] = (
    ("multi_llm", "multi-persona (LLM labeller)"),
    ("multi_extractive", "multi-persona (extractive labeller)"),
    ("multi_evidence", "multi-persona text + evidence (extractive)"),
    ("multi_centroid", "multi-centroid (same clusters, no text)"),
    ("single_llm", "single persona from all history (LLM labeller)"),
    ("single_extractive", "single persona from all history (extractive)"),
    ("history_centroid", "history centroid"),
    ("nearest_memory", "nearest history memory"),
    ("most_recent", "most recent memory"),
    ("popularity", "popularity"),
    ("random", "random"),
)
LLM_METHODS = ("multi_llm", "single_llm")


class EvaluationError(PersonaEtlError):
    """The warehouse has nothing to evaluate, or the settings make the protocol impossible."""


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

def load_dataset(con: duckdb.DuckDBPyConnection, source: str, cfg: EvaluationSettings,
                 max_chars: int = 600) -> tuple[pl.DataFrame, str]:
    """``user_id, memory_id, started_at, text, item_key`` of one source, and the granularity used. ``text`` is what
    is embedded and labelled: the mart's ``embedding_text`` (queries, titles), or for MovieLens movies the event's
    ``content_text`` (``Title (year) [genres]``)."""
    granularity = cfg.movielens_granularity if source == "movielens" else "session"
    if granularity == "session":
        df = query_pl(con, "SELECT user_id, memory_id, started_at, coalesce(embedding_text, '') AS text "
                           "FROM marts.intent_memories WHERE source = $s", {"s": source})
        return df.with_columns(item_key=pl.col("text")), granularity
    # the rating value is dropped from the text: every event here is a rating of at least min_rating, and
    # similarity should reflect the movies, not a user's habit of giving 4.0 or 5.0
    events = query_pl(
        con, """
        SELECT user_id, event_id, event_ts, event_date, coalesce(item_id, event_id) AS item_key,
               coalesce(content_text, '') AS text
        FROM staging.stg_events
        WHERE source = $s AND event_type = 'rating' AND rating >= $r
        """, {"s": source, "r": cfg.movielens_min_rating})
    if granularity == "movie":
        return events.select("user_id", pl.col("event_id").alias("memory_id"), pl.col("event_ts").alias("started_at"),
                             "text", "item_key"), granularity
    days = (events.sort("user_id", "event_ts", "event_id")
            .group_by("user_id", "event_date", maintain_order=True)
            .agg(pl.col("event_ts").min().alias("started_at"), pl.col("text").str.join("; ")))
    days = days.with_columns(
        memory_id=(pl.col("user_id") + "|" + pl.col("event_date").cast(pl.String)),
        text=pl.col("text").str.slice(0, max_chars),
    )
    return days.select("user_id", "memory_id", "started_at", "text",
                       pl.col("text").alias("item_key")), granularity


def evaluable_users_by_granularity(con: duckdb.DuckDBPyConnection, source: str, cfg: EvaluationSettings,
                                   max_chars: int = 600) -> dict[str, int]:
    """MovieLens: users with at least ``min_memories`` memories under each granularity (why ``movie`` is used)."""
    out = {}
    for g in ("movie", "day", "session"):
        df, _ = load_dataset(con, source, cfg.model_copy(update={"movielens_granularity": g}), max_chars)
        out[g] = int((df.group_by("user_id").len()["len"] >= cfg.min_memories).sum())
    return out


def split_history_future(memories: pl.DataFrame, future_fraction: float = 0.2,
                         min_memories: int = 5) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(history, future): per user, in time order (``started_at``, ``memory_id``), the last
    ``max(1, floor(future_fraction * n))`` memories are the future; users with fewer than ``min_memories``
    memories are left out. Both frames are sorted by user, then time, and carry ``position`` (0-based, per user)."""
    df = memories.sort("user_id", "started_at", "memory_id").with_columns(
        position=pl.int_range(pl.len()).over("user_id"), _n=pl.len().over("user_id"))
    df = df.filter(pl.col("_n") >= min_memories)
    # + 1e-9: 0.2 * 15 must floor to 3 whatever the float rounding
    n_future = pl.max_horizontal(pl.lit(1), (pl.col("_n") * future_fraction + 1e-9).floor().cast(pl.Int64))
    df = df.with_columns(is_future=pl.col("position") >= pl.col("_n") - n_future).drop("_n")
    return df.filter(~pl.col("is_future")).drop("is_future"), df.filter(pl.col("is_future")).drop("is_future")


def _blocks(users: Sequence[str] | pl.Series) -> list[tuple[str, int, int]]:
    """(user, start, end) of each run of equal consecutive values."""
    s = pl.Series(users) if not isinstance(users, pl.Series) else users
    if s.is_empty():
        return []
    g = (s.to_frame("u").with_row_index("i").group_by("u", maintain_order=True)
         .agg(pl.col("i").min().alias("a"), (pl.col("i").max() + 1).alias("b")))
    return [(u, int(a), int(b)) for u, a, b in g.iter_rows()]


def sample_negatives(future_users: Sequence[str] | pl.Series, n_negatives: int, seed: int,
                     future_texts: Sequence[str] | pl.Series | None = None,
                     own_texts: dict[str, set[str]] | None = None) -> np.ndarray:
    """``(n_future, k)`` row indices of negatives for each future memory: drawn without replacement, seeded, from
    the future rows of other users (rows must be grouped by user). ``k = min(n_negatives, smallest pool)``.

    With ``future_texts`` (the text of each future row) and ``own_texts`` (per user, every text of their own
    memories, history and future) the pool is the *unseen* rule's: other users' future rows whose text the user
    never had (a query the user also searched is not a wrong answer). Without them, every other user's row."""
    blocks = _blocks(future_users)
    n = sum(b - a for _, a, b in blocks)
    if not blocks:
        return np.zeros((0, n_negatives), dtype=np.int64)
    rng = np.random.default_rng(seed)
    if future_texts is None or own_texts is None:
        k = min(n_negatives, n - max(b - a for _, a, b in blocks))
        if k < 1:
            raise EvaluationError("negatives need future memories of at least two users")
        out = np.empty((n, k), dtype=np.int64)
        for _, a, b in blocks:
            m = b - a
            for row in range(a, b):
                idx = rng.choice(n - m, size=k, replace=False)
                out[row] = idx + m * (idx >= a)
        return out
    texts = pl.Series(future_texts, dtype=pl.String).fill_null("")
    codes = texts.cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)
    code_of = dict(zip(texts.to_list(), codes.tolist()))
    rows = np.arange(n)
    pools: list[np.ndarray] = []
    for u, a, b in blocks:
        own = np.fromiter((code_of[t] for t in own_texts.get(u, ()) if t in code_of), dtype=np.int64)
        keep = ~np.isin(codes, own) & ((rows < a) | (rows >= b))
        pools.append(rows[keep])
    k = min(n_negatives, min(p.size for p in pools))
    if k < 1:
        raise EvaluationError("no unseen negatives: some user has had every other user's future text")
    out = np.empty((n, k), dtype=np.int64)
    for (_, a, b), pool in zip(blocks, pools):
        for row in range(a, b):
            out[row] = pool[rng.choice(pool.size, size=k, replace=False)]
    return out


def user_texts(*frames: pl.DataFrame) -> dict[str, set[str]]:
    """Per user, the set of ``text`` values over the frames (the unseen rule's "texts the user had")."""
    both = pl.concat([f.select("user_id", "text") for f in frames]).unique()
    return {u: set(t) for u, t in both.group_by("user_id").agg("text").iter_rows()}


# ---------------------------------------------------------------------------------------------------------------
# Confidence intervals: bootstrap over users
# ---------------------------------------------------------------------------------------------------------------

def bootstrap_weights(n_users: int, n_samples: int, seed: int) -> np.ndarray:
    """``(n_samples, n_users)`` multiplicities of a bootstrap over users (each row a multinomial draw)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_users, np.full(n_users, 1.0 / n_users), size=n_samples).astype(np.float64)


def user_sums(values: np.ndarray, user_index: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Per user: the sum of ``values`` over their future memories, and how many there are."""
    return (np.bincount(user_index, weights=values, minlength=n_users),
            np.bincount(user_index, minlength=n_users).astype(np.float64))


def bootstrap_ci(values: np.ndarray, user_index: np.ndarray, weights: np.ndarray,
                 baseline: np.ndarray | None = None, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the micro-averaged ``values`` (minus ``baseline``, paired: the same resampled users)
    under the bootstrap ``weights`` over users. ``user_index``: each value's user (0..n_users-1)."""
    if weights.size == 0 or values.size == 0:
        return (float("nan"), float("nan"))
    d = values if baseline is None else values - baseline
    s, c = user_sums(d, user_index, weights.shape[1])
    stats = (weights @ s) / np.maximum(weights @ c, 1.0)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------

def per_query_metrics(pos: np.ndarray, neg: np.ndarray, ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """Hit@k and reciprocal rank of each positive among its negatives (``pos`` (n,), ``neg`` (n, m)), in
    expectation over a uniformly random order of tied candidates."""
    pos = np.asarray(pos, dtype=np.float64)[:, None]
    neg = np.asarray(neg, dtype=np.float64)
    g = (neg > pos).sum(axis=1).astype(np.float64)
    e = (neg == pos).sum(axis=1).astype(np.float64)
    out = {f"hit@{k}": np.clip((k - g) / (e + 1.0), 0.0, 1.0) for k in ks}
    # mean of 1/r for r = g+1 .. g+e+1 = (H(g+e+1) - H(g)) / (e+1), H(n) = digamma(n+1) + euler_gamma
    out["mrr"] = (digamma(g + e + 2.0) - digamma(g + 1.0)) / (e + 1.0)
    return out


def ranking_metrics(pos: np.ndarray, neg: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Mean Hit@k and MRR (see ``per_query_metrics``)."""
    q = per_query_metrics(pos, neg, ks)
    return {k: float(v.mean()) if v.size else float("nan") for k, v in q.items()}


def max_similarity(profile: np.ndarray, candidates: np.ndarray, temperature: float | None = None) -> np.ndarray:
    """Score of each candidate row: its maximum cosine to a profile row, or with ``temperature`` T the soft maximum
    T * log(sum(exp(cos / T))) (a candidate close to several profile vectors scores above one close to a single
    one); rounded to 1e-6 so that identical texts tie exactly whatever the BLAS blocking."""
    if profile.shape[0] == 0:
        return np.zeros(candidates.shape[0])
    sims = (candidates @ profile.T).astype(np.float64)
    if not temperature:
        return np.round(sims.max(axis=1), 6)
    z = sims / temperature
    m = z.max(axis=1, keepdims=True)
    return np.round(temperature * (m[:, 0] + np.log(np.exp(z - m).sum(axis=1))), 6)


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def rank_futures(profiles: dict[str, np.ndarray], future_vecs: np.ndarray, blocks: list[tuple[str, int, int]],
                 negatives: np.ndarray, temperature: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pos scores (n,), neg scores (n, k)) of an embedding method: ``profiles[user]`` is its profile matrix
    (users without one score 0 everywhere: only ties); ``temperature``: see ``max_similarity``."""
    n, k = negatives.shape
    pos = np.zeros(n)
    neg = np.zeros((n, k))
    for u, a, b in blocks:
        prof = profiles.get(u)
        if prof is None or prof.shape[0] == 0:
            continue
        cand = np.concatenate([np.arange(a, b)[:, None], negatives[a:b]], axis=1)
        uniq, inv = np.unique(cand, return_inverse=True)
        s = max_similarity(prof, future_vecs[uniq], temperature)[inv.reshape(cand.shape)]
        pos[a:b], neg[a:b] = s[:, 0], s[:, 1:]
    return pos, neg


# ---------------------------------------------------------------------------------------------------------------
# Personas from history
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class HistoryPersonas:
    """Personas of some users: one per cluster (aligned lists), their text embeddings, grouped by user."""

    clusters: list  # list[ClusterInput]
    labels: list    # list[PersonaLabel]
    vecs: np.ndarray
    by_user: dict[str, list[int]] = field(default_factory=dict)

    def profiles(self) -> dict[str, np.ndarray]:
        return {u: self.vecs[idx] for u, idx in self.by_user.items()}


def cluster_inputs(history: pl.DataFrame, assignments: pl.DataFrame, users: set[str] | None = None) -> list:
    """ClusterInputs of every (user, cluster) of a history clustering, most central memories first."""
    from persona_tasks.labelling import ClusterInput

    a = assignments.filter(pl.col("cluster_id").is_not_null())
    if users is not None:
        a = a.filter(pl.col("user_id").is_in(list(users)))
    g = (a.join(history.select("memory_id", "text"), on="memory_id", how="left")
         .sort(["user_id", "cluster_id", "centrality", "memory_id"], descending=[False, False, True, False])
         .group_by("user_id", "cluster_id", maintain_order=True)
         .agg("memory_id", "text", "centrality"))
    return [ClusterInput(user_id=u, cluster_id=str(c), memory_ids=list(ids), memory_texts=list(t),
                         centrality=[float(v) if v is not None else 0.0 for v in cen])
            for u, c, ids, t, cen in g.iter_rows()]


def single_cluster_inputs(history: pl.DataFrame, hvec: np.ndarray, users: set[str] | None = None) -> list:
    """One ClusterInput per user holding all of its history (centrality = cosine to the history centroid)."""
    from persona_tasks.labelling import ClusterInput

    out = []
    ids, texts = history["memory_id"].to_list(), history["text"].to_list()
    for u, a, b in _blocks(history["user_id"]):
        if users is not None and u not in users:
            continue
        c = normalise(hvec[a:b].mean(axis=0))
        cen = (hvec[a:b] @ c).tolist()
        out.append(ClusterInput(user_id=u, cluster_id="all", memory_ids=ids[a:b], memory_texts=texts[a:b],
                                centrality=cen))
    return out


def label_and_embed(clusters: list, labeller, embedder, terms=None) -> HistoryPersonas:
    """Label the clusters with ``labeller`` and embed each persona as ``"label. description"``. ``terms``
    (``labelling.privacy.PublicTerms``): the labeller sees the texts with non-public words masked, as in the
    pipeline; the returned clusters keep the real texts."""
    from persona_tasks.labelling.privacy import mask_clusters

    labels = labeller.label(mask_clusters(clusters, terms)) if clusters else []
    texts = [f"{lab.label}. {lab.description}" for lab in labels]
    vecs = embedder.encode(texts) if texts else np.zeros((0, embedder.dim), np.float32)
    by_user: dict[str, list[int]] = {}
    for i, c in enumerate(clusters):
        by_user.setdefault(c.user_id, []).append(i)
    return HistoryPersonas(clusters, labels, vecs, by_user)


def induce_history_personas(settings: Settings, history: pl.DataFrame, hvec: np.ndarray, embedder,
                            labeller: str = "extractive", users: set[str] | None = None,
                            assignments: pl.DataFrame | None = None, single: bool = False,
                            llm=None, terms=None) -> HistoryPersonas:
    """Personas of the users' history (all users of ``history`` unless ``users``): one per history cluster
    (``assignments`` from ``cluster_frame``; clustered here when None), or one of all history with ``single``.
    ``labeller``: "extractive" or "llm" (``llm``: an LLMLabeller to reuse)."""
    from persona_tasks.labelling import ExtractiveLabeller

    if single:
        clusters = single_cluster_inputs(history, hvec, users)
    else:
        if assignments is None:
            assignments = cluster_history(settings, history, hvec).assignments
        clusters = cluster_inputs(history, assignments, users)
    if labeller == "extractive":
        lab = ExtractiveLabeller(settings)
    elif labeller == "llm":
        if llm is None:
            from persona_tasks.labelling import LLMLabeller

            llm = LLMLabeller(settings)
        lab = llm
    else:
        raise EvaluationError(f"unknown labeller {labeller!r}: use llm or extractive")
    if terms is None:
        from persona_tasks.labelling.privacy import PublicTerms

        terms = PublicTerms.from_texts(history["user_id"], history["text"],
                                       settings.labelling.min_term_users)
    return label_and_embed(clusters, lab, embedder, terms)


def cluster_history(settings: Settings, history: pl.DataFrame, hvec: np.ndarray):
    """The configured per-user clustering of the history memories (nothing is written to the warehouse)."""
    from persona_tasks.cluster import cluster_frame

    frame = history.select("user_id", "memory_id", "started_at").with_columns(
        embedding=pl.Series(hvec.astype(np.float32)))
    return cluster_frame(frame, settings.clustering, progress_name="evaluate: cluster history")


def evidence_profiles(personas: HistoryPersonas, history: pl.DataFrame, hvec: np.ndarray,
                      k: int) -> dict[str, np.ndarray]:
    """Per user: each persona's text vector followed by the embeddings of its ``k`` most central memories (the
    clusters' memory_ids are most central first)."""
    row_of = {m: i for i, m in enumerate(history["memory_id"].to_list())}
    out: dict[str, np.ndarray] = {}
    for u, idx in personas.by_user.items():
        parts = []
        for i in idx:
            parts.append(personas.vecs[i:i + 1])
            parts.append(hvec[[row_of[m] for m in personas.clusters[i].memory_ids[:k]]])
        out[u] = np.concatenate(parts).astype(np.float32)
    return out


def centroid_profiles(history: pl.DataFrame, hvec: np.ndarray, assignments: pl.DataFrame) -> dict[str, np.ndarray]:
    """Per user: the normalised mean embedding of each history cluster (unassigned memories in none)."""
    lab = history.select("memory_id").join(assignments.select("memory_id", "cluster_id"), on="memory_id",
                                           how="left")["cluster_id"].fill_null(-1).to_numpy()
    out = {}
    for u, a, b in _blocks(history["user_id"]):
        ls = lab[a:b]
        ids = np.unique(ls[ls >= 0])
        out[u] = normalise(np.stack([hvec[a:b][ls == c].mean(axis=0) for c in ids])) if ids.size else hvec[a:b][:0]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Quality of the history personas
# ---------------------------------------------------------------------------------------------------------------

def persona_quality(settings: Settings, history: pl.DataFrame, hvec: np.ndarray, assignments: pl.DataFrame,
                    personas: HistoryPersonas, embedder) -> dict[str, float]:
    """Mean cohesion, alignment, truthfulness and objective (``persona_tasks.quality``) of multi-personas."""
    from threadpoolctl import threadpool_limits

    from persona_tasks.quality import embed_claims, score_user, split_claims

    if not personas.labels:
        return {}
    lab = history.select("memory_id").join(assignments.select("memory_id", "cluster_id"), on="memory_id",
                                           how="left")["cluster_id"].fill_null(-1).to_numpy()
    texts = history["text"].to_list()
    claims = [split_claims(p.label, p.description) for p in personas.labels]
    claim_vecs = embed_claims(embedder, claims)
    scores: dict[str, list[float]] = {"cohesion": [], "alignment": [], "truthfulness": [], "objective": []}
    bounds = {u: (a, b) for u, a, b in _blocks(history["user_id"])}
    with threadpool_limits(1):
        for u, idx in personas.by_user.items():
            a, b = bounds[u]
            pcl = [int(personas.clusters[i].cluster_id) for i in idx]
            s = score_user(settings.quality, hvec[a:b], lab[a:b], texts[a:b], personas.vecs[idx], pcl,
                           [claims[i] for i in idx], [claim_vecs[i] for i in idx])
            for k in scores:
                scores[k].extend(getattr(s, k).tolist())
    return {k: float(np.nanmean(v)) if v else float("nan") for k, v in scores.items()}


# ---------------------------------------------------------------------------------------------------------------
# Planted personas
# ---------------------------------------------------------------------------------------------------------------

def planted_scores(mem: pl.DataFrame, vec: np.ndarray, clustering) -> dict:
    """Mean per-user ARI / NMI of ``clustering`` (ClusteringSettings) on synth memories ``mem`` (sorted by user)
    with embeddings ``vec``; unassigned memories count as singleton clusters."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from persona_tasks.cluster import cluster_frame

    res = cluster_frame(mem.select("user_id", "memory_id", "started_at").with_columns(embedding=pl.Series(vec)),
                        clustering, progress_name="evaluate: planted personas")
    j = mem.join(res.assignments.select("memory_id", "cluster_id"), on="memory_id", how="left")
    ari, nmi, k_true, k_found = [], [], [], []
    for _, a, b in _blocks(j["user_id"]):
        truth = j["planted_persona"][a:b].to_list()
        found = j["cluster_id"][a:b].to_numpy()
        found = np.where(np.isnan(found.astype(float)), -1 - np.arange(b - a), found).astype(int)
        ari.append(adjusted_rand_score(truth, found))
        nmi.append(normalized_mutual_info_score(truth, found))
        k_true.append(len(set(truth)))
        k_found.append(len(set(found[found >= 0].tolist())))
    return {"ari": float(np.mean(ari)), "nmi": float(np.mean(nmi)), "planted_per_user": float(np.mean(k_true)),
            "clusters_per_user": float(np.mean(k_found))}


def planted_recovery(settings: Settings, embedder, n_users: int, memories_per_user: Sequence[int] = (10, 40),
                     seed: int = 0) -> dict:
    """Mean per-user ARI and NMI of the configured clustering against the planted personas of
    ``persona_tasks.synth.generate_memories`` (their ``embedding_text``, as the pipeline embeds)."""
    from persona_tasks.synth import generate_memories

    lo, hi = (int(memories_per_user[0]), int(memories_per_user[-1]))
    mem = generate_memories(n_users, (lo, hi), seed=seed).sort("user_id", "started_at", "memory_id")
    vec = encode_distinct(embedder, mem["embedding_text"].to_list())
    return {"n_users": n_users, "n_memories": mem.height, **planted_scores(mem, vec, settings.clustering),
            "seed": seed, "memories_per_user": [lo, hi]}


# ---------------------------------------------------------------------------------------------------------------
# One dataset
# ---------------------------------------------------------------------------------------------------------------

def encode_distinct(embedder, texts: Sequence[str]) -> np.ndarray:
    """Embeddings of ``texts``, each distinct text encoded once."""
    uniq = list(dict.fromkeys(texts))
    index = {t: i for i, t in enumerate(uniq)}
    vec = embedder.encode(uniq) if uniq else np.zeros((0, embedder.dim), np.float32)
    return vec[[index[t] for t in texts]] if texts else vec


def memory_vectors(settings: Settings, con: duckdb.DuckDBPyConnection, memories: pl.DataFrame,
                   granularity: str, embedder) -> np.ndarray:
    """Embeddings aligned with ``memories``: mart memories through the warehouse's embedding store
    (``embed_memories``: only missing ones are encoded, and kept); regrouped memories encoded here."""
    if granularity != "session":
        return normalise(encode_distinct(embedder, memories["text"].to_list()))
    from persona_tasks.embed import embed_memories, embeddings_to_numpy, load_embeddings

    embed_memories(settings, con, memories=memories.select("memory_id", "user_id", pl.col("text").alias("embedding_text")),
                   embedder=embedder)
    e = load_embeddings(con, embedder.model_version, memories["memory_id"].to_list())
    j = memories.select("memory_id").join(e, on="memory_id", how="left", maintain_order="left")
    if j["embedding"].null_count():
        raise EvaluationError("some memories have no embedding after embed_memories")
    return normalise(embeddings_to_numpy(j["embedding"]))


@dataclass
class Bootstrap:
    """The users of each future memory and the resampling weights: intervals for any row or difference."""

    user_index: np.ndarray
    weights: np.ndarray

    def ci(self, values: np.ndarray, mask: np.ndarray | None = None,
           baseline: np.ndarray | None = None) -> list[float]:
        m = slice(None) if mask is None else mask
        return list(bootstrap_ci(values[m], self.user_index[m], self.weights,
                                 None if baseline is None else baseline[m]))


def _metrics_of(q: dict[str, np.ndarray], mask: np.ndarray | None = None,
                boot: Bootstrap | None = None) -> dict[str, float]:
    sel = {k: (v if mask is None else v[mask]) for k, v in q.items()}
    n = int(next(iter(sel.values())).size)
    out = {k: (float(v.mean()) if n else float("nan")) for k, v in sel.items()}
    out["n"] = n
    if boot is not None and n:
        out["hit@10_ci"] = boot.ci(q["hit@10"], mask)
    return out


def score_methods(profiles: dict[str, dict[str, np.ndarray]], fvec: np.ndarray, blocks: list[tuple[str, int, int]],
                  negatives: np.ndarray, popularity: np.ndarray, seed: int,
                  temperatures: dict[str, float] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-query metrics of every method for one set of negatives (``popularity``: each future's count;
    ``temperatures``: the methods scored by a soft maximum)."""
    per_query = {}
    for name, prof in profiles.items():
        pos, neg = rank_futures(prof, fvec, blocks, negatives, (temperatures or {}).get(name))
        per_query[name] = per_query_metrics(pos, neg)
    per_query["popularity"] = per_query_metrics(popularity, popularity[negatives])
    r = np.random.default_rng(seed + 1).random((fvec.shape[0], negatives.shape[1] + 1))
    per_query["random"] = per_query_metrics(r[:, 0], r[:, 1:])
    return per_query


# paired differences reported with bootstrap intervals: (method, baseline, subset) - the goals of docs/results.md
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("multi_extractive", "multi_centroid", "all"),
    ("multi_extractive", "multi_centroid", "novel"),
    ("multi_extractive", "nearest_memory", "novel"),
    ("multi_evidence", "multi_centroid", "all"),
    ("multi_evidence", "multi_centroid", "novel"),
    ("multi_evidence", "nearest_memory", "novel"),
    ("multi_evidence", "single_extractive", "all"),
    ("multi_evidence", "history_centroid", "all"),
    ("multi_extractive", "single_extractive", "all"),
    ("multi_extractive", "history_centroid", "all"),
    ("multi_llm", "multi_extractive", "llm_sample"),
    ("multi_llm", "single_llm", "llm_sample"),
)


def evaluate_dataset(settings: Settings, con: duckdb.DuckDBPyConnection, source: str, embedder,
                     llm_max_users: int | None = None, max_users: int | None = None,
                     llm_inputs_out: Path | None = None, llm: Any = None) -> dict:
    """Run the protocol on one source of the warehouse; returns its section of the results dict.

    ``llm_inputs_out``: write the LLM sample's inputs, as the labeller would see them, to ``<folder>/<source>.json``
    (``labelling.replay``: a GPU worker labels them) and leave the LLM rows out. ``llm``: the LLM labeller to use
    (a ``ReplayLabeller`` of such a worker's labels files); default ``LLMLabeller(settings)``."""
    from persona_tasks.labelling import ExtractiveLabeller
    from persona_tasks.labelling.privacy import PublicTerms

    cfg = settings.evaluation
    llm_max_users = cfg.llm_max_users if llm_max_users is None else llm_max_users
    max_users = cfg.max_users if max_users is None else max_users
    timings: dict[str, float] = {}
    t = time.perf_counter()
    memories, granularity = load_dataset(con, source, cfg, settings.memory_text_max_chars)
    n_users_all = memories["user_id"].n_unique()
    if max_users is not None:
        memories = memories.filter(pl.col("user_id").is_in(stable_sample(memories["user_id"].to_list(), max_users)))
    history, future = split_history_future(memories, cfg.future_fraction, cfg.min_memories)
    if future["user_id"].n_unique() < 2:
        raise EvaluationError(f"{source}: fewer than two users with {cfg.min_memories}+ memories")
    log.info("evaluate %s: %d of %d users evaluable, %d history and %d future memories (granularity %s)",
             source, future["user_id"].n_unique(), n_users_all, history.height, future.height, granularity)
    vec = memory_vectors(settings, con, pl.concat([history, future]), granularity, embedder)
    hvec, fvec = vec[:history.height], vec[history.height:]
    timings["load_embed"] = round(time.perf_counter() - t, 2)

    users = future["user_id"].unique(maintain_order=True).to_list()
    blocks = _blocks(future["user_id"])
    hblocks = {u: (a, b) for u, a, b in _blocks(history["user_id"])}
    # both negatives rules; cfg.negatives is the primary protocol (every table), the other gets its own table
    neg_sets = {
        "any": sample_negatives(future["user_id"], cfg.n_negatives, cfg.seed),
        "unseen": sample_negatives(future["user_id"], cfg.n_negatives, cfg.seed, future["text"],
                                   user_texts(history, future)),
    }
    negatives = neg_sets[cfg.negatives]
    user_codes = {u: i for i, u in enumerate(users)}
    boot = Bootstrap(np.array([user_codes[u] for u in future["user_id"].to_list()], dtype=np.int64),
                     bootstrap_weights(len(users), cfg.bootstrap_samples, cfg.seed + 2))

    # personas from history
    t = time.perf_counter()
    clustering = cluster_history(settings, history, hvec)
    timings["cluster"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    # what the pipeline publishes: words fewer than min_term_users users wrote are masked (labelling/privacy.py)
    terms = PublicTerms.from_texts(history["user_id"], history["text"], settings.labelling.min_term_users)
    ext = ExtractiveLabeller(settings)
    multi_ext = label_and_embed(cluster_inputs(history, clustering.assignments), ext, embedder, terms)
    single_ext = label_and_embed(single_cluster_inputs(history, hvec), ext, embedder, terms)
    timings["label_extractive"] = round(time.perf_counter() - t, 2)
    llm_users = set(stable_sample(users, llm_max_users)) if llm_max_users else set()
    multi_llm = single_llm = None
    llm_stats = None
    if llm_users and llm_inputs_out is not None:
        from persona_tasks.labelling.privacy import mask_clusters
        from persona_tasks.labelling.replay import write_inputs

        mc = cluster_inputs(history, clustering.assignments, llm_users)
        sc = single_cluster_inputs(history, hvec, llm_users)
        path = write_inputs(mask_clusters(mc + sc, terms), Path(llm_inputs_out) / f"{source}.json",
                            meta={"source": source, "users": len(llm_users), "multi": len(mc), "single": len(sc)})
        log.info("evaluate %s: LLM sample inputs (%d clusters of %d users) written to %s; LLM rows left out",
                 source, len(mc) + len(sc), len(llm_users), path)
        llm_users = set()
    if llm_users:
        from persona_tasks.labelling import LLMLabeller

        t = time.perf_counter()
        llm = llm if llm is not None else LLMLabeller(settings)
        mc = cluster_inputs(history, clustering.assignments, llm_users)
        sc = single_cluster_inputs(history, hvec, llm_users)
        both = label_and_embed(mc + sc, llm, embedder, terms)
        multi_llm = HistoryPersonas(mc, both.labels[:len(mc)], both.vecs[:len(mc)])
        single_llm = HistoryPersonas(sc, both.labels[len(mc):], both.vecs[len(mc):])
        for hp in (multi_llm, single_llm):
            for i, c in enumerate(hp.clusters):
                hp.by_user.setdefault(c.user_id, []).append(i)
        llm_stats = llm.stats.as_dict()
        timings["label_llm"] = round(time.perf_counter() - t, 2)

    # profiles of every method
    profiles: dict[str, dict[str, np.ndarray]] = {
        "multi_extractive": multi_ext.profiles(),
        "multi_centroid": centroid_profiles(history, hvec, clustering.assignments),
        **({"multi_evidence": evidence_profiles(multi_ext, history, hvec, cfg.persona_evidence_vectors)}
           if cfg.persona_evidence_vectors else {}),
        "single_extractive": single_ext.profiles(),
        "history_centroid": {u: normalise(hvec[a:b].mean(axis=0))[None, :] for u, (a, b) in hblocks.items()},
        "nearest_memory": {u: hvec[a:b] for u, (a, b) in hblocks.items()},
        "most_recent": {u: hvec[b - 1:b] for u, (a, b) in hblocks.items()},
    }
    if multi_llm is not None:
        profiles["multi_llm"] = multi_llm.profiles()
        profiles["single_llm"] = single_llm.profiles()

    t = time.perf_counter()
    popular = history.group_by("item_key").len()
    counts = future.select("item_key").join(popular, on="item_key", how="left", maintain_order="left")["len"]
    counts = counts.fill_null(0).to_numpy().astype(np.float64)
    soft = {"multi_evidence": cfg.persona_profile_temperature} if cfg.persona_profile_temperature else {}
    per_rule = {rule: score_methods(profiles, fvec, blocks, negs, counts, cfg.seed, soft)
                for rule, negs in neg_sets.items()}
    per_query = per_rule[cfg.negatives]
    timings["rank"] = round(time.perf_counter() - t, 2)

    # subsets: LLM sample, futures that repeat a history text vs novel ones
    fusers = future["user_id"].to_numpy()
    on_sample = np.isin(fusers, list(llm_users)) if llm_users else np.zeros(future.height, dtype=bool)
    hist_pairs = history.select("user_id", "text").unique().with_columns(_rep=pl.lit(True))
    repeat = future.select("user_id", "text").join(hist_pairs, on=["user_id", "text"], how="left",
                                                   maintain_order="left")["_rep"].fill_null(False).to_numpy()
    order = [k for k, _ in METHODS]
    all_methods = {k: _metrics_of(per_query[k], None, boot) for k in order
                   if k in per_query and k not in LLM_METHODS}
    subsets = {"all": None, "novel": ~repeat, "repeat": repeat, "llm_sample": on_sample}
    comparisons = []
    for a_key, b_key, subset in COMPARISONS:
        mask = subsets[subset]
        if a_key not in per_query or b_key not in per_query or (mask is not None and not mask.any()):
            continue
        if subset == "novel" and not repeat.any():
            continue  # every future is novel (MovieLens: a movie is rated once): the "all" row says it
        va, vb = per_query[a_key]["hit@10"], per_query[b_key]["hit@10"]
        m = slice(None) if mask is None else mask
        comparisons.append({"method": a_key, "baseline": b_key, "subset": subset,
                            "delta_hit@10": float((va[m] - vb[m]).mean()), "ci": boot.ci(va, mask, vb)})
    out = {
        "source": source, "granularity": granularity,
        "n_users_total": n_users_all, "n_users": len(users),
        "n_history": history.height, "n_future": future.height, "n_negatives": int(negatives.shape[1]),
        "negatives": cfg.negatives,
        "methods": all_methods,
        "protocols": {rule: {"n_negatives": int(neg_sets[rule].shape[1]),
                             "methods": {k: _metrics_of(q[k], None, boot) for k in order
                                         if k in q and k not in LLM_METHODS}}
                      for rule, q in per_rule.items()},
        "comparisons": comparisons,
        "splits": {
            "repeat": {"n": int(repeat.sum()), "methods": {k: _metrics_of(per_query[k], repeat, boot)
                                                           for k in all_methods}},
            "novel": {"n": int((~repeat).sum()), "methods": {k: _metrics_of(per_query[k], ~repeat, boot)
                                                             for k in all_methods}},
        },
        "timings_s": timings,
    }
    if source == "movielens":
        out["evaluable_users_by_granularity"] = evaluable_users_by_granularity(con, source, cfg,
                                                                               settings.memory_text_max_chars)
    if llm_users:
        out["llm_sample"] = {"n_users": len(llm_users), "n_future": int(on_sample.sum()),
                             "methods": {k: _metrics_of(per_query[k], on_sample, boot) for k in order
                                         if k in per_query}}

    # persona statistics and quality
    t = time.perf_counter()
    a = clustering.assignments
    personas_stats = {
        "coverage": float(a["cluster_id"].is_not_null().mean()),
        "personas_per_user": len(multi_ext.labels) / len(users),
        "clusters_rules": dict(sorted(clustering.users.group_by("rule").len().iter_rows())),
    }
    quality = {"extractive": persona_quality(settings, history, hvec, a, multi_ext, embedder)}
    if multi_llm is not None:
        sample_ext = HistoryPersonas([multi_ext.clusters[i] for u in llm_users for i in multi_ext.by_user.get(u, [])],
                                     [multi_ext.labels[i] for u in llm_users for i in multi_ext.by_user.get(u, [])],
                                     multi_ext.vecs[[i for u in llm_users for i in multi_ext.by_user.get(u, [])]])
        for i, c in enumerate(sample_ext.clusters):
            sample_ext.by_user.setdefault(c.user_id, []).append(i)
        quality["extractive_llm_sample"] = persona_quality(settings, history, hvec, a, sample_ext, embedder)
        quality["llm"] = persona_quality(settings, history, hvec, a, multi_llm, embedder)
        n_fb = sum(bool(lab.fallback) for lab in multi_llm.labels)
        personas_stats["llm"] = {
            "n_users": len(llm_users), "n_personas": len(multi_llm.labels),
            "fallback_rate": n_fb / max(len(multi_llm.labels), 1),
            "single_fallback_rate": sum(bool(lab.fallback) for lab in single_llm.labels) / max(len(single_llm.labels), 1),
            "prompts_per_s": llm_stats.get("prompts_per_s") if llm_stats else None,
            "stats": llm_stats,
        }
    out["personas"] = personas_stats
    out["quality"] = quality
    timings["quality"] = round(time.perf_counter() - t, 2)
    return out


def _sources(con: duckdb.DuckDBPyConnection) -> list[str]:
    try:
        return query_pl(con, "SELECT DISTINCT source FROM marts.intent_memories ORDER BY 1")["source"].to_list()
    except duckdb.Error as exc:
        raise EvaluationError("no marts.intent_memories: ingest and `persona-etl build` first") from exc


def evaluate(settings: Settings, datasets: Sequence[str] | None = None, *, llm_max_users: int | None = None,
             max_users: int | None = None, synth_users: int | None = None,
             con: duckdb.DuckDBPyConnection | None = None, llm_inputs_out: Path | None = None,
             llm_labels: Sequence[Path] | None = None) -> dict:
    """Run the protocol on every dataset (warehouse sources; default all of them) and the planted-persona check.

    ``llm_inputs_out`` / ``llm_labels``: label the LLM sample elsewhere (``evaluate_dataset``; a GPU worker runs
    ``labelling.replay.label_inputs_file`` on the exported inputs) and score its labels here.

    Opens a writer connection (history and future memories missing from ``personas.memory_embeddings`` are
    embedded and stored there, as ``induce`` would); nothing else is written.
    """
    from persona_tasks.embed import embedder_from_settings
    from persona_tasks.warehouse import connect

    cfg = settings.evaluation
    set_threads(settings.threads)
    t0 = time.perf_counter()
    embedder = embedder_from_settings(settings)
    own = con is None
    con = con or connect(settings)
    try:
        available = _sources(con)
        names = list(datasets) if datasets else available
        missing = [d for d in names if d not in available]
        if missing:
            raise EvaluationError(f"no memories of source(s) {missing} in the warehouse (found: {available})")
        results: dict = {
            "protocol": {**cfg.model_dump(), "llm_max_users": cfg.llm_max_users if llm_max_users is None
                         else llm_max_users, "max_users": cfg.max_users if max_users is None else max_users,
                         "session_gap_minutes": settings.session_gap_minutes,
                         "clustering_strategy": settings.clustering.strategy, "ks": list(KS),
                         "min_term_users": settings.labelling.min_term_users,
                         "labelling_decoding": settings.labelling.decoding},
            "model_version": embedder.model_version,
            "reference": load_reference(settings.project_dir),
            "explorations": load_explorations(settings.project_dir),
            **bench_tables(settings.project_dir),
            "labelling_model": settings.labelling.model if settings.labelling.model_path is None
            else str(settings.labelling.model_path),
            "datasets": {},
        }
        llm = None
        if llm_labels:
            from persona_tasks.labelling.replay import ReplayLabeller

            llm = ReplayLabeller(list(llm_labels))
            results["labelling_model"] = llm.model_version
            results["llm_labels_replayed"] = [str(p) for p in llm_labels]
        with Progress("evaluate", total=len(names), unit="datasets") as progress:
            for name in names:
                results["datasets"][name] = evaluate_dataset(settings, con, name, embedder, llm_max_users, max_users,
                                                             llm_inputs_out, llm)
                progress.update(1)
    finally:
        if own:
            con.close()
    n_synth = cfg.synth_users if synth_users is None else synth_users
    if n_synth:
        t = time.perf_counter()
        results["synthetic"] = planted_recovery(settings, embedder, n_synth, cfg.synth_memories_per_user,
                                                cfg.synth_seed)
        results["synthetic"]["seconds"] = round(time.perf_counter() - t, 2)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    return results


# ---------------------------------------------------------------------------------------------------------------
# docs/results.md
# ---------------------------------------------------------------------------------------------------------------

def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _f3(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _ci(m: dict | None, key: str = "hit@10_ci") -> str:
    ci = (m or {}).get(key)
    return "n/a" if not ci or any(v is None or math.isnan(v) for v in ci) else f"{100 * ci[0]:.2f} .. {100 * ci[1]:.2f}"


def _method_table(methods: dict[str, dict], with_n: bool = False) -> list[str]:
    head = "| method | Hit@1 | Hit@10 | Hit@10 95% CI | MRR |" + (" futures |" if with_n else "")
    rows = [head, "|---|---:|---:|---:|---:|" + ("---:|" if with_n else "")]
    for key, name in METHODS:
        m = methods.get(key)
        if m is None:
            continue
        rows.append(f"| {name} | {_pct(m['hit@1'])} | {_pct(m['hit@10'])} | {_ci(m)} | {_pct(m['mrr'])} |"
                    + (f" {m['n']} |" if with_n else ""))
    return rows


REFERENCE_FILE = "data/evaluation/reference_aol.json"


def load_reference(project_dir: Path | str) -> dict | None:
    """The independent reference's figures (data/evaluation/reference_aol.json), or None when absent."""
    path = Path(project_dir) / REFERENCE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _reference_table(d: dict, ref: dict) -> list[str]:
    """The project's rows beside the reference's, on the reference's negatives rule."""
    proto = d.get("protocols", {}).get(ref.get("negatives", "unseen"))
    if not proto:
        return []
    rows = ["| method | this project Hit@10 | reference Hit@10 | difference (points) |", "|---|---:|---:|---:|"]
    for key, name in METHODS:
        if key not in ref["hit@10"] or key not in proto["methods"]:
            continue
        ours = 100 * proto["methods"][key]["hit@10"]
        rows.append(f"| {name}{' (*)' if key in ref.get('notes', {}) else ''} | {ours:.2f} | {ref['hit@10'][key]:.2f} | "
                    f"{ours - ref['hit@10'][key]:+.2f} |")
    return rows


PROFILE_VARIANTS = {
    "text": "one vector per persona: \"label. description\" (the multi-persona row)",
    "label": "the label only",
    "terms": "the description's key terms only",
    "label+examples3": "one vector: the label and the 3 most central memories' texts",
    "label+examples5": "one vector: the label and the 5 most central memories' texts",
    "label+examples10": "one vector: the label and the 10 most central memories' texts",
    "text+examples5": "one vector: label, description and the 5 most central memories' texts",
    "centroid": "the cluster centroids (the multi-centroid row)",
    "centroid+text": "per persona: its centroid and its text vector",
    "text+evidence1": "per persona: its text vector and its most central memory",
    "text+evidence3": "per persona: its text vector and its 3 most central memories",
    "text+evidence5": "per persona: its text vector and its 5 most central memories",
    "text+evidence10": "per persona: its text vector and its 10 most central memories (the text + evidence row)",
    "evidence3": "per persona: its 3 most central memories, no text",
    "evidence5": "per persona: its 5 most central memories, no text",
    "text+evidence_all": "per persona: its text vector and all of its memories",
    "nearest": "every history memory, no persona (the nearest-memory row)",
}


def _exploration_lines(expl: dict) -> list[str]:
    """The persona-profile variants tried (bench/explore_persona_profiles.py), as a table."""
    rows = [f"`bench/explore_persona_profiles.py` on {expl['dataset']} ({expl['n_users']} users, "
            f"{expl['personas_per_user']:.2f} personas per user, negatives {expl['negatives']}; the same clusters and "
            "extractive personas for every variant; `lseT:` = soft maximum T x logsumexp(cos / T) instead of the "
            "maximum):", "",
            "| profile | what each user's profile holds | vectors per user | Hit@10 | repeat Hit@10 | novel Hit@10 |",
            "|---|---|---:|---:|---:|---:|"]
    for name, r in expl["variants"].items():
        base = name.split(":", 1)[-1]
        what = PROFILE_VARIANTS.get(base, base) + (f", soft maximum (T = {name[3:].split(':')[0]})"
                                                   if name.startswith("lse") else "")
        rows.append(f"| {name} | {what} | {r['vectors_per_user']:.1f} | {_pct(r['hit@10'])} | {_pct(r['repeat'])} | "
                    f"{_pct(r['novel'])} |")
    return rows


def load_explorations(project_dir: Path | str) -> dict:
    """bench/results/persona_profiles_<dataset>.json files, by dataset (what was tried for docs/results.md)."""
    out = {}
    for path in sorted((Path(project_dir) / "bench" / "results").glob("persona_profiles_*.json")):
        data = json.loads(path.read_text())
        out[data["dataset"]] = data
    return out


def _bench_results(project_dir: Path | str, pattern: str) -> list[dict]:
    """The bench/results files matching ``pattern``, each with its name under ``file``."""
    out = []
    for path in sorted((Path(project_dir) / "bench" / "results").glob(pattern)):
        data = json.loads(path.read_text())
        data["file"] = path.name
        out.append(data)
    return out


def load_labelling_arms(project_dir: Path | str) -> list[dict]:
    """bench/results/labelling_arms_*.json (bench/bench_labelling_arms.py): the decoding arms and models measured on
    the same history clusters, for docs/results.md."""
    return _bench_results(project_dir, "labelling_arms_*.json")


def load_training_arms(project_dir: Path | str) -> list[dict]:
    """bench/results/training_arms_*.json (bench/bench_training.py): the retrained labeller's arms on the same
    preference groups and held-out clusters, for docs/results.md (issue 13)."""
    return _bench_results(project_dir, "training_arms_*.json")


def bench_tables(project_dir: Path | str) -> dict[str, list[dict]]:
    """The bench results docs/results.md shows beside a run (``labelling_arms``, ``training_arms``): read when the run
    is made, and again when a stored run is re-rendered (``persona-etl evaluate --from-json``)."""
    return {"labelling_arms": load_labelling_arms(project_dir), "training_arms": load_training_arms(project_dir)}


def _arms_lines(files: list[dict]) -> list[str]:
    """One row per model, results file, dataset and decoding arm of bench/bench_labelling_arms.py."""
    rows = ["| model | file | dataset | arm | clusters | fallback rate | objective | truthfulness | alignment | "
            "s per persona | problems (every attempt) |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for d in files:
        model = (d.get("model_version") or "extractive").split("@")[0]
        for src, ds in d["datasets"].items():
            for arm, r in ds["arms"].items():
                q = r.get("quality") or {}
                probs = ", ".join(f"{k} {v}" for k, v in sorted((r.get("problems") or {}).items(),
                                                                key=lambda kv: -kv[1])[:4])
                rows.append(f"| {model} | `{d['file']}` | {src} | {arm} | {r['clusters']} | {r['fallback_rate']:.3f} | "
                            f"{_f3(q.get('objective'))} | {_f3(q.get('truthfulness'))} | {_f3(q.get('alignment'))} | "
                            f"{r['seconds_per_persona']:.2f} | {probs or '-'} |")
    return rows


def llm_sample_summary(results: dict) -> dict[str, dict]:
    """Per dataset, the LLM sample's figures that the labeller's targets read (issues 12 and 13): users, fallback
    rate, objective and truthfulness (LLM / extractive, the same clusters), multi-persona Hit@10 (LLM labels /
    extractive labels, the same users) and their paired difference with its 95% CI."""
    out: dict[str, dict] = {}
    for name, d in results["datasets"].items():
        q, s = d.get("quality", {}), d.get("llm_sample")
        if "llm" not in q or not s:
            continue
        ql, qe = q["llm"], q["extractive_llm_sample"]
        comp = next((c for c in d.get("comparisons", []) if c["method"] == "multi_llm"
                     and c["baseline"] == "multi_extractive"), None)
        out[name] = {"users": d["personas"]["llm"]["n_users"],
                     "fallback_rate": d["personas"]["llm"].get("fallback_rate") or 0.0,
                     "objective": ql.get("objective"), "objective_extractive": qe.get("objective"),
                     "truthfulness": ql.get("truthfulness"), "truthfulness_extractive": qe.get("truthfulness"),
                     "hit@10": s["methods"]["multi_llm"]["hit@10"],
                     "hit@10_extractive": s["methods"]["multi_extractive"]["hit@10"],
                     "hit@10_diff": comp["delta_hit@10"] if comp else None, "hit@10_diff_ci": comp["ci"] if comp else None}
    return out


def _labeller_target_lines(results: dict) -> list[str]:
    """The untrained LLM labeller's targets on each dataset's LLM sample: fallback at most 10%, objective and
    truthfulness at least the extractive labeller's on the same clusters, multi-persona Hit@10 at least the
    extractive labels' on the same users."""
    rows = ["| dataset | users | LLM fallback rate (target <= 0.10) | objective LLM / extractive | truthfulness LLM / "
            "extractive | multi-persona Hit@10 LLM / extractive | paired difference (95% CI) | targets met |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, m in llm_sample_summary(results).items():
        met = {"fallback": m["fallback_rate"] <= 0.10,
               "objective": (m["objective"] or 0) >= (m["objective_extractive"] or 0),
               "truthfulness": (m["truthfulness"] or 0) >= (m["truthfulness_extractive"] or 0),
               "Hit@10": m["hit@10"] >= m["hit@10_extractive"]}
        verdict = "all" if all(met.values()) else "not " + ", ".join(k for k, v in met.items() if not v)
        rows.append(f"| {name} | {m['users']} | {m['fallback_rate']:.3f} | {_f3(m['objective'])} / "
                    f"{_f3(m['objective_extractive'])} | {_f3(m['truthfulness'])} / {_f3(m['truthfulness_extractive'])} | "
                    f"{_pct(m['hit@10'])} / {_pct(m['hit@10_extractive'])} | {_diff_ci(m)} | {verdict} |")
    return rows if len(rows) > 2 else []


def _diff_ci(m: dict) -> str:
    if m.get("hit@10_diff") is None:
        return "-"
    lo, hi = m["hit@10_diff_ci"]
    return f"{100 * m['hit@10_diff']:+.2f} ({100 * lo:+.2f} .. {100 * hi:+.2f})"


# issue 13's targets for a promoted labeller: fallback at most this, objective above the untrained labeller's with
# the paired 95% CI clear of zero, multi-persona Hit@10 at least the extractive labels' on the same users
TRAINED_MAX_FALLBACK = 0.05


def _arm_evaluations(arm: dict) -> list[dict]:
    """An arm's attached evaluations (``bench_training.py --attach-eval``), each {dataset: llm_sample_summary}:
    ``evals`` per evaluation file, or the one ``eval`` of files written before evaluations were kept per file."""
    if arm.get("evals"):
        return list(arm["evals"].values())
    return [arm["eval"]] if arm.get("eval") else []


def _training_arms_lines(files: list[dict]) -> list[str]:
    """One row per results file and arm of bench/bench_training.py: training cost, held-out quality against the
    untrained labeller (paired over the same clusters: the run's base arm, else the current labeller measured with
    the groups), and the evaluation's Hit@10 where the arm labelled the evaluation's LLM sample."""
    rows = ["| file | arm | optimiser steps x groups | learning rate | train s (s per step) | peak RSS GB | "
            "held-out clusters | fallback | objective | truthfulness | alignment | objective vs untrained (95% CI) | "
            "Hit@10 arm / extractive (users) | targets met |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for d in files:
        for arm, r in d.get("arms", {}).items():
            h = r.get("heldout")
            if not h:
                continue
            # against the run's own base arm when it has one (the untrained model under the same decoding), else
            # against the current labeller's labels of the same clusters (current.json)
            v = r.get("heldout_vs_base") or r.get("heldout_vs_current") or {}
            ci = v.get("ci") or [None, None]
            vs = (f"{v['mean']:+.4f} ({ci[0]:+.4f} .. {ci[1]:+.4f})" if v.get("mean") is not None else "-")
            evals = _arm_evaluations(r)
            hits = "; ".join(f"{name} {_pct(e['hit@10'])} / {_pct(e['hit@10_extractive'])} ({e['users']} users, "
                             f"{_diff_ci(e)})" for ev in evals for name, e in ev.items()) or "-"
            # per dataset, the evaluation on the most users decides the Hit@10 target
            ev = {}
            for e in evals:
                ev.update({name: m for name, m in e.items() if m["users"] >= ev.get(name, {"users": -1})["users"]})
            if arm == "base":
                verdict = "- (untrained)"
            else:
                met = {"fallback": h["fallback_rate"] <= TRAINED_MAX_FALLBACK,
                       "objective": ci[0] is not None and ci[0] > 0}
                if ev:
                    met["Hit@10"] = all(e["hit@10"] >= e["hit@10_extractive"] for e in ev.values())
                verdict = "all" if all(met.values()) else "not " + ", ".join(k for k, ok in met.items() if not ok)
            steps = f"{r.get('steps', 0)} x {d.get('groups_per_batch', '?')}" if r.get("steps") else "-"
            lr = f"{d['learning_rate']:g}" if d.get("learning_rate") and r.get("steps") else "-"
            train = f"{r['train_seconds']:.0f} ({r['seconds_per_step']:.1f})" if r.get("steps") else "-"
            # the arm's peak: training's (kept with a reused adapter) or the labelling process's, whichever is higher
            peak = max(r.get("peak_rss_mb") or 0, r.get("peak_rss_mb_after_train") or 0)
            name = f"{arm} (adapter trained earlier)" if r.get("adapter_reused") else arm
            rows.append(f"| `{d['file']}` | {name} | {steps} | {lr} | {train} | {peak / 1024:.1f} | "
                        f"{h['clusters']} | {h['fallback_rate']:.3f} | {_f3(h['objective'])} | "
                        f"{_f3(h['truthfulness'])} | {_f3(h['alignment'])} | {vs} | {hits} | {verdict} |")
    return rows if len(rows) > 2 else []


def _comparison_lines(d: dict) -> list[str]:
    names = dict(METHODS)
    out = ["| method | baseline | futures | Hit@10 difference (points) | 95% CI (paired bootstrap over users) | clear of zero |",
           "|---|---|---|---:|---:|---|"]
    for c in d.get("comparisons", []):
        lo, hi = c["ci"]
        clear = "yes, above" if lo > 0 else ("yes, below" if hi < 0 else "no")
        out.append(f"| {names[c['method']]} | {names[c['baseline']]} | {c['subset'].replace('_', ' ')} | "
                   f"{100 * c['delta_hit@10']:+.2f} | {100 * lo:+.2f} .. {100 * hi:+.2f} | {clear} |")
    return out if len(out) > 2 else []


def _verdict(methods: dict[str, dict], multi: str, single: str) -> str:
    a, b, c = methods.get(multi), methods.get(single), methods.get("multi_centroid")
    if not a or not b:
        return ""
    d = 100 * (a["hit@10"] - b["hit@10"])
    s = (f"multi-persona {'beats' if d > 0 else 'does not beat'} single-persona on Hit@10 "
         f"({_pct(a['hit@10'])} vs {_pct(b['hit@10'])}, {d:+.2f} points)")
    if c:
        g = 100 * (c["hit@10"] - a["hit@10"])
        s += (f"; multi-centroid (no text) is {abs(g):.2f} points {'above' if g > 0 else 'below'} the text personas "
              f"({_pct(c['hit@10'])})")
    best = max(methods, key=lambda k: methods[k]["hit@10"])
    s += f"; best Hit@10: {dict(METHODS)[best]} ({_pct(methods[best]['hit@10'])})"
    return s


NEGATIVES_RULES = {
    "unseen": "Negatives: other users' future memories whose text occurs nowhere among the user's own memories "
              "(history or future): the usual implicit-feedback rule (a candidate the user did have is never "
              "counted as wrong), and the independent reference's.",
    "any": "Negatives: any future memory of another user, even one whose text the user also had (the protocol "
           "before 2026-12; a user who searched `google` is then penalised for another user's `google`).",
}

GRANULARITY = {
    "session": "one memory per session of `marts.intent_memories` (gap > {gap} min or UTC midnight starts a new one)",
    "movie": "one memory per rating of at least {r} (one per rated movie; evaluation-side regrouping of "
             "`staging.stg_events`, text `Title (year) [genres]` from `content_text`, the rating value dropped)",
    "day": "one memory per user and UTC day of ratings of at least {r} (evaluation-side regrouping of "
           "`staging.stg_events`)",
}


def render_results(results: dict) -> str:
    """docs/results.md from the dict of ``evaluate`` (every table; nothing typed by hand)."""
    p = results["protocol"]
    L: list[str] = [
        "# Results: future interaction prediction",
        "",
        "Generated by `persona-etl evaluate --json results.json --write-docs` (persona_tasks/evaluate.py) from the "
        "warehouse; do not edit by hand. Embedding model: `" + results["model_version"] + "`; clustering strategy: `"
        + str(p["clustering_strategy"]) + f"`; total run time {results.get('seconds', 0):.0f} s on CPU.",
        "",
        *([results["run_note"], ""] if results.get("run_note") else []),
        "## Protocol",
        "",
        "1. **Memories.** Each dataset is one `source` of the warehouse. Granularity per dataset is given with its "
        "table. A memory's text (what is embedded, clustered, labelled and compared) is what the user meant: "
        "`marts.intent_memories.embedding_text` (the session's distinct queries and item titles, no `searched:` / "
        "`clicked:` template words, no clicked sites), not the display text `memory_text`.",
        f"2. **Split.** Per user, memories ordered by `started_at` then `memory_id`; the last "
        f"max(1, floor({p['future_fraction']} x n)) memories are the *future*, the rest the *history*. Users with "
        f"fewer than {p['min_memories']} memories are left out.",
        "3. **Personas from history only.** The history memories' embeddings are clustered per user "
        "(`persona_tasks.cluster`, configured strategy); each cluster is labelled (extractive labeller for every "
        "user; LLM labeller for a fixed sample, below); each persona is embedded as `\"label. description\"` with the "
        "same sentence embedder as the memories. As in the pipeline, the labellers see the history texts with every "
        f"word that fewer than {p.get('min_term_users', 1)} users' histories contain masked as `[rare]` "
        "(k-anonymous persona terms, docs/privacy.md; 1 = none masked).",
        f"4. **Candidates.** Each future memory is ranked among itself and {p['n_negatives']} negatives sampled "
        f"without replacement (numpy `default_rng({p['seed']})`) from the future memories of *other* users. "
        + NEGATIVES_RULES.get(p.get("negatives", "any"), "") + f" (`[evaluation] negatives = \"{p.get('negatives', 'any')}\"`; "
        "the other rule's table is shown too.)",
        "5. **Scores.** A candidate's score is its maximum cosine similarity to any vector of the user's profile: "
        "*multi-persona*: the persona text embeddings; *multi-persona text + evidence*: per persona its text "
        f"embedding and the embeddings of its {p.get('persona_evidence_vectors', 0)} most central evidence memories "
        "(what a published persona links to), scored by the soft maximum T log(sum(exp(cos / T))) with T = "
        f"{p.get('persona_profile_temperature')} (a candidate close to several of the profile's vectors ranks above "
        "one close to a single vector); *multi-centroid*: the same clusters' embedding centroids "
        "(no text: the ceiling of what the labels could carry); *single persona*: one persona labelled from all "
        "history as one cluster; *history centroid*: the mean history embedding; *nearest history memory*: every "
        "history memory (no summary at all); *most recent memory*: the last history memory. *Popularity* scores a "
        "candidate by how often its item (AOL: the memory's text; MovieLens: the movie) occurs in all evaluated "
        f"users' histories; *random* by a uniform draw (seed {p['seed'] + 1}).",
        "6. **Metrics.** Hit@1, Hit@10 and MRR of the future memory's rank among the candidates, averaged over "
        "future memories (micro average), in percent. Tied candidates are ordered uniformly at random *in "
        "expectation* (exact expected Hit@k and reciprocal rank), so the numbers are deterministic and a constant "
        "score gets the random expectation (Hit@10 = 10 %, MRR = 5.19 % with 100 candidates). Intervals: 95 % "
        f"percentile intervals of a bootstrap over users ({p.get('bootstrap_samples', 0)} resamples; a user's "
        "futures stay together); differences between two methods are paired (the same resampled users).",
        f"7. **LLM sample.** The LLM labeller (the configured model, default SmolLM2-135M-Instruct, decoding arm "
        f"`{p.get('labelling_decoding', 'free')}`, docs/labelling.md; on CPU it manages about one prompt per second "
        f"at best, throughput below) labels the history clusters of a fixed sample "
        f"of {p['llm_max_users']} evaluable users per dataset (the first by md5 of user_id), single persona included; "
        "its rows are reported on that sample next to every other method on the same users' futures. Its personas "
        "that fail validation after the configured attempts are extractive fallbacks (rate below)."
        + (f" In this run the LLM sample was labelled outside the evaluation: its inputs, exported by `persona-etl "
           f"evaluate --export-llm-inputs`, were labelled by `labelling.replay.label_inputs_file` (on a GPU machine "
           f"by `bench/gpu_session.py`; the run note above says where, model `{results.get('labelling_model')}`) "
           f"and the labels replayed here by input digest (`persona-etl evaluate --llm-labels`, "
           f"persona_tasks/labelling/replay.py); its prompts/s are those of the labelling run."
           if results.get("llm_labels_replayed") else ""),
        "",
    ]
    verdicts = []
    for name, d in results["datasets"].items():
        gran = GRANULARITY.get(d["granularity"], d["granularity"]).format(gap=p["session_gap_minutes"],
                                                                         r=p["movielens_min_rating"])
        L += [f"## {name}", "",
              f"Granularity: {gran}. {d['n_users']} of {d['n_users_total']} users evaluable ({d['n_history']} history, "
              f"{d['n_future']} future memories, {d['n_negatives']} negatives each).", "",
              ]
        if d.get("evaluable_users_by_granularity"):
            e = d["evaluable_users_by_granularity"]
            L += [f"Users with {p['min_memories']}+ memories by granularity: one per rated movie {e['movie']}, one per "
                  f"day of ratings {e['day']}, sessions of the mart ({p['session_gap_minutes']}-minute gap, every "
                  f"rating) {e['session']}, of {d['n_users_total']}: ratings come in bursts, so sessions leave most "
                  "users out; the per-movie granularity is used.", ""]
        rule = d.get("negatives", "any")
        L += [f"### All evaluable users (negatives: {rule})", ""]
        L += _method_table(d["methods"])
        v = _verdict(d["methods"], "multi_extractive", "single_extractive")
        if v:
            verdicts.append(f"- {name}, all users (extractive): {v}; "
                            f"{d['personas']['personas_per_user']:.2f} personas per user.")
        L.append("")
        for other, proto in d.get("protocols", {}).items():
            if other == rule:
                continue
            L += [f"### All evaluable users (negatives: {other}, {proto['n_negatives']} each)", "",
                  NEGATIVES_RULES[other], ""]
            L += _method_table(proto["methods"])
            L.append("")
        ref = results.get("reference")
        if ref and ref.get("dataset") == name:
            tab = _reference_table(d, ref)
            if tab:
                L += [f"### Agreement with an independent reference (negatives: {ref.get('negatives')})", "",
                      ref["what"] + f" Source: {ref['provenance']}.", "", *tab, ""]
                L += [f"(*) {ref['notes'][k]}." for k in ref.get("notes", {}) if k in ref["hit@10"]] + [""]
        comp = _comparison_lines(d)
        if comp:
            L += [f"### Paired differences (negatives: {rule})", "", *comp, ""]
        expl = results.get("explorations", {}).get(name)
        if expl:
            L += ["### What a persona profile holds: variants tried", "", *_exploration_lines(expl), ""]
        sp = d.get("splits", {})
        if sp and sp["repeat"]["n"]:
            L += [f"### Futures that repeat a history memory's text ({sp['repeat']['n']}) vs novel ones "
                  f"({sp['novel']['n']})", "",
                  "| method | repeat Hit@1 | repeat Hit@10 | repeat MRR | novel Hit@1 | novel Hit@10 | novel MRR |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
            for key, label in METHODS:
                r, n = sp["repeat"]["methods"].get(key), sp["novel"]["methods"].get(key)
                if r is None:
                    continue
                L.append(f"| {label} | {_pct(r['hit@1'])} | {_pct(r['hit@10'])} | {_pct(r['mrr'])} | "
                         f"{_pct(n['hit@1'])} | {_pct(n['hit@10'])} | {_pct(n['mrr'])} |")
            L.append("")
        if "llm_sample" in d:
            s = d["llm_sample"]
            L += [f"### LLM sample: {s['n_users']} users, {s['n_future']} future memories (every row on the same "
                  "users)", ""]
            L += _method_table(s["methods"])
            v = _verdict(s["methods"], "multi_llm", "single_llm")
            if v:
                fb = d["personas"].get("llm", {}).get("fallback_rate")
                verdicts.append(f"- {name}, LLM sample (LLM labeller): {v}"
                                + (f" (caution: {_pct(fb)} % of the LLM multi-personas are extractive fallbacks, "
                                   f"{s['n_future']} futures)" if fb is not None else "") + ".")
            L.append("")
        ps, q = d["personas"], d["quality"]
        L += ["### Personas of the history", "",
              "| personas | users | personas per user | coverage | cohesion | alignment | truthfulness | objective "
              "| LLM fallback rate |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

        def qrow(label: str, qq: dict, users: int, ppu: str, fb: str) -> str:
            return (f"| {label} | {users} | {ppu} | {_f3(ps['coverage'])} | {_f3(qq.get('cohesion'))} | "
                    f"{_f3(qq.get('alignment'))} | {_f3(qq.get('truthfulness'))} | {_f3(qq.get('objective'))} | {fb} |")

        L.append(qrow("extractive, all users", q["extractive"], d["n_users"], f"{ps['personas_per_user']:.2f}", "-"))
        if "llm" in q:
            lm = ps["llm"]
            L.append(qrow("extractive, LLM sample", q["extractive_llm_sample"], lm["n_users"],
                          f"{lm['n_personas'] / max(lm['n_users'], 1):.2f}", "-"))
            L.append(qrow("LLM, LLM sample", q["llm"], lm["n_users"], f"{lm['n_personas'] / max(lm['n_users'], 1):.2f}",
                          f"{_pct(lm['fallback_rate'])} %"))
        L += ["", "Coverage: share of history memories in some cluster (the rest are unassigned noise). Scores: "
              "docs/quality.md (cohesion, alignment, truthfulness in [0, 1]; objective their weighted mean)."
              + (f" LLM: {ps['llm']['stats'].get('prompts', '?')} prompts at "
                 f"{ps['llm']['stats'].get('prompts_per_s', '?')} prompts/s; single-persona fallback rate "
                 f"{_pct(ps['llm']['single_fallback_rate'])} %." if "llm" in ps and ps["llm"].get("stats") else ""),
              ""]
    syn = results.get("synthetic")
    if syn:
        L += ["## Planted personas (synthetic logs)", "",
              f"`persona_tasks.synth.generate_memories({syn['n_users']} users, {syn['memories_per_user'][0]}-"
              f"{syn['memories_per_user'][1]} memories each, seed {syn['seed']})`, clustered with the configured "
              "strategy; per-user ARI / NMI against the planted personas (unassigned memories as singletons), "
              "averaged over users.", "",
              "| users | memories | planted personas per user | clusters per user | ARI | NMI |",
              "|---:|---:|---:|---:|---:|---:|",
              f"| {syn['n_users']} | {syn['n_memories']} | {syn['planted_per_user']:.2f} | "
              f"{syn['clusters_per_user']:.2f} | {_f3(syn['ari'])} | {_f3(syn['nmi'])} |", ""]
    arms, targets = results.get("labelling_arms") or [], _labeller_target_lines(results)
    if arms or targets:
        L += ["## LLM labeller: decoding arms, model and targets", "",
              f"This run's labeller: model `{results.get('labelling_model', 'smollm2-135m')}`, decoding arm "
              f"`{p.get('labelling_decoding', 'free')}` (`[labelling] model`, `[labelling] decoding`; docs/labelling.md "
              "says what each arm is and why the default was chosen)."]
        if arms:
            L += ["", "Arms measured by `bench/bench_labelling_arms.py` on the same history clusters of the first users "
                  "by md5 of each sample (evaluation futures never shown; a `_subsetN` file labels the first N of "
                  "them); quality from `persona_tasks.quality` with the persona's own evidence:", "",
                  *_arms_lines(arms)]
        if targets:
            L += ["", "Targets of the untrained LLM labeller on this evaluation's LLM sample (the same clusters and "
                  "users for both labellers):", "", *targets]
        L.append("")
    trained = _training_arms_lines(results.get("training_arms") or [])
    if trained:
        L += ["## The retrained labeller: training arms", "",
              "Arms of `bench/bench_training.py` on the same preference groups (docs/training.md): the untrained "
              "model (base), SFT on each group's best valid candidate (trl's SFTTrainer), pairwise DPO (trl's "
              "DPOTrainer, best against each other candidate), pairwise_shared (the same pairs and loss on our "
              "trainer, each prompt run once) and groupwise DPO (ours, Plackett-Luce); LoRA "
              "adapters. Each arm labels the same held-out clusters (users never trained on); \"objective vs "
              "untrained\" is the paired mean difference over those clusters against the untrained labeller's labels "
              "(bootstrap 95% CI): the same file's base arm, decoded as the arm is, where the file has one; otherwise "
              "(and on the base row) the current labeller's labels of the same clusters, measured when the groups were built or again on fresh held-out clusters (`--remeasure-current`). \"Adapter trained earlier\": an "
              "adapter of an earlier file's run, scored again under the decoding of this one. Where an arm also "
              "labelled this evaluation's LLM sample, its multi-persona Hit@10 is given next to the extractive labels' on the same users. Targets of a promoted labeller (issue 13): "
              f"fallback at most {TRAINED_MAX_FALLBACK:.2f}, objective above the untrained labeller's with the CI "
              "clear of zero, Hit@10 at least the extractive labels'.", "", *trained, ""]
    if verdicts:
        L += ["## Does multi-persona beat single-persona?", "", *verdicts, "",
              "The source paper reports AOL Hit@10 = 40.18 for multi-persona under a protocol it does not publish; "
              "the numbers above are not comparable to it beyond their direction.", ""]
    return "\n".join(L).rstrip() + "\n"


def write_results_doc(results: dict, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_results(results))
    return path


def write_json(results: dict, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    return path


__all__ = [
    "METHODS", "EvaluationError", "HistoryPersonas", "centroid_profiles", "cluster_history", "cluster_inputs",
    "evaluable_users_by_granularity", "evaluate", "evaluate_dataset", "induce_history_personas", "load_dataset", "max_similarity",
    "per_query_metrics", "persona_quality", "planted_recovery", "rank_futures", "ranking_metrics",
    "bench_tables", "llm_sample_summary", "load_training_arms", "render_results", "sample_negatives", "split_history_future", "write_json",
    "write_results_doc",
]
