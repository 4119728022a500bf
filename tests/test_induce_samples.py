"""Persona induction on the bundled real samples (AOL search log, MovieLens ratings): the real loaders, a real
dbt build, real MiniLM embeddings, clustering, the extractive labeller, scoring and publishing, for a few users
of each (embedding every memory of every user would take minutes on 2 cores)."""

from __future__ import annotations

import hashlib

import polars as pl
import pytest

from persona_tasks.config import PROJECT_DIR, load_settings
from persona_tasks.dbt_runner import build
from persona_tasks.induce import induce
from persona_tasks.ingest import ingest_files
from persona_tasks.warehouse import connect_read_only, query_pl

DATA = PROJECT_DIR / "data"
N_USERS = 5


@pytest.fixture(scope="module", params=["aol", "movielens"])
def sample(request, tmp_path_factory):
    fmt = request.param
    settings = load_settings(warehouse=tmp_path_factory.mktemp(fmt) / "wh.duckdb")
    paths = [DATA / "aol" / "aol_sample.tsv.gz"] if fmt == "aol" else [DATA / "movielens" / "ratings.csv"]
    ingest_files(settings, fmt, paths)
    build(settings)
    with connect_read_only(settings) as con:
        counts = query_pl(con, """SELECT user_id, count(*) AS n FROM marts.intent_memories
                                  GROUP BY user_id HAVING count(*) BETWEEN 5 AND 150""")
    # a stable sample of users with a moderate number of memories (several clusters, affordable to embed)
    users = sorted(counts["user_id"].to_list(), key=lambda u: hashlib.md5(u.encode()).hexdigest())[:N_USERS]
    report = induce(settings, labeller="extractive", users=users)
    return fmt, settings, users, report


def test_sample_users_get_personas_with_their_own_evidence(sample):
    fmt, settings, users, report = sample
    assert report.published is not None and report.n_users == len(users)
    with connect_read_only(settings) as con:
        personas = query_pl(con, "SELECT * FROM personas.personas")
        evidence = query_pl(con, """
            SELECT p.user_id AS persona_user, m.user_id AS memory_user, e.persona_id, e.memory_id
            FROM personas.persona_evidence e JOIN personas.personas p USING (persona_id)
            JOIN marts.intent_memories m USING (memory_id)""")
        memories = query_pl(con, "SELECT user_id, count(*) AS n FROM marts.intent_memories GROUP BY user_id")
    assert set(personas["user_id"]) == set(users)
    assert personas.height >= len(users)
    # evidence always belongs to the persona's own user; every persona has evidence
    assert (evidence["persona_user"] == evidence["memory_user"]).all()
    assert set(evidence["persona_id"]) == set(personas["persona_id"])
    assert (personas["n_evidence"] >= 1).all()
    # labels are short and non-empty; scores are there and in range
    assert personas["label"].map_elements(lambda s: 0 < len(s.split()) <= 8, return_dtype=pl.Boolean).all()
    for col in ("cohesion", "alignment", "truthfulness", "objective"):
        vals = personas[col].drop_nulls()
        assert vals.len() == personas.height and vals.min() >= 0 and vals.max() <= 1
    # coverage: most of each user's memories end up as some persona's evidence (noise rules are documented)
    per_user = evidence.group_by("persona_user").agg(pl.col("memory_id").n_unique().alias("covered"))
    cov = per_user.join(memories, left_on="persona_user", right_on="user_id")
    assert (cov["covered"] / cov["n"]).mean() >= 0.5, (fmt, cov)


def test_sample_personas_are_grounded_in_the_evidence_text(sample):
    """Extractive labels are built from the evidence: every label word appears in the user's memory text."""
    fmt, settings, users, _ = sample
    with connect_read_only(settings) as con:
        rows = query_pl(con, """
            SELECT p.persona_id, any_value(p.label) AS label, lower(string_agg(m.memory_text, ' ')) AS text
            FROM personas.personas p JOIN personas.persona_evidence e USING (persona_id)
            JOIN marts.intent_memories m USING (memory_id) GROUP BY p.persona_id""")
    assert rows.height > 0
    grounded = rows.map_rows(lambda r: all(w.strip(",.;:()'\"-").lower() in r[2]
                                           for w in r[1].split() if len(w.strip(",.;:()'\"-")) > 3))
    assert grounded.to_series().mean() >= 0.8, fmt
