"""What a gate check is: a named Great Expectations expectation with a severity and its on-call runbook entry.

A check cannot exist without its runbook entry: ``Check`` requires one (``Entry``: what it means, where to look,
what to do, queries), and docs/oncall.md is rendered from the suites (persona_tasks/runbook.py). Expectations are
built per run (``build(settings, run_date)``) so that thresholds come from the settings and the run's interval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # GX is imported only when a gate runs (it is slow to import)
    import pandas as pd
    from great_expectations.expectations import Expectation

    from persona_tasks.config import Settings

Severity = Literal["block", "warn"]
SEVERITIES = ("block", "warn")


@dataclass(frozen=True)
class Entry:
    """An on-call runbook entry (docs/oncall.md)."""

    task: str    # the task that raises it
    means: str   # what failed, in one or two sentences
    look: str    # where to look, in words
    do: str      # what to do
    sql: tuple[str, ...] = ()  # queries to run (DuckDB, ``$d`` = the run date); tests run every one of them

    def __post_init__(self):
        for name in ("task", "means", "look", "do"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"runbook entry without {name!r}")

    def short(self, check: str) -> str:
        """The line an alert carries."""
        return f"{self.do} (runbook: docs/oncall.md#{check})"


@dataclass(frozen=True)
class Check:
    """One check of a gate: ``build`` returns the GX expectation validating ``frame`` (a frame the gate loads)."""

    name: str
    frame: str
    build: Callable[[Settings, date], Expectation]
    severity: Severity
    title: str      # what is checked, in a few words (Data Docs show "<name> (<severity>): <title>")
    runbook: Entry

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"check {self.name}: severity {self.severity!r} is not block or warn")
        if not isinstance(self.runbook, Entry):
            raise TypeError(f"check {self.name} has no runbook entry")


@dataclass(frozen=True)
class Suite:
    """A gate's checks and the frames they validate (``load`` reads them from the warehouse as pandas frames)."""

    gate: str
    # frame name -> the column naming its rows in results (event_id, memory_id, persona_id, ...; None: one row)
    frames: dict[str, str | None]
    checks: tuple[Check, ...]
    load: Callable[..., tuple[dict[str, pd.DataFrame], dict[str, Any]]] = field(repr=False)

    def __post_init__(self):
        names = [c.name for c in self.checks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"suite {self.gate}: duplicate check names {dup}")
        unknown = sorted({c.frame for c in self.checks} - set(self.frames))
        if unknown:
            raise ValueError(f"suite {self.gate}: checks on unknown frames {unknown}")
        for c in self.checks:
            if c.runbook.task != self.gate:
                raise ValueError(f"check {c.name}: runbook task {c.runbook.task} is not {self.gate}")

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)


def metric(column: str, min_value: float | None = None, max_value: float | None = None,
           exempt_when_null: bool = False, **kw: Any) -> Expectation:
    """A bound on a one-row metrics frame's value. A null value fails, unless ``exempt_when_null`` (a day without
    history): then the map expectation skips it (GX ignores nulls) and the check passes as exempt."""
    import great_expectations as gx

    E = gx.expectations
    if exempt_when_null:
        return E.ExpectColumnValuesToBeBetween(column=column, min_value=min_value, max_value=max_value, **kw)
    if min_value is not None and max_value is None:
        return E.ExpectColumnMinToBeBetween(column=column, min_value=min_value, **kw)
    return E.ExpectColumnMaxToBeBetween(column=column, min_value=min_value, max_value=max_value, **kw)
