"""`airflow backfill create` of two days of persona_daily, run by a real scheduler.

Airflow 3 runs backfills through the scheduler: the CLI only records the backfill and its DAG runs. This test
starts the services a LocalExecutor deployment needs, as subprocesses on loopback with AIRFLOW_HOME in a temporary
folder (SQLite metadata DB): `airflow api-server` (the tasks' Execution API, on a free port), `airflow
dag-processor` (parses dags/ into the metadata DB) and `airflow scheduler` (LocalExecutor). It then unpauses the
DAG, creates a backfill over two landing days written by `daily.sample_landing_day` (the bundled AOL sample), polls
the metadata DB until both backfill runs succeed, and checks that the warehouse holds personas of both days.
Every service runs in its own process group, stopped (SIGTERM, then SIGKILL) in a finally block.

`[scheduler] use_job_schedule = False`: the scheduler creates no scheduled runs of its own (with catchup off it
would otherwise start a run for yesterday, which has no landing files); backfill runs are unaffected.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from fixtures.services import Service, api_up, free_port, start_service, stop_services, wait_for
from persona_tasks.config import PROJECT_DIR
from persona_tasks.local_airflow import SQLITE_CONNECT_ARGS_ENV

pytestmark = pytest.mark.slow

AIRFLOW = Path(sys.executable).parent / "airflow"
DAGS = PROJECT_DIR / "dags"
DAY1, DAY2 = "2006-03-01", "2006-03-02"
TIMEOUT_S = 600  # both runs (about 2-4 min on 2 cores), plus service start-up


def airflow_env(root: Path, home: Path, landing: Path, warehouse: Path) -> dict[str, str]:
    api_port, log_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PERSONA_ETL_"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        **SQLITE_CONNECT_ARGS_ENV,  # scheduler and CLI share the SQLite file: wait for its lock
        # the Execution API the task processes talk to, and the shared JWT secret that signs their tokens
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(log_port),
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "PERSONA_ETL_CONFIG": str(root / "no-config.toml"),
        "PERSONA_ETL_WAREHOUSE": str(warehouse),
        "PERSONA_ETL_DBT__TARGET_PATH": str(root / "dbt_target"),
        "PERSONA_ETL_ORCHESTRATION__LANDING_DIR": str(landing),
        "PERSONA_ETL_ORCHESTRATION__N_SHARDS": "2",
        "PERSONA_ETL_ORCHESTRATION__RETRIES": "0",  # fail fast: a retry would only hide a broken run here
        "PYTHONUNBUFFERED": "1",
    })
    return env


def db_rows(home: Path, sql: str, params: tuple = ()) -> list[tuple]:
    try:
        con = sqlite3.connect(f"file:{home / 'airflow.db'}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:  # busy, or the table does not exist yet
        return []


def test_backfill_two_days_through_the_scheduler(tmp_path):
    from persona_tasks.config import DbtSettings, OrchestrationSettings, Settings
    from persona_tasks.daily import sample_landing_day

    home, landing, warehouse = tmp_path / "airflow", tmp_path / "landing", tmp_path / "wh" / "warehouse.duckdb"
    home.mkdir()
    settings = Settings(warehouse=warehouse, dbt=DbtSettings(target_path=tmp_path / "dbt_target"),
                        orchestration=OrchestrationSettings(landing_dir=str(landing)))
    for day in (DAY1, DAY2):
        assert sample_landing_day(settings, day).stat().st_size > 1000
    env = airflow_env(tmp_path, home, landing, warehouse)

    def cli(*args: str, timeout: int = 180, locked_retries: int = 0) -> str:
        for attempt in range(locked_retries + 1):
            proc = subprocess.run([str(AIRFLOW), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                                  timeout=timeout)
            # SQLite metadata DB: the scheduler writes all the time; on a loaded machine a write can wait past the
            # 60 s busy timeout (seen once in CI under 3x CPU load). The command's transaction rolled back: retry
            if proc.returncode == 0 or "database is locked" not in proc.stdout + proc.stderr:
                break
            time.sleep(5 * (attempt + 1))
        assert proc.returncode == 0, f"airflow {' '.join(args)} exited {proc.returncode}:\n" \
                                     + (proc.stdout + proc.stderr)[-3000:]
        return proc.stdout

    cli("db", "migrate", timeout=300)
    cli("pools", "set", "warehouse_writer", "1", "one DuckDB writer at a time")

    services: list[Service] = []
    t0 = time.monotonic()
    try:
        services.append(start_service("api-server", ["api-server"], env, tmp_path))
        services.append(start_service("dag-processor", ["dag-processor"], env, tmp_path))
        services.append(start_service("scheduler", ["scheduler"], env, tmp_path))
        wait_for("the api-server", lambda: api_up(env["AIRFLOW__API__PORT"]), 120, services)
        wait_for("the DAG to be parsed", lambda: db_rows(
            home, "SELECT 1 FROM serialized_dag WHERE dag_id = 'persona_daily'"), 180, services)
        started_s = time.monotonic() - t0
        cli("dags", "unpause", "persona_daily")
        # a backfill has its own max_active_runs (default 10), independent of the DAG's: the days must run one at a
        # time (cluster state is shared between the steps of a day), so the backfill is created with 1
        out = cli("backfill", "create", "--dag-id", "persona_daily", "--from-date", DAY1, "--to-date", DAY2,
                  "--max-active-runs", "1", locked_retries=2)
        t_backfill = time.monotonic()

        def runs_done():
            rows = db_rows(home, "SELECT substr(logical_date, 1, 10), state FROM dag_run WHERE dag_id = "
                                 "'persona_daily' AND run_type = 'backfill' ORDER BY logical_date")
            if any(state == "failed" for _, state in rows):
                ti = db_rows(home, "SELECT run_id, task_id, map_index, state FROM task_instance "
                                   "WHERE dag_id = 'persona_daily' AND state NOT IN ('success')")
                raise AssertionError(f"a backfill run failed: {rows}; task instances not successful: {ti}; "
                                     f"task logs under {home / 'logs'}")
            return rows if len(rows) == 2 and all(s == "success" for _, s in rows) else None

        rows = wait_for("both backfill runs to succeed", runs_done, TIMEOUT_S - (time.monotonic() - t0), services)
        backfill_s = time.monotonic() - t_backfill
        assert [d for d, _ in rows] == [DAY1, DAY2], rows
        # the CLI's own view of the runs
        listed = json.loads(cli("dags", "list-runs", "persona_daily", "-o", "json").strip().splitlines()[-1])
        assert sorted((r["logical_date"][:10], r["state"]) for r in listed) == [(DAY1, "success"),
                                                                                (DAY2, "success")], listed
        # every task instance of both runs succeeded, both cluster shards included
        tis = db_rows(home, "SELECT task_id, map_index, state FROM task_instance WHERE dag_id = 'persona_daily'")
        assert len(tis) == 2 * 13 and {s for _, _, s in tis} == {"success"}, tis
        # one day after the other: the second run's first task started after the first run's last task ended
        (end1,), (start2,) = (db_rows(home, "SELECT ti.end_date FROM task_instance ti JOIN dag_run r ON r.run_id = "
                                            "ti.run_id WHERE substr(r.logical_date, 1, 10) = ? AND ti.task_id = "
                                            "'serve'", (DAY1,)),
                              db_rows(home, "SELECT ti.start_date FROM task_instance ti JOIN dag_run r ON r.run_id = "
                                            "ti.run_id WHERE substr(r.logical_date, 1, 10) = ? AND ti.task_id = "
                                            "'ingest_landing'", (DAY2,)))
        assert start2[0] >= end1[0], (end1, start2)
        # the backfill itself is marked complete by the scheduler once its runs are done
        wait_for("the backfill to be marked complete", lambda: db_rows(
            home, "SELECT id FROM backfill WHERE dag_id = 'persona_daily' AND completed_at IS NOT NULL"),
            60, services)
    finally:
        stop_services(services)
    assert all(sv.proc.poll() is not None for sv in services)

    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        per_day = con.execute("SELECT run_date::VARCHAR, count(*), count(DISTINCT user_id) FROM personas.personas "
                              "GROUP BY 1 ORDER BY 1").fetchall()
        batches = con.execute("SELECT count(*) FROM raw.ingest_batches").fetchall()[0][0]
    finally:
        con.close()
    assert [d for d, _, _ in per_day] == [DAY1, DAY2], per_day
    assert all(n > 100 and users > 100 for _, n, users in per_day), per_day
    assert batches == 2
    print(f"services up in {started_s:.0f}s; backfill of 2 days: {backfill_s:.0f}s; personas per day: {per_day}; "
          f"backfill create said: {out.strip()[-200:]}")
