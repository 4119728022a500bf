"""What each failing check means, where to look and what to do: one table for on-call engineers.

Every alert (``ops_alerts.failing_check``, the webhook post) names its checks; ``runbook_for(check)`` gives the
entry the alert carries (``ops_alerts.runbook``) and docs/oncall.md is rendered from the same table
(``python -m persona_tasks.runbook --write docs/oncall.md``; a test keeps the two equal). The gates' entries come
from their Great Expectations suites themselves (persona_tasks/gates/: a ``Check`` cannot be defined without its
entry), the others (a task failing outside a gate) are below. The queries take the run date as ``$d`` (DuckDB CLI:
replace it with ``DATE '2026-01-05'``) and never print raw query text beyond what a row holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from persona_tasks.gates.suites import SUITES
from persona_tasks.gates.checks import Entry
from persona_tasks.gates.results import FAILED_LAST_NIGHT_SQL, FAILING_SINCE_SQL

DOC_PATH = "docs/oncall.md"
AFTER_THE_FIX = ("Whatever the check: a failed gate published nothing, so analysts keep the last good personas and "
                 "serving copy. Every task is idempotent: after the fix, clear the failed task (or the whole run) in "
                 "the Airflow UI or with `airflow tasks clear persona_daily -s <day> -e <day>`.")


# failures outside the gates' suites (a task that cannot run at all)
TASK_ENTRIES: dict[str, Entry] = {
    "input_file": Entry(
        "ingest_landing", "A landing file cannot be read at all (wrong format, truncated, not UTF-8); the error "
        "names the file, row and field.",
        "The task log (the error line), then the file itself.",
        "Replace or repair the file upstream (rows with bad fields are quarantined, not fatal: this is a file-level "
        "failure), then clear `ingest_landing`."),
    "dbt_build": Entry(
        "build", "`dbt build` itself failed (compilation, a model error, a failed test).",
        "The `build` task log (failing nodes and dbt's message).",
        "Fix the model or the data, then clear `build`; the incremental model reprocesses the day."),
}

RUNBOOK: dict[str, Entry] = {**TASK_ENTRIES, **{c.name: c.runbook for s in SUITES for c in s.checks}}
SEVERITY: dict[str, str] = {c.name: c.severity for s in SUITES for c in s.checks}


def runbook_for(check: str | None) -> str | None:
    """The alert's "what to do" line for ``check``, or for each of several comma-separated checks (None for an
    unknown or missing check)."""
    names = [c.strip() for c in (check or "").split(",") if c.strip()]
    lines = [RUNBOOK[c].short(c) if len(names) == 1 else f"{c}: {RUNBOOK[c].short(c)}" for c in names
             if c in RUNBOOK]
    return " | ".join(lines) or None


def _sql(q: str, **params: str) -> str:
    for k, v in params.items():
        q = q.replace(f"${k}", v)
    return q


def render_markdown() -> str:
    lines = ["# On-call runbook", "",
             "Generated from `persona_tasks/runbook.py` and the gates' suites in `persona_tasks/gates/` "
             "(`python -m persona_tasks.runbook --write docs/oncall.md`); do not edit by hand.", "",
             "An alert (a row in the warehouse table `ops_alerts`, and a webhook post when configured) names the "
             "task, the run date, the try, a one-line error and **every failing check** (`failing_check`, comma "
             "separated); `ops_alerts.runbook` holds the \"what to do\" line of each below and `docs_url` the Data "
             "Docs page of the failing validation. See every alert of a day:", "",
             "```sql", "SELECT task_id, map_index, try_number, failing_check, error_summary, runbook, docs_url, log_url",
             "FROM ops_alerts WHERE run_date = DATE '2026-01-05' ORDER BY alerted_at;", "```", "",
             "## Gates, results and history", "",
             "The three gates (`gate_raw`, `gate_memories`, `gate_personas`) are Great Expectations suites "
             "(persona_tasks/gates/). Each run evaluates **every** check of its gate and records each in the "
             "warehouse table `quality_check_results` (observed value, threshold, severity, up to 5 ids of "
             "unexpected rows, the Data Docs page), for every run and retry. A check of severity **block** that "
             "fails stops the run (nothing is published); a **warn** check publishes and alerts "
             "(`error_type = 'GateWarning'`). `[gates] severity = { check = \"warn\" }` changes a check's "
             "severity for good.", "",
             "Data Docs (every validation as a page: each check with its observed value): `persona-etl gate docs` "
             "(or `make quality-docs`) serves them on http://127.0.0.1:8765 (`[gates] docs_port`); the alert "
             "links the failing page. Only the last `[gates] docs_keep_runs` results per suite are kept.", "",
             "What failed last night (the latest try of each check of the latest run date):", "",
             "```sql", FAILED_LAST_NIGHT_SQL + ";", "```", "",
             "Since when has a check failed (the first day of its current run of failed days; NULL when it "
             "passes now):", "",
             "```sql", _sql(FAILING_SINCE_SQL, check="'rejected_share'") + ";", "```", "",
             "## Publishing anyway: an audited override", "",
             "When you have checked that the data is right although a blocking check failed, record an override "
             "for that one check and that one day, then clear the gate task:", "",
             "```bash",
             "persona-etl gate override --run-date 2026-01-05 --check volume --reason \"holiday: half the traffic "
             "is real\" --by jane",
             "airflow tasks clear persona_daily -s 2026-01-05 -e 2026-01-05 -t gate_raw",
             "```", "",
             "The rerun evaluates the check as `warn` for that day only (recorded with `overridden_by` and "
             "`override_reason` in `quality_check_results`, and alerted as a warning); the next day it blocks "
             "again. The override is refused for a day no gate ran for, for a check that passed (or only "
             "warned), and there is no global switch. Overrides: `SELECT * FROM quality_overrides`. Never "
             "override `pii`.", "",
             AFTER_THE_FIX, "",
             "| check | task | severity |", "|---|---|---|"]
    lines += [f"| [{c}](#{c}) | `{e.task}` | {SEVERITY.get(c, '-')} |" for c, e in RUNBOOK.items()]
    lines.append("")
    for c, e in RUNBOOK.items():
        sev = f" Severity **{SEVERITY[c]}**." if c in SEVERITY else ""
        lines += [f"## {c}", "", f"Raised by `{e.task}`.{sev} {e.means}", "", f"**Look:** {e.look}", ""]
        if e.sql:
            lines += ["```sql", *[_sql(q, d="DATE '2026-01-05'") + ";" for q in e.sql], "```", ""]
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
