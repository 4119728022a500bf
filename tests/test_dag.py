"""The Airflow DAG persona_daily: integrity, and real `airflow dags test` runs on days of the bundled AOL sample.

Real Airflow (SQLite metadata DB in a temporary AIRFLOW_HOME, `airflow db migrate` first), real dbt, real DuckDB,
real MiniLM embeddings, the extractive labeller. The end-to-end runs share one module-scoped Airflow home and
warehouse and run in order: day 1, day 2, a rerun of day 2 (identical tables), then a day with a planted bad
landing file (the raw gate fails, nothing is published, an alert row is written and posted to a webhook on
loopback, the published personas and the serving copy are unchanged).
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from datetime import date
from pathlib import Path

import duckdb
import pytest

from persona_tasks.config import PROJECT_DIR

DAGS = PROJECT_DIR / "dags"
AOL = PROJECT_DIR / "data" / "aol" / "aol_sample.tsv.gz"
DAY1, DAY2, BAD_DAY = "2006-03-01", "2006-03-02", "2006-03-03"
N_SHARDS = 3

# columns that record when a row was processed, not what it says
VOLATILE = ("created_at", "clustered_at", "embedded_at", "ingested_at", "published_at", "rejected_at", "stats",
            "alerted_at")
CHECKED_TABLES = [
    "raw.events", "raw.ingest_batches", "marts.intent_memories", "personas.memory_embeddings",
    "personas.memory_clusters", "personas.user_clusterings", "personas.personas", "personas.persona_evidence",
    "personas.persona_embeddings", "personas.persona_topics", "personas.induction_runs",
]
PUBLISHED = ["personas.personas", "personas.persona_evidence", "personas.persona_embeddings",
             "personas.persona_topics"]


# --- helpers ---------------------------------------------------------------------------------------------------

def write_landing_day(root: Path, day: str, extra_bad_rows: int = 0) -> Path:
    """landing/<day>/aol_<day>.tsv: the AOL sample's rows of that day, in the original layout (header kept);
    ``extra_bad_rows`` appends rows whose QueryTime cannot be parsed (rejected by ingest)."""
    with gzip.open(AOL, "rt", encoding="utf-8", newline="") as f:
        header = f.readline()
        rows = [line for line in f if line.split("\t")[2].startswith(day)]
    bad = [f"9999{k}\tsome query\tnot-a-time\t\t\n" for k in range(extra_bad_rows)]
    out = root / day
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"aol_{day}.tsv"
    path.write_text(header + "".join(rows) + "".join(bad), encoding="utf-8")
    return path


def checksums(warehouse: Path, tables: list[str]) -> dict[str, tuple[int, int]]:
    from persona_tasks.serving import table_checksum

    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        return {t: table_checksum(con, t, VOLATILE) for t in tables}
    finally:
        con.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def webhook():
    """A Slack-compatible webhook receiver on loopback: yields (url, list of received JSON bodies)."""
    _Hook.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Hook.received
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def af(tmp_path_factory, webhook):
    """An Airflow home (SQLite, migrated, pools created: ``LocalAirflow``, as ``make demo`` uses) and a persona-etl
    deployment in a temporary folder."""
    from persona_tasks.config import load_settings
    from persona_tasks.local_airflow import LocalAirflow

    root = tmp_path_factory.mktemp("airflow_e2e")
    home, landing, wh = root / "airflow", root / "landing", root / "wh"
    settings = load_settings(warehouse=wh / "warehouse.duckdb")
    local = LocalAirflow.create(settings, home, {
        "PERSONA_ETL_CONFIG": str(root / "no-config.toml"),
        "PERSONA_ETL_DBT__TARGET_PATH": str(root / "dbt_target"),
        "PERSONA_ETL_ORCHESTRATION__LANDING_DIR": str(landing),
        "PERSONA_ETL_ORCHESTRATION__N_SHARDS": str(N_SHARDS),
        "PERSONA_ETL_ALERTS__WEBHOOK_URL": webhook[0],
        "PERSONA_ETL_ALERTS__TIMEOUT_S": "5",
    }, cwd=root)
    for day in (DAY1, DAY2):
        write_landing_day(landing, day)
    return {"root": root, "home": home, "landing": landing, "warehouse": wh / "warehouse.duckdb",
            "serving": wh / "serving" / "personas_serving.duckdb", "env": local.env, "run": local.run,
            "local": local, "timings": {}}


def task_states(af, run_logical_date: str) -> dict[str, str]:
    return af["local"].task_states("persona_daily", run_logical_date)


# --- DAG integrity (parsed in this process, no metadata DB needed) -----------------------------------------------

@pytest.fixture(scope="module")
def dag(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow_home_parse")
    code = (
        "import json, time; t = time.perf_counter()\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"b = DagBag({str(DAGS)!r})\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in b.import_errors.items()}, 'seconds': "
        "time.perf_counter() - t, 'file_seconds': [s.duration.total_seconds() for s in b.dagbag_stats], "
        "'dags': list(b.dags)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PERSONA_ETL_"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               PERSONA_ETL_CONFIG=str(home / "no-config.toml"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    # parse in this process too (for the task objects), with the default settings and a throwaway Airflow home
    saved = {k: os.environ.get(k) for k in ("AIRFLOW_HOME", "PERSONA_ETL_CONFIG")}
    os.environ.setdefault("AIRFLOW_HOME", str(home))
    os.environ["PERSONA_ETL_CONFIG"] = str(home / "no-config.toml")
    try:
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(str(DAGS))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return parsed, bag.dags["persona_daily"]


def test_dag_imports_fast_and_clean(dag):
    parsed, _ = dag
    assert parsed["errors"] == {}
    assert sorted(parsed["dags"]) == ["persona_daily", "persona_retrain"]
    # the DAG file itself (what the dag processor re-parses) and a cold DagBag in a fresh interpreter
    assert max(parsed["file_seconds"]) < 2.0, parsed
    assert parsed["seconds"] < 10.0, parsed


def test_dag_shape(dag):
    _, d = dag
    ids = {t.task_id for t in d.tasks}
    assert ids == {"ingest_landing", "gate_raw", "build", "gate_memories", "embed", "cluster", "store_clusters",
                   "label", "score", "gate_personas", "publish", "serve"}
    assert d.max_active_runs == 1 and d.catchup is False
    assert type(d.timetable).__name__ == "CronDataIntervalTimetable"
    assert {"persona-etl", "daily"} <= set(d.tags)
    # no cycles, one chain from ingest to serve
    order, seen, stack = [], set(), set()

    def visit(t):
        assert t.task_id not in stack, f"cycle through {t.task_id}"
        if t.task_id in seen:
            return
        stack.add(t.task_id)
        for u in t.downstream_list:
            visit(u)
        stack.discard(t.task_id)
        seen.add(t.task_id)
        order.append(t.task_id)

    for t in d.roots:
        visit(t)
    assert [t.task_id for t in d.roots] == ["ingest_landing"] and [t.task_id for t in d.leaves] == ["serve"]
    order.reverse()
    assert order.index("gate_raw") < order.index("build") < order.index("gate_memories") < order.index("embed") \
        < order.index("cluster") < order.index("store_clusters") < order.index("label") < order.index("score") \
        < order.index("gate_personas") < order.index("publish") < order.index("serve")


def test_task_policies(dag):
    _, d = dag
    for t in d.tasks:
        assert t.owner == "persona-etl"
        assert t.on_failure_callback, t.task_id
        if t.task_id.startswith("gate_"):
            assert t.retries == 0, t.task_id
        else:
            assert t.retries >= 1 and t.retry_exponential_backoff > 0 and t.max_retry_delay, t.task_id
        if t.task_id == "cluster":
            assert t.pool == "default_pool"  # reads a Parquet export only: shards run in parallel
        else:
            assert t.pool == "warehouse_writer", t.task_id  # every task that opens the warehouse
    cluster = d.get_task("cluster")
    assert type(cluster).__name__.endswith("MappedOperator")  # dynamic task mapping over shard numbers
    publish = d.get_task("publish")
    assert [a.name for a in publish.outlets] == ["persona_tables"]


def test_label_queue_and_pool_are_configurable(tmp_path):
    code = ("from airflow.dag_processing.dagbag import DagBag\n"
            f"d = DagBag({str(DAGS)!r}).dags['persona_daily']\nt = d.get_task('label')\n"
            "print(d.get_task('embed').queue, d.get_task('score').queue, t.queue, t.pool)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PERSONA_ETL_"))}
    env.update(AIRFLOW_HOME=str(tmp_path), PERSONA_ETL_ORCHESTRATION__LABEL_QUEUE="gpu",
               PERSONA_ETL_ORCHESTRATION__LABEL_POOL="gpu", PERSONA_ETL_ORCHESTRATION__EMBED_QUEUE="gpu",
               PERSONA_ETL_ORCHESTRATION__SCORE_QUEUE="gpu",
               PERSONA_ETL_CONFIG=str(tmp_path / "none.toml"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "gpu gpu gpu gpu"


# --- end to end: airflow dags test -------------------------------------------------------------------------------

def test_dags_test_end_to_end(af):
    proc, seconds = af["run"]("dags", "test", "persona_daily", DAY1, name="dags_test_day1")
    af["timings"]["day1"] = seconds
    states = task_states(af, DAY1)
    assert states["publish"] == "success" and states["serve"] == "success", states
    assert {states[f"cluster[{k}]"] for k in range(N_SHARDS)} == {"success"}
    con = duckdb.connect(str(af["warehouse"]), read_only=True)
    try:
        n_personas, n_users = con.execute("SELECT count(*), count(DISTINCT user_id) FROM personas.personas "
                                          "WHERE run_date = ?", [DAY1]).fetchall()[0]
        n_scored = con.execute("SELECT count(objective) FROM personas.personas").fetchall()[0][0]
        assert con.execute("SELECT count(*) FROM raw.ingest_batches").fetchall()[0][0] == 1
    finally:
        con.close()
    assert n_personas > 100 and n_users > 100 and n_scored == n_personas
    # the three gates ran their Great Expectations suites inside the Airflow tasks: every check recorded with the
    # Airflow run id and try, each with its Data Docs page
    con = duckdb.connect(str(af["warehouse"]), read_only=True)
    try:
        gates = con.execute("SELECT gate, count(*), count(*) FILTER (WHERE NOT success AND severity = 'block'), "
                            "min(dag_run_id), max(try_number), min(docs_page) FROM quality_check_results "
                            "WHERE run_date = ? GROUP BY 1 ORDER BY 1", [DAY1]).fetchall()
    finally:
        con.close()
    assert [g[0] for g in gates] == ["gate_memories", "gate_personas", "gate_raw"]
    assert all(n >= 6 and blocking == 0 and not run_id.startswith("local__") and tries == 1
               for _, n, blocking, run_id, tries, _ in gates), gates
    page = Path(gates[0][5].removeprefix("file://"))
    assert page.is_file() and "gate_memories" in page.read_text()
    # the serving copy: a separate file analysts open read-only
    srv = duckdb.connect(str(af["serving"]), read_only=True)
    try:
        assert srv.execute("SELECT count(*) FROM personas.personas").fetchall()[0][0] == n_personas
        assert srv.execute("SELECT count(*) FROM personas.current_personas").fetchall()[0][0] == n_personas
        assert srv.execute("SELECT run_date::VARCHAR FROM ops.serving_info").fetchall() == [(DAY1,)]
    finally:
        srv.close()
    print(f"airflow dags test persona_daily {DAY1}: {seconds:.1f}s")

    proc, seconds = af["run"]("dags", "test", "persona_daily", DAY2, name="dags_test_day2")
    af["timings"]["day2"] = seconds
    con = duckdb.connect(str(af["serving"]), read_only=True)
    try:
        days = con.execute("SELECT DISTINCT run_date::VARCHAR FROM personas.personas ORDER BY 1").fetchall()
    finally:
        con.close()
    assert days == [(DAY1,), (DAY2,)]
    print(f"airflow dags test persona_daily {DAY2}: {seconds:.1f}s")


def test_rerun_of_a_day_gives_identical_tables(af):
    if not (af["serving"]).exists():
        pytest.skip("needs test_dags_test_end_to_end")
    before = checksums(af["warehouse"], CHECKED_TABLES)
    serving_before = checksums(af["serving"], ["personas.personas", "personas.persona_evidence",
                                               "personas.persona_topics"])
    _, seconds = af["run"]("dags", "test", "persona_daily", DAY2, name="dags_test_day2_rerun")
    af["timings"]["rerun"] = seconds
    after = checksums(af["warehouse"], CHECKED_TABLES)
    assert after == before
    assert checksums(af["serving"], list(serving_before)) == serving_before
    print(f"rerun of {DAY2}: {seconds:.1f}s; {len(after)} tables identical")


def test_bad_landing_file_fails_the_gate_and_publishes_nothing(af, webhook):
    if not (af["serving"]).exists():
        pytest.skip("needs test_dags_test_end_to_end")
    write_landing_day(af["landing"], BAD_DAY, extra_bad_rows=400)
    before = checksums(af["warehouse"], PUBLISHED)
    serving_sha = sha256(af["serving"])
    n_hooks = len(webhook[1])
    proc, _ = af["run"]("dags", "test", "persona_daily", BAD_DAY, check=False, name="dags_test_bad_day")
    assert proc.returncode != 0
    states = task_states(af, BAD_DAY)
    assert states["ingest_landing"] == "success"
    assert states["gate_raw"] == "failed"
    assert states["publish"] == "upstream_failed" and states["serve"] == "upstream_failed"
    # the last published personas and the serving copy are untouched
    assert checksums(af["warehouse"], PUBLISHED) == before
    assert sha256(af["serving"]) == serving_sha
    from persona_tasks.alerts import read_alerts
    from persona_tasks.config import Settings

    alerts = read_alerts(Settings(warehouse=af["warehouse"]))
    row = alerts.filter(alerts["run_date"].cast(str) == BAD_DAY).row(0, named=True)
    assert row["dag_id"] == "persona_daily" and row["task_id"] == "gate_raw"
    assert row["try_number"] == 1 and row["failing_check"] == "rejected_share"
    assert "max_rejected_share" in row["runbook"]
    assert "rejected" in row["error_summary"] and "not-a-time" not in row["error_summary"]
    assert row["log_url"] and "gate_raw" in row["log_url"]
    assert row["webhook_status"] == "200"
    # the alert links the failing validation's Data Docs page; the results table holds the observed share
    assert row["docs_url"] and Path(row["docs_url"].removeprefix("file://")).is_file()
    con = duckdb.connect(str(af["warehouse"]), read_only=True)
    try:
        observed, page = con.execute("SELECT observed_value, docs_page FROM quality_check_results WHERE run_date = ? "
                                     "AND check_name = 'rejected_share'", [BAD_DAY]).fetchall()[0]
    finally:
        con.close()
    assert float(observed) > 0.05 and page == row["docs_url"]
    posted = webhook[1][n_hooks:]
    assert len(posted) == 1 and "gate_raw" in posted[0]["text"] and posted[0]["alert"]["failing_check"] == \
        "rejected_share"


def test_task_durations_are_recorded(af):
    """Every task instance of a day has its duration in the metadata DB (what bench_daily reports per task);
    prints the measured wall times (pytest -s)."""
    durations = af["local"].task_durations("persona_daily", DAY1)
    assert set(durations) == set(task_states(af, DAY1))
    assert all(d > 0 for d in durations.values()), durations
    assert durations["build"] > durations["gate_raw"]  # a dbt build outlasts a count query
    print("airflow dags test wall times (s):", {k: round(v, 1) for k, v in af["timings"].items()})


# --- serving copy, landing URLs, alerts (no Airflow needed) ------------------------------------------------------

def _settings(tmp_path, **kw):
    from persona_tasks.config import DbtSettings, Settings

    return Settings(warehouse=tmp_path / "wh" / "warehouse.duckdb", dbt=DbtSettings(target_path=tmp_path / "t"),
                    **kw)


def test_serving_copy_is_swapped_atomically(tmp_path):
    from persona_tasks.config import ServingSettings
    from persona_tasks.serving import connect_serving, publish_serving, serving_path
    from persona_tasks.warehouse import connect

    tables = ["personas.persona_history", "personas.induction_runs"]
    s = _settings(tmp_path, serving=ServingSettings(tables=tables))
    con = connect(s)
    con.execute("CREATE SCHEMA personas; CREATE TABLE personas.persona_history (user_id VARCHAR, label VARCHAR, "
                "is_current BOOLEAN, valid_from DATE, valid_to DATE, persona_id VARCHAR DEFAULT 'p', version INTEGER "
                "DEFAULT 1, change VARCHAR DEFAULT 'appeared', ended VARCHAR, description VARCHAR DEFAULT '', "
                "first_seen DATE DEFAULT DATE '2006-03-01'); "
                "CREATE TABLE personas.induction_runs (run_date DATE, published_at TIMESTAMP)")
    con.execute("INSERT INTO personas.persona_history (user_id, label, is_current, valid_from) "
                "VALUES ('u1', 'old', true, DATE '2006-03-01')")
    con.execute("INSERT INTO personas.induction_runs VALUES (DATE '2006-03-01', now())")
    con.close()
    publish_serving(s)
    reader = connect_serving(s)  # an analyst's session, open while the next run publishes
    con = connect(s)
    con.execute("UPDATE personas.persona_history SET is_current = false, valid_to = DATE '2006-03-02'")
    con.execute("INSERT INTO personas.persona_history (user_id, label, is_current, valid_from) "
                "VALUES ('u1', 'new', true, DATE '2006-03-02')")
    con.execute("INSERT INTO personas.induction_runs VALUES (DATE '2006-03-02', now())")
    con.close()
    out = publish_serving(s)
    assert out["rows"] == {"personas.persona_history": 2, "personas.induction_runs": 2}
    # the open session keeps reading the copy it opened (never half a run); a new one sees the new run
    assert reader.execute("SELECT label FROM personas.current_personas").fetchall() == [("old",)]
    reader.close()
    fresh = connect_serving(s)
    try:
        assert fresh.execute("SELECT label, run_date FROM personas.current_personas").fetchall() == [
            ("new", date(2006, 3, 2))]
        # the as-of view over the copied history: one persona per published run date
        assert fresh.execute("SELECT run_date, label FROM personas.personas ORDER BY 1").fetchall() == [
            (date(2006, 3, 1), "old"), (date(2006, 3, 2), "new")]
        with pytest.raises(duckdb.Error):
            fresh.execute("DELETE FROM personas.persona_history")  # read-only
    finally:
        fresh.close()
    # no temporary files left beside the copy
    assert sorted(p.name for p in serving_path(s).parent.iterdir()) == ["personas_serving.duckdb"]


def test_landing_files_from_an_fsspec_url(tmp_path):
    import fsspec

    from persona_tasks.config import OrchestrationSettings
    from persona_tasks.daily import landing_files

    fs = fsspec.filesystem("memory")
    fs.pipe("/landing-test/2006-03-01/a.tsv", b"AnonID\tQuery\tQueryTime\tItemRank\tClickURL\n")
    fs.pipe("/landing-test/2006-03-01/b.tsv", b"x")
    fs.pipe("/landing-test/2006-03-02/c.tsv", b"y")
    s = _settings(tmp_path, orchestration=OrchestrationSettings(landing_dir="memory://landing-test"))
    got = landing_files(s, "2006-03-01")
    assert [p.name for p in got] == ["a.tsv", "b.tsv"] and got[1].read_bytes() == b"x"
    assert landing_files(s, "2006-03-09") == []


def test_alert_row_and_webhook_post(tmp_path, webhook):
    from datetime import datetime, timezone
    from types import SimpleNamespace

    from persona_tasks.alerts import on_failure_callback, read_alerts
    from persona_tasks.config import AlertsSettings
    from persona_tasks.daily import GateError

    s = _settings(tmp_path, alerts=AlertsSettings(webhook_url=webhook[0]))
    try:
        try:
            raise GateError("coverage", "coverage 0.2 below 0.5")
        except GateError as inner:
            raise RuntimeError("wrapped\nsecond line with data") from inner
    except RuntimeError as exc:
        err = exc
    ti = SimpleNamespace(dag_id="persona_daily", task_id="cluster", map_index=2, run_id="r1", try_number=3,
                         log_url="http://localhost:8080/log")
    n = len(webhook[1])
    os.environ["PERSONA_ETL_WAREHOUSE"] = str(s.warehouse)
    os.environ["PERSONA_ETL_ALERTS__WEBHOOK_URL"] = webhook[0]
    try:
        on_failure_callback({"ti": ti, "exception": err,
                             "logical_date": datetime(2006, 3, 4, tzinfo=timezone.utc)})
    finally:
        os.environ.pop("PERSONA_ETL_WAREHOUSE")
        os.environ.pop("PERSONA_ETL_ALERTS__WEBHOOK_URL")
    row = read_alerts(s).row(0, named=True)
    assert (row["task_id"], row["map_index"], row["try_number"], str(row["run_date"])) == ("cluster", 2, 3,
                                                                                          "2006-03-04")
    assert row["failing_check"] == "coverage" and row["error_type"] == "GateError"
    assert row["error_summary"] == "gate check coverage failed: coverage 0.2 below 0.5"
    assert row["runbook"] and row["runbook"].endswith("docs/oncall.md#coverage)")
    assert "What to do:" in webhook[1][n]["text"] and "oncall.md#coverage" in webhook[1][n]["text"]
    assert webhook[1][n]["alert"]["task_id"] == "cluster" and webhook[1][n]["text"].startswith(":red_circle:")


# --- docker/compose.yaml names only real things (Docker cannot run here) -----------------------------------------

def test_compose_file_names_real_things(tmp_path):
    import yaml

    from persona_tasks.config import Settings

    compose_path = PROJECT_DIR / "docker" / "compose.yaml"
    spec = yaml.safe_load(compose_path.read_text())
    services = spec["services"]
    assert {"postgres", "redis", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
            "airflow-triggerer", "airflow-worker", "airflow-worker-gpu"} <= set(services)
    env: dict[str, str] = {}
    commands = []
    for name, svc in services.items():
        if "build" in svc:  # the image is built from the project's Dockerfile
            ctx = (compose_path.parent / svc["build"]["context"]).resolve()
            assert ctx == PROJECT_DIR and (ctx / svc["build"]["dockerfile"]).is_file()
        for vol in svc.get("volumes", []):
            host, container = vol.split(":")[:2]
            if host.startswith("."):
                # a project folder (created by a run if absent) mounted where the settings point
                rel = (compose_path.parent / host).resolve().relative_to(PROJECT_DIR)
                assert rel.parts[0] in {"landing", "warehouse", ".cache", "dbt_project", "dags"}, vol
                assert container == "/app/" + str(rel)
        env.update({k: str(v) for k, v in (svc.get("environment") or {}).items()})
        if svc.get("command"):
            commands.append((name, svc["command"]))
    # persona-etl variables: every one is a real setting, and the paths are the mounted volumes
    pe = {k: v for k, v in env.items() if k.startswith("PERSONA_ETL_")}
    for k in pe:
        path = k[len("PERSONA_ETL_"):].lower().split("__")
        model = Settings.model_fields
        for part in path[:-1]:
            model = model[part].annotation.model_fields
        assert path[-1] in model, k
    proc = subprocess.run([sys.executable, "-c", "from persona_tasks.config import load_settings; "
                           "s = load_settings(); print(s.orchestration.label_queue, s.warehouse)"],
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("PERSONA_ETL_")},
                               **pe, "PERSONA_ETL_CONFIG": str(tmp_path / "none.toml")},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    queue, warehouse = proc.stdout.split()
    assert warehouse.startswith("/app/warehouse/") and Path(warehouse).name != "personas.duckdb"
    # queues: the GPU worker serves the label task's queue, the other worker the default queue
    worker_queues = {name: cmd[cmd.index("--queues") + 1] for name, cmd in commands if "--queues" in cmd}
    assert worker_queues == {"airflow-worker": "default", "airflow-worker-gpu": queue}
    gpu = services["airflow-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    # Airflow: every command is an airflow CLI command, every AIRFLOW__SECTION__KEY a real option
    af_env = {k: v for k, v in env.items() if k.startswith("AIRFLOW__")}
    code = ("import json, sys\nfrom airflow.configuration import conf\nfrom airflow.cli.cli_parser import "
            "get_parser\nkeys = json.loads(sys.argv[1])\nsubs = get_parser()._subparsers._group_actions[0].choices\n"
            "d = conf.configuration_description\nprint(json.dumps({'options': {k: k.split('__')[2] in d.get(k.split('__')[1], {}).get('options', {}) for k in keys}, "
            "'commands': sorted(subs)}))\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([k.lower() for k in af_env])],
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
                               "AIRFLOW_HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    celery_installed = "celery" in got["commands"]
    for k, ok in got["options"].items():
        if k.startswith("airflow__celery__") and not celery_installed:
            continue  # the Celery provider defines that section (see the note in compose.yaml)
        assert ok, f"{k.upper()} is not an Airflow option"
    for name, cmd in commands:
        words = cmd if cmd[0] != "bash" else cmd[2].split("&&")[0].split()
        if words[0] != "airflow":
            continue
        if words[1] == "celery" and not celery_installed:
            continue
        assert words[1] in got["commands"], (name, cmd)
    init = services["airflow-init"]["command"][2]
    assert "airflow db migrate" in init and "pools set warehouse_writer 1" in init
