"""The dbt project as a whole: docs, vars kept in sync with Settings, failures surfaced as BuildError, the CLI verb."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import make_event
from persona_tasks import cli, dbt_runner
from persona_tasks.config import IngestSettings, Settings
from persona_tasks.errors import BuildError
from persona_tasks.warehouse import connect

PROJECT_MODELS = {"stg_events", "int_sessions", "intent_memories"}


def test_event_types_var_matches_settings_default():
    project = yaml.safe_load((Settings().dbt.project_dir / "dbt_project.yml").read_text())
    assert project["vars"]["event_types"] == IngestSettings().event_types


def test_vars_come_from_settings(warehouse_settings):
    s = warehouse_settings("vars", session_gap_minutes=7, memory_text_max_chars=80)
    assert dbt_runner.dbt_vars(s) == {
        "session_gap_minutes": 7, "memory_text_max_chars": 80, "event_types": s.ingest.event_types}


@pytest.fixture(scope="module")
def built(warehouse_settings, insert_events):
    settings = warehouse_settings("project")
    insert_events(settings, [
        make_event(user, f"2024-03-0{day} {hour}:00:00", "search", f"hello {user} {day} {hour}")
        for user in ("u", "v") for day in (1, 2, 3) for hour in (10, 12)
    ])
    dbt_runner.build(settings)
    return settings


def test_docs_generate_documents_every_model_and_column(built):
    target = dbt_runner.docs_generate(built)
    assert (target / "index.html").exists()
    manifest = json.loads((target / "manifest.json").read_text())
    catalog = json.loads((target / "catalog.json").read_text())
    models = {n["name"]: n for n in manifest["nodes"].values()
              if n["resource_type"] == "model" and n["package_name"] == "persona_etl"}
    assert PROJECT_MODELS <= set(models)
    for name in PROJECT_MODELS:
        node = models[name]
        assert node["description"].strip(), name
        assert node["schema"] in {"staging", "intermediate", "marts"}
        built_columns = {c.lower() for c in catalog["nodes"][node["unique_id"]]["columns"]}
        documented = {c.lower() for c, v in node["columns"].items() if v["description"].strip()}
        assert built_columns == documented, (name, built_columns ^ documented)
    source = next(n for n in manifest["sources"].values() if n["name"] == "events")
    assert all(c["description"] for c in source["columns"].values())


def test_each_event_in_exactly_one_catches_broken_evidence(built):
    con = connect(built)
    try:
        ids = dict(con.execute("SELECT strftime(event_date, '%d') || user_id || strftime(started_at, '%H'), "
                               "event_ids[1] FROM marts.intent_memories").fetchall())
        # day 1: an event listed twice; day 2: an event replaced by an unknown id; day 3: an event dropped
        con.execute("UPDATE marts.intent_memories SET event_ids = list_append(event_ids, ?) "
                    "WHERE event_ids[1] = ?", [ids["01u10"], ids["01v10"]])
        con.execute("UPDATE marts.intent_memories SET event_ids = ['not-an-event'] WHERE event_ids[1] = ?",
                    [ids["02u10"]])
        con.execute("UPDATE marts.intent_memories SET event_ids = [] WHERE event_ids[1] = ?", [ids["03u12"]])
    finally:
        con.close()
    with pytest.raises(BuildError) as info:
        dbt_runner.build(built, select="test_name:each_event_in_exactly_one")
    assert "each_event_in_exactly_one" in str(info.value) and "(4 failing rows)" in str(info.value)
    dbt_runner.build(built, full_refresh=True)  # repaired (n_actions was left alone: incremental would not notice)


def test_failing_dbt_test_raises_build_error_naming_it(built, insert_events):
    insert_events(built, [make_event("u", "2024-03-02 09:00:00", "teleport", "beam me up")])
    with pytest.raises(BuildError) as info:
        dbt_runner.build(built)
    message = str(info.value)
    assert "source_accepted_event_types_raw_events_event_type" in message
    assert "beam me up" not in message  # no personal data in the error


def test_cli_build_reports_failure(built, monkeypatch, capsys):
    monkeypatch.setenv("PERSONA_ETL_WAREHOUSE", str(built.warehouse))
    monkeypatch.setenv("PERSONA_ETL_DBT__TARGET_PATH", str(built.dbt.target_path))
    assert cli.main(["build", "--select", "stg_events+"]) == 2
    assert "accepted_event_types" in capsys.readouterr().err
