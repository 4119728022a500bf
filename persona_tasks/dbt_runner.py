"""Run the dbt project (``dbt_project/``) against the configured warehouse, in-process.

``build(settings)`` is what ``persona-etl build`` calls: ``dbt build`` (models and their tests, in DAG order)
with the profile pointed at ``settings.warehouse`` and the vars taken from ``Settings``. A failing model or test
raises :class:`~persona_tasks.errors.BuildError` naming the failing nodes; the timings (dbt start-up, then each
node) are logged and returned in a :class:`BuildResult`.

dbt reads the warehouse path and thread counts from environment variables named in ``dbt_project/profiles.yml``;
they are set only for the duration of the call. dbt's target (compiled SQL, manifest) and logs go to
``settings.dbt.target_path`` (default ``dbt_project/target``) and the ``logs`` folder beside it.

After each invocation the DuckDB database dbt-duckdb keeps open is closed (so the caller can connect to the
warehouse again in the same process), without a checkpoint: the next writer or DuckDB's automatic checkpoint
does it (see ``_release_warehouse``). Model semantics and performance notes: dbt_project/README.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_tasks.config import Settings
from persona_tasks.errors import BuildError

log = logging.getLogger(__name__)

# statuses of dbt results that mean "this node failed"
_FAILED = {"error", "fail", "runtime error"}


@dataclass(frozen=True)
class NodeTiming:
    """One dbt node (model or test) of an invocation."""

    name: str
    resource_type: str  # model | test | ...
    status: str  # success | pass | warn | fail | error | skipped
    seconds: float
    failures: int | None = None  # failing rows of a test


@dataclass(frozen=True)
class BuildResult:
    """What a dbt invocation did: its nodes, which failed, and where the time went."""

    command: str
    nodes: list[NodeTiming] = field(default_factory=list)
    total_seconds: float = 0.0
    startup_seconds: float = 0.0  # dbt start-up (load, parse, connect) before the first node started

    @property
    def nodes_run(self) -> int:
        return sum(1 for n in self.nodes if n.status != "skipped")

    @property
    def failures(self) -> list[NodeTiming]:
        return [n for n in self.nodes if n.status in _FAILED]

    @property
    def model_seconds(self) -> float:
        return sum(n.seconds for n in self.nodes if n.resource_type == "model")

    @property
    def test_seconds(self) -> float:
        return sum(n.seconds for n in self.nodes if n.resource_type == "test")


def dbt_vars(settings: Settings) -> dict[str, Any]:
    """The dbt vars of a deployment (see ``vars:`` in dbt_project.yml)."""
    return {
        "session_gap_minutes": settings.session_gap_minutes,
        "memory_text_max_chars": settings.memory_text_max_chars,
        "event_types": list(settings.ingest.event_types),
    }


def target_path(settings: Settings) -> Path:
    return Path(settings.dbt.target_path or (settings.dbt.project_dir / "target"))


def log_path(settings: Settings) -> Path:
    if settings.dbt.target_path is None:
        return settings.dbt.project_dir / "logs"
    return Path(settings.dbt.target_path) / "logs"


@contextlib.contextmanager
def _profile_env(settings: Settings) -> Iterator[None]:
    """Set the variables profiles.yml reads, restoring the previous environment afterwards."""
    values = {
        "PERSONA_ETL_WAREHOUSE": str(settings.warehouse),
        "PERSONA_ETL_DUCKDB_THREADS": str(settings.threads),
        "PERSONA_ETL_DBT_THREADS": str(settings.dbt.threads),
        "DO_NOT_TRACK": "1",
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ensure_raw_layer(settings: Settings) -> None:
    """Create the warehouse and the raw schema if needed, so a build on an empty warehouse works (no rows).

    Checked read-only first: closing a writer connection checkpoints, which would do now the work the previous
    build left to the next writer (see _release_warehouse).
    """
    import duckdb

    from persona_tasks.warehouse import connect

    if Path(settings.warehouse).exists():
        con = duckdb.connect(str(settings.warehouse), read_only=True)
        try:
            found = con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'raw' AND table_name = 'events'"
            ).fetchall()[0][0]
        finally:
            con.close()
        if found:
            return
    connect(settings).close()


def run_dbt(settings: Settings, command: str, args: Sequence[str] = ()) -> BuildResult:
    """Invoke ``dbt <command> <args>`` in-process against the configured warehouse (command: "build",
    "docs generate", ...).

    Raises BuildError when dbt cannot run (bad project, warehouse locked, ...) or when a node fails.
    """
    from dbt.cli.main import dbtRunner

    import duckdb

    try:
        _ensure_raw_layer(settings)
    except duckdb.Error as exc:  # locked by another writer, not a DuckDB file, ...
        raise BuildError(f"warehouse {settings.warehouse} cannot be opened: {_first_line(exc)}") from exc
    target = target_path(settings)
    cli_args = [
        *command.split(),
        "--project-dir", str(settings.dbt.project_dir),
        "--profiles-dir", str(settings.dbt.profiles_dir),
        "--target-path", str(target),
        "--log-path", str(log_path(settings)),
        "--vars", json.dumps(dbt_vars(settings)),
        "--no-use-colors",
        *args,
    ]
    log.info("dbt %s: warehouse %s", command, settings.warehouse)
    started = time.time()
    with _profile_env(settings):
        try:
            res = dbtRunner().invoke(cli_args)
        finally:
            _release_warehouse()
    total = time.time() - started
    result = _summarise(command, res.result, started, total)
    _log_timings(result)
    if res.exception is not None:
        raise BuildError(f"dbt {command} could not run: {_first_line(res.exception)} (log: {log_path(settings)})")
    if result.failures:
        raise BuildError(_failure_message(command, result, log_path(settings)))
    if not res.success:
        raise BuildError(f"dbt {command} failed (log: {log_path(settings)})")
    return result


def build(settings: Settings, full_refresh: bool = False, select: str | None = None) -> BuildResult:
    """``dbt build``: staging -> sessions -> intent memories, with their tests.

    Incremental by event day unless ``full_refresh``; ``select`` is a dbt node selection (default: everything;
    the tests of the selected models run with them).
    """
    args: list[str] = []
    missing = [] if full_refresh else _mart_columns_missing(settings)
    if missing:
        log.warning("marts.intent_memories predates column(s) %s: rebuilding it in full (same rows and ids)",
                    ", ".join(missing))
        full_refresh = True
    if full_refresh:
        args.append("--full-refresh")
    if select:
        args += ["--select", select]
    return run_dbt(settings, "build", args)


# columns added to the incremental mart after its first release: a warehouse built before them is rebuilt in full
# once (the model is on_schema_change='fail', and a full refresh gives the same rows and ids)
MART_COLUMNS_SINCE_V1 = ("embedding_text",)


def _mart_columns_missing(settings: Settings) -> list[str]:
    """Columns of MART_COLUMNS_SINCE_V1 that an existing marts.intent_memories lacks (read-only check)."""
    import duckdb

    if not Path(settings.warehouse).exists():
        return []
    try:
        con = duckdb.connect(str(settings.warehouse), read_only=True)
    except duckdb.Error:
        return []  # locked or not a DuckDB file: run_dbt reports it
    try:
        have = {r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'marts' AND table_name = 'intent_memories'").fetchall()}
    finally:
        con.close()
    return [c for c in MART_COLUMNS_SINCE_V1 if have and c not in have]


def docs_generate(settings: Settings) -> Path:
    """``dbt docs generate``: writes index.html, manifest.json and catalog.json into the target path."""
    run_dbt(settings, "docs generate")
    return target_path(settings)


def _release_warehouse() -> None:
    """Close the DuckDB database dbt-duckdb keeps open in this process after an invocation.

    Otherwise the warehouse file stays attached with dbt's configuration, and the next ``warehouse.connect`` /
    ``connect_read_only`` in the same process fails ("different configuration than existing connections").
    dbt-duckdb (pinned 1.11.x) has no public call for this: its connection manager holds one environment.
    """
    try:
        from dbt.adapters.duckdb.connections import DuckDBConnectionManager
    except ImportError:  # pragma: no cover - dbt-duckdb is a dependency
        return
    with DuckDBConnectionManager._LOCK:
        env = DuckDBConnectionManager._ENV
        if env is not None:
            try:
                conn = getattr(env, "conn", None)
                if conn is not None:
                    # The build's data is already in the file (DuckDB writes large inserts straight to blocks and
                    # logs the rest in the WAL), so the close need not also checkpoint: on 10M events that
                    # checkpoint (merging the freshly written row groups) takes longer than the build's tests.
                    # The next writer, or DuckDB's automatic checkpoint once the WAL grows, does it instead.
                    conn.execute("PRAGMA disable_checkpoint_on_shutdown")
                env.close()
            except Exception as exc:  # closing must not hide the build's own outcome
                log.debug("closing dbt's DuckDB connection failed: %s", exc)
        DuckDBConnectionManager.close_all_connections()


def _summarise(command: str, results: Any, started: float, total: float) -> BuildResult:
    nodes: list[NodeTiming] = []
    first_start: float | None = None
    for r in getattr(results, "results", None) or []:
        node = r.node
        status = str(getattr(r.status, "value", r.status))
        failures = getattr(r, "failures", None)
        nodes.append(
            NodeTiming(
                name=node.name,
                resource_type=str(getattr(node.resource_type, "value", node.resource_type)),
                status=status,
                seconds=float(r.execution_time or 0.0),
                failures=int(failures) if failures is not None else None,
            )
        )
        for t in getattr(r, "timing", None) or []:
            if t.started_at is not None:
                ts = t.started_at.timestamp()
                first_start = ts if first_start is None else min(first_start, ts)
    startup = (first_start - started) if first_start is not None else total
    return BuildResult(command=command, nodes=nodes, total_seconds=total, startup_seconds=max(startup, 0.0))


def _log_timings(result: BuildResult) -> None:
    for n in result.nodes:
        extra = f", {n.failures} failing rows" if n.failures else ""
        log.info("dbt %s %s: %s in %.2fs%s", n.resource_type, n.name, n.status, n.seconds, extra)
    log.info(
        "dbt %s: %d nodes in %.1fs (start-up %.1fs, models %.1fs, tests %.1fs), %d failed",
        result.command, result.nodes_run, result.total_seconds, result.startup_seconds,
        result.model_seconds, result.test_seconds, len(result.failures),
    )


def _failure_message(command: str, result: BuildResult, logs: Path) -> str:
    # Node names and failing-row counts only: dbt's own messages can quote data (personal) or SQL.
    parts = []
    for n in result.failures:
        what = f"{n.failures} failing rows" if n.resource_type == "test" and n.failures else n.status
        parts.append(f"{n.resource_type} {n.name} ({what})")
    skipped = sum(1 for n in result.nodes if n.status == "skipped")
    tail = f"; {skipped} downstream nodes skipped" if skipped else ""
    return f"dbt {command} failed: {'; '.join(parts)}{tail} (details in {logs / 'dbt.log'})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
