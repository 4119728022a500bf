"""Day boundaries shared by the stages (induce, the DAG's tasks, privacy terms): a run's data day and its end; and
the per-day scratch folders of a run (``work_dir``, ``run_dir``), used by the DAG, the alerts and training.

Below every stage, so that none needs another stage for them.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from persona_tasks.config import Settings


def as_date(run_date: date | datetime | str) -> date:
    """A date from a date, a datetime or an ISO string (``2026-01-05`` or ``2026-01-05T00:00:00``)."""
    if isinstance(run_date, datetime):
        return run_date.date()
    if isinstance(run_date, date):
        return run_date
    return date.fromisoformat(str(run_date)[:10])


def day_end(run_date: date) -> datetime:
    """Midnight after ``run_date``: memories of a run are those that started before it (induce and the DAG)."""
    return datetime.combine(run_date + timedelta(days=1), datetime.min.time())


def work_dir(settings: Settings) -> Path:
    """The scratch root of the daily runs: ``[orchestration] work_dir`` (relative to the project), default
    ``<warehouse folder>/work``."""
    w = settings.orchestration.work_dir
    if w is None:
        return Path(settings.warehouse).parent / "work"
    return w if w.is_absolute() else settings.project_dir / w


def run_dir(settings: Settings, run_date: date | str) -> Path:
    """``<work_dir>/<run_date>/`` (created)."""
    d = work_dir(settings) / as_date(run_date).isoformat()
    d.mkdir(parents=True, exist_ok=True)
    return d
