"""A local Airflow for one machine: the environment, metadata DB and pools that `airflow dags test` needs.

Used by ``make demo`` (``persona_tasks.demo``) and by the DAG tests, so both run the DAG the same way: SQLite
metadata in ``AIRFLOW_HOME`` (no server), examples off, the project's ``dags/`` folder, the pool
``warehouse_writer`` with one slot, and persona-etl settings passed through ``PERSONA_ETL_*`` variables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from persona_tasks.config import Settings
from persona_tasks.errors import PersonaEtlError

AIRFLOW_BIN = Path(sys.executable).parent / "airflow"

# SQLite metadata DB with several Airflow processes (scheduler, dag-processor, api-server, CLI): wait up to 60 s for
# a write lock instead of failing after sqlite3's default 5 s ("database is locked", seen on a loaded 2-core CI
# machine when `airflow backfill create` raced the scheduler). Airflow imports it by name:
SQLITE_CONNECT_ARGS = {"timeout": 60}
SQLITE_CONNECT_ARGS_ENV = {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "persona_tasks.local_airflow.SQLITE_CONNECT_ARGS"}


@dataclass
class LocalAirflow:
    """``LocalAirflow.create(settings, home, env)`` then ``.run("dags", "test", "persona_daily", day)``."""

    home: Path
    env: dict[str, str]
    cwd: Path
    logs: list[Path] = field(default_factory=list)

    @classmethod
    def create(cls, settings: Settings, home: Path, persona_env: dict[str, str] | None = None,
               cwd: Path | None = None) -> LocalAirflow:
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PERSONA_ETL_"))}
        env.update({
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(settings.project_dir / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            **SQLITE_CONNECT_ARGS_ENV,
            # the task processes need the venv's executables (dbt, airflow) on PATH
            "PATH": f"{AIRFLOW_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PERSONA_ETL_WAREHOUSE": str(settings.warehouse),
            "PYTHONUNBUFFERED": "1",
        })
        env.update({k: v for k, v in os.environ.items() if k.startswith("PERSONA_ETL_")})
        env.update(persona_env or {})
        af = cls(home=home, env=env, cwd=cwd or settings.project_dir)
        af.run("db", "migrate", name="db_migrate")
        af.run("pools", "set", settings.orchestration.warehouse_pool, "1", "one DuckDB writer at a time",
               name="pools_set")
        return af

    def run(self, *args: str, check: bool = True, name: str | None = None,
            timeout: float = 1800) -> tuple[subprocess.CompletedProcess, float]:
        """Run an ``airflow`` CLI command; its output goes to ``<home>/<name>.log``; raises when it fails."""
        t0 = time.perf_counter()
        proc = subprocess.run([str(AIRFLOW_BIN), *args], env=self.env, cwd=self.cwd, capture_output=True,
                              text=True, timeout=timeout)
        seconds = time.perf_counter() - t0
        log = self.home / f"{name or args[0]}.log"
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        self.logs.append(log)
        if check and proc.returncode != 0:
            raise PersonaEtlError(f"airflow {' '.join(args[:3])} exited {proc.returncode} after {seconds:.0f}s; "
                                  f"full output in {log}:\n" + (proc.stdout + proc.stderr)[-3000:])
        return proc, seconds

    def dags_test(self, dag_id: str, day: str, conf: dict | None = None,
                  check: bool = True) -> tuple[subprocess.CompletedProcess, float]:
        args = ["dags", "test", dag_id, day] + (["-c", json.dumps(conf)] if conf else [])
        return self.run(*args, check=check, name=f"dags_test_{dag_id}_{day}")

    def task_durations(self, dag_id: str, day: str) -> dict[str, float]:
        """``{task_id or task_id[map_index]: seconds}`` of the run of ``dag_id`` whose logical date is ``day``."""
        import sqlite3

        con = sqlite3.connect(self.home / "airflow.db")
        try:
            rows = con.execute(
                "SELECT ti.task_id, ti.map_index, ti.duration FROM task_instance ti JOIN dag_run r "
                "ON r.dag_id = ti.dag_id AND r.run_id = ti.run_id WHERE ti.dag_id = ? "
                "AND substr(r.logical_date, 1, 10) = ? ORDER BY ti.start_date", (dag_id, day)).fetchall()
        finally:
            con.close()
        return {(t if m < 0 else f"{t}[{m}]"): float(d or 0.0) for t, m, d in rows}

    def task_states(self, dag_id: str, day: str) -> dict[str, str]:
        """``{task_id or task_id[map_index]: state}`` of the run of ``dag_id`` whose logical date is ``day``."""
        import sqlite3

        con = sqlite3.connect(self.home / "airflow.db")
        try:
            rows = con.execute(
                "SELECT ti.task_id, ti.map_index, ti.state FROM task_instance ti JOIN dag_run r "
                "ON r.dag_id = ti.dag_id AND r.run_id = ti.run_id WHERE ti.dag_id = ? "
                "AND substr(r.logical_date, 1, 10) = ?", (dag_id, day)).fetchall()
        finally:
            con.close()
        return {(t if m < 0 else f"{t}[{m}]"): s for t, m, s in rows}


def _live_group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are not zombies (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def standalone(grace_s: float = 30.0) -> int:
    """``airflow standalone`` (environment from the caller: ``make airflow``) that stops cleanly on Ctrl-C.

    Airflow 3.3's standalone stops its components on SIGINT but then hangs itself, with its exited components left
    as zombies (measured: components gone within 5 s, standalone still running after 60 s). So it runs here as a
    child in its own process group: Ctrl-C or SIGTERM is passed on as SIGINT; once every component has exited (or
    after ``grace_s`` seconds) what is left of the group gets SIGTERM, then SIGKILL. Returns 0 after a requested stop.
    """
    import signal

    proc = subprocess.Popen([str(AIRFLOW_BIN), "standalone"], start_new_session=True)
    stop_requested = False

    def _stop(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    while proc.poll() is None and not stop_requested:
        time.sleep(0.5)
    if not stop_requested:
        return proc.returncode or 0
    print("stopping Airflow (components first) ...", flush=True)
    pgid = proc.pid

    def killpg(sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    killpg(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and proc.poll() is None:
        if set(_live_group_members(pgid)) <= {proc.pid}:  # every component has exited
            break
        time.sleep(0.5)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is None or _live_group_members(pgid):
            killpg(sig)
            end = time.monotonic() + 10
            while time.monotonic() < end and (proc.poll() is None or _live_group_members(pgid)):
                time.sleep(0.5)
    proc.wait(timeout=10)
    print("Airflow stopped", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["standalone"]:
        raise SystemExit(standalone())
    raise SystemExit("usage: python -m persona_tasks.local_airflow standalone")
