"""persona_daily under the CeleryExecutor for real: Redis, PostgreSQL and two Celery workers on loopback.

The distributed path of docker/compose.yaml, without Docker: every service is a real process started by this test
(tests/fixtures/services.py), each in its own process group, all stopped in a finally block:

- ``redis-server`` (the Celery broker) on a free 127.0.0.1 port, no persistence;
- PostgreSQL (``initdb`` + ``postgres``): the Airflow metadata DB and the Celery result backend
  (``db+postgresql://``, with ``result_extended`` so Celery records which worker ran each task);
- ``airflow api-server`` (the tasks' Execution API), ``airflow scheduler`` (``CeleryExecutor``),
  ``airflow dag-processor``;
- two ``airflow celery worker`` processes, concurrency 1 each: ``--queues default --celery-hostname
  worker-default@%h`` and ``--queues gpu --celery-hostname worker-gpu@%h``.
  ``PERSONA_ETL_ORCHESTRATION__LABEL_QUEUE=gpu`` routes the ``label`` task to the ``gpu`` queue (as in
  docker/compose.yaml).

Both workers share one machine, so each reports its Celery node name as its host (``[core] hostname_callable``,
``fixtures.services.worker_hostname``): ``task_instance.hostname`` then names the worker that ran the task.

A one-day backfill of a day of the bundled AOL sample (``daily.sample_landing_day``) runs through the scheduler.
Checks, in PostgreSQL itself: the run and its 13 task instances succeeded; ``label`` was queued on ``gpu`` and ran on
``worker-gpu@<host>`` (task_instance.hostname, and Celery's own record in ``celery_taskmeta.worker`` joined on the
Celery task id Airflow stores in ``task_instance.external_executor_id``); every other task on ``default`` /
``worker-default@<host>``. Then the same day runs with ``airflow dags test`` (no executor services, SQLite, a
separate warehouse) and the published tables of both warehouses have equal checksums (audit timestamp columns
excluded, as in tests/test_dag.py).

Skips, with the reason, where ``redis-server`` or PostgreSQL's ``initdb`` is missing (scripts/install.sh installs
both where it runs as root with apt-get).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fixtures.services import (
    api_up,
    AIRFLOW,
    WORKER_NAME_ENV,
    Service,
    free_port,
    pg_bindir,
    postgres_server,
    redis_binary,
    redis_server,
    start_service,
    stop_services,
    wait_for,
)
from persona_tasks.config import PROJECT_DIR
from test_dag import CHECKED_TABLES, PUBLISHED, checksums

pytestmark = pytest.mark.slow

DAGS = PROJECT_DIR / "dags"
TESTS = Path(__file__).resolve().parent
DAY = "2006-03-01"
N_SHARDS = 2
RUN_TIMEOUT_S = 480  # the run under Celery (about 2 min on 2 cores), after the services are up
N_TASK_INSTANCES = 11 + N_SHARDS  # 12 tasks, cluster mapped over the shards


def _base_env(root: Path, landing: Path, warehouse: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PERSONA_ETL_"))}
    env.update({
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PERSONA_ETL_CONFIG": str(root / "no-config.toml"),
        "PERSONA_ETL_WAREHOUSE": str(warehouse),
        "PERSONA_ETL_DBT__TARGET_PATH": str(warehouse.parent / "dbt_target"),
        "PERSONA_ETL_ORCHESTRATION__LANDING_DIR": str(landing),
        "PERSONA_ETL_ORCHESTRATION__N_SHARDS": str(N_SHARDS),
        "PERSONA_ETL_ORCHESTRATION__LABEL_QUEUE": "gpu",
        "PERSONA_ETL_ORCHESTRATION__RETRIES": "0",  # fail fast: a retry would only hide a broken run here
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _cli(env: dict[str, str], cwd: Path, *args: str, timeout: int = 300, name: str | None = None) -> str:
    t0 = time.perf_counter()
    proc = subprocess.run([str(AIRFLOW), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    log = cwd / f"{name or '_'.join(args[:2])}.log"
    log.write_text(f"{time.perf_counter() - t0:.1f}s\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    assert proc.returncode == 0, f"airflow {' '.join(args)} exited {proc.returncode}; output in {log}:\n" \
                                 + (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def test_celery_run_with_a_gpu_worker_equals_a_local_run(tmp_path):
    if redis_binary() is None:
        pytest.skip("no redis-server binary (the Celery broker): apt-get install redis-server "
                    "(scripts/install.sh does it when run as root)")
    if pg_bindir() is None:
        pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb): apt-get install postgresql "
                    "(scripts/install.sh does it when run as root)")
    pytest.importorskip("airflow.providers.celery", reason="apache-airflow-providers-celery is pinned in the lock")
    from persona_tasks.config import DbtSettings, OrchestrationSettings, Settings
    from persona_tasks.daily import sample_landing_day

    landing = tmp_path / "landing"
    celery_root, local_root = tmp_path / "celery", tmp_path / "local"
    for d in (celery_root / "airflow", celery_root / "wh", local_root / "airflow", local_root / "wh"):
        d.mkdir(parents=True)
    celery_wh, local_wh = celery_root / "wh" / "warehouse.duckdb", local_root / "wh" / "warehouse.duckdb"
    assert sample_landing_day(Settings(warehouse=tmp_path / "scratch.duckdb",
                                       dbt=DbtSettings(target_path=tmp_path / "t"),
                                       orchestration=OrchestrationSettings(landing_dir=str(landing))),
                              DAY).stat().st_size > 1000
    host = socket.gethostname()
    timings: dict[str, float] = {}

    with redis_server(tmp_path) as (redis_host, redis_port), postgres_server(tmp_path) as pg:
        api_port = free_port()
        env = _base_env(celery_root, landing, celery_wh)
        env.update({
            "AIRFLOW_HOME": str(celery_root / "airflow"),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.url("psycopg2"),
            "AIRFLOW__CELERY__BROKER_URL": f"redis://{redis_host}:{redis_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + pg.url("psycopg2").replace("+psycopg2", "", 1),
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            # Celery stores the worker (node name) and queue of every task result: the proof of where it ran
            "AIRFLOW__CELERY__EXTRA_CELERY_CONFIG": '{"result_extended": true}',
            # the Execution API the task processes talk to, and the shared JWT secret that signs their tokens
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # no scheduled run of its own (see test_dag_backfill)
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        })
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://")
        cwd = celery_root
        t0 = time.perf_counter()
        _cli(env, cwd, "db", "migrate", timeout=420)
        _cli(env, cwd, "pools", "set", "warehouse_writer", "1", "one DuckDB writer at a time")
        assert _cli(env, cwd, "config", "get-value", "core", "executor").strip() == "CeleryExecutor"
        timings["migrate"] = time.perf_counter() - t0

        def worker_env(name: str) -> dict[str, str]:
            return {**env, WORKER_NAME_ENV: name,
                    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "fixtures.services.worker_hostname",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p),
                    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())}  # one log server each

        services: list[Service] = []
        try:
            t0 = time.perf_counter()
            services.append(start_service("api-server", ["api-server"], env, cwd))
            services.append(start_service("dag-processor", ["dag-processor"], env, cwd))
            services.append(start_service("scheduler", ["scheduler"], env, cwd))
            for name, queue in (("worker-default", "default"), ("worker-gpu", "gpu")):
                services.append(start_service(name, ["celery", "worker", "--queues", queue, "--concurrency", "1",
                                                     "--celery-hostname", f"{name}@%h"], worker_env(name), cwd))
            wait_for("the api-server", lambda: api_up(api_port), 180, services)

            def pg_rows(sql: str, params: tuple = ()) -> list[tuple]:
                try:
                    with pg.connect() as c:
                        return c.execute(sql, params).fetchall()
                except Exception as exc:  # noqa: BLE001 - a table that does not exist yet: poll again
                    if "does not exist" in str(exc):
                        return []
                    raise

            wait_for("the DAG to be parsed", lambda: pg_rows(
                "SELECT 1 FROM serialized_dag WHERE dag_id = 'persona_daily'"), 240, services)
            # both workers registered with the broker (Celery's own ping over Redis)
            wait_for("both Celery workers to answer a ping", lambda: _workers_up(env, cwd, host), 180, services,
                     every=3)
            timings["services_up"] = time.perf_counter() - t0

            _cli(env, cwd, "dags", "unpause", "persona_daily")
            _cli(env, cwd, "backfill", "create", "--dag-id", "persona_daily", "--from-date", DAY, "--to-date", DAY,
                 "--max-active-runs", "1")
            t_run = time.perf_counter()

            def run_done():
                rows = pg_rows("SELECT (logical_date AT TIME ZONE 'UTC')::date::text, state FROM dag_run "
                               "WHERE dag_id = 'persona_daily'")
                if any(state == "failed" for _, state in rows):
                    bad = pg_rows("SELECT task_id, map_index, state, queue, hostname FROM task_instance "
                                  "WHERE dag_id = 'persona_daily' AND state IS DISTINCT FROM 'success'")
                    raise AssertionError(f"the Celery run failed: {rows}; task instances not successful: {bad}; "
                                         f"logs under {cwd}")
                return rows if rows and all(s == "success" for _, s in rows) else None

            runs = wait_for("the Celery run to succeed", run_done, RUN_TIMEOUT_S, services, every=3)
            timings["celery_run"] = time.perf_counter() - t_run
            assert runs == [(DAY, "success")], runs

            def celery_recorded():
                # the run is marked a success when the last task instance reports; the worker writes Celery's own
                # SUCCESS to the result backend a moment later: wait for it rather than race it
                rows = pg_rows("SELECT ti.task_id, ti.map_index, ti.state, ti.queue, ti.hostname, m.worker, m.queue, "
                               "m.status FROM task_instance ti LEFT JOIN celery_taskmeta m "
                               "ON m.task_id = ti.external_executor_id WHERE ti.dag_id = 'persona_daily'")
                return rows if rows and all(r[-1] not in (None, "PENDING", "STARTED") for r in rows) else None

            tis = wait_for("Celery's result backend to record every task", celery_recorded, 120, services, every=2)
        finally:
            stop_services(services)
        assert all(s.proc.poll() is not None for s in services)

    assert len(tis) == N_TASK_INSTANCES, tis
    by_task = {(t if m < 0 else f"{t}[{m}]"): row for t, m, *row in tis}
    gpu, default = f"worker-gpu@{host}", f"worker-default@{host}"
    for task, (state, queue, hostname, celery_worker, celery_queue, celery_status) in by_task.items():
        want_queue, want_worker = ("gpu", gpu) if task == "label" else ("default", default)
        assert state == "success", (task, by_task[task])
        assert queue == want_queue, (task, by_task[task])
        assert hostname == want_worker, (task, by_task[task])
        # Celery's own record of the task (result backend in PostgreSQL): which worker node and queue ran it
        assert (celery_worker, celery_queue, celery_status) == (want_worker, want_queue, "SUCCESS"), \
            (task, by_task[task])

    # the same day through `airflow dags test` (no executor services, SQLite), into a separate warehouse
    local_env = _base_env(local_root, landing, local_wh)
    local_env.update({"AIRFLOW_HOME": str(local_root / "airflow"),
                      "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{local_root / 'airflow' / 'airflow.db'}"})
    t0 = time.perf_counter()
    _cli(local_env, local_root, "db", "migrate", timeout=300)
    _cli(local_env, local_root, "pools", "set", "warehouse_writer", "1", "one DuckDB writer at a time")
    _cli(local_env, local_root, "dags", "test", "persona_daily", DAY, timeout=900)
    timings["dags_test"] = time.perf_counter() - t0

    celery_sums, local_sums = checksums(celery_wh, CHECKED_TABLES), checksums(local_wh, CHECKED_TABLES)
    assert {t: celery_sums[t] for t in PUBLISHED} == {t: local_sums[t] for t in PUBLISHED}
    assert celery_sums == local_sums, {t: (celery_sums[t], local_sums[t]) for t in CHECKED_TABLES
                                       if celery_sums[t] != local_sums[t]}
    n_personas = celery_sums["personas.personas"][0]
    assert n_personas > 100, celery_sums
    print(f"celery run of {DAY}: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
          + f"; {len(CHECKED_TABLES)} tables equal to the dags test run ({n_personas} personas); label on {gpu}")


def _workers_up(env: dict[str, str], cwd: Path, host: str) -> bool:
    """Both worker nodes answer Celery's ``inspect ping`` through the broker."""
    code = ("import json\n"
            "from airflow.providers.celery.executors.celery_executor_utils import app\n"
            "print(json.dumps(sorted((app.control.inspect(timeout=3).ping() or {}).keys())))\n")
    proc = subprocess.run([str(AIRFLOW.parent / "python"), "-c", code], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        return False
    nodes = json.loads(proc.stdout.strip().splitlines()[-1])
    return {f"worker-default@{host}", f"worker-gpu@{host}"} <= set(nodes)
