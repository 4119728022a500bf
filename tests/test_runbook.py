"""The on-call runbook: an entry for every check a gate can raise, docs/oncall.md rendered from it, and the alert
carrying the entry's "what to do" line."""

from __future__ import annotations

import re

from persona_tasks import runbook as R
from persona_tasks.config import PROJECT_DIR
from persona_tasks.quality import SCORES


def raised_checks() -> set[str]:
    """Every literal check name of ``GateError("...")`` in persona_tasks, plus the dynamic quality floors and the
    checks the alert derives from other errors."""
    found: set[str] = set()
    for path in (PROJECT_DIR / "persona_tasks").rglob("*.py"):
        found |= set(re.findall(r'GateError\(\s*"([a-z_]+)"', path.read_text()))
    return found | {f"quality_{k}" for k in (*SCORES, "objective")} | {"dbt_build", "input_file"}


def test_every_check_has_an_entry():
    checks = raised_checks()
    assert {"rejected_share", "pii", "dbt_tests", "coverage", "quality_objective"} <= checks
    assert checks <= set(R.RUNBOOK), sorted(checks - set(R.RUNBOOK))
    assert set(R.RUNBOOK) <= checks, sorted(set(R.RUNBOOK) - checks)  # no entry for a check that no longer exists


def test_oncall_doc_is_rendered_from_the_runbook():
    doc = (PROJECT_DIR / R.DOC_PATH).read_text()
    assert doc == R.render_markdown(), "docs/oncall.md is stale: python -m persona_tasks.runbook --write docs/oncall.md"
    for check in R.RUNBOOK:
        assert f"## {check}\n" in doc


def test_alert_line_points_at_the_entry():
    line = R.runbook_for("rejected_share")
    assert "max_rejected_share" in line and line.endswith("(runbook: docs/oncall.md#rejected_share)")
    assert R.runbook_for("no_such_check") is None and R.runbook_for(None) is None


def test_older_alerts_table_gains_the_runbook_column(tmp_path):
    from persona_tasks.alerts import Alert, read_alerts, record_alert
    from persona_tasks.config import load_settings
    from persona_tasks.warehouse import connect

    settings = load_settings(warehouse=tmp_path / "w.duckdb")
    with connect(settings) as con:  # the table as it was before the runbook column
        con.execute("CREATE TABLE ops_alerts (dag_id VARCHAR NOT NULL, task_id VARCHAR NOT NULL, map_index INTEGER, "
                    "run_id VARCHAR, run_date DATE, try_number INTEGER, error_type VARCHAR, error_summary VARCHAR, "
                    "failing_check VARCHAR, log_url VARCHAR, webhook_status VARCHAR, alerted_at TIMESTAMP NOT NULL)")
    alert = Alert("persona_daily", "gate_personas", None, "r1", None, 1, "GateError", "gate check pii failed",
                  "pii", None, runbook=R.runbook_for("pii"), webhook_status="not_configured")
    from datetime import datetime

    alert.alerted_at = datetime(2026, 1, 5)
    assert record_alert(settings, alert) == "ops_alerts"
    row = read_alerts(settings).row(0, named=True)
    assert row["failing_check"] == "pii" and row["runbook"] == R.runbook_for("pii")
