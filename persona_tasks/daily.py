"""The task bodies of the Airflow DAG ``persona_daily`` (dags/persona_daily.py), as plain functions.

Each function takes ``(settings, run_date, ...)`` and returns a JSON-able dict (the DAG passes it on as an XCom);
the DAG file only wires them. They can be called from a Python shell or a test without Airflow.

One run processes one data day ``run_date`` (the DAG run's logical date, i.e. the start of its daily data
interval):

1. ``ingest_landing``: every file of ``<landing_dir>/<run_date>/`` (format ``[orchestration] landing_format``)
   into ``raw.events``; an fsspec URL as ``landing_dir`` is copied to the work folder first. Re-ingesting a file
   adds nothing (same content = same batch).
2. ``gate_raw``: the raw gate's Great Expectations suite (persona_tasks/gates/raw.py): reconciliation of the day's
   ingest batches with the ledger, rejected and duplicate shares, volume against the trailing published days, the
   events' required fields, types and times, the raw schema.
3. ``build``: ``dbt build`` (models and their tests; a failing test raises).
4. ``gate_memories``: the memory gate's suite (persona_tasks/gates/memories.py): the build ran tests and none
   failed; every valid action of the day is in exactly one intent memory of the day; texts and counts in bounds.
5. ``embed``: finds the day's *active* users (``persona_tasks.identity``: their memories up to the day changed;
   every user with the DAG param ``full``), embeds their memories (new texts only) and exports their clustering
   input to ``<work_dir>/<run_date>/cluster_input.parquet``, so the shard tasks need no warehouse.
6. ``cluster_shard`` (mapped over ``n_shards``): clusters one user shard from that file into Parquet files.
7. ``store_clusters``: writes every shard's clusters (``persona_tasks.cluster.write_clusters``, replacing the
   active users' rows only).
8. ``label``: ``induce.label_step`` (matches the new clusters to the users' personas, labels the new or changed
   ones, stages the run); ``score``: ``quality.score_run`` (the staged personas that changed).
9. ``gate_personas``: the persona gate's suite (persona_tasks/gates/personas.py): floors of ``[orchestration]`` on
   the staged run, no PII, scores in range, unique labels, LLM fallbacks, drift against the last published run.
10. ``publish``: ``publish.publish_run`` (one transaction: new persona versions, retirements, user states,
    topics; the DAG param ``rewind`` for an earlier day whose result changed); ``serve``: the analysts' serving
    copy (``persona_tasks.serving``).

A gate evaluates every check of its suite, records each in ``quality_check_results`` with a Data Docs page, and
raises :class:`GateError` (``check`` names every failing blocking check) when one blocks; nothing is published, so
the last published personas and the serving copy stay as they were. Everything is idempotent: rerunning a task or a day
gives the same rows (timestamps of processing aside).
"""

from __future__ import annotations

import logging
import shutil
import time
from datetime import date, timedelta
from pathlib import Path

from persona_tasks.config import Settings
from persona_tasks.errors import GateError, PersonaEtlError  # noqa: F401 - GateError: the DAG catches daily.GateError
from persona_tasks.days import as_date, day_end, run_dir, work_dir  # noqa: F401 - re-exported: the DAG and older callers use daily.*

log = logging.getLogger(__name__)


def landing_location(settings: Settings) -> str:
    loc = settings.orchestration.landing_dir
    if "://" in loc or Path(loc).is_absolute():
        return loc
    return str(settings.project_dir / loc)


def _is_url(loc: str) -> bool:
    return "://" in loc and not loc.startswith("file://")


def landing_files(settings: Settings, run_date: date | str) -> list[Path]:
    """The day's landing files as local paths (an object-store location is copied to the work folder first)."""
    day = as_date(run_date).isoformat()
    loc = landing_location(settings)
    if loc.startswith("file://"):
        loc = loc[len("file://"):]
    if not _is_url(loc):
        folder = Path(loc) / day
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    import fsspec

    fs, root = fsspec.core.url_to_fs(loc.rstrip("/") + "/" + day)
    if not fs.exists(root):
        return []
    remote = sorted(p for p in fs.ls(root, detail=False) if fs.isfile(p) and not Path(p).name.startswith("."))
    local_dir = run_dir(settings, day) / "landing"
    if local_dir.exists():
        shutil.rmtree(local_dir)
    local_dir.mkdir(parents=True)
    out = []
    for p in remote:
        dest = local_dir / Path(p).name
        fs.get(p, str(dest))
        out.append(dest)
    log.info("landing: copied %d file(s) of %s from %s", len(out), day, fs.protocol)
    return out


# --- 1. ingest -------------------------------------------------------------------------------------------------

def ingest_landing(settings: Settings, run_date: date | str) -> dict:
    """Ingest the day's landing files; returns the batches (new or already present) and their counts."""
    from persona_tasks.ingest import ingest_files

    day = as_date(run_date)
    cfg = settings.orchestration
    files = landing_files(settings, day)
    if not files:
        log.warning("ingest: no landing files for %s", day)
        return {"run_date": day.isoformat(), "files": [], "batch_ids": []}
    report = ingest_files(settings, cfg.landing_format, files, source=cfg.landing_source)
    out = [{"file": f.file, "batch_id": f.batch_id, "skipped": f.skipped, "rows_read": f.rows_read,
            "rows_accepted": f.rows_accepted, "rows_rejected": f.rows_rejected, "events_new": f.events_new}
           for f in report.files]
    return {"run_date": day.isoformat(), "files": out, "batch_ids": sorted({f["batch_id"] for f in out})}


# --- 2. raw gate -----------------------------------------------------------------------------------------------

def gate_raw(settings: Settings, run_date: date | str, ingested: dict, run=None) -> dict:
    """The raw gate's suite (persona_tasks/gates/raw.py); raises GateError naming every failing blocking check."""
    from persona_tasks.gates import gate_raw as run_gate

    return run_gate(settings, run_date, ingested, run)


# --- 3. dbt build ----------------------------------------------------------------------------------------------

def build(settings: Settings, run_date: date | str) -> dict:
    """``dbt build`` (incremental by event day; raises BuildError on a failing model or test)."""
    from persona_tasks.dbt_runner import build as dbt_build

    res = dbt_build(settings)
    return {"run_date": as_date(run_date).isoformat(), "nodes_run": res.nodes_run,
            "models": sum(1 for n in res.nodes if n.resource_type == "model" and n.status != "skipped"),
            "tests": sum(1 for n in res.nodes if n.resource_type == "test" and n.status != "skipped"),
            "failures": [n.name for n in res.failures], "seconds": round(res.total_seconds, 2)}


# --- 4. memory gate --------------------------------------------------------------------------------------------

def gate_memories(settings: Settings, run_date: date | str, built: dict, run=None) -> dict:
    """The memory gate's suite (persona_tasks/gates/memories.py); raises GateError."""
    from persona_tasks.gates import gate_memories as run_gate

    return run_gate(settings, run_date, built, run)


# --- 5. embed --------------------------------------------------------------------------------------------------

def embed(settings: Settings, run_date: date | str, full: bool = False) -> dict:
    """Find the day's active users (persona_tasks.identity: their memories up to the day changed; every user
    when ``full``), embed their memories and export their clustering input for the shards."""
    import polars as pl

    from persona_tasks.cluster import GlobalUMAPReducer, ensure_global_umap, get_strategy, load_cluster_input
    from persona_tasks.embed import embedder_from_settings, embed_memories
    from persona_tasks.identity import active_users
    from persona_tasks.warehouse import connect, query_pl

    day = as_date(run_date)
    embedder = embedder_from_settings(settings)
    with connect(settings) as con:
        active = active_users(con, day, full)["user_id"].to_list()
        memories = query_pl(con, "SELECT memory_id, user_id, embedding_text FROM marts.intent_memories "
                                 "WHERE started_at < $e AND user_id IN (SELECT unnest($u))",
                            {"e": day_end(day), "u": active})
        rep = embed_memories(settings, con, memories=memories, embedder=embedder)
        frame = load_cluster_input(con, embedder.model_version, users=active).filter(
            pl.col("started_at") < day_end(day))
        # global_umap_hdbscan: the shards all apply the one stored UMAP of the day (fitted here when due)
        umap_path = (ensure_global_umap(settings, con, embedder.model_version, day)
                     if isinstance(get_strategy(settings.clustering.strategy, settings.clustering).reducer,
                                   GlobalUMAPReducer) else None)
    path = run_dir(settings, day) / "cluster_input.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    frame.write_parquet(tmp)
    tmp.replace(path)
    return {"run_date": day.isoformat(), "model_version": embedder.model_version, "memories": memories.height,
            "embedded": rep.n_new, "encoded": rep.n_encoded, "cluster_input": str(path),
            "cluster_rows": frame.height, "users": frame["user_id"].n_unique() if frame.height else 0,
            "active_users": len(active), "full": full, "global_umap": str(umap_path) if umap_path else None}


# --- 6. cluster one shard (no warehouse access) ----------------------------------------------------------------

def _shard_paths(settings: Settings, day: date, shard: int, n_shards: int) -> tuple[Path, Path]:
    d = run_dir(settings, day) / "clusters"
    d.mkdir(parents=True, exist_ok=True)
    stem = f"shard-{shard:04d}-of-{n_shards:04d}"
    return d / f"{stem}.assignments.parquet", d / f"{stem}.users.parquet"


def cluster_shard(settings: Settings, run_date: date | str, shard: int, n_shards: int, embedded: dict) -> dict:
    """Cluster the users of one shard (``cluster.shard_of``) from the exported input; results to Parquet."""
    import polars as pl

    from persona_tasks.cluster import GlobalUMAP, cluster_users

    day = as_date(run_date)
    frame = pl.read_parquet(embedded["cluster_input"])
    umap_path = embedded.get("global_umap")
    result = cluster_users(settings, frame, shard=shard, n_shards=n_shards,
                           global_umap=GlobalUMAP.load(umap_path) if umap_path else None)
    a_path, u_path = _shard_paths(settings, day, shard, n_shards)
    for df, p in ((result.assignments, a_path), (result.users, u_path)):
        tmp = p.with_suffix(".tmp")
        df.write_parquet(tmp)
        tmp.replace(p)
    return {"run_date": day.isoformat(), "shard": shard, "n_shards": n_shards, "strategy": result.strategy,
            "seconds": round(result.seconds, 3), "assignments": str(a_path), "users_file": str(u_path),
            "users": result.users.height, "memories": result.assignments.height}


# --- 7. store clusters -----------------------------------------------------------------------------------------

def store_clusters(settings: Settings, run_date: date | str, shards: list[dict], embedded: dict) -> dict:
    """Write every shard's clusters to the warehouse (replacing those of the shard's active users only)."""
    import polars as pl

    from persona_tasks.cluster import ClusteringResult, write_clusters
    from persona_tasks.warehouse import connect

    day = as_date(run_date)
    shards = sorted(shards, key=lambda s: s["shard"])
    n = {s["n_shards"] for s in shards}
    if len(n) != 1 or sorted(s["shard"] for s in shards) != list(range(next(iter(n)))):
        raise PersonaEtlError(f"cluster shards incomplete: got {[s['shard'] for s in shards]} of {sorted(n)}")
    n_shards = next(iter(n))
    with connect(settings) as con:
        for s in shards:
            result = ClusteringResult(pl.read_parquet(s["assignments"]), pl.read_parquet(s["users_file"]),
                                      s["strategy"], s["seconds"])
            write_clusters(con, result, embedded["model_version"])
    return {"run_date": day.isoformat(), "n_shards": n_shards, "users": sum(s["users"] for s in shards),
            "memories": sum(s["memories"] for s in shards)}


# --- 8. label and score ----------------------------------------------------------------------------------------

def label(settings: Settings, run_date: date | str, labeller: str | None = None,
          llm_max_users: int | None = None, full: bool = False) -> dict:
    """Match the active users' clusters to their personas, label what changed and stage the run
    (``induce.label_step``)."""
    from persona_tasks.induce import label_step
    from persona_tasks.warehouse import connect

    day = as_date(run_date)
    labeller = labeller or settings.orchestration.labeller
    if llm_max_users is None:
        llm_max_users = settings.orchestration.llm_max_users
    with connect(settings) as con:
        rep = label_step(settings, con, day, labeller, llm_max_users=llm_max_users, full=full)
    return {"run_date": day.isoformat(), "run_id": rep.run_id, "labeller": labeller, "users": rep.n_users,
            "active_users": rep.n_active, "labelled": rep.n_labelled, "changes": rep.changes,
            "personas": rep.n_personas, "n_llm": rep.n_llm, "n_fallbacks": rep.n_fallbacks,
            "coverage": round(rep.coverage, 6), "llm_stats": rep.llm_stats, "timings_s": rep.timings_s}


def score(settings: Settings, run_date: date | str) -> dict:
    """Quality scores of the staged run (``induce.quality_step`` = ``quality.score_run``)."""
    from persona_tasks.induce import quality_step
    from persona_tasks.warehouse import connect

    day = as_date(run_date)
    with connect(settings) as con:
        q = quality_step(settings, con, day)
    return {"run_date": day.isoformat(), "personas": q.n_personas, "scored": q.n_scored, "means": q.finite_means()}


# --- 9. persona gate -------------------------------------------------------------------------------------------

def pii_leaks(personas) -> list[tuple[str, str]]:
    """``(persona_id, field)`` of persona texts holding PII (persona_tasks.gates.personas.pii_leaks)."""
    from persona_tasks.gates.personas import pii_leaks as leaks

    return leaks(personas)


def gate_personas(settings: Settings, run_date: date | str, run=None) -> dict:
    """The persona gate's suite (persona_tasks/gates/personas.py); raises GateError."""
    from persona_tasks.gates import gate_personas as run_gate

    return run_gate(settings, run_date, run)


# --- 10. publish and serve -------------------------------------------------------------------------------------

def publish(settings: Settings, run_date: date | str, rewind: bool = False) -> dict:
    """Publish the staged run as persona versions (one transaction: readers never see half a run)."""
    from persona_tasks.publish import publish_run
    from persona_tasks.warehouse import connect

    day = as_date(run_date)
    with connect(settings) as con:
        rep = publish_run(settings, con, day, rewind=rewind)
    return {"run_date": day.isoformat(), "personas": rep.n_personas, "evidence": rep.n_evidence,
            "users": rep.n_users, "topics": rep.n_topics, "active_users": rep.n_active, "appeared": rep.n_appeared,
            "changed": rep.n_changed, "unchanged": rep.n_unchanged, "retired": rep.n_retired,
            "rows_written": rep.rows_written, "no_op": rep.no_op}


def serve(settings: Settings, run_date: date | str) -> dict:
    """Swap in a fresh read-only serving copy for analysts (``persona_tasks.serving``)."""
    from persona_tasks.serving import publish_serving

    day = as_date(run_date)
    out = publish_serving(settings, day)
    out["work_dirs_removed"] = cleanup_work(settings, day)
    return out


def cleanup_work(settings: Settings, run_date: date | str, keep_days: int = 7) -> int:
    """Remove the scratch folders of runs more than ``keep_days`` before ``run_date`` (a cleared task of a recent
    run still finds its inputs)."""
    root, day, n = work_dir(settings), as_date(run_date), 0
    if not root.is_dir():
        return 0
    for d in root.iterdir():
        try:
            old = date.fromisoformat(d.name) < day - timedelta(days=keep_days)
        except ValueError:
            continue
        if d.is_dir() and old:
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def run_day(settings: Settings, run_date: date | str, labeller: str | None = None, full: bool = False,
            timings: bool = False) -> dict:
    """Every step of a day in order, in this process (what the DAG does, without Airflow); ``timings``: add
    ``step_seconds`` (wall seconds per step)."""
    t0 = time.perf_counter()
    day = as_date(run_date)
    out: dict = {}
    step_s: dict[str, float] = {}

    def step(name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        out[name] = fn(settings, day, *args, **kwargs)
        step_s[name] = round(time.perf_counter() - t, 3)
        return out[name]

    step("ingest", ingest_landing)
    step("gate_raw", gate_raw, out["ingest"])
    step("build", build)
    step("gate_memories", gate_memories, out["build"])
    step("embed", embed, full=full)
    n = settings.orchestration.n_shards
    t = time.perf_counter()
    shards = [cluster_shard(settings, day, k, n, out["embed"]) for k in range(n)]
    step_s["cluster"] = round(time.perf_counter() - t, 3)
    step("store_clusters", store_clusters, shards, out["embed"])
    step("label", label, labeller, full=full)
    step("score", score)
    step("gate_personas", gate_personas)
    step("publish", publish)
    step("serve", serve)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    if timings:
        out["step_seconds"] = step_s
    return out


def sample_landing_day(settings: Settings, run_date: date | str) -> Path:
    """Write ``<landing_dir>/<day>/aol_<day>.tsv``: the bundled AOL sample's rows of that day, in the original
    layout (for ``make demo`` / ``airflow dags test``; a local landing folder only)."""
    import gzip

    day = as_date(run_date).isoformat()
    src = settings.project_dir / "data" / "aol" / "aol_sample.tsv.gz"
    with gzip.open(src, "rt", encoding="utf-8", newline="") as f:
        header = f.readline()
        rows = [line for line in f if line.split("\t")[2].startswith(day)]
    out = Path(landing_location(settings)) / day
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"aol_{day}.tsv"
    path.write_text(header + "".join(rows), encoding="utf-8")
    return path
