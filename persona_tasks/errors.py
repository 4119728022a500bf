"""Errors that reach users. Each message names what failed (file, row, field) without echoing personal data."""

from __future__ import annotations


class PersonaEtlError(Exception):
    """Base: an expected failure, printed as one clear line by the CLI (exit status 2)."""


class InputFileError(PersonaEtlError):
    """A file is not of its declared format (missing columns, truncated gzip, empty, unreadable)."""

    def __init__(self, file: object, problem: str):
        self.file = str(file)
        self.problem = problem
        super().__init__(f"{self.file}: {problem}")


class BuildError(PersonaEtlError):
    """The dbt build (or one of its tests) failed."""


class GateError(PersonaEtlError):
    """A data-quality gate failed. ``check`` names the failing check, or several blocking checks joined by ", "
    (stored in ops_alerts.failing_check); ``checks`` lists them; ``docs_url`` is the Data Docs page of the
    validation when the gate ran its suites (persona_tasks.gates)."""

    def __init__(self, check: str, message: str, checks: list[str] | None = None, docs_url: str | None = None):
        self.check = check
        self.checks = list(checks) if checks else [c.strip() for c in check.split(",")]
        self.docs_url = docs_url
        prefix = f"gate check {check} failed" if len(self.checks) == 1 else f"gate checks {check} failed"
        super().__init__(f"{prefix}: {message}")
