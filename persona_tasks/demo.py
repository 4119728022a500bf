"""`make demo`: the daily Airflow DAG, end to end, on days of the bundled AOL sample, then where to look.

For each demo day, the day's rows of data/aol/aol_sample.tsv.gz are written to ``landing/<day>/`` and
``airflow dags test persona_daily <day>`` runs the whole DAG (SQLite metadata DB in ``.airflow/``, no server):
ingest, gates, dbt build, embed, cluster shards, label, score, publish, serving copy. The last day is labelled
by the LLM for a small sample of users (CPU is slow), the others by the extractive labeller.

``make demo-cli`` runs the same steps without Airflow on the whole sample (``python -m persona_tasks.demo
--cli``): ingest, build (all 300 users), induce for a sample of users.

Safe to run again: a day already ingested adds nothing, and a rerun of a day gives the same tables.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from persona_tasks.config import load_settings

EXAMPLE_SQL = (
    "SELECT user_id, started_at, n_actions, event_types, length(embedding_text) AS text_chars\n"
    "FROM marts.intent_memories\n"
    "WHERE user_id = (SELECT min(user_id) FROM marts.intent_memories)\n"
    "ORDER BY started_at LIMIT 5"
)


PERSONAS_SQL = (
    "SELECT p.user_id, p.label, p.labeller, p.n_evidence, round(p.objective, 2) AS objective, t.label AS topic\n"
    "FROM personas.current_personas p LEFT JOIN personas.persona_topics t USING (topic_id)\n"
    "WHERE len(p.sensitive_categories) = 0  -- leave out personas flagged in a special category\n"
    "ORDER BY p.user_id, p.n_evidence DESC"
)

DEMO_DAYS = "2006-03-01,2006-03-02"
# users the LLM labels on the demo's last day (DEMO_LLM_USERS=N to change; about 3 s each on 2 CPU cores). Ten, not
# three: on the sample's second day a third of the sampled users' clusters are one or two memories with no public
# word (labelled extractively without a prompt) and some are in a special category (never shown), so three users
# often left no LLM persona to show (stop 25: 1 of 3 clusters by the model, in a flagged category).
DEMO_LLM_USERS = 10


def main_dag() -> None:
    """The DAG on each demo day (``DEMO_DAYS``, comma-separated), then a few personas from the serving copy."""
    from persona_tasks.daily import sample_landing_day
    from persona_tasks.local_airflow import LocalAirflow
    from persona_tasks.serving import serving_path

    settings = load_settings()
    days = [d.strip() for d in os.environ.get("DEMO_DAYS", DEMO_DAYS).split(",") if d.strip()]
    llm_users = int(os.environ.get("DEMO_LLM_USERS", str(DEMO_LLM_USERS)))
    t0 = time.perf_counter()
    home = settings.project_dir / ".airflow"
    print(f"Airflow home {home} (SQLite metadata); warehouse {settings.warehouse}")
    af = LocalAirflow.create(settings, home, {"PERSONA_ETL_ORCHESTRATION__LLM_MAX_USERS": str(llm_users)})
    for i, day in enumerate(days):
        path = sample_landing_day(settings, day)
        llm = llm_users > 0 and i == len(days) - 1
        print(f"\nairflow dags test persona_daily {day}  (landing file {path.relative_to(settings.project_dir)}; "
              f"labeller {'llm for ' + str(llm_users) + ' sampled users, extractive for the others' if llm else 'extractive'})"
              " ...", flush=True)
        _, seconds = af.dags_test("persona_daily", day, conf={"labeller": "llm" if llm else "extractive"})
        states = af.task_states("persona_daily", day)
        failed = sorted(t for t, s in states.items() if s != "success")
        print(f"  {len(states)} task instances, {'all succeeded' if not failed else 'not succeeded: ' + ', '.join(failed)}"
              f" in {seconds:.0f}s (log: {af.logs[-1].relative_to(settings.project_dir)})")
    serving = serving_path(settings)
    print(f"\nwarehouse (the DAG's writer): {settings.warehouse}")
    print(f"serving copy for analysts (read-only, swapped atomically after each run): {serving}")
    show_personas(serving)
    show_gates(settings)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s. Tables: docs/analysts.md and docs/tables.md; "
          f"query: duckdb -readonly {serving}  or  persona-etl sql \"...\" (the warehouse)")


def main_cli() -> None:
    """Without Airflow: ingest the whole AOL sample, build intent memories, induce for a sample of users."""
    from persona_tasks.dbt_runner import build
    from persona_tasks.induce import induce
    from persona_tasks.ingest import ingest_files
    from persona_tasks.warehouse import connect_read_only, query_pl, query_row

    settings = load_settings()
    sample = settings.project_dir / "data" / "aol" / "aol_sample.tsv.gz"
    t0 = time.perf_counter()
    report = ingest_files(settings, "aol", [sample])
    t = report.totals()
    print(f"\ningest {sample.name}: rows read {t.rows_read}, accepted {t.rows_accepted}, rejected {t.rows_rejected}"
          + (" (already ingested: nothing added)" if all(f.skipped for f in report.files) else ""))
    build(settings)
    with connect_read_only(settings) as con:
        n_mem, n_users, n_events = query_row(
            con, "SELECT count(*), count(DISTINCT user_id), sum(n_actions) FROM marts.intent_memories")
        example = query_pl(con, EXAMPLE_SQL)
    print(f"\nintent memories: {n_mem} for {n_users} users from {n_events} events "
          f"({time.perf_counter() - t0:.1f}s)")
    print(f"warehouse: {settings.warehouse}")
    print("\nexample query (persona-etl sql \"...\"):\n" + EXAMPLE_SQL)
    import polars as pl

    with pl.Config(tbl_rows=5, fmt_str_lengths=70, tbl_width_chars=160):
        print(example)

    # personas: every user gets extractive personas; a stable sample of users gets LLM personas (CPU is slow)
    llm_users = int(os.environ.get("DEMO_LLM_USERS", str(DEMO_LLM_USERS)))
    # embedding every AOL memory (46k) takes ~20 min on 2 cores: the demo induces for a stable sample of users
    n_users = int(os.environ.get("DEMO_USERS", "30"))
    with connect_read_only(settings) as con:
        users = query_pl(con, "SELECT DISTINCT user_id FROM marts.intent_memories ORDER BY md5(user_id) LIMIT $n",
                         {"n": n_users})["user_id"].to_list()
    print(f"\ninducing personas for a sample of {len(users)} users (DEMO_USERS=N to change): LLM labeller for "
          f"{llm_users} of them, extractive for the others ...")
    report = induce(settings, labeller="llm" if llm_users else "extractive", users=users,
                    llm_max_users=llm_users)
    print(report.summary())
    if report.llm_stats:
        s = report.llm_stats
        print(f"LLM: {s['prompts']} prompts, {s['tokens_per_s']} generated tokens/s, "
              f"fallback rate {s['fallback_rate']:.0%}")
    show_personas(settings.warehouse)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s. Tables: docs/tables.md; analysts' queries: persona-etl sql")


SHOWCASE_RULE = ("the users with at least {k} published personas, none of them in a sensitive category "
                 "(personas.sensitive_categories empty), with the highest mean objective (ties: user_id)")


# the demo shows LLM personas of at least this quality (docs/quality.md: objective in [0, 1])
LLM_SHOW_MIN_OBJECTIVE = 0.5


def showcase_users(con, n_users: int = 3, min_personas: int = 3) -> tuple[list[str], str]:
    """The demo's users, chosen by ``SHOWCASE_RULE`` (with ``min_personas`` lowered until some user qualifies),
    and the rule as applied."""
    from persona_tasks.warehouse import query_pl

    for k in range(min_personas, 0, -1):
        users = query_pl(
            con, "SELECT user_id FROM personas.current_personas GROUP BY user_id "
                 "HAVING count(*) >= $k AND bool_and(coalesce(len(sensitive_categories), 0) = 0) "
                 "ORDER BY avg(objective) DESC NULLS LAST, user_id LIMIT $n",
            {"k": k, "n": n_users})["user_id"].to_list()
        if users:
            return users, SHOWCASE_RULE.format(k=k)
    return [], SHOWCASE_RULE.format(k=1)


def snippet(text: str | None, terms, width: int = 48) -> str:
    """A short, masked excerpt of a memory's text: words fewer than k users wrote become [rare] (the labellers'
    rule, labelling/privacy.py), then cut to ``width`` characters."""
    t = terms.mask(text or "") if terms is not None else (text or "")
    return t if len(t) <= width else t[: width - 1].rstrip() + "…"


def show_personas(database, n_users: int = 3) -> None:
    """Print the personas of the showcase users (``showcase_users``), each with evidence as memory ids and short
    masked snippets, read-only from ``database`` (the warehouse or its serving copy)."""
    import duckdb

    from persona_tasks.labelling.privacy import public_terms
    from persona_tasks.warehouse import query_pl, query_row

    settings = load_settings()
    with duckdb.connect(str(database), read_only=True) as con:
        users, rule = showcase_users(con, n_users)
        n_flagged, n_users_all = query_row(
            con, "SELECT count(*) FILTER (WHERE len(sensitive_categories) > 0), count(DISTINCT user_id) "
                 "FROM personas.current_personas")
        print(f"\nshowing {len(users)} of {n_users_all} users: {rule}. "
              f"{n_flagged} personas are flagged in a sensitive category and never shown here (docs/privacy.md).")
        last = query_row(con, "SELECT max(run_date) FROM personas.current_personas")[0]
        terms = public_terms(con, last, settings.labelling.min_term_users) if last else None
        for u in users:
            mean = query_row(con, "SELECT avg(objective) FROM personas.current_personas WHERE user_id = $u",
                             {"u": u})[0]
            print(f"\nuser {u} (mean objective {mean:.2f}):" if mean is not None else f"\nuser {u}:")
            personas = query_pl(con, "SELECT persona_id, version, label, description, labeller, is_fallback, "
                                     "n_evidence, objective FROM personas.current_personas WHERE user_id = $u "
                                     "ORDER BY n_evidence DESC LIMIT 4", {"u": u})
            for pid, version, label, desc, labeller, fb, n, obj in personas.iter_rows():
                tag = "extractive fallback" if fb else labeller
                score = f", objective {obj:.2f}" if obj is not None else ""
                print(f"  [{tag}] {label} ({n} {'memory' if n == 1 else 'memories'}{score})\n    {desc}")
                ev = query_pl(con, "SELECT e.memory_id, m.embedding_text FROM personas.persona_evidence e "
                                   "JOIN marts.intent_memories m USING (memory_id) WHERE e.persona_id = $p "
                                   "AND e.version = $v ORDER BY e.similarity DESC LIMIT 2",
                              {"p": pid, "v": version})
                for mid, text in ev.iter_rows():
                    print(f"      evidence {mid[:12]}: {snippet(text, terms)}")
        llm = query_pl(con, "SELECT persona_id, version, user_id, label, description, objective "
                            "FROM personas.current_personas WHERE labeller = 'llm' AND NOT is_fallback "
                            "AND coalesce(len(sensitive_categories), 0) = 0 AND objective >= $floor "
                            "ORDER BY objective DESC NULLS LAST, persona_id LIMIT 3", {"floor": LLM_SHOW_MIN_OBJECTIVE})
        if llm.height:
            print(f"\nwritten by the LLM labeller ({settings.labelling.decoding} decoding; its best-scored personas "
                  f"with objective >= {LLM_SHOW_MIN_OBJECTIVE}, none flagged):")
        for pid, version, u, label, desc, obj in llm.iter_rows():
            score = f", objective {obj:.2f}" if obj is not None else ""
            print(f"  user {u}: [llm] {label}{score}\n    {desc}")
            ev = query_pl(con, "SELECT e.memory_id, m.embedding_text FROM personas.persona_evidence e "
                               "JOIN marts.intent_memories m USING (memory_id) WHERE e.persona_id = $p "
                               "AND e.version = $v ORDER BY e.similarity DESC LIMIT 1", {"p": pid, "v": version})
            for mid, text in ev.iter_rows():
                print(f"      evidence {mid[:12]}: {snippet(text, terms)}")
    print("\nexample query:\n" + PERSONAS_SQL)


def show_gates(settings) -> None:
    """Per run date, the gates' checks (Great Expectations suites) and where their Data Docs are."""
    from persona_tasks.gates.site import docs_dir
    from persona_tasks.warehouse import connect_read_only

    with connect_read_only(settings) as con:
        rows = con.execute(
            "SELECT run_date, count(*), count(*) FILTER (WHERE NOT success AND severity = 'block'), "
            "count(*) FILTER (WHERE NOT success AND severity = 'warn'), string_agg(DISTINCT check_name, ', ') "
            "FILTER (WHERE NOT success) FROM (SELECT * FROM quality_check_results QUALIFY row_number() OVER "
            "(PARTITION BY run_date, gate, check_name ORDER BY checked_at DESC) = 1) GROUP BY 1 ORDER BY 1"
        ).fetchall()
    print("\nquality gates (table quality_check_results; docs/oncall.md):")
    for day, n, blocking, warned, names in rows:
        print(f"  {day}: {n} checks, {blocking} blocking and {warned} warning failures"
              + (f" ({names})" if names else ""))
    print(f"  Data Docs: {docs_dir(settings) / 'index.html'}  (serve: make quality-docs)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="persona-etl demo on the bundled AOL sample")
    ap.add_argument("--cli", action="store_true", help="without Airflow: the whole sample through the CLI steps")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.cli else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main_cli() if args.cli else main_dag()


if __name__ == "__main__":
    main()
