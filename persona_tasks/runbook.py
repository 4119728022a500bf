"""What each failing check means, where to look and what to do: one table for on-call engineers.

Every alert (``ops_alerts.failing_check``, the webhook post) names a check; ``runbook_for(check)`` gives the
entry the alert carries (``ops_alerts.runbook``) and docs/oncall.md is rendered from the same table
(``python -m persona_tasks.runbook --write docs/oncall.md``; a test keeps the two equal and checks that every gate
check raised in persona_tasks/daily.py has an entry). The queries take the run date as ``$d`` (DuckDB CLI: replace
it with ``DATE '2026-01-05'``) and never print raw query text beyond what a row holds.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

DOC_PATH = "docs/oncall.md"
AFTER_THE_FIX = ("Whatever the check: a failed gate published nothing, so analysts keep the last good personas and "
                 "serving copy. Every task is idempotent: after the fix, clear the failed task (or the whole run) in "
                 "the Airflow UI or with `airflow tasks clear persona_daily -s <day> -e <day>`.")


@dataclass(frozen=True)
class Entry:
    task: str    # the task that raises it
    means: str   # what failed, in one or two sentences
    look: str    # where to look, in words
    do: str      # what to do
    sql: tuple[str, ...] = ()  # queries to run (DuckDB, ``$d`` = the run date); tests run every one of them

    def short(self, check: str) -> str:
        """The line an alert carries."""
        return f"{self.do} (runbook: {DOC_PATH}#{check})"


_LEDGER_SQL = ("SELECT * FROM raw.ingest_batches WHERE batch_id IN (SELECT DISTINCT batch_id FROM raw.events "
               "WHERE event_ts::DATE = $d) ORDER BY ingested_at DESC",)
_LEDGER_LOOK = "The task log names the failing batch; the ledger rows of the day's batches:"
_LEDGER_DO = ("A bookkeeping mismatch is a bug or a second writer: check that the `warehouse_writer` pool has one "
              "slot and nothing else writes the warehouse, then clear `ingest_landing` (idempotent). If it fails "
              "again, file a bug with the batch_id; do not publish by hand.")
_QUALITY_DO = ("A drop across the board points at the input (a new source, a changed export, a bot) or a changed "
               "model (`[embedding] backend` / `model_path`, `[labelling]`): compare the day's memories with the "
               "previous days'. Fix the cause and clear `label`; lower `[orchestration] quality_floors.{k}` only "
               "for a known, accepted change (docs/quality.md).")

RUNBOOK: dict[str, Entry] = {
    "landing_files": Entry(
        "gate_raw", "No landing file for the run date in `[orchestration] landing_dir` (`<landing_dir>/<day>/`).",
        "The landing folder or bucket of that day; the upstream export's own logs.",
        "Deliver the day's files, then clear `ingest_landing`. A day that is empty by design: set "
        "`[orchestration] allow_empty_day = true`."),
    "input_file": Entry(
        "ingest_landing", "A landing file cannot be read at all (wrong format, truncated, not UTF-8); the error "
        "names the file, row and field.",
        "The task log (the error line), then the file itself.",
        "Replace or repair the file upstream (rows with bad fields are quarantined, not fatal: this is a file-level "
        "failure), then clear `ingest_landing`."),
    "ledger_complete": Entry("gate_raw", "An ingested batch has no row in the ledger `raw.ingest_batches`.",
                             _LEDGER_LOOK, _LEDGER_DO, _LEDGER_SQL),
    "reconciliation": Entry("gate_raw", "A batch's rows_read differs from rows_accepted + rows_rejected.",
                            _LEDGER_LOOK, _LEDGER_DO, _LEDGER_SQL),
    "quarantine_count": Entry("gate_raw", "A batch's rows in `raw.events_rejected` differ from its ledger count.",
                              _LEDGER_LOOK, _LEDGER_DO, _LEDGER_SQL),
    "events_count": Entry("gate_raw", "A batch's rows in `raw.events` differ from its ledger's events_new.",
                          _LEDGER_LOOK, _LEDGER_DO, _LEDGER_SQL),
    "rows_read": Entry(
        "gate_raw", "The day's landing files hold no rows.", "The files of `<landing_dir>/<day>/` (sizes, headers).",
        "Ask upstream for the real export, replace the files, clear `ingest_landing`."),
    "rejected_share": Entry(
        "gate_raw", "More of the day's rows were rejected than `[orchestration] max_rejected_share` allows.",
        "The rejected rows by file, field and reason (file and line name each row; `raw_record` holds it for "
        "replay):",
        "One field and reason dominating is usually a changed export (a renamed column, a new timestamp format): "
        "fix the export or the `[ingest]` mapping, then clear `ingest_landing`. Raise `max_rejected_share` only "
        "when the rejects are expected.",
        ("SELECT file, field, reason, count(*) AS n FROM raw.events_rejected WHERE rejected_at >= $d "
         "GROUP BY ALL ORDER BY n DESC",)),
    "dbt_tests": Entry(
        "gate_memories", "A dbt model or test failed, or the build ran no tests.",
        "The `build` and `gate_memories` task logs name the failing nodes; reproduce with `persona-etl build` "
        "against a copy of the warehouse.",
        "A failing test on new data: find the offending rows with the test's SQL (dbt_project/target/compiled), "
        "fix the source or the model, then clear `build`."),
    "dbt_build": Entry(
        "build", "`dbt build` itself failed (compilation, a model error, a failed test).",
        "The `build` task log (failing nodes and dbt's message).",
        "Fix the model or the data, then clear `build`; the incremental model reprocesses the day."),
    "actions_reconcile": Entry(
        "gate_memories", "The day's valid actions are not each in exactly one intent memory of that day.",
        "The day's valid actions against the actions its memories hold:",
        "A sessionisation bug or late events for a day already built: run `persona-etl build --full-refresh` on a "
        "copy, compare, and file a bug with the counts.",
        ("SELECT (SELECT count(*) FROM staging.stg_events WHERE event_date = $d) AS actions, "
         "(SELECT sum(n_actions) FROM marts.intent_memories WHERE event_date = $d) AS in_memories",)),
    "memory_text": Entry(
        "gate_memories", "Some of the day's memories have an empty text, display (`memory_text`) or embedded "
        "(`embedding_text`): nothing to embed or label.",
        "The memories without text:",
        "Usually events with no query, item or title: fix the `[ingest]` mapping of the text fields, then clear "
        "`ingest_landing`.",
        ("SELECT memory_id, n_actions FROM marts.intent_memories WHERE event_date = $d AND "
         "(coalesce(trim(memory_text), '') = '' OR coalesce(trim(embedding_text), '') = '')",)),
    "memories_exist": Entry(
        "gate_memories", "No intent memory for the day (or none at all up to it).",
        "Whether raw events of the day exist:",
        "If raw events exist, the build filtered them all (check `staging.stg_events`); otherwise see "
        "landing_files.",
        ("SELECT count(*) FROM raw.events WHERE event_ts::DATE = $d",)),
    "min_personas": Entry(
        "gate_personas", "Fewer staged personas than `[orchestration] min_personas`.",
        "The staged run's size:",
        "Follow the counts upstream (memories, clusters); a small day by design: lower `min_personas`.",
        ("SELECT count(*), count(DISTINCT user_id) FROM personas.staged_personas WHERE run_date = $d",)),
    "persona_shape": Entry(
        "gate_personas", "A staged persona has an empty label or description, or no evidence.",
        "The offending personas (ids and labeller, not their text):",
        "A labeller bug: relabel with the extractive labeller (`[orchestration] labeller = \"extractive\"`) to "
        "publish the day, and file a bug with the persona_ids.",
        ("SELECT persona_id, labeller, is_fallback, n_evidence FROM personas.staged_personas WHERE run_date = $d "
         "AND (trim(label) = '' OR trim(description) = '' OR n_evidence < 1)",)),
    "pii": Entry(
        "gate_personas", "A staged persona's label or description holds an e-mail address, phone number, 6+ digit "
        "run or URL query string. The labellers scrub these, so their scrubbing or validation is broken.",
        "The alert names the first persona_id and field; which labeller wrote it (read the text only if you must, "
        "and never paste it into a ticket):",
        "Never publish it. Relabel the day with the extractive labeller to publish, and file a bug against the "
        "labeller named in the row.",
        ("SELECT persona_id, labeller, model_version, is_fallback FROM personas.staged_personas "
         "WHERE run_date = $d ORDER BY persona_id LIMIT 20",)),
    "scored_share": Entry(
        "gate_personas", "Too few staged personas got quality scores (`min_scored_share`).",
        "Unscored personas (the `score` log says which have no embedded memory):",
        "Usually memories embedded under another model version than the personas: check that `[embedding]` is "
        "the same for every worker, then clear `embed`.",
        ("SELECT count(*) FILTER (WHERE objective IS NULL) AS unscored, count(*) AS staged "
         "FROM personas.staged_personas WHERE run_date = $d",)),
    "coverage": Entry(
        "gate_personas", "Too small a share of memories ended up as evidence of some persona (`min_coverage`).",
        "The run's coverage and step statistics:",
        "Mostly noise memories: look at the clustering settings (`[clustering]`) or a changed input mix.",
        ("SELECT coverage, stats FROM personas.induction_runs WHERE run_date = $d",)),
    **{f"quality_{k}": Entry(
        "gate_personas", f"The staged run's mean {k} is below `[orchestration] quality_floors.{k}`.",
        "The staged scores by labeller, and the last published days for comparison:",
        _QUALITY_DO.format(k=k),
        (f"SELECT labeller, count(*) AS n, avg({k}) AS {k} FROM personas.staged_personas WHERE run_date = $d "
         "GROUP BY 1",
         f"SELECT run_date, avg({k}) AS {k} FROM personas.personas GROUP BY 1 ORDER BY 1 DESC LIMIT 7"))
        for k in ("cohesion", "alignment", "truthfulness", "objective")},
}


def runbook_for(check: str | None) -> str | None:
    """The alert's "what to do" line for ``check`` (None for an unknown or missing check)."""
    entry = RUNBOOK.get(check or "")
    return entry.short(check) if entry else None


def render_markdown() -> str:
    lines = ["# On-call runbook", "",
             "Generated from `persona_tasks/runbook.py` (`python -m persona_tasks.runbook --write docs/oncall.md`); "
             "do not edit by hand.", "",
             "An alert (a row in the warehouse table `ops_alerts`, and a webhook post when configured) names the "
             "task, the run date, the try, a one-line error and the **failing check**; `ops_alerts.runbook` holds "
             "the \"what to do\" line below. See every alert of a day:", "",
             "```sql", "SELECT task_id, map_index, try_number, failing_check, error_summary, runbook, log_url",
             "FROM ops_alerts WHERE run_date = DATE '2026-01-05' ORDER BY alerted_at;", "```", "",
             AFTER_THE_FIX, "",
             "| check | task |", "|---|---|"]
    lines += [f"| [{c}](#{c}) | `{e.task}` |" for c, e in RUNBOOK.items()]
    lines.append("")
    for c, e in RUNBOOK.items():
        lines += [f"## {c}", "", f"Raised by `{e.task}`. {e.means}", "", f"**Look:** {e.look}", ""]
        if e.sql:
            lines += ["```sql", *[q.replace("$d", "DATE '2026-01-05'") + ";" for q in e.sql], "```", ""]
        lines += [f"**Do:** {e.do}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Print (or write) the on-call runbook in Markdown.")
    ap.add_argument("--write", metavar="PATH", help=f"write it to PATH (e.g. {DOC_PATH})")
    args = ap.parse_args(argv)
    text = render_markdown()
    if args.write:
        Path(args.write).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
