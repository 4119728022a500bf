"""Special categories of personal data: planted personas classified by the real embedder, the keep / flag /
suppress policy, and publication on a real DuckDB warehouse."""

from __future__ import annotations

import json
from datetime import date, datetime

import polars as pl
import pytest

from persona_tasks.config import load_settings
from persona_tasks.sensitive import (
    SensitiveCategoriesError,
    SensitiveClassifier,
    apply_policy,
    load_categories,
)

PLANTED = {
    "health": "Cancer symptoms, chemotherapy and oncologist. 9 memories mostly about cancer symptoms, chemotherapy, "
              "oncologist, side effects, hospital and treatment.",
    "religion": "Church, bible study and prayer. 7 memories mostly about church, bible study, prayer, sunday, "
                "gospel and ministry.",
    "neutral": "Espresso machines, burr grinders and milk frothers. 12 memories mostly about espresso machines, burr "
               "grinders, milk frothers, breville, tamper and descaling.",
    "sexual_content": "Nude pictures, xxx videos and porn. 20 memories mostly about nude pictures, xxx videos, porn, "
                      "adult sites, sex and webcam.",
    "political_views": "Republican party, election and conservative. 6 memories mostly about republican party, "
                       "election, conservative, campaign, vote and senate.",
}


@pytest.fixture(scope="module")
def embedder():
    from persona_tasks.embed import embedder_from_settings

    return embedder_from_settings(load_settings(threads=1))


def test_planted_personas_are_classified(embedder):
    clf = SensitiveClassifier(load_categories(load_settings()), embedder)
    found = dict(zip(PLANTED, clf.classify(embedder.encode(list(PLANTED.values())))))
    assert "health" in found["health"]
    assert "religion" in found["religion"]
    assert "sexual_content" in found["sexual_content"]
    assert "political_views" in found["political_views"]
    assert found["neutral"] == []
    # every score is a cosine, one column per category in file order
    s = clf.scores(embedder.encode(list(PLANTED.values())))
    assert s.shape == (len(PLANTED), len(clf.categories.names)) and (s <= 1.0 + 1e-6).all()


def test_policy_keep_flag_suppress():
    cats = [["health"], ["religion", "health"], [], ["religion"]]
    flags, suppress = apply_policy(cats, {"health": "suppress", "religion": "flag"})
    assert suppress == [True, True, False, False]
    assert flags[3] == ["religion"] and flags[2] == []
    flags, suppress = apply_policy(cats, {"health": "keep"})   # unlisted categories are flagged
    assert flags == [[], ["religion"], [], ["religion"]] and not any(suppress)


def test_unknown_category_in_settings_is_refused(tmp_path):
    with pytest.raises(SensitiveCategoriesError, match="unknown categories"):
        load_categories(load_settings(sensitive={"policy": {"astrology": "flag"}}))
    bad = tmp_path / "cats.json"
    bad.write_text(json.dumps({"categories": {"health": {"threshold": 0.3}}}))
    with pytest.raises(SensitiveCategoriesError, match="cats.json"):
        load_categories(load_settings(sensitive={"categories_file": str(bad)}))
    # a threshold override applies
    cats = load_categories(load_settings(sensitive={"thresholds": {"health": 0.9}}))
    assert cats.thresholds["health"] == 0.9


def _stage(settings, con, embedder, run_date):
    from persona_tasks.publish import stage_run

    now = datetime(2026, 1, 2)
    names = list(PLANTED)
    personas = pl.DataFrame([{
        "persona_id": f"p-{n}", "user_id": f"u-{n}", "run_date": run_date, "cluster_id": 0,
        "label": PLANTED[n].split(".")[0], "description": PLANTED[n].split(". ", 1)[1], "n_evidence": 1,
        "labeller": "extractive", "model_version": "extractive-ctfidf-v1", "is_fallback": False,
        "change": "appeared", "version": 1, "first_seen": run_date, "content_hash": f"h-{n}",
        "run_id": "r1", "created_at": now} for n in names],
        schema_overrides={"run_date": pl.Date, "first_seen": pl.Date, "cluster_id": pl.Int32, "n_evidence": pl.Int32,
                          "version": pl.Int32})
    evidence = pl.DataFrame([{"persona_id": f"p-{n}", "run_date": run_date, "user_id": f"u-{n}",
                              "memory_id": f"m-{n}", "similarity": 0.5, "centrality": 1.0, "is_cited": True}
                             for n in names], schema_overrides={"run_date": pl.Date})
    vecs = embedder.encode(list(PLANTED.values()))
    embeddings = pl.DataFrame({"persona_id": personas["persona_id"], "run_date": personas["run_date"],
                               "model_version": [embedder.model_version] * len(names),
                               "embedding": pl.Series([v for v in vecs], dtype=pl.List(pl.Float32))})
    run_row = {"run_id": "r1", "run_date": run_date, "labeller": "extractive", "n_users": len(names),
               "n_personas": len(names), "n_llm": 0, "n_fallbacks": 0, "coverage": 1.0, "stats": "{}",
               "published_at": None}
    stage_run(con, run_date, personas, evidence, embeddings, run_row)


def test_publish_flags_and_suppresses_on_a_real_warehouse(tmp_path, embedder):
    from persona_tasks.publish import publish_run
    from persona_tasks.warehouse import connect

    settings = load_settings(warehouse=tmp_path / "wh.duckdb", threads=1,
                             sensitive={"policy": {"sexual_content": "suppress", "political_views": "keep"}})
    run_date = date(2026, 1, 1)
    with connect(settings) as con:
        _stage(settings, con, embedder, run_date)
        report = publish_run(settings, con, run_date)
        rows = dict(con.execute("SELECT persona_id, sensitive_categories FROM personas.personas").fetchall())
        evidence = {r[0] for r in con.execute("SELECT persona_id FROM personas.persona_evidence").fetchall()}
        n_suppressed = con.execute("SELECT n_suppressed FROM personas.induction_runs").fetchall()[0][0]
        # publishing the same staged run again gives the same rows (idempotent rerun of a day)
        publish_run(settings, con, run_date)
        again = dict(con.execute("SELECT persona_id, sensitive_categories FROM personas.personas").fetchall())
    # suppressed: not published, nor its evidence; counted in the run report
    assert set(rows) == {f"p-{n}" for n in PLANTED if n != "sexual_content"}
    assert evidence == set(rows) and n_suppressed == 1 == report.n_suppressed
    # flagged: published with its category; keep: published unmarked; neutral: unmarked
    assert "health" in rows["p-health"] and "religion" in rows["p-religion"] and report.n_flagged >= 2
    assert rows["p-political_views"] == [] and rows["p-neutral"] == []
    assert again == rows


def test_demo_showcases_unflagged_users_by_its_rule_with_masked_snippets(tmp_path, embedder, capsys):
    from persona_tasks.demo import show_personas, showcase_users, snippet
    from persona_tasks.publish import publish_run
    from persona_tasks.warehouse import connect

    settings = load_settings(warehouse=tmp_path / "wh.duckdb", threads=1)
    run_date = date(2026, 1, 1)
    with connect(settings) as con:
        _stage(settings, con, embedder, run_date)
        con.execute("CREATE SCHEMA marts")
        con.execute("CREATE TABLE marts.intent_memories AS SELECT 'm-' || n AS memory_id, 'u-' || n AS user_id, "
                    "TIMESTAMP '2026-01-01 10:00:00' AS started_at, "
                    "CASE n WHEN 'neutral' THEN 'zanzibarian descaling' ELSE 'descaling' END AS embedding_text "
                    "FROM (VALUES ('neutral'), ('health'), ('religion'), ('sexual_content'), ('political_views')) v(n)")
        publish_run(settings, con, run_date)
        # the neutral persona as if the LLM had written it; the flagged religion one too (never shown)
        con.execute("UPDATE personas.persona_history SET labeller = 'llm', objective = 0.8 "
                    "WHERE persona_id IN ('p-neutral', 'p-religion')")
        users, rule = showcase_users(con, n_users=5)
    # every other planted persona is in a flagged category: only the neutral user may be shown
    assert users == ["u-neutral"] and "at least 1 published personas" in rule
    show_personas(settings.warehouse)
    out = capsys.readouterr().out
    assert "user u-neutral" in out and "user u-health" not in out and rule in out
    # evidence is a memory id with a masked snippet: one user's words never reach the screen
    assert "evidence m-neutral: [rare] descaling" in out and "zanzibarian" not in out
    # LLM-written personas get their own lines, flagged ones never
    llm_part = out.split("written by the LLM labeller", 1)[1]
    assert "user u-neutral: [llm]" in llm_part and "u-religion" not in llm_part
    assert snippet("a" * 100, None, width=10) == "a" * 9 + "…"
