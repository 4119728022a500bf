"""Persona tables for analysts, with stable persona ids and history, and their atomic publication.

A run writes the personas of its *active* users (persona_tasks.identity) to *staging* tables
(``personas.staged_*``, keyed by ``run_date``), each marked ``appeared``, ``changed`` or ``unchanged`` against the
user's current personas; later steps (scoring, quality gates) read and update them there; ``publish_run`` then,
in one DuckDB transaction, writes a new *version* of every appeared or changed persona, closes the versions they
replace, retires the active users' personas that no new cluster continues, records the users' new input states
and assigns topics. Users who were not active keep every row as it was. A reader never sees half a run; a run
that fails before publishing leaves the last published state untouched; publishing the same day again gives the
same rows, byte for byte (the day is undone first, and a version that comes back identical keeps its
``created_at``). A day before the latest published one is republished only when its result is unchanged;
otherwise the error says to rerun the later days too (``persona-etl induce --run-date D --rewind``).

Published tables and views (schema ``personas``; columns in docs/tables.md, the dbt sources, docs/analysts.md):

- ``persona_history``: one row per persona *version* (type-2 history): ``valid_from`` (run date it was
  published), ``valid_to`` (the run date that replaced or retired it; NULL while current), ``is_current``.
- ``persona_evidence`` / ``persona_embeddings``: per version (``persona_id, version``): the memories that are
  its evidence (its cluster), with similarity to the persona text; the persona text embedding.
- ``user_states``: per user and day their clustering input changed: what decides who is active.
- ``persona_topics``: personas clustered across users at a fit date (``run_date``); a version's ``topic_id``.
- views ``current_personas`` (the current version of every live persona), ``persona_changes`` (appeared /
  changed / retired per day) and ``personas`` (every persona as of every published run date: what older
  queries and the gates read).
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
from persona_tasks.errors import PersonaEtlError
from persona_tasks.warehouse import query_pl, query_row, table_exists, transaction
from persona_tasks.sampling import stable_sample_indices

log = logging.getLogger(__name__)

# the persona content both the staged rows and the history carry
_PERSONA_BODY = """
    persona_id     VARCHAR   NOT NULL,   -- stable: minted when the persona first appears (persona_tasks.identity)
    version        INTEGER   NOT NULL,   -- 1, 2, ... per persona: a new version when label, description or evidence change
    user_id        VARCHAR   NOT NULL,
    first_seen     DATE      NOT NULL,   -- run date of the persona's first version
    cluster_id     INTEGER   NOT NULL,   -- user-local intent cluster when this version was made (personas.memory_clusters)
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
    content_hash   VARCHAR   NOT NULL,   -- md5 of label, description and evidence ids: equal hash = same version
    run_id         VARCHAR   NOT NULL,
    created_at     TIMESTAMP NOT NULL    -- UTC
"""

_STAGED_PERSONA_COLUMNS = f"""
    run_date       DATE      NOT NULL,   -- the data day the run induced personas for
    change         VARCHAR   NOT NULL,   -- appeared | changed | unchanged (against the user's current personas)
    {_PERSONA_BODY}
"""

_HISTORY_COLUMNS = f"""
    {_PERSONA_BODY},
    valid_from     DATE      NOT NULL,   -- the run date that published this version
    valid_to       DATE,                 -- the run date that replaced or retired it; NULL while current
    is_current     BOOLEAN   NOT NULL,
    change         VARCHAR   NOT NULL,   -- appeared | changed: how this version began
    ended          VARCHAR               -- changed | retired: how it ended; NULL while current
"""

_EVIDENCE_BODY = """
    user_id        VARCHAR   NOT NULL,
    memory_id      VARCHAR   NOT NULL,   -- marts.intent_memories
    similarity     DOUBLE    NOT NULL,   -- cosine(persona text embedding, memory embedding)
    centrality     DOUBLE,               -- cosine(memory, cluster centroid): how representative
    is_cited       BOOLEAN   NOT NULL    -- the labeller named this memory as support
"""

_EMBEDDING_BODY = """
    model_version  VARCHAR   NOT NULL,   -- embedding model
    embedding      FLOAT[]   NOT NULL    -- L2-normalised embedding of "label. description"
"""

# the views, also recreated in the analysts' serving copy (persona_tasks.serving)
VIEWS = {
    "personas.current_personas": """
        SELECT h.*, (SELECT max(run_date) FROM personas.induction_runs WHERE published_at IS NOT NULL) AS run_date
        FROM personas.persona_history h WHERE h.is_current""",
    "personas.personas": """
        SELECT r.run_date, h.*
        FROM personas.persona_history h
        JOIN (SELECT DISTINCT run_date FROM personas.induction_runs WHERE published_at IS NOT NULL) r
          ON h.valid_from <= r.run_date AND (h.valid_to IS NULL OR r.run_date < h.valid_to)""",
    "personas.persona_changes": """
        SELECT valid_from AS change_date, user_id, persona_id, version, change, label, description, first_seen
        FROM personas.persona_history
        UNION ALL
        SELECT valid_to AS change_date, user_id, persona_id, version, 'retired' AS change, label, description,
               first_seen
        FROM personas.persona_history WHERE ended = 'retired'""",
}

PERSONAS_DDL = f"""
CREATE SCHEMA IF NOT EXISTS personas;
CREATE TABLE IF NOT EXISTS personas.staged_personas ({_STAGED_PERSONA_COLUMNS});
CREATE TABLE IF NOT EXISTS personas.staged_persona_evidence (
    persona_id VARCHAR NOT NULL, run_date DATE NOT NULL, {_EVIDENCE_BODY});
CREATE TABLE IF NOT EXISTS personas.staged_persona_embeddings (
    persona_id VARCHAR NOT NULL, run_date DATE NOT NULL, {_EMBEDDING_BODY});
CREATE TABLE IF NOT EXISTS personas.persona_history ({_HISTORY_COLUMNS});
CREATE TABLE IF NOT EXISTS personas.persona_evidence (
    persona_id VARCHAR NOT NULL, version INTEGER NOT NULL, valid_from DATE NOT NULL, {_EVIDENCE_BODY});
CREATE TABLE IF NOT EXISTS personas.persona_embeddings (
    persona_id VARCHAR NOT NULL, version INTEGER NOT NULL, valid_from DATE NOT NULL, {_EMBEDDING_BODY});
CREATE TABLE IF NOT EXISTS personas.persona_topics (
    topic_id       VARCHAR   NOT NULL,   -- T<fit date>-<n>, numbered by size
    run_date       DATE      NOT NULL,   -- the fit date: topics are refitted every [topics] refit_days
    label          VARCHAR   NOT NULL,
    description    VARCHAR   NOT NULL,
    n_personas     INTEGER   NOT NULL,   -- current personas in the topic at the fit
    n_users        INTEGER   NOT NULL,
    centroid       FLOAT[]               -- mean persona embedding: new versions join the nearest topic
);
CREATE TABLE IF NOT EXISTS personas.user_states (
    user_id        VARCHAR   NOT NULL,
    valid_from     DATE      NOT NULL,   -- the run date that published this state
    n_memories     INTEGER   NOT NULL,   -- memories up to that day
    memories_hash  UBIGINT   NOT NULL    -- bit_xor of hash(memory_id, embedding_text) over them
);
CREATE TABLE IF NOT EXISTS personas.staged_user_states (
    run_date       DATE      NOT NULL,
    user_id        VARCHAR   NOT NULL,
    n_memories     INTEGER   NOT NULL,
    memories_hash  UBIGINT   NOT NULL
);
CREATE TABLE IF NOT EXISTS personas.induction_runs (
    run_id         VARCHAR   NOT NULL,
    run_date       DATE      NOT NULL,
    labeller       VARCHAR   NOT NULL,
    n_users        INTEGER   NOT NULL,   -- active users (re-clustered) of the run
    n_personas     INTEGER   NOT NULL,   -- their personas (appeared, changed and unchanged)
    n_llm          INTEGER   NOT NULL,   -- personas the LLM was asked to label
    n_fallbacks    INTEGER   NOT NULL,   -- of those, answered by the extractive fallback
    coverage       DOUBLE,               -- share of the active users' memories that are some persona's evidence
    n_suppressed   INTEGER,              -- personas not published: a sensitive category with policy "suppress"
    stats          JSON,                 -- timings and rates per step, persona changes
    published_at   TIMESTAMP             -- NULL while staged only
);
"""

_LEGACY = ("personas", "persona_evidence", "persona_embeddings", "staged_personas", "staged_persona_evidence",
           "staged_persona_embeddings", "persona_topics")


def _migrate_legacy(con: duckdb.DuckDBPyConnection) -> None:
    """Tables of a warehouse from before persona history (one full copy per run date, ids per run) are renamed
    ``<name>_legacy``: ids were not stable, so history starts with the next run (a full rebuild)."""
    if not table_exists(con, "personas", "personas") or table_exists(con, "persona_history", "personas"):
        return
    kind = con.execute("SELECT table_type FROM information_schema.tables WHERE table_schema = 'personas' "
                       "AND table_name = 'personas'").fetchall()
    if not kind or kind[0][0] != "BASE TABLE":
        return
    for t in _LEGACY:
        if table_exists(con, t, "personas"):
            con.execute(f"ALTER TABLE personas.{t} RENAME TO {t}_legacy")
    con.execute("DROP VIEW IF EXISTS personas.current_personas")
    log.warning("personas: tables from before persona history renamed to *_legacy; the next run publishes every "
                "user's personas as version 1")


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    _migrate_legacy(con)
    con.execute(PERSONAS_DDL)
    for view, sql in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {view} AS {sql}")


@dataclass(frozen=True)
class PublishReport:
    run_date: date
    n_personas: int          # current personas after the run (every user)
    n_evidence: int          # evidence rows written by the run (new versions only)
    n_users: int             # users with current personas
    n_topics: int            # topics of the latest fit
    n_flagged: int = 0
    n_suppressed: int = 0
    n_active: int = 0        # users the run recomputed
    n_appeared: int = 0
    n_changed: int = 0
    n_unchanged: int = 0
    n_retired: int = 0
    rows_written: int = 0    # history + evidence + embedding + user state rows inserted or closed
    no_op: bool = False      # an earlier day republished with an identical result


_RUN_COLUMNS = ("mode VARCHAR", "n_active INTEGER", "n_appeared INTEGER", "n_changed INTEGER",
                "n_unchanged INTEGER", "n_retired INTEGER", "rows_written BIGINT")


def _ensure_run_columns(con: duckdb.DuckDBPyConnection) -> None:
    for col in _RUN_COLUMNS:
        con.execute(f"ALTER TABLE personas.induction_runs ADD COLUMN IF NOT EXISTS {col}")


def stage_run(con: duckdb.DuckDBPyConnection, run_date: date, personas: pl.DataFrame, evidence: pl.DataFrame,
              embeddings: pl.DataFrame, run_row: dict, user_states: pl.DataFrame | None = None) -> None:
    """Replace the staged rows of ``run_date`` for the run's active users (``user_states``: ``user_id,
    n_memories, memories_hash``; default the users of ``personas``), in one transaction."""
    ensure_schema(con)
    _ensure_run_columns(con)
    if user_states is None:
        user_states = personas.select("user_id").unique().with_columns(
            pl.lit(0, pl.Int32).alias("n_memories"), pl.lit(0, pl.UInt64).alias("memories_hash"))
    states = user_states.select("user_id", "n_memories", "memories_hash").with_columns(
        pl.lit(run_date).alias("run_date"))
    con.register("_st_p", personas.to_arrow())
    con.register("_st_e", evidence.to_arrow())
    con.register("_st_m", embeddings.to_arrow())
    con.register("_st_u", states.to_arrow())
    con.register("_st_r", pl.DataFrame([run_row]).to_arrow())
    users = "(SELECT user_id FROM _st_u UNION SELECT user_id FROM _st_p)"
    try:
        with transaction(con):
            for table in ("staged_persona_evidence", "staged_persona_embeddings", "staged_personas",
                          "staged_user_states"):
                con.execute(f"DELETE FROM personas.{table} WHERE run_date = $d AND "
                            + ("persona_id IN (SELECT persona_id FROM personas.staged_personas WHERE run_date = $d "
                               f"AND user_id IN {users})" if "evidence" in table or "embeddings" in table
                               else f"user_id IN {users}"), {"d": run_date})
            con.execute("INSERT INTO personas.staged_personas BY NAME SELECT * FROM _st_p")
            con.execute("INSERT INTO personas.staged_persona_evidence BY NAME SELECT * FROM _st_e")
            con.execute("INSERT INTO personas.staged_persona_embeddings BY NAME SELECT * FROM _st_m")
            con.execute("INSERT INTO personas.staged_user_states BY NAME SELECT * FROM _st_u")
            # a rerun keeps the day published (published_at) until its own publish replaces the day's versions
            con.execute("CREATE OR REPLACE TEMP TABLE _st_published AS SELECT run_id, published_at FROM "
                        "personas.induction_runs WHERE run_id IN (SELECT run_id FROM _st_r)")
            con.execute("DELETE FROM personas.induction_runs WHERE run_id IN (SELECT run_id FROM _st_r)")
            con.execute("INSERT INTO personas.induction_runs BY NAME SELECT r.* REPLACE "
                        "(coalesce(o.published_at, r.published_at) AS published_at) FROM _st_r r "
                        "LEFT JOIN _st_published o USING (run_id)")
            con.execute("DROP TABLE _st_published")
    finally:
        for name in ("_st_p", "_st_e", "_st_m", "_st_u", "_st_r"):
            con.unregister(name)


def publish_run(settings: Settings, con: duckdb.DuckDBPyConnection, run_date: date,
                rewind: bool = False) -> PublishReport:
    """Publish the staged run of ``run_date`` as persona versions (module docstring), atomically.

    ``rewind``: when later days are published and this day's result differs from what they were built on, undo
    them too (they must be rerun: a backfill from this day); without it that case is an error.
    """
    ensure_schema(con)
    _ensure_run_columns(con)
    runs = query_row(con, "SELECT count(*), max(CASE WHEN mode = 'full' THEN 1 ELSE 0 END) "
                          "FROM personas.induction_runs WHERE run_date = $d", {"d": run_date})
    if runs[0] == 0:
        raise PersonaEtlError(f"nothing staged for run date {run_date}: run `persona-etl induce` first")
    sensitive = _classify_staged(settings, con, run_date)
    later = query_row(con, "SELECT max(run_date) FROM personas.induction_runs WHERE run_date > $d "
                           "AND published_at IS NOT NULL", {"d": run_date})[0]
    con.register("_sensitive", sensitive.to_arrow())
    try:
        with transaction(con):
            if later is not None:
                if _same_result(con, run_date):
                    con.execute("UPDATE personas.induction_runs SET published_at = coalesce(published_at, "
                                "now()::TIMESTAMP) WHERE run_date = $d", {"d": run_date})
                    report = _report(con, run_date, no_op=True)
                    log.info("publish %s: later days (up to %s) are published and this day's result is unchanged: "
                             "nothing to do", run_date, later)
                    return report
                if not rewind:
                    raise PersonaEtlError(
                        f"run date {run_date}: its personas differ from the published ones and later days (up to "
                        f"{later}) were built on those; rerun from {run_date} with rewind (`persona-etl induce "
                        f"--run-date {run_date} --rewind`, then every later day, or a backfill from {run_date})")
                log.warning("publish %s: rewinding the published days after it (up to %s): rerun them", run_date,
                            later)
            report = _publish_staged(settings, con, run_date, refit=bool(runs[1]))
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


# the staged personas of the day that become versions (the run's active users; never a suppressed one)
_NEW = ("(SELECT * FROM personas.staged_personas WHERE run_date = $d AND change <> 'unchanged' "
        "AND user_id IN (SELECT user_id FROM personas.staged_user_states WHERE run_date = $d) "
        "AND persona_id NOT IN (SELECT persona_id FROM _sensitive WHERE suppressed))")
_KEPT = ("(SELECT persona_id FROM personas.staged_personas WHERE run_date = $d "
         "AND persona_id NOT IN (SELECT persona_id FROM _sensitive WHERE suppressed))")
_ACTIVE = "(SELECT user_id FROM personas.staged_user_states WHERE run_date = $d)"


def _same_result(con: duckdb.DuckDBPyConnection, run_date: date) -> bool:
    """Whether the staged run of ``run_date`` gives exactly the versions, retirements and user states that are
    published for that day (a rerun of an earlier day with unchanged input)."""
    p = {"d": run_date}
    new = con.execute(f"SELECT persona_id, version, content_hash FROM {_NEW} ORDER BY ALL", p).fetchall()
    old = con.execute("SELECT persona_id, version, content_hash FROM personas.persona_history WHERE valid_from = $d "
                      "ORDER BY ALL", p).fetchall()
    if new != old:
        return False
    retired_new = con.execute(
        f"SELECT persona_id FROM personas.persona_history WHERE valid_from < $d AND (valid_to IS NULL OR "
        f"valid_to >= $d) AND user_id IN {_ACTIVE} AND persona_id NOT IN {_KEPT} ORDER BY 1", p).fetchall()
    retired_old = con.execute("SELECT persona_id FROM personas.persona_history WHERE valid_to = $d AND "
                              "ended = 'retired' ORDER BY 1", p).fetchall()
    if retired_new != retired_old:
        return False
    states_new = con.execute("SELECT user_id, n_memories, memories_hash FROM personas.staged_user_states "
                             "WHERE run_date = $d ORDER BY ALL", p).fetchall()
    states_old = con.execute("SELECT user_id, n_memories, memories_hash FROM personas.user_states "
                             "WHERE valid_from = $d ORDER BY ALL", p).fetchall()
    return states_new == states_old


def _undo_from(con: duckdb.DuckDBPyConnection, run_date: date) -> None:
    """Remove what the runs of ``run_date`` and later published: their versions (with evidence and embeddings),
    user states and topic fits; the versions they closed are current again."""
    p = {"d": run_date}
    for table in ("persona_evidence", "persona_embeddings", "persona_history", "user_states"):
        con.execute(f"DELETE FROM personas.{table} WHERE valid_from >= $d", p)
    con.execute("UPDATE personas.persona_history SET valid_to = NULL, is_current = true, ended = NULL "
                "WHERE valid_to >= $d", p)
    con.execute("DELETE FROM personas.persona_topics WHERE run_date >= $d", p)
    con.execute("UPDATE personas.induction_runs SET published_at = NULL WHERE run_date > $d", p)


def _publish_staged(settings: Settings, con: duckdb.DuckDBPyConnection, run_date: date,
                    refit: bool = False) -> PublishReport:
    """The body of ``publish_run``, inside its transaction (``_sensitive`` registered)."""
    p = {"d": run_date}
    con.execute("UPDATE personas.staged_personas s SET sensitive_categories = c.sensitive_categories "
                "FROM _sensitive c WHERE s.persona_id = c.persona_id AND s.run_date = $d", p)
    # a version republished identically keeps its created_at (a rerun gives byte-identical tables)
    before = query_pl(con, "SELECT persona_id, version, content_hash, created_at FROM personas.persona_history "
                           "WHERE valid_from = $d", p)
    _undo_from(con, run_date)
    con.register("_before", before.to_arrow())
    try:
        n_changed = con.execute(
            "UPDATE personas.persona_history SET valid_to = $d, is_current = false, ended = 'changed' "
            f"WHERE is_current AND persona_id IN (SELECT persona_id FROM {_NEW} WHERE change = 'changed')",
            p).fetchall()[0][0]
        n_retired = con.execute(
            "UPDATE personas.persona_history SET valid_to = $d, is_current = false, ended = 'retired' "
            f"WHERE is_current AND user_id IN {_ACTIVE} AND persona_id NOT IN {_KEPT}", p).fetchall()[0][0]
        n_new = con.execute(
            "INSERT INTO personas.persona_history BY NAME "
            "SELECT n.* EXCLUDE (run_date, created_at), coalesce(b.created_at, n.created_at) AS created_at, "
            "$d AS valid_from, NULL::DATE AS valid_to, true AS is_current, NULL AS ended "
            f"FROM {_NEW} n LEFT JOIN _before b USING (persona_id, version, content_hash)", p).fetchall()[0][0]
    finally:
        con.unregister("_before")
    n_ev = con.execute(
        "INSERT INTO personas.persona_evidence BY NAME SELECT e.* EXCLUDE (run_date), n.version, $d AS valid_from "
        f"FROM personas.staged_persona_evidence e JOIN {_NEW} n USING (persona_id) WHERE e.run_date = $d",
        p).fetchall()[0][0]
    n_emb = con.execute(
        "INSERT INTO personas.persona_embeddings BY NAME SELECT e.* EXCLUDE (run_date), n.version, $d AS valid_from "
        f"FROM personas.staged_persona_embeddings e JOIN {_NEW} n USING (persona_id) WHERE e.run_date = $d",
        p).fetchall()[0][0]
    n_states = con.execute("INSERT INTO personas.user_states SELECT user_id, $d, n_memories, memories_hash "
                           "FROM personas.staged_user_states WHERE run_date = $d", p).fetchall()[0][0]
    _assign_topics(settings, con, run_date, refit)
    n_suppressed = query_row(con, "SELECT count(*) FROM _sensitive WHERE suppressed")[0]
    n_flagged = query_row(con, "SELECT count(*) FROM _sensitive WHERE NOT suppressed "
                               "AND len(sensitive_categories) > 0")[0]
    n_appeared = query_row(con, "SELECT count(*) FROM personas.persona_history WHERE valid_from = $d "
                                "AND change = 'appeared'", p)[0]
    n_unchanged = query_row(con, "SELECT count(*) FROM personas.staged_personas WHERE run_date = $d "
                                 "AND change = 'unchanged'", p)[0]
    n_active = query_row(con, f"SELECT count(*) FROM {_ACTIVE}", p)[0]
    rows = int(n_changed + n_retired + n_new + n_ev + n_emb + n_states)
    con.execute("UPDATE personas.induction_runs SET n_suppressed = $n, n_active = $a, n_appeared = $ap, "
                "n_changed = $c, n_unchanged = $u, n_retired = $r, rows_written = $w WHERE run_date = $d",
                {"d": run_date, "n": n_suppressed, "a": n_active, "ap": n_appeared, "c": n_new - n_appeared,
                 "u": n_unchanged, "r": n_retired, "w": rows})
    con.execute("UPDATE personas.induction_runs SET published_at = now()::TIMESTAMP "
                "WHERE run_date = $d AND published_at IS NULL", p)
    return _report(con, run_date, n_flagged=int(n_flagged), n_suppressed=int(n_suppressed), n_evidence=int(n_ev))


def _report(con: duckdb.DuckDBPyConnection, run_date: date, no_op: bool = False, n_flagged: int = 0,
            n_suppressed: int = 0, n_evidence: int = 0) -> PublishReport:
    n_p, n_u = query_row(con, "SELECT count(*), count(DISTINCT user_id) FROM personas.persona_history "
                              "WHERE is_current")
    n_t = query_row(con, "SELECT count(*) FROM personas.persona_topics WHERE run_date = (SELECT max(run_date) "
                         "FROM personas.persona_topics)")[0]
    r = query_row(con, "SELECT coalesce(max(n_active), 0), coalesce(max(n_appeared), 0), coalesce(max(n_changed), 0), "
                       "coalesce(max(n_unchanged), 0), coalesce(max(n_retired), 0), coalesce(max(rows_written), 0) "
                       "FROM personas.induction_runs WHERE run_date = $d", {"d": run_date})
    return PublishReport(run_date, int(n_p), n_evidence, int(n_u), int(n_t), n_flagged, n_suppressed,
                         *(int(v) for v in r), no_op=no_op)


def _assign_topics(settings: Settings, con: duckdb.DuckDBPyConnection, run_date: date, refit: bool) -> int:
    """Topics of the current personas: a refit (every current persona clustered across users, each topic
    labelled with c-TF-IDF terms) when asked, when there is no fit yet or the latest is ``[topics] refit_days``
    old; otherwise the day's new versions (and any persona whose topic fit was undone) join the latest fit's
    nearest topic (cosine to its centroid at least ``join_min_similarity``), so the cost follows the activity."""
    from persona_tasks.embed import embeddings_to_numpy

    last = query_row(con, "SELECT max(run_date) FROM personas.persona_topics")[0]
    if refit or last is None or (run_date - last).days >= settings.topics.refit_days:
        return _refit_topics(settings, con, run_date)
    rows = query_pl(
        con, "SELECT h.persona_id, e.embedding FROM personas.persona_history h JOIN personas.persona_embeddings e "
        "USING (persona_id, version) WHERE h.is_current AND (h.valid_from = $d OR (h.topic_id IS NOT NULL AND "
        "h.topic_id NOT IN (SELECT topic_id FROM personas.persona_topics))) ORDER BY h.persona_id", {"d": run_date})
    topics = query_pl(con, "SELECT topic_id, centroid FROM personas.persona_topics WHERE run_date = $l "
                           "AND centroid IS NOT NULL ORDER BY topic_id", {"l": last})
    if rows.is_empty():
        return topics.height
    topic = [None] * rows.height
    if topics.height:
        sim = embeddings_to_numpy(rows["embedding"]) @ embeddings_to_numpy(topics["centroid"]).T
        best = sim.argmax(axis=1)
        ids = topics["topic_id"].to_list()
        topic = [ids[b] if sim[i, b] >= settings.topics.join_min_similarity else None for i, b in enumerate(best)]
    con.register("_topic_of", pl.DataFrame({"persona_id": rows["persona_id"], "topic_id": topic},
                                           schema={"persona_id": pl.String, "topic_id": pl.String}).to_arrow())
    try:
        con.execute("UPDATE personas.persona_history h SET topic_id = t.topic_id FROM _topic_of t "
                    "WHERE h.persona_id = t.persona_id AND h.is_current")
    finally:
        con.unregister("_topic_of")
    return topics.height


LABEL_TEXTS = 100


def _refit_topics(settings: Settings, con: duckdb.DuckDBPyConnection, run_date: date) -> int:
    """Cluster every current persona across users (``topic_clusters``) and label each topic."""
    from persona_tasks.embed import embeddings_to_numpy
    from persona_tasks.labelling import ClusterInput, ExtractiveLabeller

    rows = query_pl(
        con, "SELECT h.persona_id, h.user_id, h.label, h.description, e.embedding FROM personas.persona_history h "
        "JOIN personas.persona_embeddings e USING (persona_id, version) WHERE h.is_current ORDER BY h.persona_id")
    con.execute("DELETE FROM personas.persona_topics WHERE run_date = $d", {"d": run_date})
    if rows.is_empty():
        return 0
    x = embeddings_to_numpy(rows["embedding"])
    cfg = settings.topics
    if rows.height > cfg.fit_sample:
        # fit on a stable sample (by md5 of persona_id), then every persona joins its nearest topic: the refit's
        # cost stays bounded however many personas there are
        idx = np.sort(stable_sample_indices(rows["persona_id"].to_list(), cfg.fit_sample))
        fitted = topic_clusters(x[idx], cfg.min_cluster_share, cfg.join_min_similarity, seed=settings.clustering.seed)
        k = int(fitted.max()) + 1
        topic = np.full(rows.height, -1, dtype=np.int64)
        if k > 0:
            cent = np.stack([x[idx][fitted == t].mean(axis=0) for t in range(k)])
            cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
            sim = x @ cent.T
            best = sim.argmax(axis=1)
            topic = np.where(sim[np.arange(rows.height), best] >= cfg.join_min_similarity, best, -1)
        log.info("topics: fitted on %d of %d current personas, %d topics", len(idx), rows.height, k)
    else:
        topic = topic_clusters(x, cfg.min_cluster_share, cfg.join_min_similarity, seed=settings.clustering.seed)
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
    # each topic labelled from at most LABEL_TEXTS of its personas' texts (in persona_id order): enough for its key
    # terms, and the refit's cost stays bounded
    labels = ExtractiveLabeller(settings).label([
        ClusterInput(user_id="__topics__", cluster_id=t, memory_ids=list(pids)[:LABEL_TEXTS],
                     memory_texts=list(texts)[:LABEL_TEXTS])
        for t, pids, texts in zip(groups["topic_id"], groups["persona_id"], groups["text"])
    ]) if groups.height else []
    index = {t: i for i, t in enumerate(groups["topic_id"].to_list())}
    member = np.array([index.get(t, -1) if t is not None else -1 for t in rows["topic_id"].to_list()])
    sums = np.stack([x[member == t].sum(axis=0) for t in range(groups.height)]) if groups.height else \
        np.zeros((0, x.shape[1]), np.float32)
    sums /= np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    cents = [row.astype(np.float32).tolist() for row in sums]
    topics = pl.DataFrame({
        "topic_id": groups["topic_id"],
        "run_date": [run_date] * groups.height,
        "label": [lab.label for lab in labels],
        "description": [lab.description for lab in labels],
        "n_personas": groups["persona_id"].list.len().cast(pl.Int32),
        "n_users": groups["user_id"].list.n_unique().cast(pl.Int32),
        "centroid": pl.Series(cents, dtype=pl.List(pl.Float32)),
    }, schema_overrides={"run_date": pl.Date})
    con.register("_topics", topics.to_arrow())
    con.register("_topic_of", rows.select("persona_id", "topic_id").to_arrow())
    try:
        con.execute("INSERT INTO personas.persona_topics BY NAME SELECT * FROM _topics")
        con.execute("UPDATE personas.persona_history h SET topic_id = t.topic_id FROM _topic_of t "
                    "WHERE h.persona_id = t.persona_id AND h.is_current")
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
