"""The retraining stage as steps (``persona-etl train`` runs them in a row; ``dags/persona_retrain.py`` runs each as
a task): snapshot -> build groups (and measure the current labeller on the held-out clusters) -> train -> evaluate
the candidate on the same held-out clusters -> register, gate, promote or keep.

Training never blocks or slows the daily DAG's warehouse writes: ``snapshot`` copies the warehouse file once (in
the warehouse pool, seconds) and every model step reads that copy read-only; only ``register`` writes (groups,
registry rows, audit), briefly. The steps pass files in ``<work_dir>/retrain/<as_of>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from persona_tasks.config import Settings
from persona_tasks.errors import PersonaEtlError

log = logging.getLogger(__name__)


def retrain_dir(settings: Settings, as_of: date | str) -> Path:
    from persona_tasks.days import work_dir

    return work_dir(settings) / "retrain" / str(as_of)


def _latest_run_date(settings: Settings, not_after: date | None = None) -> date:
    from persona_tasks.warehouse import connect_read_only

    con = connect_read_only(settings)
    try:
        row = con.execute("SELECT max(run_date) FROM personas.induction_runs WHERE run_date <= $d "
                          "AND published_at IS NOT NULL",
                          {"d": not_after or date(9999, 12, 31)}).fetchall()
    except Exception as e:  # noqa: BLE001 - no persona tables yet
        raise PersonaEtlError("no published personas: run the daily DAG (or `persona-etl induce`) first") from e
    finally:
        con.close()
    if not row or row[0][0] is None:
        raise PersonaEtlError("no published personas: run the daily DAG (or `persona-etl induce`) first")
    return row[0][0]


# ---------------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------------

def snapshot(settings: Settings, as_of: date | str | None = None, not_after: date | str | None = None) -> dict:
    """Copy the warehouse to ``<retrain dir>/snapshot.duckdb`` (the model steps read only that copy). ``as_of``:
    the last run date of the training window (default: the latest published run date, not after ``not_after``)."""
    import duckdb

    limit = date.fromisoformat(str(not_after)) if not_after else None
    as_of = date.fromisoformat(str(as_of)) if as_of else _latest_run_date(settings, limit)
    d = retrain_dir(settings, as_of)
    d.mkdir(parents=True, exist_ok=True)
    target = d / "snapshot.duckdb"
    t0 = time.perf_counter()
    con = duckdb.connect(str(settings.warehouse))  # flush the write-ahead log into the file first
    try:
        con.execute("CHECKPOINT")
    finally:
        con.close()
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(settings.warehouse, tmp)
    tmp.replace(target)
    log.info("retrain snapshot of %s: %.1f MB in %.1fs", settings.warehouse, target.stat().st_size / 2**20,
             time.perf_counter() - t0)
    return {"as_of": as_of.isoformat(), "snapshot": str(target)}


def _clusters(settings: Settings, as_of: date, embedder: Any) -> Any:
    from persona_tasks.train.groups import load_training_clusters
    from persona_tasks.warehouse import connect_read_only

    con = connect_read_only(settings, retrain_dir(settings, as_of) / "snapshot.duckdb")
    try:
        return load_training_clusters(settings, con, as_of, embedder)
    finally:
        con.close()


def _threads(settings: Settings) -> None:
    from persona_tasks.progress import set_threads

    set_threads(settings.training.threads or settings.threads)


def evaluate_labeller(settings: Settings, data: Any, indices: list[int], llm: Any, embedder: Any) -> dict:
    """Label the clusters ``indices`` of ``data`` with ``llm`` (retries, extractive fallback: as in production) and
    score them: means of the quality scores, fallback rate, and the per-cluster objectives (for paired tests)."""
    from persona_tasks.train.groups import score_personas

    t0 = time.perf_counter()
    labels = llm.label([data.masked[i] for i in indices])
    scores = score_personas(settings, embedder, data, [(i, p.label, p.description) for i, p in zip(indices, labels)])
    n = len(labels)

    def mean(k: str) -> float | None:
        v = scores[k]
        return float(np.nanmean(v)) if n and np.isfinite(v).any() else None

    return {"clusters": n, "model_version": llm.model_version,
            "fallback_rate": (sum(bool(p.fallback) for p in labels) / n) if n else None,
            **{k: mean(k) for k in ("objective", "truthfulness", "alignment", "cohesion")},
            "per_cluster_objective": [None if not np.isfinite(v) else round(float(v), 6) for v in scores["objective"]],
            "keys": [[data.clusters[i].user_id, int(data.clusters[i].cluster_id)] for i in indices],
            "seconds": round(time.perf_counter() - t0, 2)}


def paired_difference(a: list[float | None], b: list[float | None], samples: int = 1000, seed: int = 0) -> dict:
    """Mean of a - b over the clusters where both are known, with a 95 % bootstrap interval."""
    pairs = np.array([(x, y) for x, y in zip(a, b) if x is not None and y is not None], dtype=np.float64)
    if pairs.size == 0:
        return {"n": 0, "mean": None, "ci": [None, None]}
    d = pairs[:, 0] - pairs[:, 1]
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, d.size, size=(samples, d.size))].mean(axis=1) if samples else np.array([d.mean()])
    return {"n": int(d.size), "mean": float(d.mean()),
            "ci": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]}


def candidate_labeller(settings: Settings, model: Any, tokenizer: Any, version: str) -> Any:
    """The LLMLabeller that samples preference candidates: the training temperature, and as many prompts per
    generate call as keep the K sequences each at ``labelling.batch_size`` (also what checks candidates sampled
    elsewhere: ``labelling.replay.ReplayCandidates``)."""
    from persona_tasks.labelling.llm import LLMLabeller

    k = settings.training.num_candidates
    lab = settings.labelling.model_copy(update={"temperature": settings.training.temperature,
                                                "batch_size": max(1, settings.labelling.batch_size // k)})
    return LLMLabeller(settings.model_copy(update={"labelling": lab}), model=model, tokenizer=tokenizer,
                       model_version=version)


def build_groups_step(settings: Settings, as_of: date | str) -> dict:
    """Preference groups from the snapshot with the current labeller (files ``groups/``), and the current
    labeller's held-out metrics (``current.json``)."""
    from persona_tasks.embed import embedder_from_settings
    from persona_tasks.labelling.llm import LLMLabeller
    from persona_tasks.labelling.model import load_causal_lm
    from persona_tasks.train.groups import build_groups, save_build

    as_of = date.fromisoformat(str(as_of))
    _threads(settings)
    d = retrain_dir(settings, as_of)
    embedder = embedder_from_settings(settings)
    data = _clusters(settings, as_of, embedder)
    model, tok, version = load_causal_lm(settings)  # the current labeller: promoted adapter merged, if any
    build = build_groups(settings, data, candidate_labeller(settings, model, tok, version), embedder)
    save_build(build, d / "groups")
    current = _measure_current(settings, d, data, LLMLabeller(settings, model=model, tokenizer=tok,
                                                              model_version=version), embedder)
    return {"as_of": as_of.isoformat(), "build_id": build.build_id, **build.stats,
            "current_objective": current["objective"]}


def _measure_current(settings: Settings, d: Path, data: Any, labeller: Any, embedder: Any, skip: int = 0) -> dict:
    held = data.subset("heldout", skip + settings.training.heldout_max_clusters)[skip:]
    current = evaluate_labeller(settings, data, held, labeller, embedder)
    (d / "current.json").write_text(json.dumps(current, indent=1))
    return current


def measure_current_step(settings: Settings, as_of: date | str, skip: int = 0) -> dict:
    """The current labeller's held-out metrics again (``current.json``), on ``[training] heldout_max_clusters``
    clusters after the first ``skip`` of the held-out order, without rebuilding the groups: a larger sample for a
    tighter interval, or a fresh one that no choice of settings has seen."""
    from persona_tasks.embed import embedder_from_settings
    from persona_tasks.labelling.llm import LLMLabeller
    from persona_tasks.labelling.model import load_causal_lm

    as_of = date.fromisoformat(str(as_of))
    _threads(settings)
    embedder = embedder_from_settings(settings)
    data = _clusters(settings, as_of, embedder)
    model, tok, version = load_causal_lm(settings)
    current = _measure_current(settings, retrain_dir(settings, as_of), data,
                               LLMLabeller(settings, model=model, tokenizer=tok, model_version=version), embedder,
                               skip)
    return {**_summary(current), "skipped": skip}


def new_version(arm: str) -> str:
    now = datetime.now(timezone.utc)
    return f"dpo-{arm}-{now:%Y%m%dT%H%M%S}-{hashlib.md5(str(time.time_ns()).encode()).hexdigest()[:6]}"


def train_step(settings: Settings, as_of: date | str, arm: str | None = None) -> dict:
    """Train the configured arm on the build's groups; the adapter goes to ``<retrain dir>/<version>/adapter``."""
    from persona_tasks.train.groups import read_build
    from persona_tasks.train.trainer import train_arm

    as_of = date.fromisoformat(str(as_of))
    arm = arm or settings.training.arm
    d = retrain_dir(settings, as_of)
    build = read_build(d / "groups")
    groups = build.training_groups()
    if not groups:
        raise PersonaEtlError(f"build {build.build_id}: no usable preference groups ({build.stats.get('dropped')}); "
                              "more clusters ([training] max_clusters) or a higher temperature may help")
    version = new_version(arm)
    result = train_arm(settings, arm, groups, d / version)
    (d / "trained.json").write_text(json.dumps({"version": version, **result.as_dict()}, indent=1, default=str))
    return {"version": version, "arm": arm, "steps": result.steps, "seconds": result.seconds,
            "groups": len(groups)}


def evaluate_step(settings: Settings, as_of: date | str) -> dict:
    """The trained candidate (base model + its adapter) on the held-out clusters the current labeller was measured
    on (``candidate.json``)."""
    from peft import PeftModel

    from persona_tasks.embed import embedder_from_settings
    from persona_tasks.labelling.llm import LLMLabeller
    from persona_tasks.labelling.model import load_causal_lm

    as_of = date.fromisoformat(str(as_of))
    _threads(settings)
    d = retrain_dir(settings, as_of)
    trained = json.loads((d / "trained.json").read_text())
    embedder = embedder_from_settings(settings)
    data = _clusters(settings, as_of, embedder)
    current = json.loads((d / "current.json").read_text())
    keys = {(u, c): i for i, cl in enumerate(data.clusters) for u, c in [(cl.user_id, int(cl.cluster_id))]}
    held = [keys[(u, c)] for u, c in current["keys"] if (u, c) in keys]
    base, tok, base_version = load_causal_lm(settings, adapter=False)
    model = PeftModel.from_pretrained(base, trained["adapter_dir"]).merge_and_unload().eval()
    cand = evaluate_labeller(settings, data, held, LLMLabeller(settings, model=model, tokenizer=tok,
                                                               model_version=f"{base_version}+{trained['version']}"),
                             embedder)
    cand["base_model"] = base_version
    (d / "candidate.json").write_text(json.dumps(cand, indent=1))
    return {"version": trained["version"], "objective": cand["objective"], "fallback_rate": cand["fallback_rate"]}


def register_step(settings: Settings, as_of: date | str, auto_promote: bool = True, actor: str | None = None,
                  con: Any = None) -> dict:
    """Store the groups, register the candidate with its metrics, run the gate, and promote it when it passes
    (``auto_promote``); otherwise the current version stays and the reason is recorded."""
    from persona_tasks.train import registry as R
    from persona_tasks.train.groups import read_build, write_groups
    from persona_tasks.warehouse import connect

    as_of = date.fromisoformat(str(as_of))
    d = retrain_dir(settings, as_of)
    build = read_build(d / "groups")
    trained = json.loads((d / "trained.json").read_text())
    current = json.loads((d / "current.json").read_text())
    cand = json.loads((d / "candidate.json").read_text())
    actor = actor or R.default_actor()
    own = con is None
    con = con or connect(settings)
    try:
        write_groups(con, build)
        history = trained.get("log_history") or []
        train_logs = [h for h in history if "loss" in h]
        metrics = {
            "groups": build.stats,
            "train": {k: trained.get(k) for k in ("n_examples", "steps", "seconds", "peak_rss_mb", "peak_cuda_mb",
                                                  "device")},
            "train_log": train_logs,
            "final_train": {k: v for k, v in (train_logs[-1] if train_logs else {}).items()
                            if k.startswith(("loss", "rewards/"))},
            "heldout": {"current": _summary(current), "candidate": _summary(cand),
                        "objective_difference": paired_difference(cand["per_cluster_objective"],
                                                                  current["per_cluster_objective"])},
        }
        row = R.register(settings, con, version=trained["version"], arm=trained["arm"], base_model=cand["base_model"],
                         adapter_dir=Path(trained["adapter_dir"]), group_count=trained["n_groups"], metrics=metrics,
                         labeller_version=build.labeller_version, build_id=build.build_id, window=build.window,
                         actor=actor)
        decision = R.gate(settings, _summary(cand), _summary(current))
        R.record_gate(con, row["version"], decision, actor)
        promoted = False
        if decision.passed and auto_promote:
            R.promote(settings, con, row["version"], actor=actor)
            promoted = True
        log.info("retrain %s: %s %s (%s)", as_of, row["version"], "promoted" if promoted else
                 ("passed the gate, not promoted" if decision.passed else "refused by the gate"), decision.reason)
        return {"version": row["version"], "passed": decision.passed, "promoted": promoted,
                "reason": decision.reason, "build_id": build.build_id}
    finally:
        if own:
            con.close()


def _summary(m: dict) -> dict:
    return {k: m.get(k) for k in ("clusters", "model_version", "fallback_rate", "objective", "truthfulness",
                                  "alignment", "cohesion", "seconds")}


@dataclass
class RetrainReport:
    as_of: str
    groups: dict
    trained: dict
    evaluated: dict
    registered: dict

    def summary(self) -> str:
        r = self.registered
        verdict = "promoted" if r["promoted"] else ("passed the gate" if r["passed"] else "kept the current labeller")
        return (f"retrain {self.as_of}: {self.groups.get('used')} groups ({self.groups.get('build_id')}), "
                f"{self.trained['arm']} {self.trained['steps']} steps in {self.trained['seconds']:.1f}s -> "
                f"{r['version']}: {verdict} ({r['reason']})")


def run_training(settings: Settings, as_of: date | str | None = None, arm: str | None = None,
                 auto_promote: bool = True, actor: str | None = None) -> RetrainReport:
    """Every step in a row (``persona-etl train``)."""
    snap = snapshot(settings, as_of)
    day = snap["as_of"]
    groups = build_groups_step(settings, day)
    trained = train_step(settings, day, arm)
    evaluated = evaluate_step(settings, day)
    registered = register_step(settings, day, auto_promote=auto_promote, actor=actor)
    return RetrainReport(day, groups, trained, evaluated, registered)
