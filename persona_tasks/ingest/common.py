"""Shared machinery of the raw-event loaders: reading files, the one validation step, the transactional write.

How a file is ingested (``persona_tasks.ingest.run.ingest_files`` drives it):

1. *plan*: every path is checked before anything is written (exists, not empty, gzip intact, header or Parquet
   schema of the declared format). A file that is not of its format raises ``InputFileError`` naming the file and
   the problem, never its content.
2. *skip*: a file whose sha256 (with format and source) is already in ``raw.ingest_batches`` adds nothing.
3. *stage*: the format module turns the whole file into one SQL relation, one row per source row, with the
   columns of :data:`STAGE_COLUMNS` (text files are read as lines with polars, split and parsed in DuckDB;
   Parquet is scanned by DuckDB). No Python loop ever touches a row.
4. *validate* (:func:`validate`, shared by every format): one SQL ``CASE`` gives each row its ``field`` and
   ``reason`` or accepts it, in one pass over the whole file before any write (parsed text is kept in a temp
   table; Parquet is scanned again by the write rather than held in memory).
5. *write* (:func:`write_batch`), in one transaction: events (``event_id`` computed in SQL, anti-joined on
   ``raw.events`` and de-duplicated within the file), rejected rows, the ledger row. A failure writes nothing.

Counts are in source rows (``rows_read = rows_accepted + rows_rejected``); ``events_new`` and
``events_duplicate`` count events (an AOL row can give a search and a click).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import polars as pl

from persona_tasks.errors import InputFileError

log = logging.getLogger("persona_tasks.ingest")

UNIT_SEP = "\x1f"
REPLACEMENT_CHAR = "\ufffd"
GZIP_MAGIC = b"\x1f\x8b"
# accepted event timestamps: [TS_MIN, TS_MAX); outside is "timestamp out of range" (catches ms read as s)
TS_MIN = "1970-01-01 00:00:00"
TS_MAX = "2100-01-01 00:00:00"

# Columns every staged relation provides (plus format-specific extras):
#   line          BIGINT   1-based physical line (text) or row number (Parquet)
#   src           any      the source record (raw line, or a struct of the Parquet row); rendered by
#                          Stage.raw_record for rejected rows only
#   pre_field, pre_reason  structural problem found while reading (ragged line, invalid UTF-8, invalid JSON)
#   user_id, ts_raw, event_ts, event_type, item_id, text, attributes   the contract columns
#   post_field, post_reason  format-specific problem checked after the contract (bad rating, missing query)
STAGE_COLUMNS = (
    "line", "src", "pre_field", "pre_reason", "user_id", "ts_raw", "event_ts", "event_type", "item_id", "text",
    "attributes", "post_field", "post_reason",
)
EVENT_COLUMNS = ("line", "user_id", "event_ts", "event_type", "item_id", "text", "attributes")
DEFAULT_EVENTS_SQL = "SELECT line, user_id, event_ts, event_type, item_id, text, attributes FROM _ingest_accepted"


# ----------------------------------------------------------------------------------------------- results


@dataclass
class FileResult:
    """What one input file added (``skipped``: its content was ingested before, in ``batch_id``)."""

    file: str
    skipped: bool
    batch_id: str
    rows_read: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    events_new: int = 0
    events_duplicate: int = 0
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows_read / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Totals:
    rows_read: int
    rows_accepted: int
    rows_rejected: int
    events_new: int
    events_duplicate: int


@dataclass
class IngestReport:
    files: list[FileResult] = field(default_factory=list)

    def totals(self) -> Totals:
        fs = self.files
        return Totals(
            rows_read=sum(f.rows_read for f in fs),
            rows_accepted=sum(f.rows_accepted for f in fs),
            rows_rejected=sum(f.rows_rejected for f in fs),
            events_new=sum(f.events_new for f in fs),
            events_duplicate=sum(f.events_duplicate for f in fs),
        )


@dataclass
class Job:
    """One file to ingest: ``display`` is the path as the user named it (messages), ``path`` the file read."""

    path: Path
    display: str
    kind: str = ""
    context: dict = field(default_factory=dict)


@dataclass
class Stage:
    """A staged file: ``sql`` selects :data:`STAGE_COLUMNS` + ``extra`` (one row per source row).

    ``fields`` maps contract columns (user_id, event_ts, event_type) to the source field names used in
    rejection reasons; ``raw_record`` is a SQL expression over ``src`` giving the raw record kept for a rejected
    row; ``events_sql`` selects :data:`EVENT_COLUMNS` from ``_ingest_accepted`` (the accepted rows).
    """

    sql: str
    fields: dict[str, str]
    raw_record: str = "src"
    extra: tuple[str, ...] = ()
    events_sql: str = DEFAULT_EVENTS_SQL
    one_event_per_row: bool = True
    materialize: bool = True
    registered: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Checked:
    """Outcome of :func:`validate`: source rows read / accepted / rejected, events in the accepted rows and how
    many of them are distinct (by a 64-bit content hash: equal counts prove there is no repeat)."""

    rows_read: int
    rows_accepted: int
    rows_rejected: int
    n_events: int
    n_distinct: int
    ts_min: datetime | None = None
    ts_max: datetime | None = None


# ----------------------------------------------------------------------------------------------- event id


def iso_ts(ts: datetime) -> str:
    """The ISO form used in event ids: ``datetime.isoformat()`` of the naive UTC timestamp."""
    return ts.replace(tzinfo=None).isoformat()


def compute_event_id(
    source: str, user_id: str, event_ts: datetime, event_type: str, item_id: str | None, text: str | None
) -> str:
    """Reference (pure Python) implementation of ``event_id``; :func:`event_id_sql` computes the same in SQL.

    md5 hex of source, user_id, ISO event_ts, event_type, item_id, text joined by U+001F (a missing item_id or
    text is the empty string).
    """
    parts = [source, user_id, iso_ts(event_ts), event_type, item_id or "", text or ""]
    return hashlib.md5(UNIT_SEP.join(parts).encode("utf-8")).hexdigest()


def iso_sql(expr: str) -> str:
    return (
        f"CASE WHEN epoch_us({expr}) % 1000000 = 0 THEN strftime({expr}, '%Y-%m-%dT%H:%M:%S') "
        f"ELSE strftime({expr}, '%Y-%m-%dT%H:%M:%S.%f') END"
    )


def event_key_sql(source: str) -> str:
    """The string hashed into ``event_id`` (over columns user_id, event_ts, event_type, item_id, text)."""
    return (
        f"concat_ws(chr(31), {q(source)}, user_id, {iso_sql('event_ts')}, event_type, "
        f"coalesce(item_id, ''), coalesce(text, ''))"
    )


def event_id_sql(source: str) -> str:
    return f"md5({event_key_sql(source)})"


def event_hash_sql(source: str) -> str:
    """A cheap 64-bit hash of the event key: equal keys (hence equal event ids) give equal hashes."""
    return f"hash({event_key_sql(source)})"


# ----------------------------------------------------------------------------------------------- SQL helpers


def q(s: str) -> str:
    """A SQL string literal."""
    return "'" + str(s).replace("'", "''") + "'"


def qi(s: str) -> str:
    """A SQL identifier."""
    return '"' + str(s).replace('"', '""') + '"'


def nn(expr: str) -> str:
    """Trimmed VARCHAR, NULL when empty."""
    return f"nullif(trim(CAST({expr} AS VARCHAR)), '')"


def json_path(key: str) -> str:
    return q('$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"')


INTEGER_TYPES = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
                 "UBIGINT", "UHUGEINT"}
FLOAT_TYPES = {"FLOAT", "DOUBLE", "REAL"}


def epoch_sql(num_expr: str, unit: str) -> str:
    """Epoch seconds (or milliseconds, ``unit='epoch_ms'``), any numeric expression -> naive UTC TIMESTAMP.

    NULL or NaN -> NULL (unparseable); beyond what a TIMESTAMP holds -> +/-infinity (then out of range).
    """
    div = "1000.0" if unit == "epoch_ms" else "1.0"
    x = f"(CAST({num_expr} AS DOUBLE) / {div})"
    return (
        f"CASE WHEN isnan({x}) THEN NULL WHEN {x} > 9e12 THEN CAST('infinity' AS TIMESTAMP) "
        f"WHEN {x} < -9e12 THEN CAST('-infinity' AS TIMESTAMP) "
        f"ELSE make_timestamp(CAST(round({x} * 1000000) AS BIGINT)) END"
    )


def string_ts_sql(expr: str, ts_format: str | None) -> str:
    """A text timestamp -> naive UTC TIMESTAMP (NULL when it does not parse)."""
    s = f"trim(CAST({expr} AS VARCHAR))"
    if ts_format in ("epoch_s", "epoch_ms"):
        return epoch_sql(f"try_cast({s} AS DOUBLE)", ts_format)
    if ts_format:
        return f"(CAST(try_strptime({s}, {q(ts_format)}) AS TIMESTAMPTZ) AT TIME ZONE 'UTC')"
    # ISO-8601; an offset or Z is honoured, no offset means UTC (the session time zone)
    return f"(try_cast({s} AS TIMESTAMPTZ) AT TIME ZONE 'UTC')"


def typed_ts_sql(expr: str, duck_type: str, ts_format: str | None) -> str:
    """A column of a typed source (Parquet) -> naive UTC TIMESTAMP, whatever its type."""
    t = duck_type.upper()
    if t in ("TIMESTAMPTZ", "TIMESTAMP WITH TIME ZONE"):
        return f"({expr} AT TIME ZONE 'UTC')"
    if t.startswith("TIMESTAMP") or t == "DATE":
        return f"CAST({expr} AS TIMESTAMP)"
    numeric = t in INTEGER_TYPES or t in FLOAT_TYPES or t.startswith("DECIMAL")
    if numeric and ts_format not in (None, "epoch_s", "epoch_ms"):
        return string_ts_sql(expr, ts_format)  # e.g. 20240101 with '%Y%m%d'
    if numeric:
        return epoch_sql(expr, ts_format or "epoch_s")
    return string_ts_sql(expr, ts_format)


def check_strptime_format(ts_format: str | None) -> str | None:
    """None when ``ts_format`` is usable, else the problem."""
    if ts_format in (None, "epoch_s", "epoch_ms"):
        return None
    try:
        duckdb.connect().execute("SELECT try_strptime('2000-01-01', ?)", [ts_format]).fetchall()
    except duckdb.Error:
        return f"ts_format {ts_format!r} is not a valid strptime format (or epoch_s / epoch_ms)"
    return None


# ----------------------------------------------------------------------------------------------- files


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def require_file(path: Path, display: str | None = None) -> None:
    display = display or str(path)
    if not path.exists():
        raise InputFileError(display, "no such file or folder")
    if not path.is_file():
        raise InputFileError(display, "not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError as exc:
        raise InputFileError(display, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not head:
        raise InputFileError(display, "empty file")


def expand(paths: list[Path], suffixes: tuple[str, ...], what: str) -> list[Job]:
    """Files named by the user; a folder stands for its files with one of ``suffixes`` (sorted)."""
    jobs: list[Job] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(suffixes))
            if not found:
                raise InputFileError(p, f"folder holds no {what} files ({', '.join(suffixes)})")
            jobs += [Job(path=f, display=str(f)) for f in found]
        else:
            jobs.append(Job(path=p, display=str(p)))
    return jobs


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _decode(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return text[1:] if text.startswith("\ufeff") else text


def probe_text(path: Path, display: str) -> str:
    """Check a text file (plain or gzip) end to end without keeping it; return its first line (decoded).

    Raises ``InputFileError`` for a missing, unreadable or empty file and a truncated or corrupt gzip stream.
    """
    require_file(path, display)
    try:
        if is_gzip(path):
            with gzip.open(path, "rb") as f:
                first = f.readline(1 << 20)
                while f.read(1 << 22):  # decompress to the end: a truncated stream fails here, not mid-ingest
                    pass
            if not first:
                raise InputFileError(display, "empty file (gzip holds no data)")
        else:
            with open(path, "rb") as f:
                first = f.readline(1 << 20)
    except EOFError:
        raise InputFileError(display, "truncated gzip file (the compressed stream ends early)") from None
    except (gzip.BadGzipFile, zlib.error):
        raise InputFileError(display, "corrupt gzip data") from None
    except OSError as exc:
        raise InputFileError(display, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    return _decode(first).rstrip("\r\n")


def read_text(path: Path, display: str) -> str:
    """The whole file (gunzipped if it is gzip), decoded as UTF-8 with invalid bytes replaced by U+FFFD."""
    try:
        data = path.read_bytes()
        if data[:2] == GZIP_MAGIC:
            data = gzip.decompress(data)
    except EOFError:
        raise InputFileError(display, "truncated gzip file (the compressed stream ends early)") from None
    except (gzip.BadGzipFile, zlib.error):
        raise InputFileError(display, "corrupt gzip data") from None
    except OSError as exc:
        raise InputFileError(display, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not data:
        raise InputFileError(display, "empty file")
    return _decode(data)


def text_lines(text: str) -> pl.DataFrame:
    """Physical lines of ``text`` as (line BIGINT 1-based, raw VARCHAR); empty lines are dropped (not rows)."""
    return (
        pl.DataFrame({"raw": [text]})
        .select(pl.col("raw").str.split("\n"))
        .explode("raw")
        .with_row_index("line", offset=1)
        .with_columns(pl.col("line").cast(pl.Int64), pl.col("raw").str.strip_suffix("\r"))
        .filter(pl.col("raw").is_not_null() & (pl.col("raw") != ""))
    )


def header_fields(first_line: str, delimiter: str) -> list[str]:
    """Column names of a header line (CSV quoting honoured), stripped."""
    if delimiter == "\t":
        return [c.strip() for c in first_line.split("\t")]
    try:
        row = next(csv.reader([first_line]), [])
    except csv.Error:
        row = first_line.split(delimiter)
    return [c.strip() for c in row]


def check_header(display: str, found: list[str], expected: list[str], what: str) -> None:
    """``found`` must be ``expected`` (case-insensitive, same order); the message lists only expected names."""
    low = [c.lower() for c in found]
    exp = [c.lower() for c in expected]
    if low == exp:
        return
    missing = [c for c, e in zip(expected, exp) if e not in low]
    if missing:
        raise InputFileError(
            display,
            f"not a valid {what} file: header lacks column(s) {', '.join(missing)} "
            f"(expected a first line with {', '.join(expected)})",
        )
    raise InputFileError(
        display, f"not a valid {what} file: header columns must be {', '.join(expected)} in this order"
    )


# ------------------------------------------------------------------------------- delimited text -> fields

CSV_FIELD = '("(?:[^"]|"")*"|[^,"]*)'


def _unquote(expr: str) -> str:
    return f"""CASE WHEN starts_with({expr}, '"') THEN replace({expr}[2:-2], '""', '"') ELSE {expr} END"""


def delimited_sql(relation: str, columns: list[str], delimiter: str, first_line: int = 2) -> str:
    """Split each line of ``relation`` (line, raw) into ``columns`` -> line, src, pre_field, pre_reason, c1..cN.

    Tab: a plain split (no quoting, as in the AOL log). Comma: RFC-4180 quoting within one line. A line with
    the wrong number of fields gets ``pre_reason``; so does a line holding U+FFFD (invalid UTF-8 in the file),
    with ``pre_field`` naming the first field that holds it.
    """
    n = len(columns)
    cs = [f"c{i + 1}" for i in range(n)]
    if delimiter == "\t":
        inner = (
            f"SELECT line, raw, string_split(raw, chr(9)) AS f FROM {relation} WHERE line >= {first_line}"
        )
        ok = f"len(f) = {n}"
        col = {c: f"CASE WHEN {ok} THEN f[{i + 1}] END" for i, c in enumerate(cs)}
        bad_shape = f"'expected {n} tab-separated fields, found ' || len(f)"
    elif delimiter == ",":
        pattern = "^(" + ",".join([CSV_FIELD] * n) + ")$"
        names = ", ".join(q(x) for x in ["all", *cs])
        inner = (
            f"SELECT line, raw, regexp_extract(raw, {q(pattern)}, [{names}]) AS f "
            f"FROM {relation} WHERE line >= {first_line}"
        )
        ok = "f['all'] <> ''"
        col = {c: f"CASE WHEN {ok} THEN {_unquote(f'f[{q(c)}]')} END" for c in cs}
        bad_shape = q(f"malformed CSV line (expected {n} comma-separated fields)")
    else:  # pragma: no cover - programming error
        raise ValueError(delimiter)
    fffd = f"chr({ord(REPLACEMENT_CHAR)})"
    which = " ".join(f"WHEN contains({col[c]}, {fffd}) THEN {q(name)}" for c, name in zip(cs, columns))
    return f"""
        SELECT line, raw AS src,
            CASE WHEN contains(raw, {fffd}) THEN (CASE {which} ELSE 'line' END)
                 WHEN NOT ({ok}) THEN 'line' END AS pre_field,
            CASE WHEN contains(raw, {fffd}) THEN 'invalid UTF-8'
                 WHEN NOT ({ok}) THEN {bad_shape} END AS pre_reason,
            {", ".join(f"{col[c]} AS {c}" for c in cs)}
        FROM ({inner})
    """


def register_lines(con: duckdb.DuckDBPyConnection, name: str, text: str) -> int:
    """Register the lines of ``text`` as relation ``name`` (line, raw); return the number of non-empty lines."""
    df = text_lines(text)
    con.register(name, df)
    return df.height


# ----------------------------------------------------------------------------------------------- validation


def validate(con: duckdb.DuckDBPyConnection, stage: Stage, event_types: list[str], source: str) -> Checked:
    """The one validation step of every format: accept a staged row or give it a ``field`` and a ``reason``.

    One pass over the whole staged file evaluates the checks below, in order, and keeps the rejected rows in
    temp table ``_ingest_rejected`` (line, field, reason, raw_record); temp view ``_ingest_accepted`` yields the
    accepted rows (the same deterministic expressions, re-evaluated by the write). Reasons name the problem,
    never a source value.
    """
    f_user = q(stage.fields.get("user_id", "user_id"))
    f_ts = q(stage.fields.get("event_ts", "event_ts"))
    f_type = q(stage.fields.get("event_type", "event_type"))
    unknown_type = f"event_type NOT IN ({', '.join(q(t) for t in event_types)})" if event_types else "true"
    extra = "".join(f", {c}" for c in stage.extra)

    def rej(f: str, r: str) -> str:
        return f"{{'f': {f}, 'r': {r}}}"

    checked_sql = f"""
        SELECT line, src, user_id, event_ts, event_type, item_id, text, attributes{extra},
               rej.f AS field, rej.r AS reason
        FROM (
            SELECT *, CASE
                WHEN pre_reason IS NOT NULL THEN {rej("coalesce(pre_field, 'line')", "pre_reason")}
                WHEN user_id IS NULL THEN {rej(f_user, "'missing user id'")}
                WHEN ts_raw IS NULL THEN {rej(f_ts, "'missing timestamp'")}
                WHEN event_ts IS NULL THEN {rej(f_ts, "'unparseable timestamp'")}
                WHEN NOT (event_ts >= TIMESTAMP '{TS_MIN}' AND event_ts < TIMESTAMP '{TS_MAX}')
                    THEN {rej(f_ts, "'timestamp out of range (before 1970 or after 2099)'")}
                WHEN event_type IS NULL THEN {rej(f_type, "'missing event type'")}
                WHEN {unknown_type} THEN {rej(f_type, "'unknown event type'")}
                WHEN post_reason IS NOT NULL THEN {rej("coalesce(post_field, 'line')", "post_reason")}
            END AS rej
            FROM ({stage.sql}) AS staged
        )
    """
    if stage.materialize:  # parsed text: evaluate once (the write reads it again, AOL twice)
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _ingest_checked AS "
            f"SELECT * REPLACE (CASE WHEN reason IS NOT NULL THEN src END AS src) FROM ({checked_sql})"
        )
    else:  # Parquet: re-scanning is cheaper than holding millions of rows in memory
        con.execute(f"CREATE OR REPLACE TEMP VIEW _ingest_checked AS {checked_sql}")
    con.execute(
        "CREATE OR REPLACE TEMP VIEW _ingest_accepted AS "
        "SELECT * EXCLUDE (src, field, reason) FROM _ingest_checked WHERE reason IS NULL"
    )
    # one pass: counts, time span, and (when each row is one event) how many distinct events there are
    distinct = (
        f"count(DISTINCT {event_hash_sql(source)}) FILTER (WHERE reason IS NULL)" if stage.one_event_per_row
        else "NULL"
    )
    read, rejected, n_distinct, ts_min, ts_max = con.execute(f"""
        SELECT count(*), count(*) FILTER (WHERE reason IS NOT NULL), {distinct},
               min(event_ts) FILTER (WHERE reason IS NULL), max(event_ts) FILTER (WHERE reason IS NULL)
        FROM _ingest_checked
    """).fetchall()[0]
    where = "reason IS NOT NULL" if rejected else "false"
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _ingest_rejected AS
        SELECT line, field, reason, CAST({stage.raw_record} AS VARCHAR) AS raw_record
        FROM _ingest_checked WHERE {where}
    """)
    accepted = int(read) - int(rejected)
    if stage.one_event_per_row:
        n_events = accepted
    else:
        n_events, n_distinct = con.execute(
            f"SELECT count(*), count(DISTINCT {event_hash_sql(source)}) FROM ({stage.events_sql})"
        ).fetchall()[0]
    return Checked(int(read), accepted, int(rejected), int(n_events), int(n_distinct), ts_min, ts_max)


# ----------------------------------------------------------------------------------------------- writing


def batch_id_for(fmt: str, source: str, sha256: str) -> str:
    return hashlib.md5(f"{fmt}{UNIT_SEP}{source}{UNIT_SEP}{sha256}".encode()).hexdigest()[:20]


def existing_batch(con: duckdb.DuckDBPyConnection, fmt: str, source: str, sha256: str) -> str | None:
    rows = con.execute(
        "SELECT batch_id FROM raw.ingest_batches WHERE file_sha256 = ? AND format = ? AND source = ? LIMIT 1",
        [sha256, fmt, source],
    ).fetchall()
    return rows[0][0] if rows else None


def write_batch(
    con: duckdb.DuckDBPyConnection,
    stage: Stage,
    *,
    fmt: str,
    source: str,
    file: str,
    sha256: str,
    batch_id: str,
    checked: Checked,
) -> tuple[int, int]:
    """Write the validated file in one transaction; return (events_new, events_duplicate)."""
    now = datetime.now(timezone.utc).replace(tzinfo=None).isoformat(sep=" ")
    events = stage.events_sql
    n_events = checked.n_events
    # Events repeated within the file (same content -> same event_id) are stored once. Only when the 64-bit
    # content hash finds repeats (or a collision) does the insert group by event_id (costly in memory).
    # the events already stored that can equal one of these: same source, within the file's time span
    span = (
        f"AND event_ts BETWEEN TIMESTAMP {q(checked.ts_min.isoformat(sep=' '))} "
        f"AND TIMESTAMP {q(checked.ts_max.isoformat(sep=' '))}"
        if checked.ts_min is not None and checked.ts_max is not None else ""
    )
    present = f"(SELECT event_id FROM raw.events WHERE source = {q(source)} {span})"
    constants = f"{q(source)}, {q(batch_id)}, TIMESTAMP {q(now)}"
    if checked.n_distinct == n_events:
        insert_sql = f"""
            SELECT event_id, user_id, event_ts, event_type, item_id, text, attributes, {constants}
            FROM (SELECT {event_id_sql(source)} AS event_id, * FROM ({events})) AS e
            ANTI JOIN {present} AS present USING (event_id)
        """
    else:
        insert_sql = f"""
            SELECT event_id, any_value(user_id), any_value(event_ts), any_value(event_type), any_value(item_id),
                   any_value(text), arg_min(attributes, line), {constants}
            FROM (SELECT {event_id_sql(source)} AS event_id, * FROM ({events})) AS e
            ANTI JOIN {present} AS present USING (event_id)
            GROUP BY event_id
        """
    con.execute("BEGIN TRANSACTION")
    try:
        new = con.execute(f"""
            INSERT INTO raw.events
                (event_id, user_id, event_ts, event_type, item_id, text, attributes, source, batch_id, ingested_at)
            {insert_sql}
        """).fetchall()[0][0]
        con.execute(f"""
            INSERT INTO raw.events_rejected
                (rejected_id, source, file, line, field, reason, raw_record, batch_id, rejected_at)
            SELECT rejected_id, {q(source)}, {q(file)}, line, field, reason, raw_record, {q(batch_id)},
                   TIMESTAMP {q(now)}
            FROM (SELECT md5({q(sha256)} || ':' || line) AS rejected_id, * FROM _ingest_rejected) AS r
            ANTI JOIN raw.events_rejected AS present USING (rejected_id)
        """)
        con.execute(
            "INSERT INTO raw.ingest_batches VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, CAST(? AS TIMESTAMP))",
            [batch_id, source, fmt, file, sha256, checked.rows_read, checked.rows_accepted, checked.rows_rejected,
             int(new), n_events - int(new), now],
        )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return int(new), n_events - int(new)


def drop_temp(con: duckdb.DuckDBPyConnection, stage: Stage | None) -> None:
    con.execute("DROP VIEW IF EXISTS _ingest_accepted")
    con.execute("DROP TABLE IF EXISTS _ingest_rejected")
    kind = con.execute(
        "SELECT any_value(table_type) FROM information_schema.tables WHERE table_name = '_ingest_checked'"
    ).fetchall()[0][0]
    if kind:
        con.execute(f"DROP {'VIEW' if kind == 'VIEW' else 'TABLE'} _ingest_checked")
    for name in stage.registered if stage else []:
        try:
            con.unregister(name)
        except duckdb.Error:  # pragma: no cover
            pass


# ----------------------------------------------------------------------------------------------- Parquet


def parquet_columns(path: Path, display: str) -> dict[str, str]:
    """Column name -> DuckDB type of a Parquet file; ``InputFileError`` when it is not (readable) Parquet."""
    require_file(path, display)
    try:
        rows = duckdb.connect().execute(f"DESCRIBE SELECT * FROM read_parquet({q(str(path))})").fetchall()
    except duckdb.Error:
        raise InputFileError(display, "not a Parquet file (or a truncated or corrupt one)") from None
    cols = {r[0]: r[1] for r in rows}
    if "file_row_number" in cols:
        raise InputFileError(display, "has a column named file_row_number, which the loader reserves")
    return cols


def parquet_scan(path: Path) -> str:
    """FROM clause over a Parquet file, aliased ``t``, with ``file_row_number`` (0-based) available."""
    return f"read_parquet({q(str(path))}, file_row_number = true) AS t"


def parquet_src(columns: dict[str, str]) -> str:
    """The whole Parquet row as a struct (rendered as JSON for rejected rows only)."""
    return "{" + ", ".join(f"{q(c)}: t.{qi(c)}" for c in columns) + "}"


def require_columns(display: str, present: list[str] | dict[str, str], required: list[str], what: str) -> None:
    missing = [c for c in required if c not in present]
    if missing:
        raise InputFileError(display, f"not a valid {what} file: missing column(s) {', '.join(missing)}")
