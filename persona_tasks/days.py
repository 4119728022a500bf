"""Day boundaries shared by the stages (induce, the DAG's tasks, privacy terms): a run's data day and its end.

Below every stage, so that none needs another stage for them.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta


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
