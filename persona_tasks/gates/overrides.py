"""Audited overrides: on-call decides the data of one day is right although a blocking check failed.

``persona-etl gate override --run-date D --check NAME --reason TEXT [--by WHO]`` records who, why and when in
``quality_overrides``; the next run of that day's gate treats that one check as ``warn`` (it still runs and is
recorded, with ``overridden_by`` / ``override_reason`` in quality_check_results, and alerts as a warning). There
is no global switch: an override names one check and one run date, and is refused for a day no gate ran for, a
check that was not evaluated that day, or a check whose latest result passed (or was only a warning).
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import duckdb

from persona_tasks.config import Settings
from persona_tasks.days import as_date
from persona_tasks.errors import PersonaEtlError
from persona_tasks.warehouse import table_exists

OVERRIDES_DDL = """
CREATE TABLE IF NOT EXISTS quality_overrides (
    run_date       DATE      NOT NULL,   -- the one data day it applies to
    gate           VARCHAR   NOT NULL,
    check_name     VARCHAR   NOT NULL,   -- the one check it turns from block into warn
    reason         VARCHAR   NOT NULL,
    overridden_by  VARCHAR   NOT NULL,
    created_at     TIMESTAMP NOT NULL    -- UTC
);
"""


class OverrideRefused(PersonaEtlError):
    """The override does not apply to anything that failed (printed as one line by the CLI)."""


@dataclass(frozen=True)
class Override:
    run_date: date
    gate: str
    check_name: str
    reason: str
    overridden_by: str
    created_at: datetime


def record_override(settings: Settings, run_date: date | str, check: str, reason: str,
                    by: str | None = None) -> Override:
    """Store an override of ``check`` for ``run_date`` after checking that its latest result failed and blocked."""
    from persona_tasks.warehouse import connect, transaction

    day = as_date(run_date)
    reason = (reason or "").strip()
    if not reason:
        raise OverrideRefused("an override needs a --reason (it is stored for the audit trail)")
    by = (by or os.environ.get("PERSONA_ETL_USER") or getpass.getuser() or "").strip()
    if not by:
        raise OverrideRefused("cannot tell who overrides: pass --by")
    if not Path(settings.warehouse).exists():
        raise OverrideRefused(f"warehouse {settings.warehouse} does not exist")
    con = connect(settings)
    try:
        if not table_exists(con, "quality_check_results"):
            raise OverrideRefused(f"no gate has run on this warehouse yet (no quality_check_results): nothing to "
                                  f"override for {day}")
        days = con.execute("SELECT count(*) FROM quality_check_results WHERE run_date = $d", {"d": day}).fetchall()
        if not days[0][0]:
            raise OverrideRefused(f"run date {day} does not exist: no gate ran for it (quality_check_results has no "
                                  "row of that day)")
        latest = con.execute(
            "SELECT gate, success, severity, checked_at FROM quality_check_results WHERE run_date = $d AND "
            "check_name = $c ORDER BY checked_at DESC LIMIT 1", {"d": day, "c": check}).fetchall()
        if not latest:
            failed = [r[0] for r in con.execute(
                "SELECT DISTINCT check_name FROM quality_check_results WHERE run_date = $d AND NOT success "
                "ORDER BY 1", {"d": day}).fetchall()]
            raise OverrideRefused(f"check {check} was not evaluated on {day}; checks that failed that day: "
                                  f"{', '.join(failed) or 'none'}")
        gate, success, severity, checked_at = latest[0]
        if success:
            raise OverrideRefused(f"check {check} passed on {day} (latest result {checked_at:%Y-%m-%d %H:%M} UTC): "
                                  "nothing to override")
        if severity != "block":
            raise OverrideRefused(f"check {check} failed on {day} as a warning only (it did not stop the run): "
                                  "nothing to override")
        ov = Override(day, gate, check, reason, by, datetime.now(timezone.utc).replace(tzinfo=None))
        con.execute(OVERRIDES_DDL)
        with transaction(con):
            con.execute("INSERT INTO quality_overrides VALUES ($d, $g, $c, $r, $b, $t)",
                        {"d": day, "g": gate, "c": check, "r": reason, "b": by, "t": ov.created_at})
        return ov
    finally:
        con.close()


def active_overrides(con: duckdb.DuckDBPyConnection, run_date: date, gate: str) -> dict[str, Override]:
    """The overrides of one gate for one run date, by check (the latest per check)."""
    if not table_exists(con, "quality_overrides"):
        return {}
    rows = con.execute("SELECT run_date, gate, check_name, reason, overridden_by, created_at FROM quality_overrides "
                       "WHERE run_date = $d AND gate = $g ORDER BY created_at", {"d": run_date, "g": gate}).fetchall()
    return {r[2]: Override(*r) for r in rows}
