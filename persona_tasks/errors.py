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
