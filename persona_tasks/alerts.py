"""Failure alerts of the DAG: a row in the warehouse table ``ops_alerts`` and an optional webhook post.

``on_failure_callback(context)`` is the DAG's task failure callback (Airflow passes the task context). It
records: dag, task (and map index), run id, run date, try number, error type and a one-line error summary, the
failing check (``GateError.check``, or ``dbt_build`` for a dbt failure), what to do about it (``runbook``:
persona_tasks/runbook.py, docs/oncall.md), and the task's log URL. When
``[alerts] webhook_url`` is set it also posts Slack-compatible JSON (``{"text": ..., "blocks": ...}``) there.

Personal data: the summary is the first line of the error message only; persona-etl's own errors never quote
data, and no query text is ever included. The callback never raises: a broken alert path must not hide the
task's own failure (it logs instead). If the warehouse cannot be opened (for example another writer holds it),
the row goes to ``<work_dir>/ops_alerts.jsonl`` instead.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from persona_tasks.config import Settings
from persona_tasks.runbook import runbook_for

log = logging.getLogger(__name__)

ALERTS_DDL = """
CREATE TABLE IF NOT EXISTS ops_alerts (
    dag_id         VARCHAR   NOT NULL,
    task_id        VARCHAR   NOT NULL,
    map_index      INTEGER,              -- mapped task instance (cluster shard); NULL when not mapped
    run_id         VARCHAR,
    run_date       DATE,                 -- the data day of the run
    try_number     INTEGER,
    error_type     VARCHAR,
    error_summary  VARCHAR,              -- first line of the error message (never data or query text)
    failing_check  VARCHAR,              -- gate check name, dbt_build, ... (NULL when not a check)
    log_url        VARCHAR,
    runbook        VARCHAR,              -- what to do for failing_check (persona_tasks/runbook.py, docs/oncall.md)
    docs_url       VARCHAR,              -- Data Docs page of the failing gate validation (persona_tasks.gates)
    webhook_status VARCHAR,              -- not_configured | HTTP status | error class
    alerted_at     TIMESTAMP NOT NULL    -- UTC
);
"""


@dataclass
class Alert:
    dag_id: str
    task_id: str
    map_index: int | None
    run_id: str | None
    run_date: date | None
    try_number: int | None
    error_type: str | None
    error_summary: str | None
    failing_check: str | None
    log_url: str | None
    runbook: str | None = None
    webhook_status: str | None = None
    alerted_at: datetime | None = None
    docs_url: str | None = None

    def text(self) -> str:
        task = self.task_id + (f"[{self.map_index}]" if self.map_index is not None else "")
        several = self.failing_check and "," in self.failing_check
        check = f" (check{'s' if several else ''} {self.failing_check})" if self.failing_check else ""
        head = (f":warning: {self.dag_id}.{task} passed with failed warning checks" if self.error_type == "GateWarning"
                else f":red_circle: {self.dag_id}.{task} failed")
        return (f"{head} for run date {self.run_date} on try {self.try_number}"
                f"{check}: {self.error_summary}" + (f"\nWhat to do: {self.runbook}" if self.runbook else "")
                + (f"\nData Docs: {self.docs_url}" if self.docs_url else "")
                + (f"\nLog: {self.log_url}" if self.log_url else ""))

    def payload(self) -> dict:
        fields = {k: (v.isoformat() if isinstance(v, (date, datetime)) else v) for k, v in asdict(self).items()}
        return {"text": self.text(),
                "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": self.text()}}],
                "alert": fields}


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def failing_check(exc: BaseException | str | None) -> str | None:
    if not isinstance(exc, BaseException):
        return None
    from persona_tasks.errors import BuildError, InputFileError

    for e in _chain(exc):
        check = getattr(e, "check", None)
        if isinstance(check, str):
            return check
        if isinstance(e, BuildError):
            return "dbt_build"
        if isinstance(e, InputFileError):
            return "input_file"
    return None


def docs_url(exc: BaseException | str | None) -> str | None:
    """The Data Docs page a gate failure carries (``GateError.docs_url``)."""
    if not isinstance(exc, BaseException):
        return None
    return next((e.docs_url for e in _chain(exc) if isinstance(getattr(e, "docs_url", None), str)), None)


def error_summary(exc: BaseException | str | None, max_chars: int = 500) -> tuple[str | None, str | None]:
    """``(error type, first line of the message)``, cut to ``max_chars``."""
    if exc is None:
        return None, None
    if isinstance(exc, BaseException):
        # AirflowFailException wraps our error: report the original
        inner = next((e for e in _chain(exc) if type(e).__module__.startswith("persona_tasks")), exc)
        kind, text = type(inner).__name__, str(inner)
    else:
        kind, text = "Error", str(exc)
    lines = text.strip().splitlines()
    first = lines[0] if lines else kind
    return kind, first[:max_chars]


def alert_from_context(settings: Settings, context: Any) -> Alert:
    ti = context.get("ti") or context.get("task_instance")
    exc = context.get("exception")
    kind, summary = error_summary(exc, settings.alerts.max_summary_chars)
    logical = context.get("logical_date") or context.get("data_interval_start")
    run_date = None
    if logical is not None:
        run_date = (logical.astimezone(timezone.utc) if getattr(logical, "tzinfo", None) else logical).date()
    map_index = getattr(ti, "map_index", None)
    dag_run = context.get("dag_run")
    check = failing_check(exc)
    return Alert(
        dag_id=getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", "?"),
        task_id=getattr(ti, "task_id", None) or "?",
        map_index=map_index if isinstance(map_index, int) and map_index >= 0 else None,
        run_id=getattr(ti, "run_id", None) or getattr(dag_run, "run_id", None),
        run_date=run_date,
        try_number=getattr(ti, "try_number", None),
        error_type=kind,
        error_summary=summary,
        failing_check=check,
        log_url=getattr(ti, "log_url", None),
        runbook=runbook_for(check),
        docs_url=docs_url(exc),
    )


def post_webhook(url: str, payload: dict, timeout_s: float = 10.0) -> str:
    """POST JSON to a Slack-compatible webhook; returns the HTTP status or the error class (never raises)."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - configured URL
            return str(resp.status)
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except Exception as exc:  # network errors must not break the callback
        return type(exc).__name__


def record_alert(settings: Settings, alert: Alert) -> str:
    """Insert the alert into ops_alerts (or the JSONL fallback); returns where it went."""
    import duckdb

    from persona_tasks.warehouse import connect

    row = asdict(alert)
    try:
        con = connect(settings)
        try:
            con.execute(ALERTS_DDL)
            for col in ("runbook", "docs_url"):  # tables from before these columns
                con.execute(f"ALTER TABLE ops_alerts ADD COLUMN IF NOT EXISTS {col} VARCHAR")
            con.execute("INSERT INTO ops_alerts BY NAME SELECT * FROM (SELECT " + ", ".join(
                f"${k} AS {k}" for k in row) + ")", row)
        finally:
            con.close()
        return "ops_alerts"
    except (duckdb.Error, OSError) as exc:
        from persona_tasks.days import work_dir

        path = work_dir(settings) / "ops_alerts.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(alert.payload()["alert"]) + "\n")
        log.warning("alerts: warehouse not writable (%s): alert appended to %s", type(exc).__name__, path)
        return str(path)


def send_alert(settings: Settings, alert: Alert) -> Alert:
    alert.alerted_at = datetime.now(timezone.utc).replace(tzinfo=None)
    url = settings.alerts.webhook_url
    alert.webhook_status = post_webhook(url, alert.payload(), settings.alerts.timeout_s) if url else "not_configured"
    where = record_alert(settings, alert)
    log.error("alert: %s.%s failed for %s (try %s, check %s); recorded in %s, webhook %s", alert.dag_id,
              alert.task_id, alert.run_date, alert.try_number, alert.failing_check, where, alert.webhook_status)
    return alert


def on_failure_callback(context: Any) -> None:
    """Airflow task failure callback (default_args of dags/persona_daily.py). Never raises."""
    try:
        from persona_tasks.config import load_settings

        settings = load_settings()
        send_alert(settings, alert_from_context(settings, context))
    except Exception:  # pragma: no cover - last resort
        log.exception("alerts: the failure callback itself failed")


def read_alerts(settings: Settings, path: Path | None = None):
    """The ops_alerts rows as a polars frame (empty when none)."""
    import polars as pl

    from persona_tasks.warehouse import connect_read_only, query_pl

    con = connect_read_only(settings, path)
    try:
        exists = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'ops_alerts'"
                             ).fetchall()[0][0]
        return query_pl(con, "SELECT * FROM ops_alerts ORDER BY alerted_at") if exists else pl.DataFrame()
    finally:
        con.close()
