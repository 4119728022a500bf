"""The one settings object: defaults, TOML file, environment, and the example file kept in sync."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from persona_tasks.config import PROJECT_DIR, Settings

EXAMPLE = PROJECT_DIR / "persona_etl.example.toml"


def test_example_file_lists_the_defaults(monkeypatch):
    monkeypatch.chdir(PROJECT_DIR)
    monkeypatch.setenv("PERSONA_ETL_CONFIG", str(EXAMPLE))
    from_file = Settings()
    monkeypatch.setenv("PERSONA_ETL_CONFIG", str(PROJECT_DIR / "no-such-file.toml"))
    assert from_file.model_dump() == Settings().model_dump()


def test_file_then_environment_override(tmp_path, monkeypatch):
    cfg = tmp_path / "p.toml"
    cfg.write_text('session_gap_minutes = 45\nwarehouse = "w/file.duckdb"\n[embedding]\nbatch_size = 8\n')
    monkeypatch.setenv("PERSONA_ETL_CONFIG", str(cfg))
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.session_gap_minutes == 45 and s.embedding.batch_size == 8
    assert s.warehouse == tmp_path / "w" / "file.duckdb"
    monkeypatch.setenv("PERSONA_ETL_WAREHOUSE", str(tmp_path / "env.duckdb"))
    monkeypatch.setenv("PERSONA_ETL_EMBEDDING__BATCH_SIZE", "16")
    s = Settings()
    assert s.warehouse == tmp_path / "env.duckdb" and s.embedding.batch_size == 16
    assert s.session_gap_minutes == 45  # untouched keys still come from the file


def test_invalid_values_fail_with_the_field_name(monkeypatch):
    monkeypatch.setenv("PERSONA_ETL_SESSION_GAP_MINUTES", "0")
    with pytest.raises(ValidationError, match="session_gap_minutes"):
        Settings()


def test_default_warehouse_is_under_the_project(monkeypatch):
    monkeypatch.delenv("PERSONA_ETL_WAREHOUSE", raising=False)
    monkeypatch.setenv("PERSONA_ETL_CONFIG", str(Path("/nonexistent.toml")))
    assert Settings().warehouse == PROJECT_DIR / "warehouse" / "warehouse.duckdb"


def test_a_warehouse_file_named_like_a_schema_is_refused(monkeypatch, tmp_path):
    """personas.duckdb would make personas.personas ambiguous in DuckDB (catalog or schema): refuse it early."""
    monkeypatch.setenv("PERSONA_ETL_WAREHOUSE", str(tmp_path / "personas.duckdb"))
    with pytest.raises(ValidationError, match="personas.duckdb.*schema"):
        Settings()
    import duckdb  # the failure the check prevents, on a real DuckDB file

    con = duckdb.connect(str(tmp_path / "personas.duckdb"))
    con.execute("CREATE SCHEMA personas")
    with pytest.raises(duckdb.BinderException, match="Ambiguous"):
        con.execute("CREATE TABLE personas.t (x INT)")
    con.close()
