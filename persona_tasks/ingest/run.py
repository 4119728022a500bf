"""``ingest_files``: the driver behind ``persona-etl ingest`` (see ``common`` for the steps)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import duckdb
import polars as pl

from persona_tasks.config import Settings
from persona_tasks.errors import InputFileError, PersonaEtlError
from persona_tasks.ingest.common import (
    FileResult,
    IngestReport,
    Job,
    Stage,
    batch_id_for,
    drop_temp,
    existing_batch,
    file_sha256,
    validate,
    write_batch,
)
from persona_tasks.warehouse import connect

log = logging.getLogger("persona_tasks.ingest")

FORMATS = ("aol", "movielens", "merrec", "events")


def _loader(settings: Settings, fmt: str):
    if fmt == "aol":
        from persona_tasks.ingest.aol import AolLoader

        return AolLoader()
    if fmt == "movielens":
        from persona_tasks.ingest.movielens import MovieLensLoader

        return MovieLensLoader()
    if fmt == "merrec":
        from persona_tasks.ingest.merrec import MerRecLoader

        return MerRecLoader()
    if fmt == "events":
        from persona_tasks.ingest.events import EventsLoader

        return EventsLoader(settings.ingest.events)
    raise PersonaEtlError(f"unknown ingest format {fmt!r} (expected one of {', '.join(FORMATS)})")


def ingest_files(settings: Settings, fmt: str, paths: list[Path], source: str | None = None) -> IngestReport:
    """Ingest ``paths`` of format ``fmt`` into raw.events / raw.events_rejected / raw.ingest_batches.

    Every file is checked against its format before anything is written (``InputFileError`` otherwise); each
    file is then validated completely and written in its own transaction. A file already ingested (same
    content, format and source) is skipped and reported as such.
    """
    loader = _loader(settings, fmt)
    source = source or fmt
    if not source.strip():
        raise PersonaEtlError("--source must not be empty")
    jobs = loader.plan([Path(p) for p in paths])
    report = IngestReport()
    con = connect(settings)
    try:
        for job in jobs:
            report.files.append(_ingest_one(con, loader, job, settings, fmt, source))
    finally:
        con.close()
    return report


def _ingest_one(con: duckdb.DuckDBPyConnection, loader, job: Job, settings: Settings, fmt: str,
                source: str) -> FileResult:
    t0 = time.perf_counter()
    sha = file_sha256(job.path)
    previous = existing_batch(con, fmt, source, sha)
    if previous:
        log.info("%s: already ingested in batch %s (same content, format %s, source %s): skipped",
                 job.display, previous, fmt, source)
        return FileResult(file=job.display, skipped=True, batch_id=previous)
    batch_id = batch_id_for(fmt, source, sha)
    stage: Stage | None = None
    try:
        try:
            stage = loader.stage(con, job)
            checked = validate(con, stage, settings.ingest.event_types, source)
        except (duckdb.Error, pl.exceptions.PolarsError, UnicodeError) as exc:
            # never echo the exception text: engines quote the offending values (personal data)
            raise InputFileError(job.display, f"could not be read as {fmt} ({type(exc).__name__})") from None
        new, dup = write_batch(
            con, stage, fmt=fmt, source=source, file=str(job.path.resolve()), sha256=sha, batch_id=batch_id,
            checked=checked,
        )
    finally:
        drop_temp(con, stage)
    read, accepted, rejected = checked.rows_read, checked.rows_accepted, checked.rows_rejected
    res = FileResult(
        file=job.display, skipped=False, batch_id=batch_id, rows_read=read, rows_accepted=accepted,
        rows_rejected=rejected, events_new=new, events_duplicate=dup, seconds=time.perf_counter() - t0,
    )
    log.info(
        "%s: rows read %d, accepted %d, rejected %d; events %d new, %d already present; %.2fs (%.0f rows/s)",
        job.display, read, accepted, rejected, new, dup, res.seconds, res.rows_per_s,
    )
    return res
