"""`persona-etl`: the command line of persona-etl. Each verb is a thin call into a plain function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from persona_tasks.config import TRAINED_ARMS, load_settings
from persona_tasks.errors import PersonaEtlError


def _cmd_ingest(args: argparse.Namespace) -> int:
    from persona_tasks.ingest import ingest_files

    settings = load_settings()
    report = ingest_files(settings, args.format, [Path(p) for p in args.paths], source=args.source)
    for f in report.files:
        if f.skipped:
            print(f"{f.file}: already ingested in batch {f.batch_id}: adds nothing")
        else:
            print(
                f"{f.file}: rows read {f.rows_read}, accepted {f.rows_accepted}, rejected {f.rows_rejected}"
                f" (events: {f.events_new} new, {f.events_duplicate} already present)"
            )
    t = report.totals()
    print(f"total: rows read {t.rows_read}, accepted {t.rows_accepted}, rejected {t.rows_rejected}")
    if t.rows_rejected:
        print("rejected rows are kept with file, line, field and reason in raw.events_rejected")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from persona_tasks.dbt_runner import build

    settings = load_settings()
    build(settings, full_refresh=args.full_refresh, select=args.select)
    return 0


def _cmd_sql(args: argparse.Namespace) -> int:
    from persona_tasks.warehouse import connect_read_only, query_pl

    settings = load_settings()
    import polars as pl

    with connect_read_only(settings) as con:
        df = query_pl(con, args.query)
    if args.format == "csv":
        sys.stdout.write(df.write_csv())
    elif args.format == "json":
        sys.stdout.write(df.write_ndjson())
    else:
        with pl.Config(tbl_rows=args.max_rows, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200):
            print(df)
    return 0


def _cmd_induce(args: argparse.Namespace) -> int:
    from datetime import date

    from persona_tasks.induce import induce

    settings = load_settings()
    users = [u for part in args.users for u in part.split(",") if u] if args.users else None
    run_date = date.fromisoformat(args.run_date) if args.run_date else None
    report = induce(settings, labeller=args.labeller, users=users, run_date=run_date,
                    llm_max_users=args.llm_max_users, full=args.full, rewind=args.rewind)
    print(report.summary())  # counts, coverage, and the quality step's scored count and mean scores
    if report.published:
        p = report.published
        print(f"published: run date {p.run_date}: {p.n_appeared} personas appeared, {p.n_changed} changed, "
              f"{p.n_retired} retired, {p.n_unchanged} unchanged ({p.rows_written} rows written); now "
              f"{p.n_personas} current personas of {p.n_users} users, {p.n_topics} topics (personas.current_personas "
              "with quality scores cohesion, alignment, truthfulness, objective (docs/quality.md), "
              "personas.persona_history, personas.persona_changes, personas.persona_evidence; docs/analysts.md)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from persona_tasks.evaluate import bench_tables, evaluate, write_json, write_results_doc

    settings = load_settings()
    if args.from_json:
        # re-render the tables of a stored run, with the bench results files (arms) as they are now
        if not args.write_docs:
            raise SystemExit("persona-etl evaluate --from-json: add --write-docs [PATH]")
        results = {**json.loads(Path(args.from_json).read_text()), **bench_tables(settings.project_dir)}
        print(f"tables: {write_results_doc(results, args.write_docs)}")
        return 0
    if not args.json:
        raise SystemExit("persona-etl evaluate: --json PATH is required (or --from-json PATH --write-docs)")
    results = evaluate(settings, datasets=args.datasets or None, llm_max_users=args.llm_max_users,
                       max_users=args.max_users, synth_users=args.synth_users,
                       llm_inputs_out=args.export_llm_inputs, llm_labels=args.llm_labels)
    print(f"results: {write_json(results, args.json)}")
    for name, d in results["datasets"].items():
        for key in ("multi_extractive", "single_extractive", "multi_centroid", "nearest_memory"):
            m = d["methods"].get(key)
            if m:
                print(f"{name} {key}: Hit@1 {100 * m['hit@1']:.2f} Hit@10 {100 * m['hit@10']:.2f} "
                      f"MRR {100 * m['mrr']:.2f} ({m['n']} futures)")
    if args.write_docs:
        print(f"tables: {write_results_doc(results, args.write_docs)}")
    return 0


def _cmd_gate_override(args: argparse.Namespace) -> int:
    from persona_tasks.gates.overrides import record_override

    ov = record_override(load_settings(), args.run_date, args.check, args.reason, by=args.by)
    print(f"override recorded: check {ov.check_name} of {ov.gate} is a warning for run date {ov.run_date} only "
          f"(by {ov.overridden_by} at {ov.created_at:%Y-%m-%d %H:%M} UTC). Rerun the gate: airflow tasks clear "
          f"persona_daily -s {ov.run_date} -e {ov.run_date} -t {ov.gate}")
    return 0


def _cmd_gate_docs(args: argparse.Namespace) -> int:
    from persona_tasks.gates import site

    settings = load_settings()
    if args.rebuild:
        print(f"Data Docs rebuilt: {site.rebuild(settings)}")
    site.serve(settings, port=args.port)
    return 0


def _cmd_gate_failed(args: argparse.Namespace) -> int:
    import polars as pl

    from persona_tasks.gates.results import failed_last_night, failing_since
    from persona_tasks.warehouse import connect_read_only

    with connect_read_only(load_settings()) as con:
        if args.check:
            since, n, last = failing_since(con, args.check)
            print(f"{args.check}: passing on its latest day" if since is None else
                  f"{args.check}: failing since {since} ({n} day(s), latest {last})")
            return 0
        df = failed_last_night(con)
    with pl.Config(tbl_rows=100, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
        print(df.drop("docs_page", strict=False) if df.height else "nothing failed on the latest run date")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from persona_tasks.train.pipeline import run_training

    settings = load_settings()
    report = run_training(settings, as_of=args.as_of, arm=args.arm, auto_promote=not args.no_promote,
                          actor=args.actor)
    print(report.summary())
    print(f"groups: training.preference_groups build {report.groups.get('build_id')}; registry: training.model_registry "
          f"(`persona-etl models list`)")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from persona_tasks.train import registry as R
    from persona_tasks.warehouse import connect

    settings = load_settings()
    with connect(settings) as con:
        R.ensure_registry(con)
        if args.action == "list":
            rows = R.list_versions(con)
            if not rows:
                print("no trained versions (the daily labelling uses the base model); `persona-etl train` makes one")
            for r in rows:
                m = json.loads(r["metrics"]) if r["metrics"] else {}
                h = (m.get("heldout") or {}).get("candidate") or {}
                cur = (m.get("heldout") or {}).get("current") or {}
                obj = f"{h['objective']:.3f} (current {cur.get('objective') or float('nan'):.3f})" \
                    if h.get("objective") is not None else "n/a"
                print(f"{r['version']}  {r['status']:9s} arm {r['arm']:9s} groups {r['group_count']:4d} "
                      f"window {r['window_start']}..{r['window_end']} held-out objective {obj} "
                      f"created {r['created_at']:%Y-%m-%d %H:%M}"
                      + (f" promoted by {r['promoted_by']}" if r["promoted_by"] else "")
                      + (f"  reason: {r['reason']}" if r["reason"] else ""))
            cur = R.promoted_version(con)
            print(f"daily labelling uses: {cur['version'] if cur else 'the base model'}")
        elif args.action == "promote":
            if not args.version:
                raise R.RegistryError("models promote needs a VERSION (see `persona-etl models list`)")
            row = R.promote(settings, con, args.version, actor=args.actor, force=args.force, reason=args.reason)
            print(f"promoted {row['version']}: the daily labelling loads it from {row['adapter_path']}")
        else:
            row = R.rollback(settings, con, actor=args.actor, reason=args.reason)
            print(f"rolled back: the daily labelling uses {row['version'] if row else 'the base model'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="persona-etl",
        description="Turn raw user behaviour logs into evidence-grounded personas. "
        "Settings: persona_etl.toml (or $PERSONA_ETL_CONFIG) and PERSONA_ETL_* environment variables; "
        "the warehouse is $PERSONA_ETL_WAREHOUSE.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="load raw log files into raw.events (bad rows go to raw.events_rejected)",
                       description="Load raw log files into raw.events. Rows that break the contract go to "
                       "raw.events_rejected with file, line, field and reason. Re-ingesting a file adds nothing.")
    p.add_argument("--format", required=True, choices=["aol", "movielens", "merrec", "events"],
                   help="input layout: aol (AOL query log, .txt/.gz), movielens (ratings.csv [+ movies.csv, tags.csv] "
                   "or their folder), merrec (Mercari MerRec parquet), events (CSV/Parquet/JSONL with the column "
                   "mapping in [ingest.events])")
    p.add_argument("--source", default=None, help="source name stored with each event (default: the format)")
    p.add_argument("paths", nargs="+", help="files (or, for movielens, a folder) to ingest")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("build", help="run the dbt build (staging -> sessions -> intent memories) on the warehouse",
                       description="Run `dbt build` of dbt_project against the configured warehouse: models and "
                       "their tests. Incremental by event day unless --full-refresh.")
    p.add_argument("--full-refresh", action="store_true", help="rebuild incremental models from scratch")
    p.add_argument("--select", default=None, help="dbt node selection (default: everything)")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("induce", help="embed, cluster, label, score and publish personas from intent memories",
                       description="Induce several personas per user from marts.intent_memories: embed memories, "
                       "cluster each user's memories, label each cluster, score each persona (cohesion, "
                       "alignment, truthfulness, objective: docs/quality.md), and publish new persona versions "
                       "(personas.persona_history, persona_evidence, persona_topics) atomically for one run date. "
                       "Incremental: only users whose memories changed are recomputed; persona ids are stable.")
    p.add_argument("--labeller", choices=["llm", "extractive"], default="extractive",
                   help="llm: the configured causal LM (default SmolLM2-135M-Instruct), validated, with "
                   "extractive fallback; extractive: c-TF-IDF key terms (fast)")
    p.add_argument("--users", nargs="*", default=None, help="only these user ids (space or comma separated)")
    p.add_argument("--run-date", default=None, help="data day YYYY-MM-DD (default: the latest event day)")
    p.add_argument("--llm-max-users", type=int, default=None,
                   help="with --labeller llm: let the LLM label only this many users (a stable sample); "
                   "the others get extractive personas")
    p.add_argument("--full", action="store_true",
                   help="recompute every user, not only the day's active ones (after changing the embedding model "
                   "or clustering settings; on unchanged data it gives the same personas)")
    p.add_argument("--rewind", action="store_true",
                   help="republishing a day before the latest published one whose result changed: undo the later "
                   "days too (rerun them afterwards, in order)")
    p.set_defaults(func=_cmd_induce)

    p = sub.add_parser("evaluate", help="future-interaction prediction: history personas vs baselines "
                       "(docs/results.md)",
                       description="Per user, split memories in time order into history (first 80%) and future "
                       "(last 20%, at least one; users with fewer than [evaluation] min_memories left out), induce "
                       "personas from the history only, rank each future memory among negatives from other users' "
                       "futures, and report Hit@1, Hit@10 and MRR of multi-persona (LLM, extractive), multi-centroid, "
                       "single persona, history centroid, nearest memory, most recent, popularity and random; plus "
                       "persona quality, coverage and ARI/NMI on planted personas. Protocol: docs/results.md.")
    p.add_argument("--json", default=None, metavar="PATH", help="write every number to this JSON file (required)")
    p.add_argument("--from-json", type=Path, default=None, metavar="PATH",
                   help="evaluate nothing: re-render --write-docs from this stored run (its --json file) with the "
                   "arms results in bench/results/ as they are now (after a new bench_labelling_arms / "
                   "bench_training run)")
    p.add_argument("--datasets", nargs="*", default=None, metavar="SOURCE",
                   help="warehouse sources to evaluate, e.g. aol movielens (default: every source)")
    p.add_argument("--llm-max-users", type=int, default=None,
                   help="users of each dataset labelled by the LLM (a stable sample; 0 = no LLM rows; default "
                   "[evaluation] llm_max_users)")
    p.add_argument("--max-users", type=int, default=None,
                   help="evaluate at most this many users per dataset (a stable sample; default all)")
    p.add_argument("--synth-users", type=int, default=None,
                   help="users of the planted-persona check (0 = skip; default [evaluation] synth_users)")
    p.add_argument("--export-llm-inputs", type=Path, default=None, metavar="DIR",
                   help="write the LLM sample's inputs (as the labeller sees them) to DIR/<source>.json for a GPU "
                   "worker to label (bench/gpu_session.py), and leave the LLM rows out of this run")
    p.add_argument("--llm-labels", type=Path, nargs="+", default=None, metavar="FILE",
                   help="labels files of those inputs (labelling.replay) to use instead of running the LLM here")
    p.add_argument("--write-docs", nargs="?", const=str(Path(__file__).resolve().parent.parent / "docs" / "results.md"),
                   default=None, metavar="PATH", help="also render the tables to PATH (default docs/results.md)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("gate", help="data-quality gates: overrides, Data Docs, failed checks (docs/oncall.md)",
                       description="The gates of the daily run (Great Expectations suites; docs/oncall.md).")
    gsub = p.add_subparsers(dest="gate_command", required=True, metavar="GATE_COMMAND")
    g = gsub.add_parser("override", help="let one failed blocking check of one run date pass as a warning (audited)",
                        description="Record an audited override in the warehouse (quality_overrides): the next "
                        "run of that day's gate treats CHECK as a warning for RUN_DATE only. Refused for a day no "
                        "gate ran for, or a check that passed.")
    g.add_argument("--run-date", required=True, help="the data day, YYYY-MM-DD")
    g.add_argument("--check", required=True, help="the check name (docs/oncall.md)")
    g.add_argument("--reason", required=True, help="why the data is right anyway (stored for the audit)")
    g.add_argument("--by", default=None, help="who decides (default: $PERSONA_ETL_USER or the login name)")
    g.set_defaults(func=_cmd_gate_override)
    g = gsub.add_parser("docs", help="serve the gates' Data Docs on 127.0.0.1 (Ctrl-C stops)",
                        description="Serve the Data Docs site of the gates ([gates] docs_dir) on 127.0.0.1.")
    g.add_argument("--port", type=int, default=None, help="port (default [gates] docs_port, 8765)")
    g.add_argument("--rebuild", action="store_true", help="rebuild the site from the stored results first")
    g.set_defaults(func=_cmd_gate_docs)
    g = gsub.add_parser("failed", help="what failed on the latest run date, or since when CHECK fails",
                        description="Print the checks that failed on the latest run date (latest try of each), or "
                        "with --check since when that check has failed (quality_check_results).")
    g.add_argument("--check", default=None, help="since when has this check failed")
    g.set_defaults(func=_cmd_gate_failed)
    p = sub.add_parser("train", help="retrain the LLM labeller on preference groups (docs/training.md)",
                       description="Build preference groups (K sampled candidates per cluster of the published runs "
                       "of the training window, validated, scored, ranked; stored in training.preference_groups), "
                       "train a LoRA adapter ([training] arm: groupwise DPO, pairwise DPO (trl's trainer or ours) "
                       "or SFT), measure it and the current labeller on held-out clusters, register it in training.model_registry and promote it "
                       "when it passes the gate (objective gain, truthfulness, fallback rate).")
    p.add_argument("--arm", choices=TRAINED_ARMS, default=None,
                   help="training arm (default [training] arm)")
    p.add_argument("--as-of", default=None, help="last run date of the window YYYY-MM-DD (default: the latest)")
    p.add_argument("--no-promote", action="store_true", help="register and gate only; promote by hand")
    p.add_argument("--actor", default=None, help="who is recorded in the audit trail (default: the login name)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("models", help="trained labeller versions: list | promote VERSION | rollback (audited)",
                       description="The model registry (training.model_registry): list versions with their gate "
                       "metrics, promote one (the gate must have passed it, or --force with --reason), or roll back "
                       "to the version promoted before (or the base model). Every action is recorded in "
                       "training.model_audit; the daily labelling loads the promoted version.")
    p.add_argument("action", choices=["list", "promote", "rollback"])
    p.add_argument("version", nargs="?", default=None, help="the version to promote")
    p.add_argument("--force", action="store_true", help="promote although the gate refused it (needs --reason)")
    p.add_argument("--reason", default=None, help="why (recorded in training.model_audit)")
    p.add_argument("--actor", default=None, help="who is recorded in the audit trail (default: the login name)")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("sql", help="run a read-only SQL query on the warehouse and print the result",
                       description="Run one read-only SQL query against the warehouse and print the result.")
    p.add_argument("query", help='for example: "SELECT * FROM marts.intent_memories LIMIT 5"')
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")
    p.add_argument("--max-rows", type=int, default=50, help="rows shown in table format")
    p.set_defaults(func=_cmd_sql)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (PersonaEtlError, FileNotFoundError) as exc:
        print(f"persona-etl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
