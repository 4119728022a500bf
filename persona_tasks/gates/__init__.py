"""The data-quality gates of the daily run, as Great Expectations suites (GX Core 1.x, defined in code).

One module per gate's suite (``raw``, ``memories``, ``personas``: checks, thresholds from the settings, the frames
they validate), the shared runner (``runner``: validate the whole suite, record, alert, raise), the results table
(``results``: quality_check_results), audited overrides (``overrides``) and the Data Docs site (``site``).
The DAG, ``persona-etl`` and ``make demo`` call the three gate functions below (through persona_tasks.daily).
"""

from __future__ import annotations

from datetime import date

from persona_tasks.config import Settings
from persona_tasks.errors import GateError
from persona_tasks.gates import memories, personas, raw
from persona_tasks.gates.runner import RunInfo, run_suite
from persona_tasks.gates.suites import SUITES, suite

__all__ = ["GateError", "RunInfo", "SUITES", "gate_memories", "gate_personas", "gate_raw", "suite"]


def gate_raw(settings: Settings, run_date: date | str, ingested: dict, run: RunInfo | None = None) -> dict:
    """The day's batches reconcile with the ledger; rejected and duplicate shares, volume, events' fields, types,
    times and the raw schema (persona_tasks/gates/raw.py). Raises GateError naming every failing blocking check."""
    return run_suite(settings, raw.SUITE, run_date, ingested, run)


def gate_memories(settings: Settings, run_date: date | str, built: dict, run: RunInfo | None = None) -> dict:
    """dbt tests passed; the day's actions reconcile with its memories; memory texts and counts within bounds
    (persona_tasks/gates/memories.py)."""
    return run_suite(settings, memories.SUITE, run_date, built, run)


def gate_personas(settings: Settings, run_date: date | str, run: RunInfo | None = None) -> dict:
    """Floors and shape of the staged run, no PII, scores in range, unique labels, LLM fallbacks, drift against the
    last published run (persona_tasks/gates/personas.py)."""
    return run_suite(settings, personas.SUITE, run_date, None, run)
