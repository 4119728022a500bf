"""Persona tables for analysts, and their atomic publication.

A run writes its personas to *staging* tables (``personas.staged_*``, keyed by ``run_date``); later steps
(scoring, quality gates) read and update them there; ``publish_run`` then replaces the run's rows in the
published tables in one DuckDB transaction and recomputes that day's persona topics. A reader therefore never
sees half a run, and a run that fails before publishing leaves the last good rows untouched. Publishing the
same staged run twice gives the same rows (idempotent rerun of a day).

Published tables (schema ``personas``; columns documented in docs/tables.md and the dbt sources):

- ``personas``: one row per persona per ``run_date``; ``current_personas`` is each user's latest run.
- ``persona_evidence``: the memories that are a persona's evidence (its cluster), with similarity to the
  persona text; actions are reachable through ``marts.intent_memories.event_ids``.
- ``persona_topics``: personas clustered across users for a run date, each topic labelled; ``personas.topic_id``
  points to it, so "how many users share this kind of persona" is one GROUP BY.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import date

import duckdb
import numpy as np
import polars as pl

from persona_tasks.config import Settings
from persona_tasks.warehouse import query_pl, query_row, transaction

log = logging.getLogger(__name__)

_PERSONA_COLUMNS = """
    persona_id     VARCHAR   NOT NULL,   -- md5 of user_id, run_date, cluster_id
    user_id        VARCHAR   NOT NULL,
    run_date       DATE      NOT NULL,   -- the data day the run induced personas for
    cluster_id     INTEGER   NOT NULL,   -- user-local intent cluster (personas.memory_clusters)
    label          VARCHAR   NOT NULL,   -- at most 8 words
    description    VARCHAR   NOT NULL,   -- 1-3 sentences
    n_evidence     INTEGER   NOT NULL,   -- memories in persona_evidence
    labeller       VARCHAR   NOT NULL,   -- llm | extractive
    model_version  VARCHAR   NOT NULL,   -- labelling model (or extractive-ctfidf-v1)
    is_fallback    BOOLEAN   NOT NULL,   -- the LLM failed validation and the extractive labeller answered
    topic_id       VARCHAR,              -- personas.persona_topics (set on publish)
    cohesion       DOUBLE,               -- quality scores in [0, 1] (docs/quality.md); NULL until scored
    alignment      DOUBLE,
    truthfulness   DOUBLE,
    objective      DOUBLE,
    sensitive_categories VARCHAR[],      -- special categories the persona reveals, policy "flag" (persona_tasks.sensitive)
    run_id         VARCHAR   NOT NULL,
    created_at     TIMESTAMP NOT NULL    -- UTC
"""

_EVIDENCE_COLUMNS = """
    persona_id     VARCHAR   NOT NULL,
    run_date       DATE      NOT NULL,
    user_id        VARCHAR   NOT NULL,
    memory_id      VARCHAR   NOT NULL,   -- marts.intent_memories
    similarity     DOUBLE    NOT NULL,   -- cosine(persona text embedding, memory embedding)
    centrality     DOUBLE,               -- cosine(memory, cluster centroid): how representative
    is_cited       BOOLEAN   NOT NULL    -- the labeller named this memory as support
"""

_EMBEDDING_COLUMNS = """
    persona_id     VARCHAR   NOT NULL,
    run_date       DATE      NOT NULL,
    model_version  VARCHAR   NOT NULL,   -- embedding model
    embedding      FLOAT[]   NOT NULL    -- L2-normalised embedding of "label. description"
"""

PERSONAS_DDL = f"""
CREATE SCHEMA IF NOT EXISTS personas;
CREATE TABLE IF NOT EXISTS personas.staged_personas ({_PERSONA_COLUMNS});
CREATE TABLE IF NOT EXISTS personas.staged_persona_evidence ({_EVIDENCE_COLUMNS});
CREATE TABLE IF NOT EXISTS personas.staged_persona_embeddings ({_EMBEDDING_COLUMNS});
CREATE TABLE IF NOT EXISTS personas.personas ({_PERSONA_COLUMNS});
CREATE TABLE IF NOT EXISTS personas.persona_evidence ({_EVIDENCE_COLUMNS});
CREATE TABLE IF NOT EXISTS personas.persona_embeddings ({_EMBEDDING_COLUMNS});
CREATE TABLE IF NOT EXISTS personas.persona_topics (
    topic_id       VARCHAR   NOT NULL,   -- T<run_date>-<n>, numbered by size
    run_date       DATE      NOT NULL,
    label          VARCHAR   NOT NULL,
    description    VARCHAR   NOT NULL,
    n_personas     INTEGER   NOT NULL,
    n_users        INTEGER   NOT NULL
);
CREATE TABLE IF NOT EXISTS personas.induction_runs (
    run_id         VARCHAR   NOT NULL,
    run_date       DATE      NOT NULL,
    labeller       VARCHAR   NOT NULL,
    n_users        INTEGER   NOT NULL,
    n_personas     INTEGER   NOT NULL,
    n_llm          INTEGER   NOT NULL,   -- personas the LLM was asked to label
    n_fallbacks    INTEGER   NOT NULL,   -- of those, answered by the extractive fallback
    coverage       DOUBLE,               -- share of memories that are some persona's evidence
    n_suppressed   INTEGER,              -- personas not published: a sensitive category with policy "suppress"
    stats          JSON,                 -- timings and rates per step
    published_at   TIMESTAMP             -- NULL while staged only
);
CREATE OR REPLACE VIEW personas.current_personas AS
    SELECT p.* FROM personas.personas p
    JOIN (SELECT user_id, max(run_date) AS run_date FROM personas.personas GROUP BY user_id) latest
      USING (user_id, run_date);
"""


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(PERSONAS_DDL)
    # warehouses from before the sensitive-category policy
    for table in ("staged_personas", "personas"):
        con.execute(f"ALTER TABLE personas.{table} ADD COLUMN IF NOT EXISTS sensitive_categories VARCHAR[]")
    con.execute("ALTER TABLE personas.induction_runs ADD COLUMN IF NOT EXISTS n_suppressed INTEGER")


@dataclass(frozen=True)
class PublishReport:
    run_date: date
    n_personas: int
    n_evidence: int
    n_users: int
    n_topics: int
    n_flagged: int = 0
    n_suppressed: int = 0


def stage_run(con: duckdb.DuckDBPyConnection, run_date: date, personas: pl.DataFrame, evidence: pl.DataFrame,
              embeddings: pl.DataFrame, run_row: dict) -> None:
    """Replace the staged rows of ``run_date`` for the users in ``personas`` (one transaction)."""
    ensure_schema(con)
    con.register("_st_p", personas.to_arrow())
    con.register("_st_e", evidence.to_arrow())
    con.register("_st_m", embeddings.to_arrow())
    con.register("_st_r", pl.DataFrame([run_row]).to_arrow())
    try:
        with transaction(con):
            # evidence and embeddings first: they find the run's personas through staged_personas
            for table in ("staged_persona_evidence", "staged_persona_embeddings"):
                con.execute(
                    f"DELETE FROM personas.{table} WHERE run_date = $d AND persona_id IN "
                    "(SELECT persona_id FROM personas.staged_personas WHERE run_date = $d AND user_id IN "
                    "(SELECT user_id FROM _st_p))", {"d": run_date})
            con.execute("DELETE FROM personas.staged_personas WHERE run_date = $d AND user_id IN "
                        "(SELECT user_id FROM _st_p)", {"d": run_date})
            con.execute("INSERT INTO personas.staged_personas BY NAME SELECT * FROM _st_p")
            con.execute("INSERT INTO personas.staged_persona_evidence BY NAME SELECT * FROM _st_e")
            con.execute("INSERT INTO personas.staged_persona_embeddings BY NAME SELECT * FROM _st_m")
            con.execute("DELETE FROM personas.induction_runs WHERE run_id IN (SELECT run_id FROM _st_r)")
            con.execute("INSERT INTO personas.induction_runs BY NAME SELECT * FROM _st_r")
    finally:
        for name in ("_st_p", "_st_e", "_st_m", "_st_r"):
            con.unregister(name)


def publish_run(settings: Settings, con: duckdb.DuckDBPyConnection, run_date: date) -> PublishReport:
    """Move the staged rows of ``run_date`` into the published tables and relabel that day's topics, atomically."""
    ensure_schema(con)
    staged = query_row(con, "SELECT count(*) FROM personas.staged_personas WHERE run_date = $d", {"d": run_date})
    if staged[0] == 0:
        from persona_tasks.errors import PersonaEtlError

        raise PersonaEtlError(f"nothing staged for run date {run_date}: run `persona-etl induce` first")
    sensitive = _classify_staged(settings, con, run_date)
    con.register("_sensitive", sensitive.to_arrow())
    try:
        with transaction(con):
            report = _publish_staged(settings, con, run_date)
    finally:
        con.unregister("_sensitive")
    log.info("publish: %s", report)
    return report


def _classify_staged(settings: Settings, con: duckdb.DuckDBPyConnection, run_date: date) -> pl.DataFrame:
    """Sensitive categories of the staged personas of ``run_date`` (from their stored text embeddings)."""
    from persona_tasks.embed import embeddings_to_numpy
    from persona_tasks.sensitive import classify_personas

    rows = query_pl(con, "SELECT persona_id, embedding FROM personas.staged_persona_embeddings WHERE run_date = $d "
                         "ORDER BY persona_id", {"d": run_date})
    vecs = embeddings_to_numpy(rows["embedding"]) if rows.height else np.zeros((0, 1), np.float32)
    return classify_personas(settings, rows["persona_id"].to_list(), vecs)


def _publish_staged(settings: Settings, con: duckdb.DuckDBPyConnection, run_date: date) -> PublishReport:
    """The body of ``publish_run``, inside its transaction (``_sensitive`` registered)."""
    con.execute("UPDATE personas.staged_personas p SET sensitive_categories = s.sensitive_categories "
                "FROM _sensitive s WHERE p.persona_id = s.persona_id AND p.run_date = $d", {"d": run_date})
    suppressed = "(SELECT persona_id FROM _sensitive WHERE suppressed)"
    users = "(SELECT DISTINCT user_id FROM personas.staged_personas WHERE run_date = $d)"
    for table in ("persona_evidence", "persona_embeddings"):
        con.execute(
            f"DELETE FROM personas.{table} WHERE run_date = $d AND persona_id IN "
            f"(SELECT persona_id FROM personas.personas WHERE run_date = $d AND user_id IN {users})",
            {"d": run_date},
        )
    con.execute(f"DELETE FROM personas.personas WHERE run_date = $d AND user_id IN {users}", {"d": run_date})
    for src, dst in (("staged_personas", "personas"), ("staged_persona_evidence", "persona_evidence"),
                     ("staged_persona_embeddings", "persona_embeddings")):
        # by name: every column, the quality scores (cohesion .. objective) included, whatever the column order;
        # personas of a "suppress" category (and their evidence and embedding) are never published
        con.execute(f"INSERT INTO personas.{dst} BY NAME SELECT * FROM personas.{src} WHERE run_date = $d "
                    f"AND persona_id NOT IN {suppressed}", {"d": run_date})
    n_topics = _assign_topics(settings, con, run_date)
    n_suppressed = query_row(con, "SELECT count(*) FROM _sensitive WHERE suppressed")[0]
    n_flagged = query_row(con, "SELECT count(*) FROM _sensitive WHERE NOT suppressed "
                               "AND len(sensitive_categories) > 0")[0]
    con.execute("UPDATE personas.induction_runs SET n_suppressed = $n WHERE run_date = $d",
                {"d": run_date, "n": n_suppressed})
    con.execute("UPDATE personas.induction_runs SET published_at = now()::TIMESTAMP "
                "WHERE run_date = $d AND published_at IS NULL", {"d": run_date})
    n_p, n_u = query_row(
        con, "SELECT count(*), count(DISTINCT user_id) FROM personas.personas WHERE run_date = $d", {"d": run_date})
    n_e = query_row(con, "SELECT count(*) FROM personas.persona_evidence WHERE run_date = $d", {"d": run_date})[0]
    return PublishReport(run_date, n_p, n_e, n_u, n_topics, int(n_flagged), int(n_suppressed))


def _assign_topics(settings: Settings, con: duckdb.DuckDBPyConnection, run_date: date) -> int:
    """Cluster every published persona of ``run_date`` across users and label each topic (c-TF-IDF terms)."""
    from persona_tasks.embed import embeddings_to_numpy
    from persona_tasks.labelling import ClusterInput, ExtractiveLabeller

    rows = query_pl(
        con, "SELECT p.persona_id, p.user_id, p.label, p.description, e.embedding FROM personas.personas p "
        "JOIN personas.persona_embeddings e USING (persona_id, run_date) WHERE p.run_date = $d "
        "ORDER BY p.persona_id", {"d": run_date})
    con.execute("DELETE FROM personas.persona_topics WHERE run_date = $d", {"d": run_date})
    if rows.is_empty():
        return 0
    x = embeddings_to_numpy(rows["embedding"])
    topic = topic_clusters(x, settings.topics.min_cluster_share, settings.topics.join_min_similarity,
                           seed=settings.clustering.seed)
    rows = rows.with_columns(pl.Series("topic", topic))
    # number topics by size (desc), ties by smallest persona_id: deterministic ids
    order = (rows.filter(pl.col("topic") >= 0).group_by("topic")
             .agg(pl.len().alias("n"), pl.col("persona_id").min().alias("first"))
             .sort(["n", "first"], descending=[True, False]))
    stamp = run_date.strftime("%Y%m%d")
    ids = {t: f"T{stamp}-{k:04d}" for k, t in enumerate(order["topic"].to_list(), start=1)}
    rows = rows.with_columns(pl.col("topic").replace_strict(ids, default=None, return_dtype=pl.String)
                             .alias("topic_id"))
    groups = rows.filter(pl.col("topic_id").is_not_null()).group_by("topic_id", maintain_order=True).agg(
        "persona_id", "user_id", (pl.col("label") + ". " + pl.col("description")).alias("text"))
    groups = groups.sort("topic_id")
    labels = ExtractiveLabeller(settings).label([
        ClusterInput(user_id="__topics__", cluster_id=t, memory_ids=list(pids), memory_texts=list(texts))
        for t, pids, texts in zip(groups["topic_id"], groups["persona_id"], groups["text"])
    ]) if groups.height else []
    topics = pl.DataFrame({
        "topic_id": groups["topic_id"],
        "run_date": [run_date] * groups.height,
        "label": [lab.label for lab in labels],
        "description": [lab.description for lab in labels],
        "n_personas": groups["persona_id"].list.len().cast(pl.Int32),
        "n_users": groups["user_id"].list.n_unique().cast(pl.Int32),
    }, schema_overrides={"run_date": pl.Date})
    con.register("_topics", topics.to_arrow())
    con.register("_topic_of", rows.select("persona_id", "topic_id").to_arrow())
    try:
        con.execute("INSERT INTO personas.persona_topics BY NAME SELECT * FROM _topics")
        con.execute("UPDATE personas.personas p SET topic_id = t.topic_id FROM _topic_of t "
                    "WHERE p.persona_id = t.persona_id AND p.run_date = $d", {"d": run_date})
    finally:
        con.unregister("_topics")
        con.unregister("_topic_of")
    return topics.height


def topic_clusters(x: np.ndarray, min_cluster_share: float, join_min_similarity: float, seed: int = 0) -> np.ndarray:
    """Cross-user topics of L2-normalised persona embeddings: HDBSCAN (on a PCA projection when large), then
    each noise persona joins its nearest topic when cosine to the topic centroid >= ``join_min_similarity``.

    Returns a topic index per row, -1 for personas that fit no topic. With fewer than 4 personas every persona
    is its own topic.
    """
    n = x.shape[0]
    if n < 4:
        return np.arange(n)
    from sklearn.cluster import HDBSCAN
    from sklearn.decomposition import PCA

    z = x
    if n > 500 and x.shape[1] > 32:
        z = PCA(n_components=32, random_state=seed).fit_transform(x)
        z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    min_size = max(2, math.ceil(n * min_cluster_share))
    labels = HDBSCAN(min_cluster_size=min_size, min_samples=2, metric="euclidean", copy=True).fit_predict(z)
    if labels.max() < 0:
        return np.zeros(n, dtype=np.int64)
    k = labels.max() + 1
    cent = np.stack([x[labels == t].mean(axis=0) for t in range(k)])
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    noise = np.flatnonzero(labels < 0)
    if noise.size:
        sim = x[noise] @ cent.T
        best = sim.argmax(axis=1)
        ok = sim[np.arange(noise.size), best] >= join_min_similarity
        labels[noise[ok]] = best[ok]
    return labels
