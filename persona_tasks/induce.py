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
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime, timezone

import duckdb
import numpy as np
import polars as pl

from persona_tasks.config import Settings
from persona_tasks.days import day_end
from persona_tasks.errors import PersonaEtlError
from persona_tasks.publish import PublishReport, publish_run, stage_run
from persona_tasks.warehouse import connect, query_pl, query_row
from persona_tasks.sampling import stable_sample

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
    n_active: int = 0  # users recomputed (incremental: their memories changed; full: all)
    n_labelled: int = 0  # clusters a labeller was asked about (the rest kept their persona's label)
    changes: dict[str, int] = field(default_factory=dict)  # staged personas: appeared / changed / unchanged
    quality_means: dict[str, float | None] = field(default_factory=dict)
    published: PublishReport | None = None

    def summary(self) -> str:
        s = (f"run {self.run_date}: {self.n_active} active users recomputed, {self.n_personas} personas for "
             f"{self.n_users} users from {self.n_memories} memories (coverage {self.coverage:.1%})")
        if self.changes:
            s += " ({})".format(", ".join(f"{v} {k}" for k, v in self.changes.items()))
        if self.published is not None:
            s += f", {self.published.n_retired} retired"
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
    from persona_tasks.cluster import cluster_users, global_umap_for, load_cluster_input, write_clusters
    from persona_tasks.embed import embedder_from_settings

    version = embedder_from_settings(settings).model_version
    frame = load_cluster_input(con, version, shard, n_shards, users).filter(pl.col("started_at") < day_end(run_date))
    result = cluster_users(settings, frame, global_umap=global_umap_for(settings, con, version, run_date))
    write_clusters(con, result, version, shard, n_shards)
    return result


def load_cluster_inputs(con: duckdb.DuckDBPyConnection, run_date: date,
                        users: list[str] | None = None) -> pl.DataFrame:
    """One row per stored (user, cluster): memory ids, texts and centrality, most central first (memories that
    started before the end of ``run_date`` only: users with no memory up to that day keep older clusters);
    only ``users``' clusters when given (filtered in SQL: a day reads its active users only)."""
    only = "" if users is None else "AND c.user_id IN (SELECT unnest($u))"
    params: dict = {"end": day_end(run_date)}
    if users is not None:
        params["u"] = list(users)
    return query_pl(
        con, f"""
        SELECT c.user_id, c.cluster_id, list(c.memory_id ORDER BY c.centrality DESC, c.memory_id) AS memory_ids,
               list(m.embedding_text ORDER BY c.centrality DESC, c.memory_id) AS memory_texts,
               list(c.centrality ORDER BY c.centrality DESC, c.memory_id) AS centrality
        FROM personas.memory_clusters c JOIN marts.intent_memories m USING (memory_id)
        WHERE c.cluster_id IS NOT NULL AND m.started_at < $end {only}
        GROUP BY c.user_id, c.cluster_id
        ORDER BY c.user_id, c.cluster_id
        """, params)


def _llm_users(user_ids: list[str], llm_max_users: int | None) -> set[str]:
    """The users the LLM labels when capped: a stable pseudo-random sample (by md5 of user_id)."""
    if llm_max_users is None:
        return set(user_ids)
    return set(stable_sample(user_ids, llm_max_users))


class _Labellers:
    """The run's labellers: the LLM for the chosen users (``llm_max_users`` sample), extractive for the rest;
    ``label`` may be called more than once, the LLM statistics add up."""

    def __init__(self, settings: Settings, labeller: str, llm_max_users: int | None, user_ids: list[str]):
        self.settings = settings
        self.chosen = _llm_users(user_ids, llm_max_users) if labeller == "llm" else set()
        self.extractive = None
        self.llm = None
        self.n_llm = 0

    def label(self, clusters: list) -> list:
        from persona_tasks.labelling import ExtractiveLabeller

        out: list = [None] * len(clusters)
        llm_idx = [k for k, c in enumerate(clusters) if c.user_id in self.chosen]
        ext_idx = [k for k, c in enumerate(clusters) if c.user_id not in self.chosen]
        if ext_idx:
            self.extractive = self.extractive or ExtractiveLabeller(self.settings)
            for k, lab in zip(ext_idx, self.extractive.label([clusters[k] for k in ext_idx])):
                out[k] = lab
        if llm_idx:
            from persona_tasks.labelling import LLMLabeller

            self.llm = self.llm or LLMLabeller(self.settings)
            for k, lab in zip(llm_idx, self.llm.label([clusters[k] for k in llm_idx])):
                out[k] = lab
            self.n_llm += len(llm_idx)
        return out

    def report(self, report: InduceReport) -> None:
        if self.llm is not None:
            report.llm_stats = self.llm.stats.as_dict()
            report.n_llm = self.n_llm
            report.n_fallbacks = self.llm.stats.fallbacks


def _content_hash(label: str, description: str, memory_ids) -> str:
    """Equal hash = the same persona version (label, description and evidence ids)."""
    body = "\x1f".join([label, description, *sorted(memory_ids)])
    return hashlib.md5(body.encode()).hexdigest()


def label_step(settings: Settings, con: duckdb.DuckDBPyConnection, run_date: date, labeller: str = "extractive",
               users: list[str] | None = None, llm_max_users: int | None = None,
               report: InduceReport | None = None, full: bool = False,
               active: pl.DataFrame | None = None) -> InduceReport:
    """Match the active users' new clusters to their current personas (persona_tasks.identity), label the
    clusters that need it, embed the personas, and stage the run (not yet published).

    Each staged persona is ``appeared`` (a new id), ``changed`` (a continued id, new version: its evidence or
    label changed) or ``unchanged`` (same evidence and label: scores copied, no new version on publish).
    """
    from persona_tasks.embed import embedder_from_settings, embeddings_to_numpy, load_embeddings
    from persona_tasks.identity import active_users, current_personas_before, match_to_previous, mint_persona_id
    from persona_tasks.labelling import ClusterInput
    from persona_tasks.labelling.privacy import mask_clusters, public_terms, update_term_users

    run_id = f"{run_date.isoformat()}-{labeller}"
    report = report or InduceReport(run_date=run_date, run_id=run_id)
    t0 = time.perf_counter()
    if active is None:  # the CLI path passes the set it computed before embedding (the same: nothing between
        active = active_users(con, run_date, full)  # them changes marts.intent_memories); a DAG task computes it
    if users is not None:
        active = active.filter(pl.col("user_id").is_in(users))
    active_ids = active["user_id"].to_list()
    frame = load_cluster_inputs(con, run_date, active_ids)
    clusters = [
        ClusterInput(user_id=u, cluster_id=str(c), memory_ids=list(ids), memory_texts=list(txt),
                     centrality=[float(v) if v is not None else 0.0 for v in cen])
        for u, c, ids, txt, cen in frame.select("user_id", "cluster_id", "memory_ids", "memory_texts",
                                                "centrality").iter_rows()
    ]
    previous = current_personas_before(con, run_date, active_ids)
    embedder = embedder_from_settings(settings)
    wanted = sorted({m for c in clusters for m in c.memory_ids} | {m for ids in previous["memory_ids"] for m in ids})
    mem = load_embeddings(con, embedder.model_version, wanted)
    mem_index = {m: k for k, m in enumerate(mem["memory_id"].to_list())}
    mvec = embeddings_to_numpy(mem["embedding"]) if mem.height else np.zeros((0, embedder.dim), np.float32)

    # identity: which current persona each new cluster continues (one-to-one, by evidence overlap)
    cfg = settings.incremental
    prev_rows = {r["persona_id"]: r for r in previous.iter_rows(named=True)}
    by_user: dict[str, list[int]] = {}
    for i, c in enumerate(clusters):
        by_user.setdefault(c.user_id, []).append(i)
    match_of = {i: (m.persona_id, m.jaccard) for i, m in
                match_to_previous(clusters, previous, cfg.match_min_jaccard, mvec, mem_index).items()}
    keep = {i for i, (_, jac) in match_of.items() if jac >= cfg.keep_label_min_jaccard}
    to_label = [i for i in range(len(clusters)) if i not in keep]

    labels: list = [None] * len(clusters)
    # the active users' words for the k-anonymity counts (labelling/privacy.py): nobody else's changed
    update_term_users(con, run_date, active_ids)
    if to_label:
        # k-anonymous terms: words fewer than min_term_users users wrote never reach a labeller (labelling/privacy.py)
        terms = public_terms(con, run_date, settings.labelling.min_term_users)
        masked = mask_clusters(clusters, terms)
        llm = _Labellers(settings, labeller, llm_max_users, [c.user_id for c in clusters])
        # the user's kept clusters are the contrast a new label is chosen against (c-TF-IDF across the user's
        # clusters), as when all of a user's clusters are labelled together
        kept_texts: dict[str, list[list[str]]] = {}
        for i in sorted(keep):
            kept_texts.setdefault(clusters[i].user_id, []).append(masked[i].memory_texts)
        asked = [replace(masked[i], other_clusters_texts=kept_texts.get(masked[i].user_id, [])) for i in to_label]
        for i, lab in zip(to_label, llm.label(asked)):
            labels[i] = lab
        # a new label equal to a kept one of the same user: that user's clusters are labelled again together
        final = {i: (prev_rows[match_of[i][0]]["label"] if i in keep else labels[i].label) for i in range(len(clusters))}
        clash = sorted({clusters[i].user_id for i in to_label for j in by_user[clusters[i].user_id]
                        if j != i and final[j].strip().lower() == final[i].strip().lower()})
        if clash:
            redo = [i for u in clash for i in by_user[u]]
            for i, lab in zip(redo, llm.label([masked[i] for i in redo])):
                labels[i] = lab
            keep -= set(redo)
            to_label = sorted(set(to_label) | set(redo))
            log.info("label %s: %d user(s) relabelled whole (a new label equalled a kept one)", run_date, len(clash))
        llm.report(report)
    report.timings_s["label"] = round(time.perf_counter() - t0, 2)
    report.n_labelled = len(to_label)

    # persona rows: ids, versions and change kinds; text embeddings and evidence similarity
    t1 = time.perf_counter()
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    texts, p_rows, e_rows = [], [], []
    for k, c in enumerate(clusters):
        pid, jac = match_of.get(k, (None, 0.0))
        prev = prev_rows.get(pid) if pid else None
        row = {"run_date": run_date, "user_id": c.user_id, "cluster_id": int(c.cluster_id),
               "n_evidence": len(c.memory_ids), "run_id": run_id, "created_at": now,
               "cohesion": None, "alignment": None, "truthfulness": None, "objective": None,
               "sensitive_categories": None}
        if k in keep:
            for f in ("label", "description", "labeller", "model_version", "is_fallback"):
                row[f] = prev[f]
            cited: set[str] = set(prev["cited_ids"] or [])
        else:
            lab = labels[k]
            row.update(label=lab.label, description=lab.description, labeller=lab.labeller,
                       model_version=lab.model_version, is_fallback=bool(lab.fallback))
            cited = set(lab.evidence_ids)
        if prev is None:
            row.update(persona_id=mint_persona_id(c.user_id, run_date, c.cluster_id), version=1,
                       first_seen=run_date, change="appeared")
        else:
            same = (k in keep and set(prev["memory_ids"]) == set(c.memory_ids))
            row.update(persona_id=pid, first_seen=prev["first_seen"],
                       version=prev["version"] if same else prev["version"] + 1,
                       change="unchanged" if same else "changed")
            if same:
                for f in ("cohesion", "alignment", "truthfulness", "objective", "sensitive_categories"):
                    row[f] = prev[f]
        row["content_hash"] = _content_hash(row["label"], row["description"], c.memory_ids)
        p_rows.append(row)
        texts.append(f"{row['label']}. {row['description']}")
        e_rows.append((row["persona_id"], c, cited))
    pvec = embedder.encode(texts) if texts else np.zeros((0, embedder.dim), np.float32)
    ev_rows = []
    for k, (pid, c, cited) in enumerate(e_rows):
        rows_idx = [mem_index[m] for m in c.memory_ids if m in mem_index]
        sims = (mvec[rows_idx] @ pvec[k]) if rows_idx else np.zeros(0)
        sim_of = dict(zip([m for m in c.memory_ids if m in mem_index], sims.tolist()))
        for m, cen in zip(c.memory_ids, c.centrality or []):
            ev_rows.append({"persona_id": pid, "run_date": run_date, "user_id": c.user_id, "memory_id": m,
                            "similarity": float(sim_of.get(m, 0.0)), "centrality": float(cen),
                            "is_cited": m in cited})
    p_schema = {"run_date": pl.Date, "change": pl.String, "persona_id": pl.String, "version": pl.Int32,
                "user_id": pl.String, "first_seen": pl.Date, "cluster_id": pl.Int32, "label": pl.String,
                "description": pl.String, "n_evidence": pl.Int32, "labeller": pl.String,
                "model_version": pl.String, "is_fallback": pl.Boolean, "cohesion": pl.Float64,
                "alignment": pl.Float64, "truthfulness": pl.Float64, "objective": pl.Float64,
                "sensitive_categories": pl.List(pl.String), "content_hash": pl.String, "run_id": pl.String,
                "created_at": pl.Datetime("us")}
    personas = pl.DataFrame(p_rows, schema=p_schema) if p_rows else pl.DataFrame(schema=p_schema)
    evidence = pl.DataFrame(ev_rows, schema={
        "persona_id": pl.String, "run_date": pl.Date, "user_id": pl.String, "memory_id": pl.String,
        "similarity": pl.Float64, "centrality": pl.Float64, "is_cited": pl.Boolean})
    embeddings = pl.DataFrame({
        "persona_id": personas["persona_id"], "run_date": personas["run_date"],
        "model_version": [embedder.model_version] * personas.height,
        "embedding": pl.Series([v for v in pvec], dtype=pl.List(pl.Float32)),
    }, schema={"persona_id": pl.String, "run_date": pl.Date, "model_version": pl.String,
               "embedding": pl.List(pl.Float32)})
    n_users = personas["user_id"].n_unique()
    n_mem_total = int(active["n_memories"].sum()) if active.height else 0
    report.n_users, report.n_personas, report.n_active = n_users, personas.height, active.height
    report.changes = {k: int((personas["change"] == k).sum()) for k in ("appeared", "changed", "unchanged")}
    report.n_memories = max(report.n_memories, n_mem_total)
    report.coverage = evidence.height / n_mem_total if n_mem_total else 0.0
    report.timings_s["persona_embed"] = round(time.perf_counter() - t1, 2)
    log.info("label %s: %d active users, %d clusters (%d labelled, %d kept their label): %s", run_date,
             active.height, len(clusters), len(to_label), len(keep), report.changes)
    run_row = {"run_id": run_id, "run_date": run_date, "labeller": labeller, "n_users": active.height,
               "n_personas": personas.height, "n_llm": report.n_llm, "n_fallbacks": report.n_fallbacks,
               "coverage": report.coverage, "stats": json.dumps({"timings_s": report.timings_s,
                                                                 "llm": report.llm_stats,
                                                                 "labelled": len(to_label),
                                                                 "changes": report.changes}),
               "published_at": None, "mode": "full" if full else "incremental"}
    stage_run(con, run_date, personas, evidence, embeddings, run_row, active)
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
           con: duckdb.DuckDBPyConnection | None = None, full: bool = False, rewind: bool = False) -> InduceReport:
    """Embed, cluster, label, score and publish personas for ``run_date`` (default: the latest event day).

    Incremental by default: only the day's active users (persona_tasks.identity) are recomputed; ``full``
    recomputes every user (after a change of embedding model or clustering settings; on unchanged data it gives
    the same personas). ``rewind``: see ``publish.publish_run``.
    """
    from persona_tasks.embed import embed_memories
    from persona_tasks.identity import active_users

    if labeller not in ("llm", "extractive"):
        raise PersonaEtlError(f"unknown labeller {labeller!r}: use llm or extractive")
    own = con is None
    con = con or connect(settings)
    try:
        run_date = run_date or latest_event_date(con)
        report = InduceReport(run_date=run_date, run_id=f"{run_date.isoformat()}-{labeller}")
        t = time.perf_counter()
        active = active_users(con, run_date, full)
        if users is not None:
            active = active.filter(pl.col("user_id").is_in(users))
            known = query_row(con, "SELECT count(*) FROM marts.intent_memories WHERE started_at < $end AND user_id "
                                   "IN (SELECT unnest($u))", {"end": day_end(run_date), "u": list(users)})[0]
            if not known:
                raise PersonaEtlError("none of the given users has intent memories up to the run date")
        active_ids = active["user_id"].to_list()
        report.timings_s["active"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        if active_ids:
            memories = query_pl(
                con, "SELECT memory_id, user_id, embedding_text FROM marts.intent_memories WHERE started_at < $end "
                     "AND user_id IN (SELECT unnest($u))", {"end": day_end(run_date), "u": active_ids})
            embed_memories(settings, con, memories=memories)
        report.timings_s["embed"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        if active_ids:
            result = cluster_step(settings, con, run_date, users=active_ids)
            report.n_memories = int(result.users["n_memories"].sum()) if result.users.height else 0
        report.timings_s["cluster"] = round(time.perf_counter() - t, 2)
        label_step(settings, con, run_date, labeller, users=users, llm_max_users=llm_max_users, report=report,
                   full=full, active=active)
        if report.n_personas:
            quality_step(settings, con, run_date, users=users, report=report)
        t = time.perf_counter()
        report.published = publish_run(settings, con, run_date, rewind=rewind)
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
