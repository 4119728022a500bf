"""Preference groups for labeller training, from published runs: K sampled candidates per cluster, validated,
scored with the quality objective, ranked, stored (``training.preference_groups`` / ``preference_candidates``).

Which clusters (``load_training_clusters``): the published personas (``personas.persona_history``) valid at
``as_of`` of each user with a persona version published in the window ``[as_of - window_days + 1, as_of]``; a cluster is the persona's evidence
(``personas.persona_evidence``) with the memories' ``embedding_text``. Never an evaluation future: per (source,
user) every memory from the start of the user's evaluation future on (``persona_tasks.evaluate``'s split, same
settings) is removed. Users are split by ``md5(seed:user_id)``: a ``[training] holdout_fraction`` of them is
held out (never trained on; the promotion gate labels their clusters). Clusters whose persona is flagged in a
special category are left out (``exclude_sensitive``). Users are taken in a stable md5 order, all their clusters
at once (the skeleton arm contrasts a cluster with the user's others), up to ``max_clusters``.

Privacy: before the model sees a cluster, every word fewer than ``[labelling] min_term_users`` users wrote is
masked (``labelling.privacy``, counted over the warehouse up to ``as_of``) and the prompt scrubs PII
(``labelling.prompt``); the stored prompt is that masked text. Nothing here logs memory text.

Ranking: a candidate that fails validation ranks last (tied with the other invalid ones); valid candidates rank
by objective (``persona_tasks.quality.score_user``, the scorer of the pipeline, against the user's evidence
memories of the run), ties within ``[training] tie_tolerance``. A group is dropped (kept in the table with
``dropped_reason``) when its candidates barely differ (largest word-set Jaccard distance below
``min_candidate_distance``: ``near_duplicate``) or when all are tied (``no_preference``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any

import numpy as np
import polars as pl

from persona_tasks.config import Settings
from persona_tasks.errors import PersonaEtlError
from persona_tasks.labelling.types import ClusterInput
from persona_tasks.train.loss import ranks_from_scores
from persona_tasks.warehouse import query_pl, transaction
from persona_tasks.sampling import stable_sample

log = logging.getLogger(__name__)

GROUPS_DDL = """
CREATE SCHEMA IF NOT EXISTS training;
CREATE TABLE IF NOT EXISTS training.preference_groups (
    build_id         VARCHAR   NOT NULL,   -- one build of groups (persona-etl train / the retrain DAG)
    group_id         VARCHAR   NOT NULL,   -- md5 of build_id, user_id, run_date, cluster_id
    user_id          VARCHAR   NOT NULL,
    source           VARCHAR,
    run_date         DATE      NOT NULL,   -- the published run the cluster comes from
    cluster_id       INTEGER   NOT NULL,
    prompt           VARCHAR   NOT NULL,   -- the rendered prompt (k-anonymous masking and PII scrubbing applied)
    prompt_version   VARCHAR   NOT NULL,
    local_ids        JSON      NOT NULL,   -- {"m1": memory_id, ...}: the memories shown
    decoding         VARCHAR   NOT NULL,   -- the labeller's decoding arm
    temperature      DOUBLE    NOT NULL,
    n_candidates     INTEGER   NOT NULL,
    n_valid          INTEGER   NOT NULL,
    labeller_version VARCHAR   NOT NULL,   -- model_version of the labeller that wrote the candidates
    dropped_reason   VARCHAR,              -- NULL = used for training; near_duplicate | no_preference | too_few
    created_at       TIMESTAMP NOT NULL    -- UTC
);
CREATE TABLE IF NOT EXISTS training.preference_candidates (
    build_id         VARCHAR   NOT NULL,
    group_id         VARCHAR   NOT NULL,
    candidate        INTEGER   NOT NULL,   -- 0..K-1
    completion       VARCHAR   NOT NULL,   -- generated text after the prompt (prompt + completion = the sequence)
    is_valid         BOOLEAN   NOT NULL,
    problems         VARCHAR[] NOT NULL,   -- validation problems (empty when valid)
    label            VARCHAR,              -- the validated persona (NULL when invalid)
    description      VARCHAR,
    cohesion         DOUBLE,               -- quality scores of a valid candidate (docs/quality.md)
    alignment        DOUBLE,
    truthfulness     DOUBLE,
    objective        DOUBLE,
    rank             INTEGER   NOT NULL    -- 0 = best; equal = tied; invalid candidates share the last rank
);
"""


class GroupsError(PersonaEtlError):
    """Preference groups cannot be built (no published runs in the window, no model)."""


def _md5_unit(text: str) -> float:
    return int(hashlib.md5(text.encode()).hexdigest()[:12], 16) / float(1 << 48)


def is_heldout(user_id: str, settings: Settings) -> bool:
    """Held-out users (the gate's) by a stable hash; the rest may be trained on."""
    t = settings.training
    return _md5_unit(f"{t.seed}:{user_id}") < t.holdout_fraction


# ---------------------------------------------------------------------------------------------------------------
# Clusters of published runs
# ---------------------------------------------------------------------------------------------------------------

def evaluation_future_starts(settings: Settings, con: Any) -> pl.DataFrame:
    """``source, user_id, future_start``: when each user's evaluation future begins (``persona_tasks.evaluate``)."""
    from persona_tasks import evaluate as E

    frames = []
    for source in query_pl(con, "SELECT DISTINCT source FROM marts.intent_memories")["source"].to_list():
        mem, _ = E.load_dataset(con, source, settings.evaluation, settings.memory_text_max_chars)
        _, future = E.split_history_future(mem, settings.evaluation.future_fraction, settings.evaluation.min_memories)
        frames.append(future.group_by("user_id").agg(pl.col("started_at").min().alias("future_start"))
                      .with_columns(source=pl.lit(source)))
    if not frames:
        return pl.DataFrame(schema={"user_id": pl.String, "future_start": pl.Datetime("us"), "source": pl.String})
    return pl.concat(frames, how="vertical_relaxed")


@dataclass
class UserContext:
    """One user's evidence memories of the run: what a candidate is scored against."""

    memory_ids: list[str]
    texts: list[str]
    labels: np.ndarray
    vecs: np.ndarray


@dataclass
class TrainingClusters:
    as_of: date
    window: tuple[date, date]
    clusters: list[ClusterInput]            # real texts (scored against), most central first
    masked: list[ClusterInput]              # what the model sees
    split: list[str]                        # "train" | "heldout"
    run_date: list[date]
    source: list[str | None]
    users: dict[str, UserContext]
    n_future_memories_removed: int = 0
    n_sensitive_clusters: int = 0

    def subset(self, split: str, max_clusters: int) -> list[int]:
        """Indices of ``split`` clusters: whole users in a stable md5 order until ``max_clusters`` are reached."""
        idx = [i for i, s in enumerate(self.split) if s == split]
        by_user: dict[str, list[int]] = {}
        for i in idx:
            by_user.setdefault(self.clusters[i].user_id, []).append(i)
        out: list[int] = []
        for u in stable_sample(by_user, None):
            if len(out) >= max_clusters:
                break
            out.extend(by_user[u])
        return out[:max_clusters]


def load_training_clusters(settings: Settings, con: Any, as_of: date | None = None, embedder: Any = None
                           ) -> TrainingClusters:
    """The clusters of the published runs in the training window (module docstring), both splits."""
    from persona_tasks.embed import embedder_from_settings, embeddings_to_numpy
    from persona_tasks.labelling.privacy import mask_clusters, public_terms

    embedder = embedder or embedder_from_settings(settings)
    if as_of is None:
        row = con.execute("SELECT max(run_date) FROM personas.induction_runs WHERE published_at IS NOT NULL").fetchall()
        if not row or row[0][0] is None:
            raise GroupsError("no published personas: run the daily DAG (or `persona-etl induce`) first")
        as_of = row[0][0]
    start = as_of - timedelta(days=settings.training.window_days - 1)
    frame = query_pl(con, """
        SELECT p.user_id, p.valid_from AS run_date, p.cluster_id,
               coalesce(len(p.sensitive_categories), 0) > 0 AS sensitive,
               e.memory_id, coalesce(e.centrality, 0.0) AS centrality, coalesce(m.embedding_text, '') AS text,
               m.started_at, m.source, me.embedding
        -- the personas valid at the window's end of the users with a version published in the window
        FROM personas.persona_history p
        JOIN personas.persona_evidence e ON e.persona_id = p.persona_id AND e.version = p.version
        JOIN marts.intent_memories m ON m.memory_id = e.memory_id
        LEFT JOIN personas.memory_embeddings me ON me.memory_id = e.memory_id AND me.model_version = $v
        WHERE p.valid_from <= $b AND (p.valid_to IS NULL OR p.valid_to > $b) AND p.user_id IN
              (SELECT user_id FROM personas.persona_history WHERE valid_from BETWEEN $a AND $b)
        """, {"a": start, "b": as_of, "v": embedder.model_version})
    if frame.is_empty():
        raise GroupsError(f"no published personas with run_date in {start}..{as_of}")
    n0 = frame.height
    cuts = evaluation_future_starts(settings, con)
    frame = (frame.join(cuts, on=["source", "user_id"], how="left")
             .filter(pl.col("future_start").is_null() | (pl.col("started_at") < pl.col("future_start")))
             .drop("future_start"))
    removed = n0 - frame.height
    frame = frame.sort(["user_id", "cluster_id", "centrality", "memory_id"], descending=[False, False, True, False])
    # embeddings: stored ones, the rest encoded here (same model)
    missing = frame["embedding"].is_null()
    vecs = np.zeros((frame.height, embedder.dim), np.float32)
    if (~missing).any():
        vecs[(~missing).to_numpy()] = embeddings_to_numpy(frame.filter(~missing)["embedding"])
    if missing.any():
        vecs[missing.to_numpy()] = embedder.encode(frame.filter(missing)["text"].to_list())
    frame = frame.drop("embedding").with_row_index("row")
    users: dict[str, UserContext] = {}
    for (u,), g in frame.group_by(["user_id"], maintain_order=True):
        rows = g["row"].to_numpy()
        users[u] = UserContext(g["memory_id"].to_list(), g["text"].to_list(), g["cluster_id"].to_numpy(),
                               vecs[rows])
    clusters, split, run_dates, sources = [], [], [], []
    n_sensitive = 0
    for (u, cid), g in frame.group_by(["user_id", "cluster_id"], maintain_order=True):
        if settings.training.exclude_sensitive and bool(g["sensitive"][0]):
            n_sensitive += 1
            continue
        clusters.append(ClusterInput(user_id=u, cluster_id=str(cid), memory_ids=g["memory_id"].to_list(),
                                     memory_texts=g["text"].to_list(), centrality=g["centrality"].to_list()))
        split.append("heldout" if is_heldout(u, settings) else "train")
        run_dates.append(g["run_date"][0])
        sources.append(g["source"][0])
    masked = mask_clusters(clusters, public_terms(con, as_of, settings.labelling.min_term_users))
    log.info("training clusters %s..%s: %d clusters of %d users (%d held out); %d evaluation-future memories and "
             "%d sensitive clusters left out", start, as_of, len(clusters), len(users), split.count("heldout"),
             removed, n_sensitive)
    return TrainingClusters(as_of, (start, as_of), clusters, masked, split, run_dates, sources, users, removed,
                            n_sensitive)


# ---------------------------------------------------------------------------------------------------------------
# Scoring personas of clusters
# ---------------------------------------------------------------------------------------------------------------

def score_personas(settings: Settings, embedder: Any, data: TrainingClusters,
                   items: list[tuple[int, str, str]]) -> dict[str, np.ndarray]:
    """Quality scores of personas ``(cluster index, label, description)`` against their users' evidence memories
    (several personas of one cluster are scored independently). Arrays aligned with ``items``."""
    from threadpoolctl import threadpool_limits

    from persona_tasks.quality import SCORES, embed_claims, score_user, split_claims

    out = {k: np.full(len(items), np.nan) for k in (*SCORES, "objective")}
    if not items:
        return out
    texts = [f"{lab}. {desc}" for _, lab, desc in items]
    pvec = embedder.encode(texts)
    claims = [split_claims(lab, desc) for _, lab, desc in items]
    cvec = embed_claims(embedder, claims)
    by_user: dict[str, list[int]] = {}
    for n, (ci, _, _) in enumerate(items):
        by_user.setdefault(data.clusters[ci].user_id, []).append(n)
    with threadpool_limits(1):
        for u, ns in by_user.items():
            ctx = data.users[u]
            s = score_user(settings.quality, ctx.vecs, ctx.labels, ctx.texts, pvec[ns],
                           [int(data.clusters[items[n][0]].cluster_id) for n in ns],
                           [claims[n] for n in ns], [cvec[n] for n in ns])
            for k in out:
                out[k][ns] = getattr(s, k)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------------------------

def _word_set(text: str) -> set[str]:
    from persona_tasks.labelling.text import words

    return set(words(text or ""))


def max_jaccard_distance(texts: list[str]) -> float:
    """Largest word-set Jaccard distance between two of the texts (0 = all the same words)."""
    sets = [_word_set(t) for t in texts]
    best = 0.0
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            union = sets[i] | sets[j]
            if union:
                best = max(best, 1.0 - len(sets[i] & sets[j]) / len(union))
    return best


@dataclass
class GroupBuild:
    build_id: str
    as_of: date
    window: tuple[date, date]
    labeller_version: str
    groups: pl.DataFrame
    candidates: pl.DataFrame
    heldout: list[tuple[str, int]]           # (user_id, cluster_id) of the gate's clusters
    stats: dict = field(default_factory=dict)

    def training_groups(self) -> list[dict]:
        """Used groups as the trainers take them: prompt, completions, ranks, valid."""
        return groups_for_training(self.groups, self.candidates)


def groups_for_training(groups: pl.DataFrame, candidates: pl.DataFrame) -> list[dict]:
    used = groups.filter(pl.col("dropped_reason").is_null()).select("group_id", "prompt")
    c = (candidates.sort("group_id", "candidate").group_by("group_id", maintain_order=True)
         .agg("completion", "rank", "is_valid"))
    out = []
    for gid, prompt, comps, ranks, valid in used.join(c, on="group_id").sort("group_id").iter_rows():
        out.append({"group_id": gid, "prompt": prompt, "completions": list(comps), "ranks": [int(r) for r in ranks],
                    "valid": [bool(v) for v in valid]})
    return out


def group_headroom(groups: pl.DataFrame, candidates: pl.DataFrame) -> dict[str, float | None]:
    """How much preference training could gain on these groups: over the groups used, the mean objective of the
    best valid candidate and of a valid candidate drawn at random, and their difference (``best_minus_mean``).
    A policy that always wrote its group's best candidate would gain about that much over sampling; when it is
    small, no loss can move the objective far (docs/training.md)."""
    used = groups.filter(pl.col("dropped_reason").is_null()).select("group_id")
    per = (candidates.join(used, on="group_id").filter(pl.col("is_valid") & pl.col("objective").is_not_null())
           .group_by("group_id").agg(pl.col("objective").max().alias("best"), pl.col("objective").mean().alias("mean")))
    if not per.height:
        return {"groups": 0, "best": None, "mean": None, "best_minus_mean": None}
    best, mean = float(per["best"].mean()), float(per["mean"].mean())
    return {"groups": per.height, "best": round(best, 4), "mean": round(mean, 4),
            "best_minus_mean": round(best - mean, 4)}


def build_groups(settings: Settings, data: TrainingClusters, llm: Any, embedder: Any,
                 build_id: str | None = None) -> GroupBuild:
    """K candidates per training cluster from ``llm`` (an ``LLMLabeller``), validated, scored, ranked."""
    t = settings.training
    t0 = time.perf_counter()
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    build_id = build_id or f"g{now:%Y%m%dT%H%M%S}-{hashlib.md5(str(time.time_ns()).encode()).hexdigest()[:6]}"
    idx = data.subset("train", t.max_clusters)
    if not idx:
        raise GroupsError(f"no training clusters in {data.window[0]}..{data.window[1]} (every user held out?)")
    held = data.subset("heldout", t.heldout_max_clusters)
    cands = llm.label_candidates([data.masked[i] for i in idx], num_candidates=t.num_candidates, seed=t.seed)
    items: list[tuple[int, str, str]] = []
    where: list[tuple[int, int]] = []
    for gi, (ci, cs) in enumerate(zip(idx, cands)):
        for k, c in enumerate(cs):
            if c.persona is not None:
                items.append((ci, c.persona.label, c.persona.description))
                where.append((gi, k))
    scores = score_personas(settings, embedder, data, items)
    score_of = {w: {k: float(v[n]) for k, v in scores.items()} for n, w in enumerate(where)}
    g_rows, c_rows = [], []
    dropped: Counter = Counter()
    for gi, (ci, cs) in enumerate(zip(idx, cands)):
        c = data.clusters[ci]
        gid = hashlib.md5(f"{build_id}\x1f{c.user_id}\x1f{data.run_date[ci]}\x1f{c.cluster_id}".encode()).hexdigest()
        valid = [cand.persona is not None for cand in cs]
        obj = [score_of.get((gi, k), {}).get("objective") for k in range(len(cs))]
        ranks = ranks_from_scores(obj, valid, t.tie_tolerance)
        completions = [cand.completion[len(cand.prompt.prefill):] if cand.completion.startswith(cand.prompt.prefill)
                       else cand.completion for cand in cs]
        if not cs:
            dropped["no_candidates"] += 1  # prompt or generation failed: nothing to store
            continue
        reason = None
        if len(cs) < 2:
            reason = "too_few"
        elif max_jaccard_distance(completions) < t.min_candidate_distance:
            reason = "near_duplicate"
        elif len(set(ranks)) < 2:
            reason = "no_preference"
        if reason:
            dropped[reason] += 1
        prompt = cs[0].prompt
        g_rows.append({"build_id": build_id, "group_id": gid, "user_id": c.user_id, "source": data.source[ci],
                       "run_date": data.run_date[ci], "cluster_id": int(c.cluster_id), "prompt": prompt.text,
                       "prompt_version": _prompt_version(), "local_ids": json.dumps(prompt.local_ids),
                       "decoding": settings.labelling.decoding, "temperature": float(t.temperature),
                       "n_candidates": len(cs), "n_valid": sum(valid), "labeller_version": llm.model_version,
                       "dropped_reason": reason, "created_at": now})
        for k, (cand, comp) in enumerate(zip(cs, completions)):
            sc = score_of.get((gi, k), {})
            c_rows.append({"build_id": build_id, "group_id": gid, "candidate": k, "completion": comp,
                           "is_valid": valid[k], "problems": list(dict.fromkeys(cand.checked.problems)),
                           "label": cand.persona.label if cand.persona else None,
                           "description": cand.persona.description if cand.persona else None,
                           **{s: _finite(sc.get(s)) for s in ("cohesion", "alignment", "truthfulness", "objective")},
                           "rank": ranks[k]})
    groups = pl.DataFrame(g_rows, schema=_GROUP_SCHEMA)
    candidates = pl.DataFrame(c_rows, schema=_CANDIDATE_SCHEMA)
    n_used = groups.filter(pl.col("dropped_reason").is_null()).height
    valid_share = float(candidates["is_valid"].mean()) if candidates.height else 0.0
    stats = {"clusters": len(idx), "groups": groups.height, "used": n_used, "dropped": dict(dropped),
             "candidates": candidates.height, "valid_share": round(valid_share, 4),
             "headroom": group_headroom(groups, candidates),
             "heldout_clusters": len(held), "future_memories_removed": data.n_future_memories_removed,
             "sensitive_clusters_left_out": data.n_sensitive_clusters,
             "seconds": round(time.perf_counter() - t0, 2)}
    log.info("preference groups %s: %d clusters -> %d groups used, dropped %s; %.0f%% of %d candidates valid, "
             "in %.1fs", build_id, len(idx), n_used, dict(dropped), 100 * valid_share, candidates.height,
             stats["seconds"])
    heldout = [(data.clusters[i].user_id, int(data.clusters[i].cluster_id)) for i in held]
    return GroupBuild(build_id, data.as_of, data.window, llm.model_version, groups, candidates, heldout, stats)


def _finite(v: float | None) -> float | None:
    return None if v is None or np.isnan(v) else float(v)


def _prompt_version() -> str:
    from persona_tasks.labelling.prompt import PROMPT_VERSION

    return PROMPT_VERSION


_GROUP_SCHEMA = {
    "build_id": pl.String, "group_id": pl.String, "user_id": pl.String, "source": pl.String, "run_date": pl.Date,
    "cluster_id": pl.Int32, "prompt": pl.String, "prompt_version": pl.String, "local_ids": pl.String,
    "decoding": pl.String, "temperature": pl.Float64, "n_candidates": pl.Int32, "n_valid": pl.Int32,
    "labeller_version": pl.String, "dropped_reason": pl.String, "created_at": pl.Datetime("us"),
}
_CANDIDATE_SCHEMA = {
    "build_id": pl.String, "group_id": pl.String, "candidate": pl.Int32, "completion": pl.String,
    "is_valid": pl.Boolean, "problems": pl.List(pl.String), "label": pl.String, "description": pl.String,
    "cohesion": pl.Float64, "alignment": pl.Float64, "truthfulness": pl.Float64, "objective": pl.Float64,
    "rank": pl.Int32,
}


# ---------------------------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------------------------

def write_groups(con: Any, build: GroupBuild) -> None:
    """Store a build's groups and candidates (replacing rows of the same build_id) in one transaction."""
    con.execute(GROUPS_DDL)
    con.register("_pg", build.groups.to_arrow())
    con.register("_pc", build.candidates.to_arrow())
    try:
        with transaction(con):
            con.execute("DELETE FROM training.preference_groups WHERE build_id = $b", {"b": build.build_id})
            con.execute("DELETE FROM training.preference_candidates WHERE build_id = $b", {"b": build.build_id})
            con.execute("INSERT INTO training.preference_groups BY NAME SELECT * REPLACE (local_ids::JSON AS "
                        "local_ids) FROM _pg")
            con.execute("INSERT INTO training.preference_candidates BY NAME SELECT * FROM _pc")
    finally:
        con.unregister("_pg")
        con.unregister("_pc")


def load_groups(con: Any, build_id: str | None = None) -> tuple[str, list[dict]]:
    """(build_id, used groups) of a stored build (default: the latest)."""
    if build_id is None:
        row = con.execute("SELECT build_id FROM training.preference_groups ORDER BY created_at DESC LIMIT 1").fetchall()
        if not row:
            raise GroupsError("no preference groups stored: run `persona-etl train` (it builds them)")
        build_id = row[0][0]
    g = query_pl(con, "SELECT group_id, prompt, dropped_reason FROM training.preference_groups WHERE build_id = $b",
                 {"b": build_id})
    c = query_pl(con, "SELECT group_id, candidate, completion, rank, is_valid FROM training.preference_candidates "
                      "WHERE build_id = $b", {"b": build_id})
    return build_id, groups_for_training(g, c)


def save_build(build: GroupBuild, folder: Any) -> None:
    """Write a build to Parquet files (the retrain DAG passes it between tasks without holding the warehouse)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build.groups.write_parquet(folder / "groups.parquet")
    build.candidates.write_parquet(folder / "candidates.parquet")
    (folder / "build.json").write_text(json.dumps({
        "build_id": build.build_id, "as_of": build.as_of.isoformat(),
        "window": [d.isoformat() for d in build.window], "labeller_version": build.labeller_version,
        "heldout": build.heldout, "stats": build.stats}, indent=1))


def read_build(folder: Any) -> GroupBuild:
    from pathlib import Path

    folder = Path(folder)
    meta = json.loads((folder / "build.json").read_text())
    return GroupBuild(meta["build_id"], date.fromisoformat(meta["as_of"]),
                      tuple(date.fromisoformat(d) for d in meta["window"]), meta["labeller_version"],
                      pl.read_parquet(folder / "groups.parquet"), pl.read_parquet(folder / "candidates.parquet"),
                      [(u, int(c)) for u, c in meta["heldout"]], meta["stats"])
