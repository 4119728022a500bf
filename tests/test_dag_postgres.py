"""persona_daily with a PostgreSQL metadata DB started by the test on loopback.

Debian's ``postgresql`` package (``/usr/lib/postgresql/<v>/bin``): ``initdb`` into a temporary folder, ``postgres``
on a free 127.0.0.1 port with its unix socket in that folder (password auth over TCP, trust on the socket), a
role and a DB ``airflow``; then Airflow through configuration only
(``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql+psycopg2://airflow:...@127.0.0.1:<port>/airflow``):
``airflow db migrate``, ``airflow pools set``, ``airflow dags test persona_daily <day>`` on a day of the bundled AOL
sample. Checks the run's state in PostgreSQL itself and the personas in the warehouse; postgres is stopped in a
finally block (the server's start and stop live in tests/fixtures/services.py, shared with
tests/test_dag_celery_run.py). PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` system
user.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from fixtures.services import pg_bindir, postgres_server
from persona_tasks.config import PROJECT_DIR

pytestmark = pytest.mark.slow

AIRFLOW = Path(sys.executable).parent / "airflow"
DAGS = PROJECT_DIR / "dags"
DAY = "2006-03-01"


@pytest.fixture
def postgres(tmp_path):
    """A PostgreSQL server on loopback (tests/fixtures/services.py): yields (host, port, db, user, password)."""
    if pg_bindir() is None:
        pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb): apt-get install postgresql")
    with postgres_server(tmp_path) as pg:
        yield pg.host, pg.port, pg.db, pg.user, pg.password


def test_dags_test_with_a_postgres_metadata_db(tmp_path, postgres):
    import psycopg

    from persona_tasks.config import DbtSettings, OrchestrationSettings, Settings
    from persona_tasks.daily import sample_landing_day

    host, port, db, user, password = postgres
    home, landing, warehouse = tmp_path / "airflow", tmp_path / "landing", tmp_path / "wh" / "warehouse.duckdb"
    home.mkdir()
    sample_landing_day(Settings(warehouse=warehouse, dbt=DbtSettings(target_path=tmp_path / "t"),
                                orchestration=OrchestrationSettings(landing_dir=str(landing))), DAY)
    conn = f"postgresql+psycopg2://{user}:{password}@{host}:{port}/{db}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PERSONA_ETL_"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": conn,
        "PERSONA_ETL_CONFIG": str(tmp_path / "no-config.toml"),
        "PERSONA_ETL_WAREHOUSE": str(warehouse),
        "PERSONA_ETL_DBT__TARGET_PATH": str(tmp_path / "dbt_target"),
        "PERSONA_ETL_ORCHESTRATION__LANDING_DIR": str(landing),
        "PERSONA_ETL_ORCHESTRATION__N_SHARDS": "2",
        "PYTHONUNBUFFERED": "1",
    })
    timings = {}

    def cli(*args: str, timeout: int = 600) -> str:
        t0 = time.perf_counter()
        proc = subprocess.run([str(AIRFLOW), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=timeout)
        timings[" ".join(args[:2])] = round(time.perf_counter() - t0, 1)
        (tmp_path / f"{args[0]}_{args[1]}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        assert proc.returncode == 0, f"airflow {' '.join(args)} exited {proc.returncode}:\n" \
                                     + (proc.stdout + proc.stderr)[-4000:]
        return proc.stdout

    cli("db", "migrate")
    assert "postgresql" in cli("config", "get-value", "database", "sql_alchemy_conn")
    cli("pools", "set", "warehouse_writer", "1", "one DuckDB writer at a time")
    cli("dags", "test", "persona_daily", DAY)
    assert not (home / "airflow.db").exists()  # no SQLite fallback anywhere

    with psycopg.connect(host=host, port=port, dbname=db, user=user, password=password) as pg:
        runs = pg.execute("SELECT logical_date::date::text, state FROM dag_run WHERE dag_id = 'persona_daily'"
                          ).fetchall()
        tis = dict(pg.execute("SELECT state, count(*) FROM task_instance WHERE dag_id = 'persona_daily' "
                              "GROUP BY state").fetchall())
        pool = pg.execute("SELECT slots FROM slot_pool WHERE pool = 'warehouse_writer'").fetchone()
    assert runs == [(DAY, "success")], runs
    assert tis == {"success": 13}, tis  # 11 tasks + 2 cluster shards
    assert pool == (1,)
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        n, users = con.execute("SELECT count(*), count(DISTINCT user_id) FROM personas.personas WHERE run_date = ?",
                               [DAY]).fetchall()[0]
    finally:
        con.close()
    assert n > 100 and users > 100
    print(f"postgres metadata DB: {timings}; personas {n} of {users} users")
