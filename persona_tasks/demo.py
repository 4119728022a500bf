"""`make demo`: the main job on the bundled AOL sample, end to end, then where to look.

Safe to run again: a second ingest of the same file adds nothing and the incremental build only
touches days with new events.
"""

from __future__ import annotations

import logging
import os
import time

from persona_tasks.config import load_settings

EXAMPLE_SQL = (
    "SELECT user_id, started_at, n_actions, memory_text\n"
    "FROM marts.intent_memories\n"
    "WHERE user_id = (SELECT min(user_id) FROM marts.intent_memories)\n"
    "ORDER BY started_at LIMIT 5"
)


PERSONAS_SQL = (
    "SELECT p.user_id, p.label, p.labeller, p.n_evidence, t.label AS topic\n"
    "FROM personas.current_personas p LEFT JOIN personas.persona_topics t USING (topic_id, run_date)\n"
    "ORDER BY p.user_id, p.n_evidence DESC"
)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
            con,             "SELECT count(*), count(DISTINCT user_id), sum(n_actions) FROM marts.intent_memories")
        example = query_pl(con, EXAMPLE_SQL)
    print(f"\nintent memories: {n_mem} for {n_users} users from {n_events} events "
          f"({time.perf_counter() - t0:.1f}s)")
    print(f"warehouse: {settings.warehouse}")
    print("tables: raw.events, raw.events_rejected, raw.ingest_batches, staging.stg_events, "
          "intermediate.int_sessions, marts.intent_memories")
    print("\nexample query (persona-etl sql \"...\"):\n" + EXAMPLE_SQL)
    import polars as pl

    with pl.Config(tbl_rows=5, fmt_str_lengths=70, tbl_width_chars=160):
        print(example)

    # personas: every user gets extractive personas; a stable sample of users gets LLM personas (CPU is slow)
    llm_users = int(os.environ.get("DEMO_LLM_USERS", "3"))
    print(f"\ninducing personas: LLM labeller ({settings.labelling.model_path or 'SmolLM2-135M-Instruct'}) for "
          f"{llm_users} sampled users, extractive for the others ...")
    # embedding every AOL memory (46k) takes ~20 min on 2 cores: the demo induces for a stable sample of users
    n_users = int(os.environ.get("DEMO_USERS", "30"))
    with connect_read_only(settings) as con:
        users = query_pl(con, "SELECT DISTINCT user_id FROM marts.intent_memories ORDER BY md5(user_id) LIMIT $n",
                         {"n": n_users})["user_id"].to_list()
    print(f"(personas for a sample of {len(users)} users; DEMO_USERS=N to change)")
    report = induce(settings, labeller="llm" if llm_users else "extractive", users=users,
                    llm_max_users=llm_users)
    print(report.summary())
    if report.llm_stats:
        s = report.llm_stats
        print(f"LLM: {s['prompts']} prompts, {s['tokens_per_s']} generated tokens/s, "
              f"fallback rate {s['fallback_rate']:.0%}")
    show_personas(settings)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s. Tables: docs/tables.md; analysts' queries: persona-etl sql")


def show_personas(settings, n_users: int = 3) -> None:
    """Print a few users' personas with their top evidence (the LLM-labelled users first)."""
    from persona_tasks.warehouse import connect_read_only, query_pl

    with connect_read_only(settings) as con:
        users = query_pl(con, "SELECT user_id FROM personas.current_personas GROUP BY user_id "
                              "ORDER BY bool_or(labeller = 'llm' OR is_fallback) DESC, user_id LIMIT $n",
                         {"n": n_users})["user_id"].to_list()
        for u in users:
            print(f"\nuser {u}:")
            personas = query_pl(con, "SELECT persona_id, run_date, label, description, labeller, is_fallback, "
                                     "n_evidence FROM personas.current_personas WHERE user_id = $u "
                                     "ORDER BY n_evidence DESC LIMIT 4", {"u": u})
            for pid, run_date, label, desc, labeller, fb, n in personas.iter_rows():
                tag = "extractive fallback" if fb else labeller
                print(f"  [{tag}] {label} ({n} memories)\n    {desc}")
                ev = query_pl(con, "SELECT m.memory_text FROM personas.persona_evidence e "
                                   "JOIN marts.intent_memories m USING (memory_id) WHERE e.persona_id = $p "
                                   "AND e.run_date = $d ORDER BY e.similarity DESC LIMIT 2",
                              {"p": pid, "d": run_date})
                for (text,) in ev.iter_rows():
                    print(f"      evidence: {text[:110]}")
    print("\nexample query:\n" + PERSONAS_SQL)


if __name__ == "__main__":
    main()
