"""`make airflow`: airflow standalone bound to 127.0.0.1, examples off, a generated 64-byte JWT secret, the URL and
login printed; Ctrl-C (SIGINT to its process group, as a terminal sends it) stops every process it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fixtures.services import api_up, free_port
from persona_tasks.config import PROJECT_DIR

pytestmark = pytest.mark.slow


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_make_airflow_serves_on_loopback_and_stops_cleanly(tmp_path: Path):
    home, port = tmp_path / "airflow", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PERSONA_ETL_", "MAKE"))}
    env.update(AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
               AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
               PERSONA_ETL_CONFIG=str(tmp_path / "none.toml"), PERSONA_ETL_WAREHOUSE=str(tmp_path / "wh.duckdb"))
    log = tmp_path / "make_airflow.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["make", "-s", "airflow", f"AIRFLOW_HOME={home}", f"AIRFLOW_PORT={port}"],
                                cwd=PROJECT_DIR, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not api_up(port):
                assert proc.poll() is None, f"make airflow exited {proc.returncode}:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no api-server on 127.0.0.1:{port}:\n{log.read_text()[-3000:]}"
                time.sleep(2)
            text = log.read_text()
            assert f"Airflow: http://127.0.0.1:{port}" in text and "login: admin" in text
            secret = (home / "jwt_secret").read_text().strip()
            assert len(secret) >= 86  # token_urlsafe(64): 64 random bytes
            assert (home / "jwt_secret").stat().st_mode & 0o077 == 0
            # bound to loopback only: the machine's other address does not answer
            other = socket.gethostbyname(socket.gethostname())
            if not other.startswith("127."):
                with socket.socket() as s:
                    s.settimeout(2)
                    assert s.connect_ex((other, port)) != 0
            # examples off: the only DAG is ours
            dags = subprocess.run([str(PROJECT_DIR / ".venv" / "bin" / "airflow"), "dags", "list", "-o", "plain"],
                                  env={**env, "AIRFLOW_HOME": str(home),
                                       "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_DIR / "dags"),
                                       "AIRFLOW__CORE__LOAD_EXAMPLES": "False"},
                                  capture_output=True, text=True, timeout=120)
            assert "example_" not in dags.stdout
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
            try:
                proc.wait(timeout=90)
            finally:
                stopped = not _group_alive(proc.pid)
                if not stopped:
                    os.killpg(proc.pid, signal.SIGKILL)
    assert stopped, f"processes of make airflow still running 90 s after Ctrl-C:\n{log.read_text()[-2000:]}"
    assert not api_up(port)
