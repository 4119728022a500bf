"""The CeleryExecutor deployment of docker/compose.yaml: the pinned Celery stack loads, and the queues agree.

Docker cannot run here (tests/test_dag_celery_run.py runs the Celery path for real with Redis and PostgreSQL on
loopback). What this file checks is the compose file's own configuration: the Celery provider, celery and the redis client pinned in requirements/lock.txt import and configure with the compose
file's settings (executor class, broker transport, result backend, `airflow celery worker` options), and every
queue a persona_daily task is routed to (parsed with the compose file's PERSONA_ETL_* environment) is served by a
worker of the compose file, with the label task on the GPU worker's queue.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from persona_tasks.config import PROJECT_DIR

pytest.importorskip("airflow.providers.celery", reason="apache-airflow-providers-celery is pinned in the lock")

COMPOSE = PROJECT_DIR / "docker" / "compose.yaml"
DAGS = PROJECT_DIR / "dags"


def _compose():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    env = {k: str(v) for k, v in services["airflow-scheduler"]["environment"].items()}
    workers = {}
    for name, svc in services.items():
        cmd = svc.get("command") or []
        if cmd[:3] == ["airflow", "celery", "worker"]:
            workers[name] = {"queues": set(cmd[cmd.index("--queues") + 1].split(",")),
                             "env": {k: str(v) for k, v in svc["environment"].items()}, "cmd": cmd}
    return services, env, workers


def test_celery_stack_loads_with_the_compose_settings(tmp_path):
    _, env, workers = _compose()
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    code = (
        "import json\n"
        "from airflow.configuration import conf\n"
        "from airflow.executors.executor_loader import ExecutorLoader\n"
        "cls, _ = ExecutorLoader.import_default_executor_cls()\n"
        "from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG as c\n"
        "from kombu import Connection\n"
        "import celery, redis\n"
        "from airflow.cli.cli_parser import get_parser\n"
        "p = get_parser()\n"
        "w = p.parse_args(['celery', 'worker', '--queues', 'default,gpu', '--concurrency', '4'])\n"
        "print(json.dumps({'executor': cls.__module__ + '.' + cls.__name__,\n"
        "  'transport': Connection(c['broker_url']).transport_cls, 'backend': c['result_backend'],\n"
        "  'default_queue': conf.get('operators', 'default_queue'), 'celery_default_queue': c['task_default_queue'],\n"
        "  'worker_args': [w.queues, w.concurrency], 'celery': celery.__version__, 'redis': redis.__version__}))\n"
    )
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PERSONA_ETL_"))}
    run_env.update({k: v for k, v in env.items() if k.startswith("AIRFLOW__") and "${" not in v})
    run_env.update(AIRFLOW_HOME=str(tmp_path), AIRFLOW__API_AUTH__JWT_SECRET="x" * 64,
                   AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path / 'a.db'}")  # nothing connects
    proc = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["executor"] == "airflow.providers.celery.executors.celery_executor.CeleryExecutor"
    assert got["transport"] == "redis"  # kombu's redis transport, i.e. the redis client is installed
    assert got["backend"] == env["AIRFLOW__CELERY__RESULT_BACKEND"]
    assert got["worker_args"] == ["default,gpu", 4]
    # the CPU worker serves the queue tasks without an explicit queue go to
    assert got["default_queue"] == got["celery_default_queue"] == "default"
    assert got["default_queue"] in workers["airflow-worker"]["queues"]


def test_every_task_queue_has_a_compose_worker(tmp_path):
    _, env, workers = _compose()
    code = ("import json\nfrom airflow.dag_processing.dagbag import DagBag\n"
            f"d = DagBag({str(DAGS)!r}).dags['persona_daily']\n"
            "print(json.dumps({t.task_id: t.queue for t in d.tasks}))\n")
    for worker in workers.values():
        # parse the DAG as that worker does (its environment: the GPU worker overrides devices only)
        pe = {k: v for k, v in worker["env"].items() if k.startswith("PERSONA_ETL_") and "${" not in v}
        run_env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PERSONA_ETL_"))}
        run_env.update(pe, AIRFLOW_HOME=str(tmp_path), PERSONA_ETL_CONFIG=str(tmp_path / "none.toml"))
        proc = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        queues = json.loads(proc.stdout.strip().splitlines()[-1])
        served = set().union(*(w["queues"] for w in workers.values()))
        assert set(queues.values()) <= served, (queues, served)
        assert queues["label"] == env["PERSONA_ETL_ORCHESTRATION__LABEL_QUEUE"] == "gpu"
        assert queues["label"] in workers["airflow-worker-gpu"]["queues"]
        assert {q for t, q in queues.items() if t != "label"} == {"default"}
    assert Path(COMPOSE).is_file()
