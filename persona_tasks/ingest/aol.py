"""Loader for the original AOL query-log layout (``--format aol``).

Input: tab-separated text, plain or gzip (detected from the content, not the name), header
``AnonID  Query  QueryTime  ItemRank  ClickURL``, one row per clicked result; a row with empty ItemRank and
ClickURL is a query without a click. There is no quoting (queries hold quotes), so each physical line is one
record, split on tabs in DuckDB; a line with another number of fields is rejected with its line number.

Mapping, per accepted row:

* ``search`` event: user_id = AnonID, event_ts = QueryTime (``YYYY-MM-DD HH:MM:SS``, taken as UTC),
  text = the query (trimmed), no item. Rows repeating the same (AnonID, QueryTime, Query) - one per clicked
  result - are **one** search.
* ``click`` event, when ClickURL is set: same user and time, item_id = the ClickURL, text = the clicked site's
  domain (lower case, without ``www.``), attributes ``{"url": ..., "rank": ItemRank or null}``.

Rejected rows (field, reason): a line without 5 fields (line), invalid UTF-8 (the field holding it), missing
AnonID, missing or unparseable QueryTime, missing Query, non-integer ItemRank.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from persona_tasks.ingest.common import (
    Job,
    Stage,
    check_header,
    delimited_sql,
    expand,
    header_fields,
    probe_text,
    read_text,
    register_lines,
)

COLUMNS = ["AnonID", "Query", "QueryTime", "ItemRank", "ClickURL"]
SUFFIXES = (".txt", ".txt.gz", ".tsv", ".tsv.gz", ".gz")
WHAT = "AOL query-log"

EVENTS_SQL = """
    SELECT min(line) AS line, user_id, event_ts, 'search' AS event_type, CAST(NULL AS VARCHAR) AS item_id, text,
           CAST(NULL AS JSON) AS attributes
    FROM _ingest_accepted
    GROUP BY user_id, event_ts, text
    UNION ALL
    SELECT line, user_id, event_ts, 'click' AS event_type, url AS item_id,
           coalesce(nullif(regexp_replace(
               regexp_extract(lower(url), '^(?:[a-z][a-z0-9+.-]*://)?([^/:?#]*)', 1), '^www\\.', ''), ''), url)
               AS text,
           json_object('url', url, 'rank', item_rank) AS attributes
    FROM _ingest_accepted
    WHERE url IS NOT NULL
"""


class AolLoader:
    fmt = "aol"

    def plan(self, paths: list[Path]) -> list[Job]:
        jobs = expand(paths, SUFFIXES, WHAT)
        for job in jobs:
            first = probe_text(job.path, job.display)
            check_header(job.display, header_fields(first, "\t"), COLUMNS, WHAT)
        return jobs

    def stage(self, con: duckdb.DuckDBPyConnection, job: Job) -> Stage:
        text = read_text(job.path, job.display)
        register_lines(con, "_ingest_lines", text)
        del text
        fields = delimited_sql("_ingest_lines", COLUMNS, "\t")
        sql = f"""
            SELECT line, src, pre_field, pre_reason,
                nullif(trim(c1), '') AS user_id,
                nullif(trim(c3), '') AS ts_raw,
                try_strptime(trim(c3), '%Y-%m-%d %H:%M:%S') AS event_ts,
                'search' AS event_type,
                CAST(NULL AS VARCHAR) AS item_id,
                nullif(trim(c2), '') AS text,
                CAST(NULL AS JSON) AS attributes,
                CASE WHEN nullif(trim(c2), '') IS NULL THEN 'Query'
                     WHEN nullif(trim(c4), '') IS NOT NULL AND try_cast(trim(c4) AS INTEGER) IS NULL
                     THEN 'ItemRank' END AS post_field,
                CASE WHEN nullif(trim(c2), '') IS NULL THEN 'missing query'
                     WHEN nullif(trim(c4), '') IS NOT NULL AND try_cast(trim(c4) AS INTEGER) IS NULL
                     THEN 'ItemRank is not an integer' END AS post_reason,
                try_cast(trim(c4) AS INTEGER) AS item_rank,
                nullif(trim(c5), '') AS url
            FROM ({fields})
        """
        return Stage(
            sql=sql,
            fields={"user_id": "AnonID", "event_ts": "QueryTime", "event_type": "Query"},
            extra=("item_rank", "url"),
            events_sql=EVENTS_SQL,
            one_event_per_row=False,
            registered=["_ingest_lines"],
        )
