"""Which users a day must recompute, and which persona a new cluster continues (stable persona ids).

Why: re-clustering and relabelling every user ever seen makes a day's cost grow with the archive, and an id
minted per run makes "since when does this user have this interest" unanswerable. Two rules fix both:

*Active users* (``active_users``): a user's clustering input as of ``run_date`` is their memories that started
up to the end of that day. Its fingerprint (the number of memories and an order-free hash of every
``memory_id`` with its ``embedding_text``) is compared with the fingerprint stored when the user's current
personas were published (``personas.user_states``, one row per user per day it changed). A user is active when
the two differ: new memories that day, or a late event that rebuilt an earlier day's memory. Only active users
are re-clustered, relabelled and rescored; every other user's personas stay exactly as published.

*Matching* (``match_clusters``): each new cluster of an active user is matched one-to-one to the user's current
personas by evidence overlap, the Jaccard index of the two sets of memory ids; pairs are taken greedily by
Jaccard, then centroid cosine (tie-break), then ids, and only pairs with Jaccard at least
``[incremental] match_min_jaccard``. A matched cluster keeps the persona's ``persona_id``; with Jaccard at least
``keep_label_min_jaccard`` it also keeps the label and description (no labeller call; a new version only when the
evidence changed at all). An unmatched cluster is a new persona (``mint_persona_id``); an unmatched current
persona is retired. Memories accumulate (a user's memories up to a later day include the earlier ones), so an
interest that keeps going keeps most of its evidence and its id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

import duckdb
import numpy as np
import polars as pl

from persona_tasks.days import day_end
from persona_tasks.warehouse import query_pl

def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    from persona_tasks.publish import ensure_schema as ensure_persona_schema

    ensure_persona_schema(con)


def user_fingerprints(con: duckdb.DuckDBPyConnection, run_date: date) -> pl.DataFrame:
    """``user_id, n_memories, memories_hash`` of every user with memories up to the end of ``run_date``."""
    return query_pl(con, """
        SELECT user_id, count(*)::INTEGER AS n_memories,
               bit_xor(hash(memory_id, coalesce(embedding_text, '')))::UBIGINT AS memories_hash
        FROM marts.intent_memories WHERE started_at < $end GROUP BY user_id ORDER BY user_id""",
                    {"end": day_end(run_date)})


def active_users(con: duckdb.DuckDBPyConnection, run_date: date, full: bool = False) -> pl.DataFrame:
    """The users to recompute for ``run_date`` with their new fingerprint (``user_id, n_memories, memories_hash``):
    every user with memories when ``full``, else those whose fingerprint differs from their state published
    before ``run_date`` (or who have none)."""
    ensure_schema(con)
    now = user_fingerprints(con, run_date)
    if full or now.is_empty():
        return now
    before = query_pl(con, """
        SELECT user_id, n_memories, memories_hash FROM personas.user_states WHERE valid_from < $d
        QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY valid_from DESC) = 1""", {"d": run_date})
    joined = now.join(before, on="user_id", how="left", suffix="_before")
    changed = (pl.col("n_memories_before").is_null() | (pl.col("n_memories") != pl.col("n_memories_before"))
               | (pl.col("memories_hash") != pl.col("memories_hash_before")))
    return joined.filter(changed).select(now.columns)


def jaccard(a: frozenset[str] | set[str], b: frozenset[str] | set[str]) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


@dataclass(frozen=True)
class Match:
    """A new cluster (index into the new list) continuing a previous persona, with their overlap."""

    cluster: int
    persona_id: str
    jaccard: float
    cosine: float


def match_clusters(new: Sequence[frozenset[str]], previous: Sequence[tuple[str, frozenset[str]]],
                   min_jaccard: float, new_centroids: np.ndarray | None = None,
                   previous_centroids: np.ndarray | None = None) -> list[Match]:
    """One-to-one matches of new clusters (their memory id sets) to previous personas ``(persona_id, ids)``:
    greedy by Jaccard (at least ``min_jaccard``), then centroid cosine, then ids (deterministic)."""
    pairs = []
    for i, ids in enumerate(new):
        for j, (pid, prev_ids) in enumerate(previous):
            jac = jaccard(ids, prev_ids)
            if jac < min_jaccard:
                continue
            cos = 0.0
            if new_centroids is not None and previous_centroids is not None:
                cos = float(new_centroids[i] @ previous_centroids[j])
            pairs.append((-jac, -cos, pid, i, j, jac, cos))
    pairs.sort()
    used_new: set[int] = set()
    used_prev: set[int] = set()
    out = []
    for _, _, pid, i, j, jac, cos in pairs:
        if i in used_new or j in used_prev:
            continue
        used_new.add(i)
        used_prev.add(j)
        out.append(Match(i, pid, jac, cos))
    return sorted(out, key=lambda m: m.cluster)


def centroid(vectors: np.ndarray, row_of: dict[str, int], ids) -> np.ndarray | None:
    """L2-normalised mean of the rows of ``vectors`` for the memory ids (None when none has a vector)."""
    rows = [row_of[m] for m in ids if m in row_of]
    if not rows:
        return None
    c = vectors[rows].mean(axis=0)
    return c / max(float(np.linalg.norm(c)), 1e-12)


def match_to_previous(clusters: Sequence, previous: pl.DataFrame, min_jaccard: float, vectors: np.ndarray,
                      row_of: dict[str, int]) -> dict[int, Match]:
    """For every new cluster (objects with ``user_id`` and ``memory_ids``) that continues one of its user's
    ``previous`` personas (``current_personas_before``): its ``Match`` (``match_clusters`` per user; centroids of
    the memory ``vectors`` for the tie-break), keyed by the cluster's index."""
    prev_by_user: dict[str, list[tuple[str, frozenset[str]]]] = {}
    for pid, uid, ids in zip(previous["persona_id"], previous["user_id"], previous["memory_ids"]):
        prev_by_user.setdefault(uid, []).append((pid, frozenset(ids)))
    by_user: dict[str, list[int]] = {}
    for i, c in enumerate(clusters):
        by_user.setdefault(c.user_id, []).append(i)
    dim = vectors.shape[1] if vectors.ndim == 2 and vectors.shape[1] else 1

    def cents(groups) -> np.ndarray:
        out = [centroid(vectors, row_of, g) for g in groups]
        return np.stack([v if v is not None else np.zeros(dim, np.float32) for v in out])

    matches: dict[int, Match] = {}
    for uid, idx in by_user.items():
        prev = prev_by_user.get(uid)
        if not prev:
            continue
        new_sets = [frozenset(clusters[i].memory_ids) for i in idx]
        for m in match_clusters(new_sets, prev, min_jaccard, cents(new_sets), cents([s for _, s in prev])):
            matches[idx[m.cluster]] = m
    return matches


def mint_persona_id(user_id: str, first_seen: date, cluster_key: str) -> str:
    """A new persona's id: from its user, the day it first appeared and its cluster that day (never the day of a
    later run), so a rerun of that day mints the same id and no other persona can get it."""
    return hashlib.md5(f"{user_id}\x1f{first_seen.isoformat()}\x1f{cluster_key}".encode()).hexdigest()


def current_personas_before(con: duckdb.DuckDBPyConnection, run_date: date,
                            users: Sequence[str]) -> pl.DataFrame:
    """The given users' personas as published before ``run_date`` (their versions valid on the day before),
    with their evidence memory ids: what a day's new clusters are matched to."""
    import pyarrow as pa

    ensure_schema(con)
    con.register("_id_users", pa.table({"user_id": pa.array(list(users), pa.string())}))
    try:
        return query_pl(con, """
            SELECT h.persona_id, h.version, h.user_id, h.first_seen, h.label, h.description, h.labeller,
                   h.model_version, h.is_fallback, h.cohesion, h.alignment, h.truthfulness, h.objective,
                   h.sensitive_categories,
                   list(e.memory_id ORDER BY e.memory_id) AS memory_ids,
                   coalesce(list(e.memory_id ORDER BY e.memory_id) FILTER (WHERE e.is_cited), []) AS cited_ids
            FROM personas.persona_history h JOIN _id_users u USING (user_id)
            JOIN personas.persona_evidence e USING (persona_id, version)
            WHERE h.valid_from < $d AND (h.valid_to IS NULL OR h.valid_to >= $d)
            GROUP BY ALL ORDER BY h.user_id, h.persona_id""", {"d": run_date})
    finally:
        con.unregister("_id_users")
