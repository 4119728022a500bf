"""Persona induction, end to end: embed -> cluster -> label -> stage -> score -> publish.

Each step is a plain function over (settings, connection) so the Airflow DAG can run them as separate tasks;
``induce`` chains them for the CLI and the demo. A run is for one ``run_date`` (the data day): it uses the
memories that started before the end of that day, so rerunning or backfilling a day gives the same personas
even after later days arrived.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone

import duckdb
import numpy as np
import polars as pl

from persona_tasks.config import Settings
from persona_tasks.days import day_end
from persona_tasks.errors import PersonaEtlError
from persona_tasks.publish import PublishReport, publish_run, stage_run
from persona_tasks.warehouse import connect, query_pl, query_row

log = logging.getLogger(__name__)


@dataclass
class InduceReport:
    run_date: date
    run_id: str
    n_users: int = 0
    n_memories: int = 0
    n_personas: int = 0
    n_llm: int = 0
    n_fallbacks: int = 0
    coverage: float = 0.0
    timings_s: dict[str, float] = field(default_factory=dict)
    llm_stats: dict | None = None
    # quality step (persona_tasks.quality.score_run on the staged run): personas with all four scores, and the
    # mean of each score over them (None when no persona could be scored)
    n_scored: int = 0
    quality_means: dict[str, float | None] = field(default_factory=dict)
    published: PublishReport | None = None

    def summary(self) -> str:
        s = (f"run {self.run_date}: {self.n_personas} personas for {self.n_users} users from {self.n_memories} "
             f"memories (coverage {self.coverage:.1%})")
        if self.n_llm:
            s += f"; LLM labelled {self.n_llm} clusters, {self.n_fallbacks} fell back to extractive"
        if self.quality_means:
            s += f"; {self.quality_summary()}"
        return s

    def quality_summary(self) -> str:
        """``quality: 120/125 scored, mean objective 0.812 (cohesion ..., alignment ..., truthfulness ...)``."""
        def f(k: str) -> str:
            v = self.quality_means.get(k)
            return "n/a" if v is None else f"{v:.3f}"

        parts = ", ".join(f"{k} {f(k)}" for k in ("cohesion", "alignment", "truthfulness"))
        return f"quality: {self.n_scored}/{self.n_personas} scored, mean objective {f('objective')} ({parts})"


def latest_event_date(con: duckdb.DuckDBPyConnection) -> date:
    row = query_row(con, "SELECT max(event_date) FROM marts.intent_memories")
    if not row or row[0] is None:
        raise PersonaEtlError("marts.intent_memories is empty: ingest and `persona-etl build` first")
    return row[0]


def cluster_step(settings: Settings, con: duckdb.DuckDBPyConnection, run_date: date,
                 users: list[str] | None = None, shard: int | None = None, n_shards: int | None = None):
    """Cluster the memories (up to ``run_date``) of the given users / shard and store the clusters."""
    from persona_tasks.cluster import cluster_users, load_cluster_input, write_clusters
    from persona_tasks.embed import embedder_from_settings

    version = embedder_from_settings(settings).model_version
    frame = load_cluster_input(con, version, shard, n_shards).filter(pl.col("started_at") < day_end(run_date))
    if users is not None:
        frame = frame.filter(pl.col("user_id").is_in(users))
    result = cluster_users(settings, frame)
    write_clusters(con, result, version, shard, n_shards)
    return result


def load_cluster_inputs(con: duckdb.DuckDBPyConnection, run_date: date,
                        users: list[str] | None = None) -> pl.DataFrame:
    """One row per stored (user, cluster): memory ids, texts and centrality, most central first (memories that
    started before the end of ``run_date`` only: users with no memory up to that day keep older clusters)."""
    df = query_pl(
        con, """
        SELECT c.user_id, c.cluster_id, list(c.memory_id ORDER BY c.centrality DESC, c.memory_id) AS memory_ids,
               list(m.embedding_text ORDER BY c.centrality DESC, c.memory_id) AS memory_texts,
               list(c.centrality ORDER BY c.centrality DESC, c.memory_id) AS centrality
        FROM personas.memory_clusters c JOIN marts.intent_memories m USING (memory_id)
        WHERE c.cluster_id IS NOT NULL AND m.started_at < $end
        GROUP BY c.user_id, c.cluster_id
        ORDER BY c.user_id, c.cluster_id
        """, {"end": day_end(run_date)})
    if users is not None:
        df = df.filter(pl.col("user_id").is_in(users))
    return df


def _llm_users(user_ids: list[str], llm_max_users: int | None) -> set[str]:
    """The users the LLM labels when capped: a stable pseudo-random sample (by md5 of user_id)."""
    if llm_max_users is None:
        return set(user_ids)
    ranked = sorted(set(user_ids), key=lambda u: hashlib.md5(u.encode()).hexdigest())
    return set(ranked[:llm_max_users])


def label_step(settings: Settings, con: duckdb.DuckDBPyConnection, run_date: date, labeller: str = "extractive",
               users: list[str] | None = None, llm_max_users: int | None = None,
               report: InduceReport | None = None) -> InduceReport:
    """Label every stored cluster of the users, embed the personas, and stage the run (not yet published)."""
    from persona_tasks.embed import embedder_from_settings, embeddings_to_numpy, load_embeddings
    from persona_tasks.labelling import ClusterInput, ExtractiveLabeller
    from persona_tasks.labelling.privacy import mask_clusters, public_terms

    run_id = f"{run_date.isoformat()}-{labeller}"
    report = report or InduceReport(run_date=run_date, run_id=run_id)
    t0 = time.perf_counter()
    frame = load_cluster_inputs(con, run_date, users)
    if frame.is_empty():
        raise PersonaEtlError(f"no clusters to label for run date {run_date}: run the cluster step first")
    clusters = [
        ClusterInput(user_id=u, cluster_id=str(c), memory_ids=list(ids), memory_texts=list(txt),
                     centrality=[float(v) if v is not None else 0.0 for v in cen])
        for u, c, ids, txt, cen in frame.select("user_id", "cluster_id", "memory_ids", "memory_texts",
                                                "centrality").iter_rows()
    ]
    # k-anonymous terms: words fewer than min_term_users users wrote never reach a labeller (labelling/privacy.py)
    clusters = mask_clusters(clusters, public_terms(con, run_date, settings.labelling.min_term_users))
    chosen = _llm_users([c.user_id for c in clusters], llm_max_users) if labeller == "llm" else set()
    llm_idx = [i for i, c in enumerate(clusters) if c.user_id in chosen]
    ext_idx = [i for i, c in enumerate(clusters) if c.user_id not in chosen]
    labels: list = [None] * len(clusters)
    if ext_idx:
        for i, lab in zip(ext_idx, ExtractiveLabeller(settings).label([clusters[i] for i in ext_idx])):
            labels[i] = lab
    if llm_idx:
        from persona_tasks.labelling import LLMLabeller

        llm = LLMLabeller(settings)
        for i, lab in zip(llm_idx, llm.label([clusters[i] for i in llm_idx])):
            labels[i] = lab
        report.llm_stats = llm.stats.as_dict()
        report.n_llm = len(llm_idx)
        report.n_fallbacks = llm.stats.fallbacks
    report.timings_s["label"] = round(time.perf_counter() - t0, 2)

    # persona text embeddings and evidence similarity
    t1 = time.perf_counter()
    embedder = embedder_from_settings(settings)
    texts = [f"{lab.label}. {lab.description}" for lab in labels]
    pvec = embedder.encode(texts)
    mem = load_embeddings(con, embedder.model_version, [m for c in clusters for m in c.memory_ids])
    mem_index = {m: k for k, m in enumerate(mem["memory_id"].to_list())}
    mvec = embeddings_to_numpy(mem["embedding"]) if mem.height else np.zeros((0, pvec.shape[1]), np.float32)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    p_rows, e_rows = [], []
    for k, (c, lab) in enumerate(zip(clusters, labels)):
        pid = hashlib.md5(f"{c.user_id}\x1f{run_date.isoformat()}\x1f{c.cluster_id}".encode()).hexdigest()
        p_rows.append({
            "persona_id": pid, "user_id": c.user_id, "run_date": run_date, "cluster_id": int(c.cluster_id),
            "label": lab.label, "description": lab.description, "n_evidence": len(c.memory_ids),
            "labeller": lab.labeller, "model_version": lab.model_version, "is_fallback": bool(lab.fallback),
            "run_id": run_id, "created_at": now,
        })
        cited = set(lab.evidence_ids)
        rows_idx = [mem_index[m] for m in c.memory_ids if m in mem_index]
        sims = (mvec[rows_idx] @ pvec[k]) if rows_idx else np.zeros(0)
        sim_of = dict(zip([m for m in c.memory_ids if m in mem_index], sims.tolist()))
        for m, cen in zip(c.memory_ids, c.centrality or []):
            e_rows.append({"persona_id": pid, "run_date": run_date, "user_id": c.user_id, "memory_id": m,
                           "similarity": float(sim_of.get(m, 0.0)), "centrality": float(cen),
                           "is_cited": m in cited})
    personas = pl.DataFrame(p_rows, schema_overrides={"run_date": pl.Date, "cluster_id": pl.Int32,
                                                      "n_evidence": pl.Int32})
    evidence = pl.DataFrame(e_rows, schema_overrides={"run_date": pl.Date})
    embeddings = pl.DataFrame({
        "persona_id": personas["persona_id"], "run_date": personas["run_date"],
        "model_version": [embedder.model_version] * personas.height,
        "embedding": pl.Series([v for v in pvec], dtype=pl.List(pl.Float32)),
    })
    n_users = personas["user_id"].n_unique()
    n_mem_total = query_row(
        con, "SELECT count(*) FROM personas.memory_clusters WHERE user_id IN (SELECT * FROM (SELECT unnest($u)))",
        {"u": personas["user_id"].unique().to_list()})[0]
    report.n_users, report.n_personas = n_users, personas.height
    report.n_memories = max(report.n_memories, n_mem_total)
    report.coverage = evidence.height / n_mem_total if n_mem_total else 0.0
    report.timings_s["persona_embed"] = round(time.perf_counter() - t1, 2)
    run_row = {"run_id": run_id, "run_date": run_date, "labeller": labeller, "n_users": n_users,
               "n_personas": personas.height, "n_llm": report.n_llm, "n_fallbacks": report.n_fallbacks,
               "coverage": report.coverage, "stats": json.dumps({"timings_s": report.timings_s,
                                                                 "llm": report.llm_stats}),
               "published_at": None}
    stage_run(con, run_date, personas, evidence, embeddings, run_row)
    return report


def quality_step(settings: Settings, con: duckdb.DuckDBPyConnection, run_date: date,
                 users: list[str] | None = None, report: InduceReport | None = None):
    """Score the staged personas of ``run_date`` (``persona_tasks.quality.score_run``: cohesion, alignment,
    truthfulness, objective in ``personas.staged_personas``) and record a summary in ``report``."""
    from persona_tasks.quality import score_run

    t = time.perf_counter()
    q = score_run(settings, con, run_date, users=users)
    if report is not None:
        report.n_scored = q.n_scored
        report.quality_means = q.finite_means()
        report.timings_s["quality"] = round(time.perf_counter() - t, 2)
    return q


def induce(settings: Settings, labeller: str = "extractive", users: list[str] | None = None,
           run_date: date | None = None, llm_max_users: int | None = None,
           con: duckdb.DuckDBPyConnection | None = None) -> InduceReport:
    """Embed, cluster, label, score and publish personas for ``run_date`` (default: the latest event day)."""
    from persona_tasks.embed import embed_memories

    if labeller not in ("llm", "extractive"):
        raise PersonaEtlError(f"unknown labeller {labeller!r}: use llm or extractive")
    own = con is None
    con = con or connect(settings)
    try:
        run_date = run_date or latest_event_date(con)
        report = InduceReport(run_date=run_date, run_id=f"{run_date.isoformat()}-{labeller}")
        t = time.perf_counter()
        memories = query_pl(
            con, "SELECT memory_id, user_id, embedding_text FROM marts.intent_memories WHERE started_at < $end",
            {"end": day_end(run_date)})
        if users is not None:
            memories = memories.filter(pl.col("user_id").is_in(users))
            if memories.is_empty():
                raise PersonaEtlError("none of the given users has intent memories up to the run date")
        embed_memories(settings, con, memories=memories)
        report.timings_s["embed"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        result = cluster_step(settings, con, run_date, users=users)
        report.timings_s["cluster"] = round(time.perf_counter() - t, 2)
        report.n_memories = int(result.users["n_memories"].sum()) if result.users.height else 0
        label_step(settings, con, run_date, labeller, users=users, llm_max_users=llm_max_users, report=report)
        quality_step(settings, con, run_date, users=users, report=report)
        t = time.perf_counter()
        report.published = publish_run(settings, con, run_date)
        report.timings_s["publish"] = round(time.perf_counter() - t, 2)
        log.info("induce: %s; timings %s", report.summary(), report.timings_s)
        return report
    finally:
        if own:
            con.close()


def report_dict(report: InduceReport) -> dict:
    d = asdict(report)
    d["run_date"] = report.run_date.isoformat()
    if report.published:
        d["published"]["run_date"] = report.published.run_date.isoformat()
    return d
