"""Persona induction end to end on a real warehouse: ingest (events format) -> dbt build -> induce -> publish."""

from __future__ import annotations

import json
from datetime import date

import duckdb
import polars as pl
import pytest
from sklearn.metrics import adjusted_rand_score

from persona_tasks.config import load_settings
from persona_tasks.dbt_runner import build
from persona_tasks.errors import PersonaEtlError
from persona_tasks.induce import induce, label_step, report_dict
from persona_tasks.ingest import ingest_files
from persona_tasks.publish import publish_run
from persona_tasks.quality import score_run
from persona_tasks.synth import generate_events, write_events
from persona_tasks.warehouse import connect, query_pl, query_row

PUBLISHED = ("personas.personas", "personas.persona_evidence", "personas.persona_topics",
             "personas.persona_embeddings")
AUDIT_COLUMNS = {"created_at", "published_at"}


def checksum(con: duckdb.DuckDBPyConnection, table: str) -> tuple:
    cols = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall() if r[0] not in AUDIT_COLUMNS]
    expr = ", ".join(cols)
    return query_row(con, f"SELECT count(*), sum(hash({expr})) FROM {table}")


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("induce")
    settings = load_settings(warehouse=tmp / "wh.duckdb",
                             ingest={"events": {"attributes": ["category", "brand", "price"]}})
    events = generate_events(2500, n_users=25, seed=7, days=4)
    path = write_events(events, tmp / "events.parquet")
    ingest_files(settings, "events", [path], source="synth")
    build(settings)
    report = induce(settings, labeller="extractive")
    return settings, events, report


def test_every_user_gets_personas_for_each_cluster(warehouse):
    settings, events, report = warehouse
    with connect(settings) as con:
        per_user = query_pl(con, """
            SELECT c.user_id, count(DISTINCT c.cluster_id) AS n_clusters,
                   (SELECT count(*) FROM personas.personas p WHERE p.user_id = c.user_id) AS n_personas
            FROM personas.memory_clusters c WHERE c.cluster_id IS NOT NULL GROUP BY c.user_id""")
        n_users_with_memories = query_row(con, "SELECT count(DISTINCT user_id) FROM marts.intent_memories")[0]
    assert per_user.height == n_users_with_memories == events["user_id"].n_unique()
    assert (per_user["n_clusters"] == per_user["n_personas"]).all()
    assert report.n_personas == per_user["n_personas"].sum()
    assert 0.9 <= report.coverage <= 1.0


SCORE_COLUMNS = ["cohesion", "alignment", "truthfulness", "objective"]


def test_every_published_persona_has_its_quality_scores(warehouse):
    settings, _, report = warehouse
    with connect(settings) as con:
        s = query_pl(con, "SELECT persona_id, cohesion, alignment, truthfulness, objective FROM personas.personas "
                          "WHERE run_date = $d", {"d": report.run_date})
    assert s.height == report.n_personas > 0
    assert s.select(pl.col(SCORE_COLUMNS).null_count()).sum_horizontal().item() == 0
    assert s.select(((pl.col(SCORE_COLUMNS) >= 0) & (pl.col(SCORE_COLUMNS) <= 1)).all()).to_numpy().all()
    # objective = the configured weighted mean, recomputed from the stored parts
    w = settings.quality.objective_weights
    expected = sum(w[k] * s[k] for k in w) / sum(w.values())
    assert (s["objective"] - expected).abs().max() < 1e-9
    # the run's report carries the quality summary (and the CLI / log line shows it)
    assert report.n_scored == report.n_personas
    assert report.quality_means["objective"] == pytest.approx(s["objective"].mean(), abs=1e-4)
    assert set(report.quality_means) == set(SCORE_COLUMNS)
    assert f"quality: {report.n_personas}/{report.n_personas} scored, mean objective" in report.summary()
    assert "quality" in report.timings_s
    d = json.loads(json.dumps(report_dict(report), allow_nan=False))
    assert d["n_scored"] == report.n_scored and d["quality_means"]["objective"] == report.quality_means["objective"]


def test_a_persona_with_unrelated_text_scores_lower(warehouse):
    """Swap one well-scored persona's text (and text embedding) for another user's least similar persona: its
    alignment and truthfulness fall below its own and below the typical normally labelled persona's."""
    settings, _, report = warehouse
    d = report.run_date
    with connect(settings) as con:
        score_run(settings, con, d)  # the staged run (every test leaves one labelled) with fresh scores
        s = query_pl(con, "SELECT p.persona_id, p.user_id, p.label, p.description, p.alignment, p.truthfulness, "
                          "p.objective, e.embedding FROM personas.staged_personas p "
                          "JOIN personas.staged_persona_embeddings e USING (persona_id, run_date) "
                          "WHERE p.run_date = $d ORDER BY p.objective DESC, p.persona_id", {"d": d})
        victim = s.row(0, named=True)
        others = s.filter(pl.col("user_id") != victim["user_id"])
        vecs, v = others["embedding"].to_list(), victim["embedding"]
        donor = others.row(min(range(others.height), key=lambda i: sum(a * b for a, b in zip(vecs[i], v))),
                           named=True)
        con.execute("UPDATE personas.staged_personas SET label = $l, description = $t WHERE persona_id = $p",
                    {"l": donor["label"], "t": donor["description"], "p": victim["persona_id"]})
        con.execute("UPDATE personas.staged_persona_embeddings SET embedding = $e WHERE persona_id = $p",
                    {"e": donor["embedding"], "p": victim["persona_id"]})
        score_run(settings, con, d, users=[victim["user_id"]])
        swapped = query_row(con, "SELECT alignment, truthfulness FROM personas.staged_personas "
                                 "WHERE persona_id = $p", {"p": victim["persona_id"]})
        # restore the staging area for the other tests
        label_step(settings, con, d, "extractive")
        score_run(settings, con, d)
    normal = s.filter(pl.col("persona_id") != victim["persona_id"])
    print(f"victim {victim['label']!r} -> {donor['label']!r}: alignment {victim['alignment']:.3f} -> "
          f"{swapped[0]:.3f}, truthfulness {victim['truthfulness']:.3f} -> {swapped[1]:.3f}; normal medians "
          f"{normal['alignment'].median():.3f} / {normal['truthfulness'].median():.3f}")
    assert swapped[0] < min(victim["alignment"], normal["alignment"].median())
    assert swapped[1] < min(victim["truthfulness"], normal["truthfulness"].median())


def test_cli_induce_prints_the_quality_summary(warehouse, monkeypatch, capsys, tmp_path):
    from persona_tasks.cli import main

    settings, _, report = warehouse
    monkeypatch.setenv("PERSONA_ETL_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("PERSONA_ETL_WAREHOUSE", str(settings.warehouse))
    assert main(["induce", "--run-date", report.run_date.isoformat()]) == 0
    out = capsys.readouterr().out
    assert f"quality: {report.n_personas}/{report.n_personas} scored, mean objective" in out
    assert "truthfulness" in out and "published:" in out


def test_evidence_is_the_persona_cluster_of_the_same_user(warehouse):
    settings, _, _ = warehouse
    with connect(settings) as con:
        bad = query_row(con, """
            SELECT count(*) FROM personas.persona_evidence e
            JOIN personas.persona_history p USING (persona_id, version)
            LEFT JOIN personas.memory_clusters c ON c.memory_id = e.memory_id
            WHERE c.user_id IS DISTINCT FROM p.user_id OR c.cluster_id IS DISTINCT FROM p.cluster_id
               OR e.user_id <> p.user_id""")[0]
        mismatch = query_row(con, """
            SELECT count(*) FROM personas.persona_history p
            WHERE n_evidence <> (SELECT count(*) FROM personas.persona_evidence e WHERE e.persona_id = p.persona_id
                                 AND e.version = p.version)
               OR n_evidence = 0 OR length(label) = 0 OR length(description) = 0""")[0]
        sims = query_row(con, "SELECT min(similarity), max(similarity), bool_or(is_cited) "
                              "FROM personas.persona_evidence")
    assert bad == 0 and mismatch == 0
    assert -1.0 <= sims[0] <= sims[1] <= 1.0 and sims[2]


def test_clusters_recover_planted_personas(warehouse):
    """Memories of one planted persona should mostly share a cluster (ARI over all users' memories)."""
    settings, events, _ = warehouse
    with connect(settings) as con:
        mem = query_pl(con, """
            SELECT c.user_id, c.cluster_id, m.memory_id, unnest(m.event_ids) AS event_id
            FROM personas.memory_clusters c JOIN marts.intent_memories m USING (memory_id)""")
        ev = query_pl(con, "SELECT event_id, user_id, event_ts, event_type, text FROM raw.events")
    planted = events.select("user_id", "event_ts", "event_type", "text", "planted_persona", "planted_noise")
    ev = ev.join(planted, on=["user_id", "event_ts", "event_type", "text"], how="inner")
    m = (mem.join(ev.select("event_id", "planted_persona", "planted_noise"), on="event_id")
         .filter(~pl.col("planted_noise"))
         .group_by("memory_id", "user_id", "cluster_id").agg(pl.col("planted_persona").mode().first()))
    truth = (m["user_id"] + "|" + m["planted_persona"]).to_list()
    pred = (m["user_id"] + "|" + m["cluster_id"].cast(pl.String).fill_null("none")).to_list()
    assert adjusted_rand_score(truth, pred) > 0.6


def test_topics_group_personas_across_users(warehouse):
    settings, _, report = warehouse
    with connect(settings) as con:
        topics = query_pl(con, "SELECT * FROM personas.persona_topics")
        dangling = query_row(con, "SELECT count(*) FROM personas.personas p WHERE topic_id IS NOT NULL AND "
                                  "topic_id NOT IN (SELECT topic_id FROM personas.persona_topics)")[0]
        in_topics = query_row(con, "SELECT count(*) FROM personas.personas WHERE topic_id IS NOT NULL")[0]
    assert report.published is not None and report.published.n_topics == topics.height > 0
    assert dangling == 0
    assert topics["n_personas"].sum() == in_topics
    assert (topics["n_users"] <= topics["n_personas"]).all()
    assert topics["n_users"].max() > 1  # 25 users over 24 planted topics: some topic is shared


def test_rerun_of_the_day_gives_identical_tables(warehouse):
    settings, _, report = warehouse
    with connect(settings) as con:
        before = {t: checksum(con, t) for t in PUBLISHED}
    induce(settings, labeller="extractive", run_date=report.run_date)
    with connect(settings) as con:
        after = {t: checksum(con, t) for t in PUBLISHED}
    assert before == after


def test_failed_publish_leaves_last_good_rows(warehouse):
    settings, _, report = warehouse
    with connect(settings) as con:
        before = {t: checksum(con, t) for t in PUBLISHED}
        label_step(settings, con, report.run_date, "extractive")
        # corrupt one staged persona embedding (wrong dimension): the topic step inside publish fails
        con.execute("UPDATE personas.staged_persona_embeddings SET embedding = [1.0, 0.0] "
                    "WHERE persona_id = (SELECT min(persona_id) FROM personas.staged_persona_embeddings)")
        with pytest.raises(Exception, match="different lengths"):
            publish_run(settings, con, report.run_date)
        after = {t: checksum(con, t) for t in PUBLISHED}
        # repair the staging area for the other tests
        label_step(settings, con, report.run_date, "extractive")
    assert before == after


def test_run_date_uses_only_memories_up_to_that_day(warehouse):
    settings, _, report = warehouse
    first_day = date(2026, 1, 1)
    with connect(settings) as con:
        before = {t: checksum(con, t) for t in PUBLISHED}
        # an earlier day than the latest published one, with a different result: refused without rewind
        with pytest.raises(PersonaEtlError, match="rewind"):
            induce(settings, labeller="extractive", run_date=first_day, con=con)
        assert {t: checksum(con, t) for t in PUBLISHED} == before
        r = induce(settings, labeller="extractive", run_date=first_day, con=con, rewind=True)
        later = query_row(con, """
            SELECT count(*) FROM personas.persona_evidence e JOIN marts.intent_memories m USING (memory_id)
            WHERE e.valid_from = $d AND m.event_date > $d""", {"d": first_day})[0]
        current = query_row(con, "SELECT count(DISTINCT run_date), min(run_date) FROM personas.current_personas")
        published = query_row(con, "SELECT list(run_date ORDER BY run_date) FROM personas.induction_runs "
                                    "WHERE published_at IS NOT NULL")[0]
    assert r.n_personas > 0 and later == 0
    assert current == (1, first_day) and published == [first_day]  # the later day was undone: rerun it
    # rerunning the later day restores it (the day's input is what it was)
    induce(settings, labeller="extractive", run_date=report.run_date)
    with connect(settings) as con:
        assert query_row(con, "SELECT max(run_date) FROM personas.current_personas")[0] == report.run_date


@pytest.mark.slow
def test_llm_labeller_end_to_end_on_a_sample_of_users(warehouse):
    """Real SmolLM2-135M forward passes for one user's clusters; other users stay extractive."""
    settings, _, report = warehouse
    r = induce(settings, labeller="llm", run_date=report.run_date, llm_max_users=1)
    with connect(settings) as con:
        by = query_pl(con, "SELECT labeller, is_fallback, count(DISTINCT user_id) AS users, count(*) AS n "
                           "FROM personas.personas WHERE run_date = $d GROUP BY ALL", {"d": report.run_date})
        run = query_row(con, "SELECT n_llm, n_fallbacks FROM personas.induction_runs WHERE run_id = $r",
                        {"r": r.run_id})
        llm_users = query_row(con, "SELECT count(DISTINCT user_id) FROM personas.personas WHERE run_date = $d "
                                   "AND (labeller = 'llm' OR is_fallback)", {"d": report.run_date})[0]
    assert r.n_llm > 0 and run == (r.n_llm, r.n_fallbacks)
    llm_or_fallback = by.filter((pl.col("labeller") == "llm") | pl.col("is_fallback"))
    assert llm_users == 1 and llm_or_fallback["n"].sum() == r.n_llm
    assert r.llm_stats is not None and r.llm_stats["generated_tokens"] > 0
