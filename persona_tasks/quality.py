"""Persona quality, measured: cohesion, alignment, truthfulness and their weighted objective, each in [0, 1].

Formulas, the reasons for them, and the calibration on data are in docs/quality.md; in short, for a persona of
cluster ``c`` of a user with memory embeddings ``X`` (L2-normalised, so a dot product is the cosine):

- **cohesion** (the evidence cluster, not the text): mean silhouette of the members of ``c`` on cosine distance,
  computed exactly as ``persona_tasks.cluster.cohesion`` scores points (``a`` = mean distance to the other
  members, ``b`` = the smallest mean distance to another of the user's clusters; a one-memory cluster scores 0),
  mapped to [0, 1] by ``(s + 1) / 2``. A user with one cluster has no other cluster to compare with: the user's
  unassigned memories are the contrast when there are any, otherwise the silhouette is 0 (cohesion 0.5, "no
  evidence either way"), as in the clustering step's own score.
- **alignment** (the text against the evidence): ``w * AUC + (1 - w) * clip(cos(persona, centroid), 0, 1)`` where
  AUC is the ROC-AUC of persona-memory cosine, the cluster's memories as positives and the user's other memories
  (other clusters and unassigned) as negatives, ``w = [quality] alignment_auc_weight``. When the user has no
  other memory the AUC is undefined and alignment is the centroid term alone.
- **truthfulness** (the claims against the evidence): the share of claims (``split_claims``: the label and the
  clauses of the description that carry a content word) whose best cosine to an evidence memory is at least
  ``[quality] claim_support_threshold`` (calibrated), times ``(1 - specific_term_penalty) ** k`` where ``k`` is
  the number of specific terms (``specific_terms``: names, brands, model numbers) of the claims that no evidence
  memory contains. A persona with no checkable claim scores 1 (it asserts nothing false).
- **objective**: the weighted mean of the three with ``[quality] objective_weights``.

Pure functions work on numpy arrays and strings; ``score_user`` scores one user's personas (the unit of work,
also used by ``bench/calibrate_quality.py``); ``score_run(settings, con, run_date)`` reads a staged run, embeds
every claim of a chunk of users in one batched encode call, and updates the four score columns of
``personas.staged_personas`` in one transaction (between ``induce.label_step`` and ``publish.publish_run``).
"""

from __future__ import annotations

import math

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date

import duckdb
import numpy as np
import polars as pl
from scipy.stats import rankdata
from threadpoolctl import threadpool_limits

from persona_tasks.config import QualitySettings, Settings
from persona_tasks.errors import PersonaEtlError
from persona_tasks.labelling.text import (
    FORMAT_WORDS,
    GENERIC_PERSONA_WORDS,
    STOP_WORDS,
    content_words,
    words,
)
from persona_tasks.labelling.support import META_WORDS, SENTENCE_BREAK, best_cosine, split_claims
from persona_tasks.labelling.support import normalise_rows as _normalise
from persona_tasks.progress import Progress, set_threads
from persona_tasks.warehouse import query_pl, query_row, transaction

log = logging.getLogger(__name__)

SCORES = ("cohesion", "alignment", "truthfulness")
NEUTRAL = 0.5  # cohesion of a cluster with nothing to be compared with (silhouette 0)


class QualityError(PersonaEtlError):
    """A run cannot be scored (nothing staged, or embeddings of another model)."""


# ---------------------------------------------------------------------------------------------------------------
# Cohesion
# ---------------------------------------------------------------------------------------------------------------

def cosine_distances(x: np.ndarray) -> np.ndarray:
    """``1 - cos`` of the rows of ``x`` (normalised here), clipped to [0, 2], zero diagonal."""
    x = _normalise(x)
    d = np.clip(1.0 - x @ x.T, 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    return d


def silhouette_samples(dist: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-memory silhouette, scored exactly like ``persona_tasks.cluster.cohesion`` scores points.

    ``a`` = mean distance to the other members of the own cluster, ``b`` = smallest mean distance to another
    cluster (unassigned memories, label < 0, belong to none), ``s = (b - a) / max(a, b)``; members of one-memory
    clusters score 0, and every member scores 0 when there are fewer than two clusters. Unassigned memories get
    NaN. The one implementation of the silhouette: ``cluster.cohesion(dist, labels)`` (the clustering step's
    selection score) is the sum of these over the assigned memories divided by ``n``.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    out = np.full(n, np.nan)
    labs = np.unique(labels[labels >= 0])
    idx = np.flatnonzero(labels >= 0)
    if labs.size < 2:
        out[idx] = 0.0
        return out
    m = (labels[:, None] == labs[None, :]).astype(np.float64)
    counts = m.sum(axis=0)
    sums = dist @ m
    own = np.searchsorted(labs, labels[idx])
    own_n = counts[own]
    a = sums[idx, own] / np.maximum(own_n - 1, 1)
    other = sums[idx] / counts
    other[np.arange(idx.size), own] = np.inf
    b = other.min(axis=1)
    s = (b - a) / np.maximum(np.maximum(a, b), 1e-12)
    s[own_n < 2] = 0.0
    out[idx] = s
    return out


def cohesion_by_cluster(memory_vecs: np.ndarray, labels: np.ndarray,
                        dist: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(cluster ids, cohesion in [0, 1])`` for every cluster of one user's memories (label < 0 = unassigned).

    Cohesion = ``(mean silhouette of the cluster's members + 1) / 2``. With a single cluster the unassigned
    memories act as the other cluster; with neither, cohesion is ``NEUTRAL`` (0.5).
    """
    labels = np.asarray(labels)
    labs = np.unique(labels[labels >= 0])
    if labs.size == 0:
        return labs, np.zeros(0)
    d = cosine_distances(memory_vecs) if dist is None else dist
    if labs.size == 1:
        if not (labels < 0).any():
            return labs, np.array([NEUTRAL])
        contrast = np.where(labels >= 0, labels, labs[0] + 1)
        s = silhouette_samples(d, contrast)
        return labs, np.array([(float(s[labels == labs[0]].mean()) + 1.0) / 2.0])
    s = silhouette_samples(d, labels)
    m = labels[:, None] == labs[None, :]
    mean = np.where(m, s[:, None], 0.0).sum(axis=0) / m.sum(axis=0)
    return labs, np.clip((mean + 1.0) / 2.0, 0.0, 1.0)


def cohesion_score(memory_vecs: np.ndarray, labels: np.ndarray, cluster: int) -> float:
    """Cohesion in [0, 1] of ``cluster`` among one user's memories (see ``cohesion_by_cluster``)."""
    labs, scores = cohesion_by_cluster(memory_vecs, labels)
    k = np.searchsorted(labs, cluster)
    if k >= labs.size or labs[k] != cluster:
        raise ValueError(f"cluster {cluster} has no memories")
    return float(scores[k])


# ---------------------------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------------------------

def auc_by_column(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC-AUC of each column of ``scores`` (n, k) with ``positive`` (n, k) as labels (Mann-Whitney, ties
    count half). NaN for a column without positives or without negatives."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.ndim == 1:
        scores, positive = scores[:, None], positive[:, None]
    n = scores.shape[0]
    ranks = rankdata(scores, axis=0)
    n_pos = positive.sum(axis=0).astype(np.float64)
    n_neg = n - n_pos
    r = np.where(positive, ranks, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (r - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def roc_auc(positive_scores: Sequence[float], negative_scores: Sequence[float]) -> float:
    """ROC-AUC of two samples (probability that a positive outscores a negative, ties half)."""
    pos, neg = np.asarray(positive_scores, float), np.asarray(negative_scores, float)
    s = np.concatenate([pos, neg])
    return float(auc_by_column(s, np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)])[0])


def alignment_parts(persona_vecs: np.ndarray, memory_vecs: np.ndarray,
                    in_cluster: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(auc, centroid cosine)`` per persona: ``persona_vecs`` (k, d), ``memory_vecs`` (n, d), ``in_cluster``
    (n, k) bool, column j = the memories of persona j's cluster. AUC is NaN when a column has no negatives."""
    p = _normalise(np.atleast_2d(persona_vecs))
    x = _normalise(memory_vecs)
    mask = np.asarray(in_cluster, dtype=bool).reshape(x.shape[0], p.shape[0])
    sims = x @ p.T
    auc = auc_by_column(sims, mask)
    counts = mask.sum(axis=0)
    cent = _normalise((mask.T.astype(np.float64) @ x) / np.maximum(counts, 1)[:, None])
    csim = np.einsum("ij,ij->i", cent, p)
    csim[counts == 0] = np.nan
    return auc, csim


def combine_alignment(auc: np.ndarray | float, centroid_sim: np.ndarray | float, auc_weight: float) -> np.ndarray:
    """``w * auc + (1 - w) * clip(centroid_sim, 0, 1)``; the centroid term alone where auc is NaN."""
    auc = np.asarray(auc, dtype=np.float64)
    c = np.clip(np.asarray(centroid_sim, dtype=np.float64), 0.0, 1.0)
    return np.where(np.isnan(auc), c, auc_weight * auc + (1.0 - auc_weight) * c)


def alignment_score(persona_vec: np.ndarray, memory_vecs: np.ndarray, in_cluster_mask: np.ndarray,
                    auc_weight: float = 0.25) -> float:
    """Alignment in [0, 1] of one persona vector with its cluster among all of the user's memories."""
    auc, csim = alignment_parts(np.atleast_2d(persona_vec), memory_vecs,
                                np.asarray(in_cluster_mask, bool)[:, None])
    return float(combine_alignment(auc, csim, auc_weight)[0])


# ---------------------------------------------------------------------------------------------------------------
# Truthfulness
# ---------------------------------------------------------------------------------------------------------------

# "$1,299", "0.5%", "rtx 5070" -> "5070", "58mm", "la roche-posay", "amazon.com", "de'longhi"
_TOKEN = re.compile(r"\$?[A-Za-z0-9](?:[A-Za-z0-9'&+.,\-]*[A-Za-z0-9%])?")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# a number followed by one of these counts the user's own activity ("12 memories", "5 searches"): not a fact
# about the world to look up in the evidence
COUNT_WORDS = FORMAT_WORDS | {"memories", "memory", "times", "time", "sessions", "session", "visits", "visit",
                              "queries", "query", "actions", "action", "events", "event", "adds", "items"}


def specific_terms(text: str) -> list[str]:
    """Specific terms of a text, the words a persona can invent: numbers and tokens with digits ("5070", "58mm",
    "$300"; not counts of the user's activity such as "12 memories"), tokens with inner capitals ("iPhone",
    "RTX", "DeLonghi") and capitalised words that do not start a sentence ("Breville") unless the sentence is
    title-cased ("Home Espresso Enthusiast": every word after the first capitalised and no lower-case stop word
    of 4+ letters such as "with"; capitals say nothing there). Unique (case-insensitive), in order;
    compare them with the evidence case-insensitively (``memory_text`` is lower-cased upstream)."""
    terms: list[str] = []
    seen: set[str] = set()
    for sentence in SENTENCE_BREAK.split(text or ""):
        toks = [m.group() for m in _TOKEN.finditer(sentence)]
        toks = [t.rstrip(".,") for t in toks]
        # title case: every word after the first capitalised, and no lower-case "with", "about", "from" ...
        rest = [t for t in toks[1:] if t[:1].isalpha() and t.lower() not in STOP_WORDS]
        long_stops = [t for t in toks[1:] if t.lower() in STOP_WORDS and len(t) >= 4]
        title_case = (bool(rest) and all(t[0].isupper() for t in rest)
                      and not any(t[0].islower() for t in long_stops))
        for i, tok in enumerate(toks):
            core = tok[:-2] if tok.lower().endswith("'s") else tok
            low = core.lower().lstrip("$")
            if not low:
                continue
            specific = False
            if any(ch.isdigit() for ch in core):
                nxt = toks[i + 1].lower() if i + 1 < len(toks) else ""
                is_count = _DIGIT_COMMA.sub("", low).replace(".", "", 1).isdigit() and nxt in COUNT_WORDS
                specific = not is_count
            elif len(core) >= 2 and core[0].isalpha():
                inner_caps = any(ch.isupper() for ch in core[1:])
                named = (i > 0 and core[0].isupper() and not title_case
                         and low not in STOP_WORDS and low not in GENERIC_PERSONA_WORDS)
                specific = inner_caps or named
            if specific and low not in seen:
                seen.add(low)
                terms.append(core)
    return terms


@dataclass(frozen=True)
class EvidenceText:
    """The evidence texts of one persona, prepared once for term look-ups (case-insensitive)."""

    lower: str
    compact: str
    words: frozenset[str]
    stems: frozenset[str]

    @classmethod
    def of(cls, texts: Sequence[str]) -> EvidenceText:
        lower = _DIGIT_COMMA.sub("", " ; ".join(t or "" for t in texts).lower())
        ws = frozenset(words(lower))
        return cls(lower, re.sub(r"[^a-z0-9]", "", lower), ws, frozenset(w[:5] for w in ws if len(w) >= 5))

    def contains(self, term: str) -> bool:
        t = _DIGIT_COMMA.sub("", term.lower().lstrip("$"))
        if t.endswith("'s"):
            t = t[:-2]
        if not t:
            return True
        if re.search(rf"(?<![a-z0-9]){re.escape(t)}(?![a-z0-9])", self.lower):
            return True
        compact = re.sub(r"[^a-z0-9]", "", t)
        if len(compact) >= 5 and compact in self.compact:  # "roche-posay" ~ "roche posay", "rtx5070" ~ "rtx 5070"
            return True
        if not t.isalpha():
            return False
        if {t + "s", t + "es", t[:-1] if t.endswith("s") else t} & self.words:  # plural / singular
            return True
        return len(t) >= 5 and t[:5] in self.stems  # other inflected forms (5-letter prefix, as in grounding)


@dataclass
class TruthDetails:
    claims: list[str]
    best_similarity: list[float]      # per claim: cosine to its most similar evidence memory
    supported: list[bool]
    specific_terms: list[str]
    missing_terms: list[str]          # specific terms no evidence memory contains
    support_share: float
    penalty_factor: float

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def truthfulness_score(claims: Sequence[str], claim_vecs: np.ndarray, evidence_texts: Sequence[str] | EvidenceText,
                       evidence_vecs: np.ndarray, threshold: float = 0.43,
                       specific_penalty: float = 0.5) -> tuple[float, TruthDetails]:
    """Truthfulness in [0, 1]: share of ``claims`` whose best cosine to an evidence vector is >= ``threshold``,
    times ``(1 - specific_penalty) ** (specific terms of the claims absent from the evidence texts)``."""
    claims = list(claims)
    ev = evidence_texts if isinstance(evidence_texts, EvidenceText) else EvidenceText.of(list(evidence_texts))
    best = best_cosine(claim_vecs, evidence_vecs) if claims else np.zeros(0)
    supported = best >= threshold
    share = float(supported.mean()) if claims else 1.0
    terms: list[str] = []
    for c in claims:
        terms += [t for t in specific_terms(c) if t.lower() not in {x.lower() for x in terms}]
    missing = [t for t in terms if not ev.contains(t)]
    factor = (1.0 - specific_penalty) ** len(missing)
    details = TruthDetails(claims, best.round(4).tolist(), supported.tolist(), terms, missing, share, factor)
    return share * factor, details


# ---------------------------------------------------------------------------------------------------------------
# Objective
# ---------------------------------------------------------------------------------------------------------------

def objective(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Weighted mean of the scores named in ``weights`` (weights normalised by their sum; each score in [0, 1],
    so the objective is too). A NaN score among positively weighted ones gives NaN."""
    total = sum(w for w in weights.values() if w > 0)
    if total <= 0:
        raise ValueError("objective weights must have a positive sum")
    return float(sum(w * float(scores[k]) for k, w in weights.items() if w > 0) / total)


# ---------------------------------------------------------------------------------------------------------------
# One user's personas (the unit of work of score_run and of the calibration)
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class UserScores:
    cohesion: np.ndarray
    alignment: np.ndarray
    truthfulness: np.ndarray
    objective: np.ndarray
    auc: np.ndarray
    centroid_sim: np.ndarray
    details: list[TruthDetails] = field(default_factory=list)


def score_user(cfg: QualitySettings, memory_vecs: np.ndarray, memory_labels: np.ndarray,
               memory_texts: Sequence[str], persona_vecs: np.ndarray, persona_clusters: Sequence[int],
               claims: Sequence[Sequence[str]], claim_vecs: Sequence[np.ndarray],
               evidence_rows: Sequence[np.ndarray] | None = None, dist: np.ndarray | None = None) -> UserScores:
    """Score the personas of one user.

    ``memory_vecs`` (n, d) / ``memory_labels`` (n,) / ``memory_texts``: all of the user's clustered memories
    (label < 0 = unassigned); ``persona_vecs`` (k, d) and ``persona_clusters`` (k,): each persona's text
    embedding and cluster; ``claims[j]`` / ``claim_vecs[j]``: persona j's claims and their embeddings;
    ``evidence_rows[j]``: rows of persona j's evidence memories (default: the rows of its cluster). A persona
    whose cluster has no memory gets NaN scores.
    """
    labels = np.asarray(memory_labels)
    pcl = np.asarray(persona_clusters)
    k = pcl.shape[0]
    x = _normalise(memory_vecs)
    d = cosine_distances(x) if dist is None else dist
    labs, coh = cohesion_by_cluster(x, labels, d)
    if labs.size:
        pos = np.clip(np.searchsorted(labs, pcl), 0, labs.size - 1)
        known = labs[pos] == pcl
        cohesion = np.where(known, coh[pos], np.nan)
    else:
        known, cohesion = np.zeros(k, dtype=bool), np.full(k, np.nan)
    masks = labels[:, None] == pcl[None, :]
    auc, csim = alignment_parts(persona_vecs, x, masks)
    alignment = combine_alignment(auc, csim, cfg.alignment_auc_weight)
    truth = np.full(k, np.nan)
    details: list[TruthDetails] = []
    for j in range(k):
        rows = np.flatnonzero(masks[:, j]) if evidence_rows is None else np.asarray(evidence_rows[j], dtype=np.int64)
        score, det = truthfulness_score(claims[j], claim_vecs[j], [memory_texts[i] for i in rows], x[rows],
                                        cfg.claim_support_threshold, cfg.specific_term_penalty)
        if rows.size:
            truth[j] = score
        details.append(det)
    alignment[~known] = np.nan
    w = cfg.objective_weights
    obj = np.array([objective({"cohesion": c, "alignment": a, "truthfulness": t}, w)
                    for c, a, t in zip(cohesion, alignment, truth)])
    return UserScores(cohesion, alignment, truth, obj, auc, csim, details)


# ---------------------------------------------------------------------------------------------------------------
# The step: score a staged run
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QualityReport:
    run_date: date
    n_users: int
    n_personas: int
    n_scored: int       # personas with all four scores (the others stay NULL: no memories for their cluster)
    n_claims: int       # distinct claim texts embedded
    seconds: float
    means: dict[str, float]

    def finite_means(self) -> dict[str, float | None]:
        """``means`` with NaN (nothing scored) as None: JSON-safe, for reports and task results."""
        return {k: (None if v is None or math.isnan(v) else float(v)) for k, v in self.means.items()}

    def summary(self) -> str:
        m = ", ".join(f"{k} {v:.3f}" for k, v in self.means.items())
        return (f"quality {self.run_date}: {self.n_scored}/{self.n_personas} personas of {self.n_users} users scored "
                f"({self.n_claims} claims embedded) in {self.seconds:.1f}s "
                f"({self.n_personas / max(self.seconds, 1e-9):.1f} personas/s); means: {m}")


def _bounds(users: pl.Series) -> dict[str, tuple[int, int]]:
    """user_id -> (first row, end row) of a frame sorted by user_id."""
    if users.is_empty():
        return {}
    g = (users.to_frame("u").with_row_index("i").group_by("u", maintain_order=True)
         .agg(pl.col("i").min().alias("a"), (pl.col("i").max() + 1).alias("b")))
    return {u: (int(a), int(b)) for u, a, b in g.iter_rows()}


@dataclass
class RunData:
    """What scoring needs of a staged run, for some users, rows sorted by user.

    ``personas``: persona_id, user_id, cluster_id, label, description (``pvec``: their text embeddings);
    ``memories``: user_id, memory_id, cluster_id (-1 = unassigned), memory_text of every clustered memory of those
    users that has an embedding of the run's model (``mvec``); ``evidence``: persona_id -> rows of ``memories``.
    """

    personas: pl.DataFrame
    pvec: np.ndarray
    memories: pl.DataFrame
    mvec: np.ndarray
    evidence: dict[str, np.ndarray]
    persona_bounds: dict[str, tuple[int, int]]
    memory_bounds: dict[str, tuple[int, int]]

    def user(self, user_id: str) -> tuple[slice, slice | None]:
        """(persona rows, memory rows or None) of one user."""
        a, b = self.persona_bounds[user_id]
        m = self.memory_bounds.get(user_id)
        return slice(a, b), (slice(*m) if m else None)

    def evidence_rows(self, persona_row: int, memories: slice) -> np.ndarray:
        """Rows (relative to the user's memory slice) of a persona's evidence; its cluster when none is stored."""
        r = self.evidence.get(self.personas["persona_id"][persona_row], np.zeros(0, np.int64))
        r = r[(r >= memories.start) & (r < memories.stop)] - memories.start
        if r.size == 0:
            labels = self.memories["cluster_id"].to_numpy()[memories]
            r = np.flatnonzero(labels == self.personas["cluster_id"][persona_row])
        return r


def run_model_version(con: duckdb.DuckDBPyConnection, run_date: date) -> str | None:
    """The embedding model of a staged run's persona embeddings (None when nothing is staged)."""
    rows = con.execute("SELECT DISTINCT model_version FROM personas.staged_persona_embeddings WHERE run_date = $d",
                       {"d": run_date}).fetchall()
    if len(rows) > 1:
        raise QualityError(f"run {run_date}: persona embeddings of {len(rows)} models; relabel the run")
    return rows[0][0] if rows else None


def load_run(con: duckdb.DuckDBPyConnection, run_date: date, model_version: str,
             users: Sequence[str] | None = None) -> RunData:
    """Read the staged personas of ``run_date`` (of ``users``, default all) and their users' memories."""
    import pyarrow as pa

    from persona_tasks.embed import embeddings_to_numpy

    filt = ""
    if users is not None:
        con.register("_quality_users", pa.table({"user_id": pa.array(list(users), pa.string())}))
        filt = "JOIN _quality_users u USING (user_id)"
    try:
        personas = query_pl(
            con, f"""
            SELECT p.persona_id, p.user_id, p.cluster_id, p.label, p.description, e.embedding
            FROM personas.staged_personas p {filt}
            JOIN personas.staged_persona_embeddings e USING (persona_id, run_date)
            WHERE p.run_date = $d AND p.change <> 'unchanged'
            """, {"d": run_date}).sort("user_id", "cluster_id", "persona_id")
        memories = query_pl(
            con, f"""
            SELECT c.user_id, c.memory_id, coalesce(c.cluster_id, -1) AS cluster_id,
                   coalesce(m.embedding_text, '') AS memory_text, me.embedding  -- the embedded text: what claims are checked against
            FROM personas.memory_clusters c {filt}
            JOIN personas.memory_embeddings me ON me.memory_id = c.memory_id AND me.model_version = $v
            LEFT JOIN marts.intent_memories m ON m.memory_id = c.memory_id
            WHERE c.user_id IN (SELECT user_id FROM personas.staged_personas WHERE run_date = $d)
            """, {"v": model_version, "d": run_date}).sort("user_id", "memory_id")
        ev = query_pl(
            con, f"""
            SELECT e.persona_id, e.memory_id FROM personas.staged_persona_evidence e {filt}
            WHERE e.run_date = $d
            """, {"d": run_date})
    finally:
        if users is not None:
            con.unregister("_quality_users")
    row = memories.select("memory_id").with_row_index("row")
    ev = ev.join(row, on="memory_id", how="inner").group_by("persona_id").agg(pl.col("row").sort())
    evidence = {p: np.asarray(r, dtype=np.int64) for p, r in ev.iter_rows()}
    pvec = embeddings_to_numpy(personas["embedding"]) if personas.height else np.zeros((0, 1), np.float32)
    mvec = embeddings_to_numpy(memories["embedding"]) if memories.height else np.zeros((0, 1), np.float32)
    return RunData(personas.drop("embedding"), pvec, memories.drop("embedding"), mvec, evidence,
                   _bounds(personas["user_id"]), _bounds(memories["user_id"]))


def score_loaded(cfg: QualitySettings, data: RunData, claims: Sequence[Sequence[str]],
                 claim_vecs: Sequence[np.ndarray], progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Scores of every persona of ``data`` (arrays aligned with ``data.personas``); ``claims[i]`` /
    ``claim_vecs[i]``: persona i's claims and their embeddings."""
    n = data.personas.height
    out = {k: np.full(n, np.nan) for k in (*SCORES, "objective")}
    labels = data.memories["cluster_id"].to_numpy()
    texts = data.memories["memory_text"].to_list()
    pcl = data.personas["cluster_id"].to_numpy()
    with threadpool_limits(1):  # per-user matrices are tiny: BLAS threads only add overhead (see cluster.py)
        for u in data.persona_bounds:
            ps, ms = data.user(u)
            if ms is not None:
                s = score_user(cfg, data.mvec[ms], labels[ms], texts[ms], data.pvec[ps], pcl[ps],
                               claims[ps], claim_vecs[ps],
                               [data.evidence_rows(j, ms) for j in range(ps.start, ps.stop)])
                for k in out:
                    out[k][ps] = getattr(s, k)
            if progress is not None:
                progress.update(1)
    return out


def embed_claims(embedder, claims: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """Embed every distinct claim once, in one batched call; one (n_claims, d) matrix per persona."""
    uniq = list(dict.fromkeys(c for cs in claims for c in cs))
    vecs = embedder.encode(uniq) if uniq else np.zeros((0, 1), np.float32)
    index = {c: i for i, c in enumerate(uniq)}
    return [vecs[[index[c] for c in cs]] for cs in claims]


def score_run(settings: Settings, con: duckdb.DuckDBPyConnection, run_date: date,
              users: Sequence[str] | None = None) -> QualityReport:
    """Score every persona staged for ``run_date`` (or only ``users``' personas) and write cohesion, alignment,
    truthfulness and objective into ``personas.staged_personas`` in one transaction.

    Reads the staged personas, their embeddings and evidence, and for each of their users every memory of
    ``personas.memory_clusters`` with its embedding (same model version as the persona embeddings) and text.
    Users are processed in chunks of ``[quality] users_per_chunk``; the claims of a chunk are embedded in one
    batched call. Idempotent: scoring a run again gives the same values. Personas whose cluster has no embedded
    memory keep NULL scores (logged).
    """
    from persona_tasks.embed import embedder_from_settings
    from persona_tasks.publish import ensure_schema

    cfg = settings.quality
    t0 = time.perf_counter()
    set_threads(settings.threads)
    ensure_schema(con)
    # personas staged "unchanged" (same label and evidence as their published version) keep their scores
    staged = query_pl(con, "SELECT DISTINCT user_id FROM personas.staged_personas WHERE run_date = $d "
                           "AND change <> 'unchanged' ORDER BY 1", {"d": run_date})["user_id"].to_list()
    if not staged and not query_row(con, "SELECT count(*) FROM personas.induction_runs WHERE run_date = $d",
                                    {"d": run_date})[0]:
        raise QualityError(f"nothing staged for run date {run_date}: run the label step first")
    user_ids = staged if users is None else sorted(set(staged) & set(users))
    version = run_model_version(con, run_date)
    embedder = embedder_from_settings(settings)
    if version is not None and version != embedder.model_version:
        raise QualityError(f"run {run_date}: personas were embedded with {version}, the configured model is "
                           f"{embedder.model_version}; relabel the run with the configured model")
    frames: list[pl.DataFrame] = []
    n_claims = n_personas = 0
    log.info("quality %s: scoring the personas of %d users", run_date, len(user_ids))
    with Progress("quality", total=len(user_ids), unit="users") as progress:
        for c0 in range(0, len(user_ids), cfg.users_per_chunk):
            chunk = user_ids[c0:c0 + cfg.users_per_chunk]
            data = load_run(con, run_date, embedder.model_version, chunk)
            claims = [split_claims(lab, desc) for lab, desc in zip(data.personas["label"],
                                                                    data.personas["description"])]
            n_claims += len({c for cs in claims for c in cs})
            n_personas += data.personas.height
            out = score_loaded(cfg, data, claims, embed_claims(embedder, claims), progress)
            frames.append(pl.DataFrame({"persona_id": data.personas["persona_id"],
                                        **{k: pl.Series(k, v, dtype=pl.Float64) for k, v in out.items()}}))
    if not frames:  # every staged persona is unchanged: nothing to score
        return QualityReport(run_date, 0, 0, 0, 0, time.perf_counter() - t0, {})
    scores = pl.concat(frames).with_columns(pl.col(k).fill_nan(None) for k in (*SCORES, "objective"))
    con.register("_quality_scores", scores.to_arrow())
    try:
        with transaction(con):
            # reset first: a persona that cannot be scored now must not keep a stale score
            only = "" if users is None else " AND persona_id IN (SELECT persona_id FROM _quality_scores)"
            con.execute("UPDATE personas.staged_personas SET cohesion = NULL, alignment = NULL, truthfulness = NULL, "
                        f"objective = NULL WHERE run_date = $d AND change <> 'unchanged'{only}", {"d": run_date})
            con.execute("UPDATE personas.staged_personas p SET cohesion = s.cohesion, alignment = s.alignment, "
                        "truthfulness = s.truthfulness, objective = s.objective FROM _quality_scores s "
                        "WHERE p.persona_id = s.persona_id AND p.run_date = $d", {"d": run_date})
    finally:
        con.unregister("_quality_scores")
    n_scored = scores.drop_nulls().height
    means = {k: round(float(scores[k].mean()), 4) if scores[k].null_count() < scores.height else float("nan")
             for k in (*SCORES, "objective")}
    report = QualityReport(run_date, len(user_ids), n_personas, n_scored, n_claims, time.perf_counter() - t0, means)
    if n_scored < n_personas:
        log.warning("quality %s: %d personas left unscored (their cluster has no embedded memory)",
                    run_date, n_personas - n_scored)
    log.info("%s", report.summary())
    return report


__all__ = [
    "COUNT_WORDS", "META_WORDS", "NEUTRAL", "SCORES", "EvidenceText", "QualityError", "QualityReport", "RunData",
    "TruthDetails", "UserScores", "alignment_parts", "alignment_score", "auc_by_column", "cohesion_by_cluster",
    "cohesion_score", "combine_alignment", "cosine_distances", "embed_claims", "load_run", "objective", "roc_auc",
    "run_model_version", "score_loaded", "score_run", "score_user", "silhouette_samples", "specific_terms",
    "split_claims", "truthfulness_score",
]
