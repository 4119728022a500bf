"""persona_retrain: weekly preference retraining of the LLM labeller (docs/training.md).

A thin wiring of ``persona_tasks.train.pipeline`` (every task body is a plain function there):
snapshot -> build_groups -> train -> evaluate -> register (gate: promote or keep).

- Schedule: ``[training] schedule`` (cron, UTC; default weekly, Sunday 03:00). A run of logical date D uses the
  published runs up to D (the latest run date not after D) and the ``window_days`` before it.
- Never blocks the daily DAG's warehouse writes: ``snapshot`` and ``register`` (short) run in the warehouse pool;
  the model tasks read the snapshot only and run on ``[training] gpu_queue``.
- A model the gate refuses is not a failure: the current labeller stays and the reason is in
  ``training.model_registry``. Failures call ``persona_tasks.alerts.on_failure_callback`` (as the daily DAG).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import CronTriggerTimetable, Param, dag, task

from persona_tasks.alerts import on_failure_callback
from persona_tasks.config import TRAINED_ARMS, load_settings

DAG_ID = "persona_retrain"
_settings = load_settings()
_cfg, _train = _settings.orchestration, _settings.training

RETRYING = {"retries": _cfg.retries, "retry_delay": timedelta(seconds=_cfg.retry_delay_s),
            "retry_exponential_backoff": _cfg.retry_exponential_backoff,
            "max_retry_delay": timedelta(seconds=_cfg.max_retry_delay_s)}
WRITER = {"pool": _cfg.warehouse_pool}
MODEL = {"queue": _train.gpu_queue}


def _day(context) -> str:
    when = context.get("logical_date") or context.get("data_interval_end") or context["dag_run"].run_after
    return pendulum.instance(when).in_timezone("UTC").date().isoformat()


def _call(fn_name: str, *args, **kwargs):
    """Call ``persona_tasks.train.pipeline.<fn_name>(settings, ...)``; persona-etl's own errors (no published
    personas, no usable groups, a bad setting) fail the task at once: a retry cannot fix them."""
    from airflow.sdk.exceptions import AirflowFailException

    from persona_tasks.errors import PersonaEtlError
    from persona_tasks.train import pipeline

    try:
        return getattr(pipeline, fn_name)(load_settings(), *args, **kwargs)
    except PersonaEtlError as exc:
        raise AirflowFailException(str(exc)) from exc


@dag(
    dag_id=DAG_ID,
    schedule=CronTriggerTimetable(_train.schedule, timezone="UTC"),
    start_date=pendulum.parse(_train.start_date, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["persona-etl", "training", "weekly"],
    default_args={"owner": _cfg.owner, "on_failure_callback": on_failure_callback, **RETRYING},
    params={"arm": Param(_train.arm, type="string", enum=list(TRAINED_ARMS),
                         description="training arm of this run"),
            "auto_promote": Param(True, type="boolean", description="promote when the gate passes")},
    doc_md=__doc__,
)
def persona_retrain():
    @task(**WRITER)
    def snapshot(**context):
        return _call("snapshot", not_after=_day(context))

    @task(**MODEL)
    def build_groups(snap: dict):
        return _call("build_groups_step", snap["as_of"])

    @task(**MODEL)
    def train(groups: dict, **context):
        return {**_call("train_step", groups["as_of"], context["params"]["arm"]), "as_of": groups["as_of"]}

    @task(**MODEL)
    def evaluate(trained: dict):
        return {**_call("evaluate_step", trained["as_of"]), "as_of": trained["as_of"]}

    @task(**WRITER)
    def register(evaluated: dict, **context):
        return _call("register_step", evaluated["as_of"], auto_promote=bool(context["params"]["auto_promote"]),
                     actor=f"{DAG_ID}:{context['run_id']}")

    register(evaluate(train(build_groups(snapshot()))))


persona_retrain()
