"""persona_daily: one day of behaviour logs -> published personas, safe to rerun.

A thin wiring of ``persona_tasks.daily`` (every task body is a plain function there; read its docstring for
what each step checks). Settings come from persona_etl.toml / ``PERSONA_ETL_*`` (section ``[orchestration]``).

- Schedule: daily data intervals (``CronDataIntervalTimetable("@daily")``): the run of logical date D
  processes the data day D (``landing/<D>/*``) once the day is over. ``airflow dags test persona_daily D`` and
  ``airflow backfill create --dag-id persona_daily --from-date D1 --to-date D2`` process the days D.. alike.
- One writer per DuckDB file: ``max_active_runs=1`` and every task that opens the warehouse runs in the pool
  ``warehouse_writer`` (1 slot). The cluster shards read a Parquet export instead, so they run in parallel.
- Retries with exponential backoff on tasks that can fail transiently; none on the gates (Great Expectations
  suites, persona_tasks/gates: every check recorded in ``quality_check_results``), and a bad input file fails at
  once. Failures call ``persona_tasks.alerts.on_failure_callback`` (ops_alerts row, webhook).
- Incremental: a day recomputes only its active users (memories changed); persona ids are stable and every
  change is a new version in ``personas.persona_history``. The params ``full`` (recompute every user) and
  ``rewind`` (republish an earlier day whose result changed, undoing the later days) are for operators.
- The published persona tables and the serving copy are Assets downstream DAGs can be scheduled on.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, CronDataIntervalTimetable, Param, dag, task

from persona_tasks.alerts import on_failure_callback
from persona_tasks.config import load_settings

DAG_ID = "persona_daily"
_cfg = load_settings().orchestration

# Downstream DAGs: ``@dag(schedule=[PERSONA_TABLES])`` runs after every successful publish.
PERSONA_TABLES = Asset(uri="persona-etl://warehouse/personas", name="persona_tables",
                       extra={"tables": "personas.persona_history, personas.persona_evidence, "
                                        "personas.persona_topics"})
SERVING_COPY = Asset(uri="persona-etl://serving/personas", name="persona_serving_copy")

RETRYING = {
    "retries": _cfg.retries,
    "retry_delay": timedelta(seconds=_cfg.retry_delay_s),
    "retry_exponential_backoff": _cfg.retry_exponential_backoff,
    "max_retry_delay": timedelta(seconds=_cfg.max_retry_delay_s),
}
GATE = {"retries": 0}
WRITER = {"pool": _cfg.warehouse_pool}


def _run_date(context) -> str:
    """The data day of the run: its logical date (= the start of its daily data interval), in UTC."""
    when = context.get("logical_date") or context.get("data_interval_start") or context["dag_run"].run_after
    return pendulum.instance(when).in_timezone("UTC").date().isoformat()


def _call(fn_name: str, context, *args, **kwargs):
    """Call ``persona_tasks.daily.<fn_name>(settings, run_date, ...)``; errors that a retry cannot fix (a bad input
    file, a failed gate) fail the task at once."""
    from airflow.sdk.exceptions import AirflowFailException

    from persona_tasks import daily
    from persona_tasks.errors import InputFileError

    settings = load_settings()
    try:
        return getattr(daily, fn_name)(settings, _run_date(context), *args, **kwargs)
    except (daily.GateError, InputFileError) as exc:
        raise AirflowFailException(str(exc)) from exc


def _gate(fn_name: str, context, *args):
    """A gate task: the gate's Great Expectations suite (persona_tasks.gates), told which run and try it checks."""
    from persona_tasks.gates import RunInfo

    return _call(fn_name, context, *args, run=RunInfo.from_airflow(context))


@dag(
    dag_id=DAG_ID,
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=pendulum.parse(_cfg.start_date, tz="UTC"),
    catchup=_cfg.catchup,
    max_active_runs=1,
    tags=["persona-etl", "daily", "personas"],
    default_args={"owner": _cfg.owner, "on_failure_callback": on_failure_callback, **RETRYING},
    params={"labeller": Param(_cfg.labeller, type="string", enum=["extractive", "llm"],
                              description="persona labeller of this run"),
            "full": Param(False, type="boolean",
                          description="recompute every user, not only those whose memories changed"),
            "rewind": Param(False, type="boolean",
                            description="republishing an earlier day whose result changed: undo the later days")},
    doc_md=__doc__,
)
def persona_daily():
    @task(**WRITER)
    def ingest_landing(**context):
        return _call("ingest_landing", context)

    @task(**WRITER, **GATE)
    def gate_raw(ingested: dict, **context):
        return _gate("gate_raw", context, ingested)

    @task(**WRITER)
    def build(checked: dict, **context):
        return _call("build", context)

    @task(**WRITER, **GATE)
    def gate_memories(built: dict, **context):
        return _gate("gate_memories", context, built)

    @task(**WRITER, queue=_cfg.embed_queue)
    def embed(checked: dict, **context):
        return _call("embed", context, full=bool(context["params"].get("full", False)))

    @task  # reads the Parquet export only: no warehouse pool, shards run in parallel
    def cluster(shard: int, embedded: dict, n_shards: int, **context):
        return _call("cluster_shard", context, shard, n_shards, embedded)

    @task(**WRITER)
    def store_clusters(shards, embedded: dict, **context):
        return _call("store_clusters", context, list(shards), embedded)

    @task(pool=_cfg.label_pool, queue=_cfg.label_queue)
    def label(stored: dict, **context):
        return _call("label", context, labeller=context["params"]["labeller"],
                     full=bool(context["params"].get("full", False)))

    @task(**WRITER, queue=_cfg.score_queue)
    def score(labelled: dict, **context):
        return _call("score", context)

    @task(**WRITER, **GATE)
    def gate_personas(scored: dict, **context):
        return _gate("gate_personas", context)

    @task(**WRITER, outlets=[PERSONA_TABLES])
    def publish(checked: dict, **context):
        return _call("publish", context, rewind=bool(context["params"].get("rewind", False)))

    @task(**WRITER, outlets=[SERVING_COPY])
    def serve(published: dict, **context):
        return _call("serve", context)

    raw_ok = gate_raw(ingest_landing())
    memories_ok = gate_memories(build(raw_ok))
    embedded = embed(memories_ok)
    shards = cluster.partial(embedded=embedded, n_shards=_cfg.n_shards).expand(shard=list(range(_cfg.n_shards)))
    stored = store_clusters(shards, embedded)
    serve(publish(gate_personas(score(label(stored)))))


persona_daily()
