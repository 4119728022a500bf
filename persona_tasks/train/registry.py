"""Model registry of trained labeller adapters: versions, the promotion gate, promote / rollback, the audit trail.

Every trained adapter is a version: its files under ``<models_dir>/adapters/<version>/`` and a row of
``training.model_registry`` (docs/tables.md). Status: ``candidate`` (trained, gate not passed or not run),
``rejected`` (the gate refused it; ``reason`` says why), ``promoted`` (the one the daily labelling loads; at most one),
``retired`` (was promoted, replaced or rolled back). Every promote / rollback / gate decision is a row of
``training.model_audit`` (who, when, what, why).

What the daily labelling reads is a pointer file, ``<models_dir>/adapters/PROMOTED.json`` (version, adapter folder,
base model version), written atomically on promote and rollback: loading a model never opens the warehouse (a
writer may hold it), and the table stays the record. ``apply_promoted`` merges that adapter into the base model
when the base model version matches (else it warns and labels with the base model).

The gate (``gate``): on held-out clusters (users never trained on), the candidate's mean objective must beat the
current labeller's by ``[training] min_objective_gain``, its mean truthfulness may not drop by more than
``truthfulness_tolerance`` and its fallback rate may not rise by more than ``fallback_tolerance``; both are measured
on the same clusters in the same run.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from persona_tasks.config import Settings
from persona_tasks.errors import PersonaEtlError

log = logging.getLogger(__name__)

POINTER = "PROMOTED.json"

REGISTRY_DDL = """
CREATE SCHEMA IF NOT EXISTS training;
CREATE TABLE IF NOT EXISTS training.model_registry (
    version         VARCHAR   NOT NULL,   -- dpo-<arm>-<UTC timestamp>-<hash>
    arm             VARCHAR   NOT NULL,   -- config.TRAINED_ARMS
    base_model      VARCHAR   NOT NULL,   -- model_version of the base model the adapter was trained on
    labeller_version VARCHAR,             -- model_version of the labeller that generated the groups
    build_id        VARCHAR,              -- training.preference_groups build the adapter was trained on
    window_start    DATE,                 -- run dates of the published runs the groups came from
    window_end      DATE,
    group_count     INTEGER   NOT NULL,   -- training groups used
    metrics         JSON,                 -- training log (loss, margins, ranking accuracy), time, memory, held-out gate
    status          VARCHAR   NOT NULL,   -- candidate | rejected | promoted | retired
    reason          VARCHAR,              -- why the gate refused it / why it was retired
    adapter_path    VARCHAR   NOT NULL,   -- folder of the LoRA adapter (under models_dir/adapters)
    created_at      TIMESTAMP NOT NULL,   -- UTC
    promoted_at     TIMESTAMP,
    promoted_by     VARCHAR               -- user or DAG that promoted it
);
CREATE TABLE IF NOT EXISTS training.model_audit (
    acted_at        TIMESTAMP NOT NULL,   -- UTC
    action          VARCHAR   NOT NULL,   -- register | gate_pass | gate_refuse | promote | rollback
    version         VARCHAR,              -- the version acted on (NULL = the base model)
    previous        VARCHAR,              -- the promoted version before the action (NULL = the base model)
    actor           VARCHAR   NOT NULL,
    reason          VARCHAR
);
"""


class RegistryError(PersonaEtlError):
    """A registry action is not possible (unknown version, refused by the gate, nothing to roll back)."""


def ensure_registry(con: Any) -> None:
    con.execute(REGISTRY_DDL)


def adapters_dir(settings: Settings) -> Path:
    return Path(settings.models_dir) / "adapters"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def default_actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return os.environ.get("USER", "unknown")


# ---------------------------------------------------------------------------------------------------------------
# The pointer file and loading
# ---------------------------------------------------------------------------------------------------------------

def read_pointer(settings: Settings) -> dict | None:
    path = adapters_dir(settings) / POINTER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RegistryError(f"{path}: unreadable promoted-model pointer ({type(e).__name__}); fix or delete it, "
                            "or run `persona-etl models rollback`") from e


def write_pointer(settings: Settings, row: dict | None) -> None:
    """Point the daily labelling at ``row`` (a registry row) or, with None, at the base model (file removed)."""
    d = adapters_dir(settings)
    d.mkdir(parents=True, exist_ok=True)
    path = d / POINTER
    if row is None:
        path.unlink(missing_ok=True)
        return
    fd, tmp = tempfile.mkstemp(prefix=".promoted.", dir=d)
    with os.fdopen(fd, "w") as f:
        json.dump({"version": row["version"], "adapter_path": row["adapter_path"], "base_model": row["base_model"],
                   "promoted_at": str(row.get("promoted_at"))}, f, indent=1)
    os.replace(tmp, path)


def apply_promoted(settings: Settings, model: Any, base_version: str) -> tuple[Any, str]:
    """(model with the promoted adapter merged in, its model_version) or, without a usable promoted adapter,
    the base model and version unchanged."""
    ptr = read_pointer(settings)
    if ptr is None:
        return model, base_version
    if ptr.get("base_model") != base_version:
        log.warning("promoted adapter %s was trained on %s, the configured base model is %s: labelling with the "
                    "base model", ptr.get("version"), ptr.get("base_model"), base_version)
        return model, base_version
    path = Path(ptr["adapter_path"])
    if not (path / "adapter_config.json").is_file():
        raise RegistryError(f"{path}: promoted adapter {ptr.get('version')} has no adapter_config.json; run "
                            "`persona-etl models rollback` or restore the files")
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    log.info("labelling model: %s with promoted adapter %s", base_version, ptr["version"])
    return merged, f"{base_version}+{ptr['version']}"


# ---------------------------------------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    candidate: dict
    current: dict

    def as_dict(self) -> dict:
        return {"passed": self.passed, "reason": self.reason, "candidate": self.candidate, "current": self.current}


def gate(settings: Settings, candidate: dict, current: dict) -> GateDecision:
    """Compare held-out metrics (``objective``, ``truthfulness``, ``fallback_rate``: means over the same clusters)
    of a candidate with those of the current labeller; see the module docstring."""
    t = settings.training
    reasons = []
    for key in ("objective", "truthfulness", "fallback_rate"):
        for name, m in (("candidate", candidate), ("current", current)):
            v = m.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                reasons.append(f"{name} has no held-out {key}")
    if not reasons:
        gain = candidate["objective"] - current["objective"]
        if gain < t.min_objective_gain:
            reasons.append(f"objective {candidate['objective']:.4f} vs {current['objective']:.4f}: gain {gain:+.4f} "
                           f"below the required {t.min_objective_gain:+.4f}")
        drop = current["truthfulness"] - candidate["truthfulness"]
        if drop > t.truthfulness_tolerance:
            reasons.append(f"truthfulness dropped {candidate['truthfulness']:.4f} vs {current['truthfulness']:.4f}")
        rise = candidate["fallback_rate"] - current["fallback_rate"]
        if rise > t.fallback_tolerance:
            reasons.append(f"fallback rate rose {candidate['fallback_rate']:.4f} vs {current['fallback_rate']:.4f}")
    if reasons:
        return GateDecision(False, "; ".join(reasons), candidate, current)
    return GateDecision(True, f"objective {candidate['objective']:.4f} vs {current['objective']:.4f}, truthfulness "
                              f"{candidate['truthfulness']:.4f} vs {current['truthfulness']:.4f}, fallback "
                              f"{candidate['fallback_rate']:.4f} vs {current['fallback_rate']:.4f}",
                        candidate, current)


# ---------------------------------------------------------------------------------------------------------------
# Registry rows
# ---------------------------------------------------------------------------------------------------------------

def _rows(con: Any, sql: str, params: dict | None = None) -> list[dict]:
    cur = con.execute(sql, params) if params else con.execute(sql)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def list_versions(con: Any) -> list[dict]:
    ensure_registry(con)
    return _rows(con, "SELECT * FROM training.model_registry ORDER BY created_at, version")


def get_version(con: Any, version: str) -> dict:
    rows = _rows(con, "SELECT * FROM training.model_registry WHERE version = $v", {"v": version})
    if not rows:
        raise RegistryError(f"unknown model version {version!r}: see `persona-etl models list`")
    return rows[0]


def promoted_version(con: Any) -> dict | None:
    ensure_registry(con)
    rows = _rows(con, "SELECT * FROM training.model_registry WHERE status = 'promoted'")
    return rows[0] if rows else None


def audit(con: Any, action: str, version: str | None, previous: str | None, actor: str, reason: str | None) -> None:
    con.execute("INSERT INTO training.model_audit VALUES ($at, $a, $v, $p, $who, $r)",
                {"at": _now(), "a": action, "v": version, "p": previous, "who": actor, "r": reason})


def register(settings: Settings, con: Any, *, version: str, arm: str, base_model: str, adapter_dir: Path,
             group_count: int, metrics: dict, labeller_version: str | None = None, build_id: str | None = None,
             window: tuple[Any, Any] | None = None, actor: str | None = None) -> dict:
    """Copy the adapter under ``models_dir/adapters/<version>`` (if elsewhere) and add a ``candidate`` row."""
    ensure_registry(con)
    existing = _rows(con, "SELECT * FROM training.model_registry WHERE version = $v", {"v": version})
    if existing:  # a retried task: registered already
        return existing[0]
    target = adapters_dir(settings) / version
    adapter_dir = Path(adapter_dir)
    if adapter_dir.resolve() != target.resolve():
        if target.exists():  # files of an interrupted earlier attempt
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(adapter_dir, target)
    row = {"version": version, "arm": arm, "base_model": base_model, "labeller_version": labeller_version,
           "build_id": build_id, "window_start": window[0] if window else None,
           "window_end": window[1] if window else None, "group_count": int(group_count),
           "metrics": json.dumps(metrics, default=str), "status": "candidate", "reason": None,
           "adapter_path": str(target), "created_at": _now(), "promoted_at": None, "promoted_by": None}
    con.execute("INSERT INTO training.model_registry BY NAME SELECT * FROM (SELECT "
                + ", ".join(f"${k} AS {k}" for k in row) + ")", row)
    audit(con, "register", version, (promoted_version(con) or {}).get("version"), actor or default_actor(), None)
    return row


def record_gate(con: Any, version: str, decision: GateDecision, actor: str | None = None) -> None:
    """Store the gate's verdict: metrics.gate, status ``rejected`` with the reason when it refused."""
    row = get_version(con, version)
    metrics = json.loads(row["metrics"]) if row["metrics"] else {}
    metrics["gate"] = decision.as_dict()
    con.execute("UPDATE training.model_registry SET metrics = $m, status = $s, reason = $r WHERE version = $v",
                {"m": json.dumps(metrics, default=str), "s": row["status"] if decision.passed else "rejected",
                 "r": None if decision.passed else decision.reason, "v": version})
    audit(con, "gate_pass" if decision.passed else "gate_refuse", version,
          (promoted_version(con) or {}).get("version"), actor or default_actor(), decision.reason)


def promote(settings: Settings, con: Any, version: str, actor: str | None = None, force: bool = False,
            reason: str | None = None) -> dict:
    """Make ``version`` the labeller of the daily runs. A version the gate refused (or never judged) is promoted
    only with ``force`` and a ``reason`` (recorded)."""
    from persona_tasks.warehouse import transaction

    row = get_version(con, version)
    actor = actor or default_actor()
    if row["status"] == "promoted":
        return row
    gate_info = (json.loads(row["metrics"]) if row["metrics"] else {}).get("gate")
    if not force and not (gate_info and gate_info.get("passed")):
        why = row["reason"] or "the promotion gate has not judged it"
        raise RegistryError(f"version {version} is not promotable ({why}); `persona-etl models promote {version} "
                            "--force --reason ...` overrides the gate, audited")
    if force and not reason:
        raise RegistryError("--force needs --reason (it is recorded in training.model_audit)")
    if not (Path(row["adapter_path"]) / "adapter_config.json").is_file():
        raise RegistryError(f"{row['adapter_path']}: adapter files of {version} are missing")
    current = promoted_version(con)
    now = _now()
    with transaction(con):
        if current is not None:
            con.execute("UPDATE training.model_registry SET status = 'retired', reason = $r WHERE version = $v",
                        {"r": f"replaced by {version}", "v": current["version"]})
        con.execute("UPDATE training.model_registry SET status = 'promoted', promoted_at = $t, promoted_by = $who, "
                    "reason = NULL WHERE version = $v", {"t": now, "who": actor, "v": version})
        audit(con, "promote", version, current["version"] if current else None, actor,
              reason or (gate_info or {}).get("reason"))
    row = get_version(con, version)
    write_pointer(settings, row)
    log.info("promoted %s (was %s) by %s", version, current["version"] if current else "the base model", actor)
    return row


def rollback(settings: Settings, con: Any, actor: str | None = None, reason: str | None = None) -> dict | None:
    """Retire the promoted version and promote the one promoted before it (per the audit trail), or return to the
    base model when there is none. Returns the newly promoted row (None = the base model)."""
    from persona_tasks.warehouse import transaction

    actor = actor or default_actor()
    current = promoted_version(con)
    if current is None:
        raise RegistryError("nothing to roll back: the daily labelling already uses the base model")
    history = _rows(con, "SELECT version, previous FROM training.model_audit WHERE action = 'promote' "
                         "AND version = $v ORDER BY acted_at DESC LIMIT 1", {"v": current["version"]})
    previous = history[0]["previous"] if history else None
    prev_row = None
    if previous is not None:
        prev_row = get_version(con, previous)
        if not (Path(prev_row["adapter_path"]) / "adapter_config.json").is_file():
            log.warning("rollback: files of %s are missing: returning to the base model", previous)
            prev_row = None
    with transaction(con):
        con.execute("UPDATE training.model_registry SET status = 'retired', reason = $r WHERE version = $v",
                    {"r": f"rolled back by {actor}" + (f": {reason}" if reason else ""), "v": current["version"]})
        if prev_row is not None:
            con.execute("UPDATE training.model_registry SET status = 'promoted', promoted_at = $t, promoted_by = $who "
                        "WHERE version = $v", {"t": _now(), "who": actor, "v": prev_row["version"]})
        audit(con, "rollback", prev_row["version"] if prev_row else None, current["version"], actor, reason)
    new = get_version(con, prev_row["version"]) if prev_row else None
    write_pointer(settings, new)
    return new
