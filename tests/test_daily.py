"""The DAG's task functions (persona_tasks.daily) run in order in this process (``run_day``) on a synthetic day,
with the static embedding backend (the 2-core configuration of the daily benchmark): gates, rerun, PII gate."""

from __future__ import annotations

import pytest

from persona_tasks import daily
from persona_tasks.config import load_settings
from persona_tasks.warehouse import connect, query_pl, query_row

DAY = "2026-01-04"
EMAIL = "jane.doe@example.com"


@pytest.fixture(scope="module")
def day_run(tmp_path_factory):
    from persona_tasks.synth import generate_events, write_events

    tmp = tmp_path_factory.mktemp("daily")
    write_events(generate_events(3000, n_users=30, seed=5, days=3, start="2026-01-02"),
                 tmp / "landing" / DAY / "events.parquet")
    settings = load_settings(
        warehouse=tmp / "wh" / "warehouse.duckdb", threads=2, models_dir=tmp_path_factory.mktemp("models"),
        embedding={"backend": "static"}, ingest={"events": {"attributes": ["category", "brand", "price"]}},
        dbt={"target_path": tmp / "dbt_target"}, gates={"lateness_hours": 48},  # the file holds 3 days
        orchestration={"landing_dir": str(tmp / "landing"), "landing_format": "events", "landing_source": "synth",
                       "n_shards": 2})
    return settings, daily.run_day(settings, DAY)


def published(settings) -> dict:
    with connect(settings) as con:
        return {t: query_pl(con, f"SELECT * FROM personas.{t} ORDER BY ALL").drop(
                    "created_at", "published_at", strict=False).to_dicts()
                for t in ("personas", "persona_evidence")}


def test_static_backend_day_passes_its_gates_and_reruns_identically(day_run):
    settings, first = day_run
    assert first["embed"]["model_version"].endswith("+static-v1")
    assert first["gate_personas"]["personas"] > 30
    assert first["publish"]["users"] == 30
    before = published(settings)
    assert {p["labeller"] for p in before["personas"]} == {"extractive"}
    daily.run_day(settings, DAY)
    assert published(settings) == before


def test_pii_in_a_staged_persona_fails_the_gate_without_echoing_it(day_run):
    settings, _ = day_run
    before = published(settings)
    daily.label(settings, DAY)
    daily.score(settings, DAY)
    daily.gate_personas(settings, DAY)  # freshly staged: passes
    with connect(settings) as con:
        pid = query_row(con, "SELECT min(persona_id) FROM personas.staged_personas WHERE run_date = $d",
                        {"d": DAY})[0]
        con.execute("UPDATE personas.staged_personas SET description = description || $x WHERE persona_id = $p",
                    {"x": f" Writes to {EMAIL}.", "p": pid})
    with pytest.raises(daily.GateError) as err:
        daily.gate_personas(settings, DAY)
    assert err.value.check == "pii"
    assert pid in str(err.value) and "description" in str(err.value) and EMAIL not in str(err.value)
    assert published(settings) == before  # nothing was published
    # relabelling the day restages clean texts and the gate passes again
    daily.label(settings, DAY)
    daily.score(settings, DAY)
    assert daily.gate_personas(settings, DAY)["personas"] > 30


def test_pii_leaks_checks_labels_and_descriptions():
    import polars as pl

    frame = pl.DataFrame({"persona_id": ["a", "b", "c", "d"],
                          "label": ["Espresso at home", "Call 555-123-4567", "Running", "Order 1234567"],
                          "description": ["Grinders and beans.", "Phones.", f"Mail {EMAIL}", None]})
    assert daily.pii_leaks(frame) == [("b", "label"), ("c", "description"), ("d", "label")]


def test_runbook_queries_run_on_a_real_warehouse(day_run):
    """Every query of docs/oncall.md runs against the warehouse of a real day (staged and published runs)."""
    from persona_tasks.runbook import RUNBOOK

    settings, _ = day_run
    queries = {q for e in RUNBOOK.values() for q in e.sql}
    assert len(queries) >= 10
    with connect(settings) as con:
        for q in sorted(queries):
            con.execute(q, {"d": DAY} if "$d" in q else None).fetchall()
