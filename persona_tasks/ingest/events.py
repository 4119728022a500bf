"""Loader for generic event files (``--format events``) with the column mapping of ``[ingest.events]``.

Inputs, by file name: ``.parquet`` (scanned by DuckDB, line = 1-based row number), ``.csv`` / ``.csv.gz``
(header line, RFC-4180 quoting within a line, line = physical line), ``.jsonl`` / ``.ndjson`` (+ ``.gz``; one
JSON object per line). A folder stands for the files of those kinds in it.

``EventsMapping`` (persona_tasks.config) names the columns: ``user_id``, ``event_ts``, ``event_type``,
optional ``item_id`` and ``text`` (None = not in the files), ``attributes`` (columns copied into the JSON
attributes: typed for Parquet and JSON, text for CSV with empty = null), ``ts_format`` (None = ISO-8601, an
offset or ``Z`` is honoured and no offset means UTC; ``epoch_s`` / ``epoch_ms``; or a strptime format; typed
Parquet timestamps and dates are used as they are, TIMESTAMPTZ converted to UTC) and ``event_type_map``
(source type -> contract type; other types are trimmed and lower-cased, and must be one of
``ingest.event_types``).

A CSV or Parquet file without a mapped column is not of the format (``InputFileError``); so is a JSONL file in
which no record has a value for user_id, event_ts or event_type (a single record without one is rejected).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from persona_tasks.config import EventsMapping
from persona_tasks.errors import InputFileError, PersonaEtlError
from persona_tasks.ingest.common import (
    expand,
    REPLACEMENT_CHAR,
    Job,
    Stage,
    check_strptime_format,
    delimited_sql,
    header_fields,
    json_path,
    nn,
    parquet_columns,
    parquet_scan,
    parquet_src,
    probe_text,
    q,
    qi,
    read_text,
    register_lines,
    require_columns,
    string_ts_sql,
    typed_ts_sql,
)

KINDS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".ndjson": "jsonl",
    ".ndjson.gz": "jsonl",
}
WHAT = "events"


def kind_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(KINDS, key=len, reverse=True):
        if name.endswith(suffix):
            return KINDS[suffix]
    return None


def map_event_type(expr: str, mapping: dict[str, str]) -> str:
    """SQL: the trimmed source event type renamed by ``mapping``, else lower-cased."""
    et = nn(expr)
    if not mapping:
        return f"lower({et})"
    whens = " ".join(f"WHEN {q(k)} THEN {q(v)}" for k, v in mapping.items())
    return f"CASE {et} {whens} ELSE lower({et}) END"


class EventsLoader:
    fmt = "events"

    def __init__(self, mapping: EventsMapping) -> None:
        problem = check_strptime_format(mapping.ts_format)
        if problem:
            raise PersonaEtlError(f"[ingest.events] {problem}")
        self.m = mapping

    @property
    def required(self) -> list[str]:
        m = self.m
        cols = [m.user_id, m.event_ts, m.event_type]
        cols += [c for c in (m.item_id, m.text) if c]
        return list(dict.fromkeys(cols + list(m.attributes)))

    def plan(self, paths: list[Path]) -> list[Job]:
        jobs = expand(paths, tuple(KINDS), "events (.parquet, .csv, .jsonl, .ndjson)")
        for job in jobs:
            job.kind = kind_of(job.path) or ""
            if not job.kind:
                raise InputFileError(
                    job.display, "unsupported file type for --format events (expected .parquet, .csv, .csv.gz, "
                    ".jsonl, .ndjson, optionally .gz)"
                )
            if job.kind == "parquet":
                job.context["columns"] = cols = parquet_columns(job.path, job.display)
                require_columns(job.display, cols, self.required, "mapped events")
            elif job.kind == "csv":
                header = header_fields(probe_text(job.path, job.display), ",")
                require_columns(job.display, header, self.required, "mapped events CSV")
                job.context["columns"] = header
            else:
                probe_text(job.path, job.display)
        return jobs

    # ------------------------------------------------------------------------------------------ stage

    def _contract(self, get, ts_sql: str, attr_get) -> str:
        """SELECT list of the contract columns, given accessor functions for the source columns."""
        m = self.m
        item = nn(get(m.item_id)) if m.item_id else "CAST(NULL AS VARCHAR)"
        text = nn(get(m.text)) if m.text else "CAST(NULL AS VARCHAR)"
        if m.attributes:
            attrs = "json_object(" + ", ".join(f"{q(a)}, {attr_get(a)}" for a in m.attributes) + ")"
        else:
            attrs = "CAST(NULL AS JSON)"
        return f"""
            {nn(get(m.user_id))} AS user_id,
            {nn(get(m.event_ts))} AS ts_raw,
            {ts_sql} AS event_ts,
            {map_event_type(get(m.event_type), m.event_type_map)} AS event_type,
            {item} AS item_id,
            {text} AS text,
            CAST({attrs} AS JSON) AS attributes,
            CAST(NULL AS VARCHAR) AS post_field,
            CAST(NULL AS VARCHAR) AS post_reason
        """

    def stage(self, con: duckdb.DuckDBPyConnection, job: Job) -> Stage:
        fields = {"user_id": self.m.user_id, "event_ts": self.m.event_ts, "event_type": self.m.event_type}
        if job.kind == "parquet":
            return self._stage_parquet(job, fields)
        register_lines(con, "_ingest_lines", read_text(job.path, job.display))
        if job.kind == "csv":
            return self._stage_csv(job, fields)
        return self._stage_jsonl(con, job, fields)

    def _stage_parquet(self, job: Job, fields: dict[str, str]) -> Stage:
        cols: dict[str, str] = job.context["columns"]

        def get(c: str) -> str:
            return f"t.{qi(c)}"

        ts = typed_ts_sql(get(self.m.event_ts), cols[self.m.event_ts], self.m.ts_format)
        sql = f"""
            SELECT file_row_number + 1 AS line, {parquet_src(cols)} AS src,
                   CAST(NULL AS VARCHAR) AS pre_field, CAST(NULL AS VARCHAR) AS pre_reason,
                   {self._contract(get, ts, get)}
            FROM {parquet_scan(job.path)}
        """
        return Stage(sql=sql, fields=fields, raw_record="to_json(src)", materialize=False)

    def _stage_csv(self, job: Job, fields: dict[str, str]) -> Stage:
        header: list[str] = job.context["columns"]
        index = {}
        for i, c in enumerate(header):
            index.setdefault(c, f"c{i + 1}")

        def get(c: str) -> str:
            return index[c]

        def attr(c: str) -> str:
            return f"nullif({index[c]}, '')"

        parsed = delimited_sql("_ingest_lines", header, ",")
        ts = string_ts_sql(get(self.m.event_ts), self.m.ts_format)
        sql = f"SELECT line, src, pre_field, pre_reason, {self._contract(get, ts, attr)} FROM ({parsed})"
        return Stage(sql=sql, fields=fields, registered=["_ingest_lines"])

    def _stage_jsonl(self, con: duckdb.DuckDBPyConnection, job: Job, fields: dict[str, str]) -> Stage:
        keys = self.required
        pos = {k: i + 1 for i, k in enumerate(keys)}
        paths = "[" + ", ".join(json_path(k) for k in keys) + "]"
        parsed = f"""
            SELECT line, raw AS src, j,
                   CASE WHEN j IS NOT NULL THEN json_extract_string(j, {paths}) END AS v,
                   CASE WHEN j IS NOT NULL THEN json_extract(j, {paths}) END AS vj,
                   CASE WHEN contains(raw, chr({ord(REPLACEMENT_CHAR)})) THEN 'invalid UTF-8'
                        WHEN j IS NULL THEN 'not a JSON object' END AS pre_reason
            FROM (SELECT line, raw,
                         CASE WHEN json_valid(raw) AND json_type(CASE WHEN json_valid(raw) THEN raw END) = 'OBJECT'
                              THEN raw END AS j
                  FROM _ingest_lines)
        """
        m = self.m
        core = [m.user_id, m.event_ts, m.event_type]
        present = con.execute(
            "SELECT count(*) FILTER (WHERE j IS NOT NULL), "
            + ", ".join(f"count(v[{pos[c]}])" for c in core)
            + f" FROM ({parsed})"
        ).fetchall()[0]
        if present[0] > 0:
            absent = [c for c, n in zip(core, present[1:]) if n == 0]
            if absent:
                raise InputFileError(job.display, f"not a mapped events JSONL file: no record has {', '.join(absent)}")

        def get(c: str) -> str:
            return f"v[{pos[c]}]"

        def attr(c: str) -> str:
            return f"vj[{pos[c]}]"

        ts = string_ts_sql(get(m.event_ts), m.ts_format)
        sql = f"""
            SELECT line, src, CASE WHEN pre_reason IS NOT NULL THEN 'line' END AS pre_field, pre_reason,
                   {self._contract(get, ts, attr)}
            FROM ({parsed})
        """
        return Stage(sql=sql, fields=fields, registered=["_ingest_lines"])
