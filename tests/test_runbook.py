"""The on-call runbook: an entry for every check a gate can raise, docs/oncall.md rendered from it, and the alert
carrying the entry's "what to do" line."""

from __future__ import annotations

import re

from persona_tasks import runbook as R
from persona_tasks.config import PROJECT_DIR
from persona_tasks.quality import SCORES


def raised_checks() -> set[str]:
    """Every check a gate can fail: each check of the gates' suites, every literal ``GateError("...")`` left in
    persona_tasks, and the checks the alert derives from other errors."""
    from persona_tasks.gates import SUITES

    found: set[str] = {c.name for s in SUITES for c in s.checks}
    for path in (PROJECT_DIR / "persona_tasks").rglob("*.py"):
        found |= set(re.findall(r'GateError\(\s*"([a-z_]+)"', path.read_text()))
    return found | {"dbt_build", "input_file"}


def test_every_check_has_an_entry():
    checks = raised_checks()
    # the hand-written gates' checks keep their names, and the suites add the issue's checks
    assert {"landing_files", "ledger_complete", "reconciliation", "quarantine_count", "events_count", "rows_read",
            "rejected_share", "dbt_tests", "actions_reconcile", "memory_text", "memories_exist", "min_personas",
            "persona_shape", "pii", "scored_share", "coverage"} <= checks
    assert {f"quality_{k}" for k in (*SCORES, "objective")} <= checks
    assert {"volume", "duplicate_share", "event_types", "event_ts_in_interval", "raw_columns", "raw_types",
            "memories_per_user", "memory_text_length", "low_truthfulness_share", "labels_unique",
            "llm_fallback_share", "personas_per_user_drift", "topic_mix_drift"} <= checks
    assert checks <= set(R.RUNBOOK), sorted(checks - set(R.RUNBOOK))
    assert set(R.RUNBOOK) <= checks, sorted(set(R.RUNBOOK) - checks)  # no entry for a check that no longer exists


def test_a_check_cannot_exist_without_its_runbook_entry():
    """``Check`` refuses a missing or empty runbook entry, and a suite refuses an entry of another task: so every
    check in a suite is in docs/oncall.md (rendered from the suites), with its severity."""
    import pytest

    from persona_tasks.gates import SUITES
    from persona_tasks.gates.checks import Check, Entry, Suite

    def build(s, d):
        return None

    with pytest.raises(TypeError):
        Check("no_entry", "day", build, "block", "a check without an entry", None)
    with pytest.raises(ValueError):
        Entry("gate_raw", "means", "", "do")
    with pytest.raises(ValueError):
        Check("bad_severity", "day", build, "fatal", "t", Entry("gate_raw", "m", "l", "d"))
    with pytest.raises(ValueError):
        Suite("gate_raw", {"day": None}, (Check("x", "day", build, "warn", "t", Entry("gate_memories", "m", "l", "d")),),
              load=build)
    doc = (PROJECT_DIR / R.DOC_PATH).read_text()
    for suite in SUITES:
        for c in suite.checks:
            assert f"## {c.name}\n\nRaised by `{suite.gate}`. Severity **{c.severity}**. {c.runbook.means}" in doc
            assert f"| [{c.name}](#{c.name}) | `{suite.gate}` | {c.severity} |" in doc


def test_oncall_doc_is_rendered_from_the_runbook():
    doc = (PROJECT_DIR / R.DOC_PATH).read_text()
    assert doc == R.render_markdown(), "docs/oncall.md is stale: python -m persona_tasks.runbook --write docs/oncall.md"
    for check in R.RUNBOOK:
        assert f"## {check}\n" in doc


def test_alert_line_points_at_the_entry():
    line = R.runbook_for("rejected_share")
    assert "max_rejected_share" in line and line.endswith("(runbook: docs/oncall.md#rejected_share)")
    assert R.runbook_for("no_such_check") is None and R.runbook_for(None) is None
    several = R.runbook_for("rejected_share, volume")  # a gate failing several checks: one line per check
    assert several.startswith("rejected_share: ") and " | volume: " in several and several.endswith("#volume)")


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
