"""Shared fixtures: throwaway warehouses for the dbt tests (tests/test_dbt_*.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from persona_tasks.config import DbtSettings, Settings


def make_event(user_id: str, ts: str | datetime, event_type: str, text: str | None = None,
               item_id: str | None = None, attributes: dict[str, Any] | None = None, source: str = "test",
               batch_id: str = "b1", ingested_at: str = "2030-01-01 00:00:00") -> tuple:
    """One raw.events row, with the contract's content-hash event_id."""
    ts = datetime.fromisoformat(ts) if isinstance(ts, str) else ts
    key = "\x1f".join([source, user_id, ts.isoformat(), event_type, item_id or "", text or ""])
    return (hashlib.md5(key.encode()).hexdigest(), user_id, ts, event_type, item_id, text,
            json.dumps(attributes) if attributes is not None else None, source, batch_id,
            datetime.fromisoformat(ingested_at))


@pytest.fixture(scope="module")
def warehouse_settings(tmp_path_factory) -> Callable[..., Settings]:
    """Factory: Settings for a new warehouse in a temporary folder (dbt's target and logs go there too)."""

    def make(name: str = "wh", **overrides: Any) -> Settings:
        root: Path = tmp_path_factory.mktemp(name)
        return Settings(warehouse=root / "warehouse.duckdb", dbt=DbtSettings(target_path=root / "target"),
                        **overrides)

    return make


@pytest.fixture(scope="module")
def insert_events() -> Callable[[Settings, Iterable[tuple]], None]:
    """Insert make_event() rows into raw.events of a warehouse (creating it), then close the connection."""
    from persona_tasks.warehouse import connect

    def insert(settings: Settings, rows: Iterable[tuple]) -> None:
        con = connect(settings)
        try:
            con.executemany("INSERT INTO raw.events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", list(rows))
        finally:
            con.close()

    return insert
