"""Incremental daily induction with stable persona ids (persona_tasks.identity, publish): the DAG's task
functions (``daily.run_day``, gates included) on four days of the bundled AOL sample, incremental against full
rebuild, reruns, and the analysts' history queries of docs/analysts.md on the real warehouse."""

from __future__ import annotations

import re
import shutil
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from persona_tasks import daily
from persona_tasks.config import load_settings
from persona_tasks.identity import jaccard, match_clusters, mint_persona_id
from persona_tasks.serving import table_checksum
from persona_tasks.warehouse import connect, query_pl, query_row

DAYS = [date(2006, 3, 1), date(2006, 3, 2), date(2006, 3, 3), date(2006, 3, 4)]
TABLES = ("personas.persona_history", "personas.persona_evidence", "personas.persona_embeddings",
          "personas.persona_topics", "personas.user_states")
ANALYSTS_DOC = Path(__file__).resolve().parents[1] / "docs" / "analysts.md"


# --- matching rule -----------------------------------------------------------------------------------------------

def test_matching_is_one_to_one_by_overlap_with_a_threshold():
    new = [frozenset("abcd"), frozenset("xyz"), frozenset("abce")]
    prev = [("p1", frozenset("abc")), ("p2", frozenset("xy")), ("p3", frozenset("q"))]
    matches = match_clusters(new, prev, min_jaccard=0.3)
    # cluster 0 and 2 both overlap p1 by 3/4; the tie goes to the lower cluster index; cluster 2 is new
    assert [(m.cluster, m.persona_id) for m in matches] == [(0, "p1"), (1, "p2")]
    assert matches[1].jaccard == pytest.approx(jaccard(frozenset("xyz"), frozenset("xy")))
    assert match_clusters(new, prev, min_jaccard=0.8) == []


def test_centroid_cosine_breaks_equal_overlaps():
    new = [frozenset("ab"), frozenset("cd")]
    prev = [("p1", frozenset("abcd"))]
    cn = np.array([[1.0, 0.0], [0.0, 1.0]])
    cp = np.array([[0.0, 1.0]])
    (m,) = match_clusters(new, prev, 0.3, cn, cp)
    assert (m.cluster, m.cosine) == (1, 1.0)  # same Jaccard (0.5): the cluster nearer the persona's centroid


def test_minted_ids_depend_on_user_first_day_and_cluster():
    a = mint_persona_id("u1", date(2006, 3, 1), "0")
    assert a == mint_persona_id("u1", date(2006, 3, 1), "0")
    assert len({a, mint_persona_id("u1", date(2006, 3, 2), "0"), mint_persona_id("u2", date(2006, 3, 1), "0"),
                mint_persona_id("u1", date(2006, 3, 1), "1")}) == 4


# --- the DAG's task functions on four AOL days ---------------------------------------------------------------------

def _settings(root: Path, models: Path):
    return load_settings(
        warehouse=root / "wh" / "warehouse.duckdb", threads=2, models_dir=models, embedding={"backend": "static"},
        dbt={"target_path": root / "dbt_target"},
        topics={"fit_sample": 60, "refit_days": 3},  # refits on a sample: the bounded-cost path at test scale
        orchestration={"landing_dir": str(root / "landing"), "landing_format": "aol", "n_shards": 2,
                       "work_dir": root / "work"})


def _checksums(settings) -> dict:
    with connect(settings) as con:
        return {t: table_checksum(con, t) for t in TABLES}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Days 1-4, incremental (the default) and full rebuild, each in its own warehouse; per day the published
    result and the history rows of the users that were not active that day, before and after."""
    models = tmp_path_factory.mktemp("models")
    out = {}
    for mode in ("incremental", "full"):
        root = tmp_path_factory.mktemp(mode)
        settings = _settings(root, models)
        days = []
        for d in DAYS:
            daily.sample_landing_day(settings, d)
            history = "SELECT * FROM personas.persona_history ORDER BY ALL"
            before = after = None
            if mode == "incremental" and d != DAYS[0]:
                with connect(settings) as con:
                    before = query_pl(con, history)
            result = daily.run_day(settings, d, full=(mode == "full"))
            if before is not None:
                with connect(settings) as con:
                    after = query_pl(con, history)
            days.append((result, (before, after)))
        out[mode] = (settings, days)
    return out


def test_a_day_recomputes_only_its_active_users(runs):
    settings, days = runs["incremental"]
    with connect(settings) as con:
        users = query_row(con, "SELECT count(DISTINCT user_id) FROM marts.intent_memories")[0]
        for d, (result, (before, after)) in zip(DAYS, days):
            active = {r[0] for r in con.execute("SELECT user_id FROM personas.staged_user_states WHERE run_date = $d",
                                                {"d": d}).fetchall()}
            assert result["embed"]["active_users"] == len(active) == result["label"]["active_users"]
            if before is None:
                continue
            # users with memories before this day but none new: not active, rows untouched
            assert 0 < len(active) < users
            with_day = {r[0] for r in con.execute("SELECT DISTINCT user_id FROM marts.intent_memories "
                                                  "WHERE event_date = $d", {"d": d}).fetchall()}
            assert active == with_day  # no late events in the sample: active = users with memories that day
            untouched = before.filter(~before["user_id"].is_in(list(active)))
            kept = after.filter(~after["user_id"].is_in(list(active)))
            assert untouched.drop("topic_id").equals(kept.drop("topic_id"))  # topic ids are annotations
            # a day writes rows for its active users only
            assert query_row(con, "SELECT count(*) FROM personas.persona_history WHERE valid_from = $d "
                                  "AND user_id NOT IN (SELECT user_id FROM personas.staged_user_states "
                                  "WHERE run_date = $d)", {"d": d})[0] == 0


def test_ids_are_stable_and_changes_are_versions(runs):
    settings, days = runs["incremental"]
    last = days[-1][0]["publish"]
    assert last["appeared"] + last["changed"] + last["unchanged"] > 0
    with connect(settings) as con:
        continued = query_row(con, "SELECT count(*) FROM personas.persona_history WHERE version > 1 "
                                   "AND first_seen < valid_from AND change = 'changed'")[0]
        chains = query_row(con, """
            SELECT count(*) FROM personas.persona_history a JOIN personas.persona_history b
              ON a.persona_id = b.persona_id AND b.version = a.version + 1
            WHERE a.valid_to IS DISTINCT FROM b.valid_from OR a.ended <> 'changed' OR a.is_current""")[0]
        current = query_row(con, "SELECT count(*), count(DISTINCT persona_id), sum(CASE WHEN valid_to IS NULL "
                                 "THEN 0 ELSE 1 END) FROM personas.persona_history WHERE is_current")
        # an id never comes back for another persona: one first_seen and one user per id
        reused = query_row(con, "SELECT count(*) FROM (SELECT persona_id FROM personas.persona_history "
                                "GROUP BY 1 HAVING count(DISTINCT first_seen) > 1 OR count(DISTINCT user_id) > 1)")[0]
        snapshot = query_row(con, "SELECT count(*) FROM personas.personas WHERE run_date = $d", {"d": DAYS[-1]})[0]
    assert continued > 0  # personas kept their id across days
    assert chains == 0 and reused == 0
    assert current[0] == current[1] == snapshot and current[2] == 0


def test_topics_refit_on_schedule_and_new_versions_join_the_latest_fit(runs):
    settings, _ = runs["incremental"]
    with connect(settings) as con:
        fits = [r[0] for r in con.execute("SELECT DISTINCT run_date FROM personas.persona_topics ORDER BY 1")
                .fetchall()]
        dangling = query_row(con, "SELECT count(*) FROM personas.current_personas p WHERE topic_id IS NOT NULL "
                                  "AND topic_id NOT IN (SELECT topic_id FROM personas.persona_topics)")[0]
        on_topic, n = query_row(con, "SELECT count(topic_id), count(*) FROM personas.current_personas")
        # a version made between fits joined a topic of the fit before it (kept once the version was replaced)
        later = query_row(con, "SELECT count(*) FROM personas.persona_history h JOIN personas.persona_topics t "
                               "USING (topic_id) WHERE t.run_date = $first AND h.valid_from > $first "
                               "AND h.valid_from < $refit", {"first": fits[0], "refit": fits[-1]})[0]
        sizes = query_row(con, "SELECT sum(n_personas) FROM personas.persona_topics WHERE run_date = $d",
                          {"d": fits[0]})[0]
    assert fits == [DAYS[0], DAYS[3]]  # day 1 (no fit yet), then every refit_days = 3
    assert dangling == 0 and 0 < on_topic <= n and later > 0
    assert sizes > 60  # the first fit clustered a sample of 60, then every persona joined its nearest topic


def test_evidence_grows_with_changes_not_with_days(runs):
    settings, days = runs["incremental"]
    with connect(settings) as con:
        per_day = query_pl(con, "SELECT valid_from, count(*) AS n FROM personas.persona_evidence GROUP BY 1 "
                                "ORDER BY 1")
        versions = query_row(con, "SELECT count(*) FROM personas.persona_evidence e ANTI JOIN "
                                  "personas.persona_history h USING (persona_id, version)")[0]
    written = {r["publish"]["run_date"]: r["publish"]["evidence"] for r, _ in days}
    assert versions == 0  # every evidence row belongs to a version
    assert dict(zip(per_day["valid_from"].cast(str).to_list(), per_day["n"].to_list())) == written


def test_full_rebuild_gives_the_same_personas(runs):
    inc, _ = runs["incremental"]
    full, full_days = runs["full"]
    assert all(r["embed"]["full"] for r, _ in full_days)
    q = ("SELECT h.persona_id, h.version, h.label, h.description, h.valid_from, h.valid_to, h.ended, "
         "h.cohesion, h.objective, list(e.memory_id ORDER BY e.memory_id) AS evidence "
         "FROM personas.persona_history h JOIN personas.persona_evidence e USING (persona_id, version) "
         "GROUP BY ALL ORDER BY ALL")
    with connect(inc) as a, connect(full) as b:
        ha, hb = query_pl(a, q), query_pl(b, q)
    assert ha.height > 0 and ha.equals(hb)


def test_rerun_of_a_day_is_byte_identical(runs, tmp_path):
    settings, _ = runs["incremental"]
    copy = tmp_path / "copy"
    shutil.copytree(Path(settings.warehouse).parent.parent, copy)
    s = settings.model_copy(deep=True, update={"warehouse": copy / "wh" / "warehouse.duckdb"})
    s.orchestration.landing_dir = str(copy / "landing")
    s.orchestration.work_dir = copy / "work"
    before = _checksums(s)
    last = daily.run_day(s, DAYS[-1])  # the latest day: undone and redone
    assert _checksums(s) == before and not last["publish"]["no_op"]
    again = daily.run_day(s, DAYS[1])  # an earlier day with the same input: nothing changes
    assert again["publish"]["no_op"] and _checksums(s) == before


# --- the analysts' history queries (docs/analysts.md) ----------------------------------------------------------------

def _doc_queries() -> dict[str, str]:
    """The SQL blocks under "### History:" headings of docs/analysts.md, by heading."""
    text = ANALYSTS_DOC.read_text(encoding="utf-8")
    return {m.group(1).strip(): m.group(2) for m in
            re.finditer(r"^### History: (.+?)\n.*?```sql\n(.*?)```", text, flags=re.S | re.M)}


def test_history_queries_of_the_analyst_docs_answer_on_a_real_warehouse(runs):
    settings, _ = runs["incremental"]
    queries = _doc_queries()
    assert set(queries) == {"since when", "appeared this week", "as of a date"}
    with connect(settings) as con:
        user = query_row(con, "SELECT user_id FROM personas.persona_history GROUP BY 1 "
                              "ORDER BY count(*) DESC, 1 LIMIT 1")[0]
        since = query_pl(con, queries["since when"], {"user_id": user})
        week = query_pl(con, queries["appeared this week"], {"week_start": DAYS[1]})
        as_of = query_pl(con, queries["as of a date"], {"user_id": user, "as_of": DAYS[1]})
        expect_as_of = query_row(con, "SELECT count(*) FROM personas.personas WHERE user_id = $u AND run_date = $d",
                                 {"u": user, "d": DAYS[1]})[0]
        appeared = query_row(con, "SELECT count(*) FROM personas.persona_history WHERE change = 'appeared' AND "
                                  "valid_from >= $d AND valid_from < $d + INTERVAL 7 DAY", {"d": DAYS[1]})[0]
    assert since.height > 0 and (since["first_seen"] <= since["current_since"]).all()
    assert week.height == appeared > 0 and (week["first_seen"] >= DAYS[1]).all()
    assert as_of.height == expect_as_of > 0


def test_a_late_event_makes_its_user_active_again(runs, tmp_path):
    """A user with no memories on the last day but a late event for an earlier day: their input changed, so the
    rerun of the last day recomputes them (and only the users with changes)."""
    from persona_tasks.dbt_runner import build
    from persona_tasks.induce import induce
    from persona_tasks.ingest import ingest_files

    settings, _ = runs["incremental"]
    copy = tmp_path / "copy"
    shutil.copytree(Path(settings.warehouse).parent.parent, copy)
    s = settings.model_copy(deep=True, update={"warehouse": copy / "wh" / "warehouse.duckdb"})
    s.dbt.target_path = copy / "dbt_target"
    with connect(s) as con:
        user = query_row(con, """
            SELECT user_id FROM marts.intent_memories GROUP BY 1
            HAVING bool_or(event_date = $d2) AND NOT bool_or(event_date = $d4) ORDER BY 1 LIMIT 1""",
                         {"d2": DAYS[1], "d4": DAYS[3]})[0]
        before = {r[0] for r in con.execute("SELECT user_id FROM personas.staged_user_states WHERE run_date = $d",
                                            {"d": DAYS[3]}).fetchall()}
    assert user not in before
    late = tmp_path / "late.tsv"
    late.write_text("AnonID\tQuery\tQueryTime\tItemRank\tClickURL\n"
                    f"{user}\tharbour ferry timetable\t{DAYS[1].isoformat()} 23:50:00\t\t\n", encoding="utf-8")
    ingest_files(s, "aol", [late])
    build(s)
    report = induce(s, run_date=DAYS[3])
    with connect(s) as con:
        after = {r[0] for r in con.execute("SELECT user_id FROM personas.staged_user_states WHERE run_date = $d",
                                           {"d": DAYS[3]}).fetchall()}
    assert after == before | {user} and report.n_active == len(after)


def test_public_terms_from_the_kept_word_table_equal_a_full_count(runs):
    """k-anonymity: the words at least k users wrote, from personas.term_users (kept for each day's active users)
    and from reading every memory text, are the same set on every day."""
    from persona_tasks.labelling import privacy

    settings, _ = runs["incremental"]
    with connect(settings) as con:
        for d in DAYS:
            kept = privacy.public_terms(con, d, 2)
            con.execute("ALTER TABLE personas.term_users RENAME TO term_users_hidden")
            try:
                scanned = privacy.public_terms(con, d, 2)
            finally:
                con.execute("ALTER TABLE personas.term_users_hidden RENAME TO term_users")
            assert kept.public == scanned.public and kept.n_words == scanned.n_words and len(kept.public) > 100
