"""The Great Expectations project of the gates and its Data Docs site (static HTML on-call opens from an alert).

A file data context in ``[gates] gx_dir`` (suites, validation results) whose one Data Docs site lives in
``[gates] docs_dir``. GX rebuilds the site's index from every stored validation result, so the build time grows
with history: ``prune`` keeps only the newest ``[gates] docs_keep_runs`` results per suite (and deletes the pages
of the others) before each gate run. ``serve`` serves the site on 127.0.0.1 (``persona-etl gate docs``).
"""

from __future__ import annotations

import functools
import http.server
import logging
import shutil
import threading
from pathlib import Path

from persona_tasks.config import Settings

log = logging.getLogger(__name__)

SITE = "gates"
DATASOURCE = "persona_etl_gates"


def gx_dir(settings: Settings) -> Path:
    g = settings.gates.gx_dir
    return g if g is not None else Path(settings.warehouse).parent / "quality" / "gx"


def docs_dir(settings: Settings) -> Path:
    d = settings.gates.docs_dir
    return d if d is not None else Path(settings.warehouse).parent / "quality" / "docs"


def _site_config(settings: Settings) -> dict:
    return {"class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(docs_dir(settings)) + "/"},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}}


def context(settings: Settings):
    """The gates' GX file context (created on first use), with the Data Docs site in ``docs_dir`` and no progress
    bars (task logs)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    root = gx_dir(settings)
    root.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=str(root))
    sites = {SITE: _site_config(settings)}
    bars = ctx.variables.progress_bars
    globally = bars.get("globally") if isinstance(bars, dict) else getattr(bars, "globally", None)
    if ctx.variables.data_docs_sites != sites or globally is not False:
        ctx.variables.data_docs_sites = sites
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        ctx.variables.save()
        ctx = gx.get_context(mode="file", project_root_dir=str(root))
    return ctx


def batch_definition(ctx, asset_name: str):
    """The whole-dataframe batch definition of a pandas dataframe asset (created once, then reused)."""
    try:
        ds = ctx.data_sources.get(DATASOURCE)
    except (KeyError, ValueError):
        ds = ctx.data_sources.add_pandas(DATASOURCE)
    try:
        asset = ds.get_asset(asset_name)
    except LookupError:
        asset = ds.add_dataframe_asset(asset_name)
    try:
        return asset.get_batch_definition("whole")
    except (KeyError, ValueError, LookupError):
        return asset.add_batch_definition_whole_dataframe("whole")


def prune(settings: Settings, ctx, suite_names: list[str], keep: int) -> int:
    """Delete all but the newest ``keep`` validation results (and their Data Docs pages) of each suite; returns
    how many results were deleted."""
    store = ctx.validation_results_store
    site = docs_dir(settings)
    n = 0
    keys = [k for k in store.list_keys() if k.expectation_suite_identifier.name in suite_names]
    for name in suite_names:
        mine = sorted((k for k in keys if k.expectation_suite_identifier.name == name),
                      key=lambda k: k.run_id.run_time, reverse=True)
        for k in mine[keep:]:
            store.remove_key(k)
            page = site.joinpath("validations", *k.to_tuple()).with_suffix(".html")
            page.unlink(missing_ok=True)
            # drop folders left empty (run name / run time levels)
            for parent in list(page.parents)[:2]:
                if parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
            n += 1
    return n


def page_url(settings: Settings, ctx, key) -> str:
    """The page of one validation result: under ``[gates] docs_base_url`` when set, else a file:// URL."""
    rel = "/".join(("validations", *key.to_tuple())) + ".html"
    base = settings.gates.docs_base_url
    if base:
        return base.rstrip("/") + "/" + rel
    return (docs_dir(settings) / rel).resolve().as_uri()


def rebuild(settings: Settings) -> str:
    """Rebuild the whole site from the stored results (after deleting it): index, suites, kept validations."""
    ctx = context(settings)
    shutil.rmtree(docs_dir(settings), ignore_errors=True)
    ctx.build_data_docs(site_names=[SITE])
    return str(docs_dir(settings) / "index.html")


def serve(settings: Settings, port: int | None = None, block: bool = True):
    """Serve the Data Docs site on 127.0.0.1 (loopback only). Returns the server when ``block`` is False (it runs
    in a daemon thread; call ``shutdown()``)."""
    site = docs_dir(settings)
    if not (site / "index.html").exists():
        raise FileNotFoundError(f"no Data Docs site in {site}: a gate has not run yet (or [gates] docs_dir differs)")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):  # task/CLI logs, not stderr noise
            log.debug("quality-docs: " + fmt, *args)

    handler = functools.partial(Handler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", settings.gates.docs_port if port is None else port),
                                             handler)
    if not block:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server
    print(f"Data Docs of the gates: http://127.0.0.1:{server.server_address[1]}/index.html (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return None
