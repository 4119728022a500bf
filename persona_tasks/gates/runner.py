"""The shared gate runner: load a gate's frames from DuckDB, validate its whole suite with Great Expectations, record
every check in ``quality_check_results``, build the Data Docs pages, alert on warnings and raise on blocking failures.

Every check is evaluated on every run (a failing check never hides the next one). GX validates pandas frames read
from DuckDB (its SQL datasource gives wrong results on DuckDB, /work/shared/deps/README.md); each frame of a gate is
one GX suite ``<gate>.<frame>`` and one validation result (one Data Docs page). A blocking failure raises
``GateError`` naming every failing blocking check (the DAG fails the task without retry); a warning or an
overridden check publishes and alerts (ops_alerts row, webhook).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

from persona_tasks.config import Settings
from persona_tasks.days import as_date
from persona_tasks.errors import GateError, PersonaEtlError
from persona_tasks.gates.checks import Check, Suite
from persona_tasks.gates.overrides import Override

log = logging.getLogger(__name__)

_THRESHOLD_KEYS = ("min_value", "max_value", "strict_min", "strict_max", "value_set", "mostly")
_GX_SEVERITY = {"block": "critical", "warn": "warning"}


@dataclass(frozen=True)
class RunInfo:
    """Which run a gate evaluates for (quality_check_results, alerts): the Airflow run, or a local one."""

    run_id: str
    try_number: int = 1
    dag_id: str = "persona_daily"
    log_url: str | None = None

    @classmethod
    def local(cls) -> RunInfo:
        return cls(run_id="local__" + datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))

    @classmethod
    def from_airflow(cls, context: Any) -> RunInfo:
        ti = context.get("ti") or context.get("task_instance")
        dag_run = context.get("dag_run")
        return cls(run_id=str(getattr(ti, "run_id", None) or getattr(dag_run, "run_id", None) or "airflow"),
                   try_number=int(getattr(ti, "try_number", None) or 1),
                   dag_id=str(getattr(ti, "dag_id", None) or "persona_daily"),
                   log_url=getattr(ti, "log_url", None))


@dataclass
class CheckResult:
    check: Check
    gate: str
    severity: str              # as applied (an override turns block into warn)
    success: bool
    exempt: bool
    observed: Any
    threshold: dict
    unexpected_count: int | None
    unexpected_ids: list[str]
    expectation_type: str
    column: str | None
    docs_page: str | None = None
    override: Override | None = None
    unexpected_values: list = field(default_factory=list)  # codes/numbers only: frames never hold text

    @property
    def blocks(self) -> bool:
        return not self.success and self.severity == "block"

    def summary(self) -> str:
        """``name (observed X; min_value A, max_value B)``: what the alert and the error show per failing check."""
        bounds = ", ".join(f"{k} {_fmt(v)}" for k, v in self.threshold.items())
        s = f"{self.check.name} (observed {_fmt(self.observed)}" + (f"; {bounds})" if bounds else ")")
        if self.unexpected_ids:
            vals = ""
            if self.unexpected_values:
                vals = " with " + ", ".join(sorted({_fmt(v) for v in self.unexpected_values[:5]}))
            s += f" e.g. {', '.join(self.unexpected_ids[:3])}{vals}"
        if self.override:
            s += f" [overridden by {self.override.overridden_by}: {self.override.reason}]"
        return s


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) > 6:
        return "[" + ", ".join(map(str, v[:6])) + f", ... {len(v)} in all]"
    return json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)


def _jsonable(v: Any) -> Any:
    """numpy / pandas scalars, sets and timestamps as plain JSON values."""
    if v is None:
        return None
    if isinstance(v, (set, frozenset, tuple, list)):
        out = [_jsonable(x) for x in v]
        return sorted(out, key=str) if isinstance(v, (set, frozenset)) else out
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            v = v.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 6)
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if isinstance(v, (bool, int, str)):
        return v
    return str(v)


def known_checks() -> dict[str, Check]:
    from persona_tasks.gates.suites import SUITES

    return {c.name: c for s in SUITES for c in s.checks}


def applied_severity(settings: Settings, check: Check, override: Override | None) -> str:
    if override is not None:
        return "warn"
    return settings.gates.severity.get(check.name, check.severity)


def _check_severity_config(settings: Settings) -> None:
    unknown = sorted(set(settings.gates.severity) - set(known_checks()))
    if unknown:
        raise PersonaEtlError(f"[gates] severity names unknown check(s) {unknown}: see docs/oncall.md for the checks")


def _columns(kwargs: dict) -> list[str]:
    if "column" in kwargs:
        return [kwargs["column"]]
    if "column_A" in kwargs:
        return [kwargs["column_A"], kwargs["column_B"]]
    return list(kwargs.get("column_list") or [])


def thresholds(kwargs: dict) -> dict:
    """The bounds of an expectation (min/max, strictness, value set, mostly), as JSON values."""
    out = {k: _jsonable(kwargs[k]) for k in _THRESHOLD_KEYS
           if k in kwargs and kwargs[k] is not None and not (k == "mostly" and kwargs[k] == 1)
           and not (k in ("strict_min", "strict_max") and not kwargs[k])}
    if isinstance(out.get("value_set"), list):
        out["value_set"] = sorted(out["value_set"], key=str)
    return out


def _result_of(check: Check, er, frame, id_col: str | None, severity: str) -> CheckResult:
    cfg = er.expectation_config
    kwargs = dict(cfg.kwargs)
    cols = _columns(kwargs)
    r = er.result or {}
    exempt = False
    if "observed_value" in r:
        observed = _jsonable(r["observed_value"])
    elif id_col is None and len(frame) == 1 and cols:
        vals = {c: _jsonable(frame[c].iloc[0]) for c in cols}
        observed = vals[cols[0]] if len(cols) == 1 else vals
        exempt = len(cols) == 1 and observed is None and bool(er.success)
    elif r.get("element_count"):
        pct = r.get("unexpected_percent")
        observed = None if pct is None else round(float(pct) / 100.0, 6)  # share of unexpected rows
    else:
        observed = None
    threshold = thresholds(kwargs)
    ids: list[str] = []
    if id_col:
        for item in r.get("partial_unexpected_index_list") or []:
            if isinstance(item, dict) and item.get(id_col) is not None:
                ids.append(str(item[id_col]))
    if er.exception_info and er.exception_info.get("raised_exception"):
        # the expectation itself broke: a failed check, with the exception type (never data) as the observation
        observed = {"error": str(er.exception_info.get("exception_message") or "")[:200]}
    n_unexpected = r.get("unexpected_count")
    return CheckResult(check=check, gate="", severity=severity, success=bool(er.success), exempt=exempt,
                       observed=observed, threshold=threshold,
                       unexpected_count=None if n_unexpected is None else int(n_unexpected),
                       unexpected_ids=ids[:5], expectation_type=cfg.type, column=", ".join(cols) or None,
                       unexpected_values=[_jsonable(v) for v in (r.get("partial_unexpected_list") or [])[:5]])


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-")[:80] or "run"


def validate(settings: Settings, suite: Suite, day: date, frames: dict, run: RunInfo,
             overrides: dict[str, Override]) -> tuple[list[CheckResult], dict[str, float]]:
    """Validate every frame of ``suite`` with its checks (GX), store the results and build their Data Docs pages.
    Returns the results in suite order and timings (validate_s, docs_s)."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    import persona_tasks.gates.custom  # noqa: F401 - registers the custom expectation
    import persona_tasks.gates.site as site

    t0 = time.perf_counter()
    ctx = site.context(settings)
    suite_names = [f"{suite.gate}.{f}" for f in suite.frames]
    site.prune(settings, ctx, suite_names, settings.gates.docs_keep_runs - 1)
    run_id = RunIdentifier(run_name=_safe(f"{day}__{run.run_id}__try{run.try_number}"),
                           run_time=datetime.now(timezone.utc))
    by_name: dict[str, CheckResult] = {}
    keys = []
    for frame_name, id_col in suite.frames.items():
        checks = [c for c in suite.checks if c.frame == frame_name]
        if not checks:
            continue
        df = frames[frame_name]
        expectations = []
        for c in checks:
            sev = applied_severity(settings, c, overrides.get(c.name))
            e = c.build(settings, day)
            e.meta = {"check": c.name, "severity": sev}
            e.severity = _GX_SEVERITY[sev]
            note = " [overridden for this day]" if c.name in overrides else ""
            bounds = ", ".join(f"{k} {_fmt(v)}" for k, v in thresholds(dict(e.configuration.kwargs)).items())
            e.description = f"{c.name} ({sev}{note}): {c.title}" + (f" [{bounds}]" if bounds else "")
            expectations.append(e)
        name = f"{suite.gate}.{frame_name}"
        gx_suite = ctx.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))
        vd = ctx.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=name, data=site.batch_definition(ctx, name), suite=gx_suite))
        result_format = {"result_format": "SUMMARY", "partial_unexpected_count": 5}
        if id_col:
            result_format["unexpected_index_column_names"] = [id_col]
        res = vd.run(batch_parameters={"dataframe": df}, result_format=result_format, run_id=run_id)
        key = ValidationResultIdentifier(expectation_suite_identifier=ExpectationSuiteIdentifier(name=name),
                                         run_id=run_id, batch_identifier=res.batch_id)
        keys.append(key)
        page = site.page_url(settings, ctx, key)
        for er in res.results:
            check = suite.check(er.expectation_config.meta["check"])
            cr = _result_of(check, er, df, id_col, er.expectation_config.meta["severity"])
            cr.gate, cr.docs_page, cr.override = suite.gate, page, overrides.get(check.name)
            by_name[check.name] = cr
    t1 = time.perf_counter()
    ctx.build_data_docs(site_names=[site.SITE], resource_identifiers=keys)
    t2 = time.perf_counter()
    missing = [c.name for c in suite.checks if c.name not in by_name]
    if missing:  # every check is evaluated: a check GX did not return is a bug, never a pass
        raise PersonaEtlError(f"{suite.gate}: no result for check(s) {missing}")
    return [by_name[c.name] for c in suite.checks], {"validate_s": round(t1 - t0, 3), "docs_s": round(t2 - t1, 3)}


def result_rows(results: list[CheckResult], day: date, run: RunInfo) -> list[dict]:
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    return [{"dag_run_id": run.run_id, "run_date": day, "try_number": run.try_number, "gate": r.gate,
             "check_name": r.check.name, "expectation_type": r.expectation_type, "column_name": r.column,
             "severity": r.severity, "success": r.success, "exempt": r.exempt,
             "observed_value": json.dumps(r.observed, default=str), "threshold": json.dumps(r.threshold, default=str),
             "unexpected_count": r.unexpected_count, "unexpected_ids": r.unexpected_ids,
             "overridden_by": r.override.overridden_by if r.override else None,
             "override_reason": r.override.reason if r.override else None,
             "docs_page": r.docs_page, "checked_at": now} for r in results]


def _warning_alert(settings: Settings, suite: Suite, day: date, run: RunInfo, warned: list[CheckResult]) -> None:
    """A gate that passed with failed warn checks (or overridden ones) still alerts (ops_alerts row, webhook)."""
    from persona_tasks.alerts import Alert, send_alert
    from persona_tasks.runbook import runbook_for

    names = ", ".join(r.check.name for r in warned)
    summary = (f"{len(warned)} warning check(s) of {suite.gate} failed (published anyway): "
               + "; ".join(r.summary() for r in warned))
    alert = Alert(dag_id=run.dag_id, task_id=suite.gate, map_index=None, run_id=run.run_id, run_date=day,
                  try_number=run.try_number, error_type="GateWarning",
                  error_summary=summary[:settings.alerts.max_summary_chars], failing_check=names,
                  log_url=run.log_url, runbook=runbook_for(names), docs_url=warned[0].docs_page)
    send_alert(settings, alert)


def run_suite(settings: Settings, suite: Suite, run_date: date | str, inputs: Any = None,
              run: RunInfo | None = None) -> dict:
    """Evaluate ``suite`` for ``run_date``; returns the gate's facts and its check summary (the task's XCom).
    Raises GateError when a blocking check failed (after recording every result)."""
    from persona_tasks.gates.overrides import active_overrides
    from persona_tasks.gates.results import write_results
    from persona_tasks.warehouse import connect

    _check_severity_config(settings)
    day = as_date(run_date)
    run = run or RunInfo.local()
    t0 = time.perf_counter()
    con = connect(settings)
    try:
        frames, facts = suite.load(settings, con, day, inputs)
        overrides = active_overrides(con, day, suite.gate)
    finally:
        con.close()
    load_s = time.perf_counter() - t0
    results, timings = validate(settings, suite, day, frames, run, overrides)
    con = connect(settings)
    try:
        write_results(con, result_rows(results, day, run))
    finally:
        con.close()
    failed = [r for r in results if not r.success]
    blocking = [r for r in failed if r.blocks]
    warned = [r for r in failed if not r.blocks]
    out = {**facts, "run_date": day.isoformat(), "checks": len(results), "failed": [r.check.name for r in failed],
           "blocking": [r.check.name for r in blocking], "warned": [r.check.name for r in warned],
           "overridden": sorted(r.check.name for r in results if r.override),
           "docs_url": (failed[0].docs_page if failed else results[0].docs_page) if results else None,
           "timings_s": {"load_s": round(load_s, 3), **timings}}
    log.info("%s: %d checks, %d failed (%d blocking) in %.1fs (load %.1fs, validate %.1fs, data docs %.1fs)",
             suite.gate, len(results), len(failed), len(blocking), time.perf_counter() - t0, load_s,
             timings["validate_s"], timings["docs_s"])
    if blocking:
        names = [r.check.name for r in blocking]
        msg = (f"{len(blocking)} of {len(results)} checks of {suite.gate} failed and block publishing: "
               + "; ".join(r.summary() for r in blocking))
        if warned:
            msg += "; also failed as warnings: " + "; ".join(r.summary() for r in warned)
        msg += f"; Data Docs: {blocking[0].docs_page}"
        raise GateError(", ".join(names), msg, checks=names, docs_url=blocking[0].docs_page)
    if warned:
        _warning_alert(settings, suite, day, run, warned)
    return out

