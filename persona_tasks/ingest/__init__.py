"""Raw-event loaders of ``persona-etl ingest``: AOL query logs, MovieLens, Mercari MerRec, generic events.

``ingest_files(settings, fmt, paths, source=None) -> IngestReport`` loads files into ``raw.events`` (rows that
break the contract go to ``raw.events_rejected`` with file, line, field and reason; one ledger row per file in
``raw.ingest_batches``). See ``common`` for the steps and guarantees, and each format module for its mapping.
"""

from persona_tasks.ingest.common import FileResult, IngestReport, Totals, compute_event_id
from persona_tasks.ingest.run import FORMATS, ingest_files

__all__ = ["FORMATS", "FileResult", "IngestReport", "Totals", "compute_event_id", "ingest_files"]
