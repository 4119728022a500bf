"""The Great Expectations gates (persona_tasks/gates) on real warehouses, with planted failures (issue 14, section 6).

One module-scoped warehouse: two synthetic days run end to end (``daily.run_day``: real ingest, dbt, static
embeddings, clustering, extractive labels, quality scores, GX gates, publish), then planted failures on later days:
a day with 10% of the trailing volume and many rejected rows (both checks named), an audited override (refused when
it does not apply, then publishing the day), memories with an empty text, fabricated persona claims, a persona
holding an e-mail address, and a topic-mix drift. Each lands in quality_check_results with its observed value and
in a Data Docs page; the on-call queries of docs/oncall.md run on the same warehouse.
"""

from __future__ import annotations

import http.server
import json
import threading
from datetime import date

import polars as pl
import pytest

from persona_tasks import daily
from persona_tasks.config import PROJECT_DIR, load_settings
from persona_tasks.gates import raw
from persona_tasks.gates import results as R
from persona_tasks.warehouse import connect, query_pl, query_row

D1, D2, D3, D4 = "2026-02-01", "2026-02-02", "2026-02-03", "2026-02-04"
EMAIL = "jane.doe@example.com"


def write_day(landing, day: str, n_events: int, seed: int, bogus: int = 0) -> None:
    """``landing/<day>/events.parquet``: synthetic events of that day; ``bogus`` rows get an unknown event type
    (ingest rejects them)."""
    from persona_tasks.synth import generate_events, write_events

    df = generate_events(n_events, n_users=40, seed=seed, days=1, start=day)
    if bogus:
        df = df.with_columns(pl.when(pl.int_range(pl.len()) < bogus).then(pl.lit("bogus"))
                             .otherwise(pl.col("event_type")).alias("event_type"))
    write_events(df, landing / day / "events.parquet")


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def webhook():
    _Hook.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Hook.received
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def wh(tmp_path_factory, webhook):
    """A warehouse with two published days (D1, D2) of 2,000 events of 40 users each."""
    tmp = tmp_path_factory.mktemp("gates")
    landing = tmp / "landing"
    for k, day in enumerate((D1, D2)):
        write_day(landing, day, 2000, seed=10 + k)
    settings = load_settings(
        warehouse=tmp / "wh" / "warehouse.duckdb", threads=2, embedding={"backend": "static"},
        ingest={"events": {"attributes": ["category", "brand", "price"]}}, dbt={"target_path": tmp / "dbt_target"},
        alerts={"webhook_url": webhook[0], "timeout_s": 5},
        orchestration={"landing_dir": str(landing), "landing_format": "events", "landing_source": "synth",
                       "n_shards": 1})
    out = {day: daily.run_day(settings, day) for day in (D1, D2)}
    return {"settings": settings, "landing": landing, "days": out}


def results(settings, day: str, gate: str | None = None) -> pl.DataFrame:
    with connect(settings) as con:
        return query_pl(con, "SELECT * FROM quality_check_results WHERE run_date = $d "
                        + ("AND gate = $g " if gate else "") + "ORDER BY checked_at, check_name",
                        {"d": day, **({"g": gate} if gate else {})})


def latest(settings, day: str, check: str) -> dict:
    df = results(settings, day).filter(pl.col("check_name") == check)
    return df.row(df.height - 1, named=True)


def page_text(url: str) -> str:
    """The visible text of a Data Docs page (file:// URL)."""
    import re
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    html = Path(unquote(urlparse(url).path)).read_text()
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_clean_days_pass_every_check_and_record_them(wh):
    settings, out = wh["settings"], wh["days"]
    for day in (D1, D2):
        df = results(settings, day)
        assert df.height == sum(out[day][g]["checks"] for g in ("gate_raw", "gate_memories", "gate_personas"))
        assert set(df["gate"]) == {"gate_raw", "gate_memories", "gate_personas"}
        assert df.filter(~pl.col("success")).height == 0, df.filter(~pl.col("success")).to_dicts()
        assert df["dag_run_id"].str.starts_with("local__").all() and (df["try_number"] == 1).all()
        assert df["docs_page"].str.starts_with("file://").all()
    # the first day has no history: volume and drift are exempt; the second is compared with the first
    v1, v2 = latest(settings, D1, "volume"), latest(settings, D2, "volume")
    assert v1["exempt"] and json.loads(v1["observed_value"]) is None
    assert not v2["exempt"] and 0.8 < json.loads(v2["observed_value"]) < 1.25
    assert json.loads(v2["threshold"]) == {"min_value": 0.5, "max_value": 3.0}
    assert latest(settings, D1, "topic_mix_drift")["exempt"]
    drift = latest(settings, D2, "topic_mix_drift")
    assert not drift["exempt"] and 0.0 <= json.loads(drift["observed_value"]) < 0.5
    assert latest(settings, D2, "llm_fallback_share")["exempt"]  # the extractive labeller ran: no LLM
    reconcile = latest(settings, D2, "reconciliation")
    assert reconcile["expectation_type"] == "expect_column_to_equal_sum_of_columns"  # the custom expectation


def test_volume_drop_and_rejected_rows_fail_naming_both_checks(wh, webhook):
    """A day with 10% of the trailing volume whose file also has 30% rejected rows: both blocking checks fail in
    one evaluation, the error, the ops_alerts row and the webhook text name both, the results table holds the
    observed values, the Data Docs page shows them."""
    from persona_tasks.alerts import alert_from_context, read_alerts, send_alert

    settings = wh["settings"]
    write_day(wh["landing"], D3, 200, seed=13, bogus=60)
    ingested = daily.ingest_landing(settings, D3)
    with pytest.raises(daily.GateError) as err:
        daily.gate_raw(settings, D3, ingested)
    assert err.value.checks == ["rejected_share", "volume"]
    assert "rejected_share (observed 0.3" in str(err.value) and "volume (observed 0.0" in str(err.value)
    df = results(settings, D3, "gate_raw")
    assert df.height == len(raw.CHECKS)  # every check ran, not only up to the first failure
    assert sorted(df.filter(~pl.col("success"))["check_name"]) == ["rejected_share", "volume"]
    rej, vol = latest(settings, D3, "rejected_share"), latest(settings, D3, "volume")
    assert json.loads(rej["observed_value"]) == pytest.approx(0.3) and rej["severity"] == "block"
    assert json.loads(vol["observed_value"]) == pytest.approx(140 / 2000, rel=0.15)  # 140 accepted of ~2,000
    assert rej["unexpected_ids"] == [] and rej["docs_page"] == vol["docs_page"]
    text = page_text(rej["docs_page"])
    assert "rejected_share (block)" in text and "volume (block)" in text and "0.3" in text
    # the alert the DAG's failure callback sends (real code path, webhook on loopback)
    n = len(webhook[1])
    alert = send_alert(settings, alert_from_context(settings, {"exception": err.value, "ti": None,
                                                               "logical_date": None}))
    assert alert.failing_check == "rejected_share, volume" and alert.docs_url == rej["docs_page"]
    row = read_alerts(settings).row(-1, named=True)
    assert row["failing_check"] == "rejected_share, volume" and row["docs_url"] == rej["docs_page"]
    assert "rejected_share: " in row["runbook"] and "volume: " in row["runbook"]
    posted = webhook[1][n]["text"]
    assert "checks rejected_share, volume" in posted and "Data Docs: file://" in posted


def test_history_queries_of_the_runbook(wh):
    """docs/oncall.md's "what failed last night" and "since when" queries on the warehouse of the tests above."""
    settings = wh["settings"]
    if not results(settings, D3).height:
        pytest.skip("needs test_volume_drop_and_rejected_rows_fail_naming_both_checks")
    doc = (PROJECT_DIR / "docs" / "oncall.md").read_text()
    assert R.FAILED_LAST_NIGHT_SQL in doc
    with connect(settings) as con:
        last = R.failed_last_night(con)
        assert {"rejected_share", "volume"} <= set(last["check_name"])
        assert R.failing_since(con, "volume") == (date.fromisoformat(D3), 1, date.fromisoformat(D3))
        assert R.failing_since(con, "raw_columns") == (None, 0, None)  # never failed


def test_override_is_refused_unless_a_blocking_check_failed_then_publishes(wh, webhook):
    from persona_tasks.cli import main
    from persona_tasks.gates.overrides import OverrideRefused, record_override

    settings = wh["settings"]
    if not results(settings, D3).height:
        pytest.skip("needs test_volume_drop_and_rejected_rows_fail_naming_both_checks")
    with pytest.raises(OverrideRefused, match="passed on 2026-02-03"):
        record_override(settings, D3, "raw_columns", "looks fine", by="jane")
    with pytest.raises(OverrideRefused, match="run date 2026-03-01 does not exist"):
        record_override(settings, "2026-03-01", "volume", "looks fine", by="jane")
    with pytest.raises(OverrideRefused, match="not evaluated"):
        record_override(settings, D3, "no_such_check", "looks fine", by="jane")
    # the CLI verb, against the configured warehouse
    import os

    os.environ["PERSONA_ETL_WAREHOUSE"] = str(settings.warehouse)
    try:
        assert main(["gate", "override", "--run-date", D3, "--check", "volume", "--reason",
                     "holiday: a real drop", "--by", "jane"]) == 0
        assert main(["gate", "override", "--run-date", D3, "--check", "raw_types", "--reason", "x"]) == 2
    finally:
        os.environ.pop("PERSONA_ETL_WAREHOUSE")
    ingested = daily.ingest_landing(settings, D3)
    with pytest.raises(daily.GateError) as err:  # only the overridden check turned into a warning
        daily.gate_raw(settings, D3, ingested)
    assert err.value.checks == ["rejected_share"]
    record_override(settings, D3, "rejected_share", "the bogus type is a known upstream test row", by="ops-bot")
    n = len(webhook[1])
    out = daily.gate_raw(settings, D3, ingested)
    assert out["blocking"] == [] and set(out["overridden"]) == {"rejected_share", "volume"}
    vol = latest(settings, D3, "volume")
    assert not vol["success"] and vol["severity"] == "warn" and vol["overridden_by"] == "jane"
    assert vol["override_reason"] == "holiday: a real drop"
    assert "overridden for this day" in page_text(vol["docs_page"])
    # the warning alert names both and shows the override
    assert "passed with failed warning checks" in webhook[1][n]["text"]
    assert "overridden by jane: holiday: a real drop" in webhook[1][n]["text"]
    # the rest of the day runs and publishes
    built = daily.build(settings, D3)
    daily.gate_memories(settings, D3, built)
    emb = daily.embed(settings, D3)
    shards = [daily.cluster_shard(settings, D3, 0, 1, emb)]
    daily.store_clusters(settings, D3, shards, emb)
    daily.label(settings, D3)
    daily.score(settings, D3)
    daily.gate_personas(settings, D3)
    assert daily.publish(settings, D3)["personas"] > 0
    # the override holds for that day only: the next day's volume check blocks again
    with connect(settings) as con:
        assert query_row(con, "SELECT count(*) FROM quality_overrides")[0] == 2


def test_memories_with_an_empty_text_fail_the_memory_gate(wh):
    settings = wh["settings"]
    built = daily.build(settings, D2)
    with connect(settings) as con:
        mid, text = query_row(con, "SELECT memory_id, memory_text FROM marts.intent_memories WHERE event_date = $d "
                                   "ORDER BY memory_id LIMIT 1", {"d": D2})
        con.execute("UPDATE marts.intent_memories SET memory_text = '  ' WHERE memory_id = $m", {"m": mid})
    try:
        with pytest.raises(daily.GateError) as err:
            daily.gate_memories(settings, D2, built)
        assert err.value.checks == ["memory_text"] and mid in str(err.value)
        row = latest(settings, D2, "memory_text")
        assert row["unexpected_ids"] == [mid] and row["unexpected_count"] == 1
        assert "memory_text (block)" in page_text(row["docs_page"])
    finally:
        with connect(settings) as con:
            con.execute("UPDATE marts.intent_memories SET memory_text = $t WHERE memory_id = $m", {"t": text, "m": mid})
    assert daily.gate_memories(settings, D2, built)["blocking"] == []


def _restage(settings, day: str) -> None:
    daily.label(settings, day)
    daily.score(settings, day)


def test_fabricated_claims_fail_on_truthfulness(wh):
    """Descriptions whose claims no evidence supports, scored for real: truthfulness falls under the floor."""
    settings = wh["settings"]
    _restage(settings, D2)
    with connect(settings) as con:
        con.execute("UPDATE personas.staged_personas SET description = 'Breeds Siberian huskies in Reykjavik 1743. "
                    "Restores Portuguese maritime charts for Zanzibar museums.' WHERE run_date = $d", {"d": D2})
    daily.score(settings, D2)
    with pytest.raises(daily.GateError) as err:
        daily.gate_personas(settings, D2)
    assert "low_truthfulness_share" in err.value.checks and "quality_truthfulness" in err.value.checks
    low = latest(settings, D2, "low_truthfulness_share")
    assert json.loads(low["observed_value"]) > 0.25 and len(low["unexpected_ids"]) == 5
    mean = latest(settings, D2, "quality_truthfulness")
    assert json.loads(mean["observed_value"]) < 0.5 and json.loads(mean["threshold"]) == {"min_value": 0.5}
    _restage(settings, D2)
    assert daily.gate_personas(settings, D2)["blocking"] == []


def test_email_in_a_persona_fails_pii_without_recording_it(wh):
    settings = wh["settings"]
    _restage(settings, D2)
    with connect(settings) as con:
        pid = query_row(con, "SELECT min(persona_id) FROM personas.staged_personas WHERE run_date = $d", {"d": D2})[0]
        con.execute("UPDATE personas.staged_personas SET label = label || $x WHERE persona_id = $p",
                    {"x": f" {EMAIL}", "p": pid})
    with pytest.raises(daily.GateError) as err:
        daily.gate_personas(settings, D2)
    assert err.value.checks == ["pii"] and pid in str(err.value) and EMAIL not in str(err.value)
    row = latest(settings, D2, "pii")
    assert row["unexpected_ids"] == [pid] and row["unexpected_count"] == 1
    assert EMAIL not in json.dumps(results(settings, D2).to_dicts(), default=str)
    assert EMAIL not in page_text(row["docs_page"]) and "pii (block)" in page_text(row["docs_page"])
    from persona_tasks.gates.site import gx_dir

    stored = "".join(p.read_text() for p in gx_dir(settings).rglob("*.json"))
    assert EMAIL not in stored  # GX's own stores hold no persona text either
    _restage(settings, D2)


def test_topic_mix_drift_warns_and_publishes(wh, webhook):
    """Every staged persona of a day moved onto one topic of the last published run: the topic mix drifts (warn:
    the gate passes and alerts)."""
    from persona_tasks.alerts import read_alerts

    settings = wh["settings"]
    _restage(settings, D2)
    with connect(settings) as con:
        prev = query_row(con, "SELECT max(run_date) FROM personas.personas WHERE run_date < $d", {"d": D2})[0]
        vec = query_row(con, "SELECT e.embedding FROM personas.personas p JOIN personas.persona_embeddings e "
                             "USING (persona_id, version) WHERE p.run_date = $d AND p.topic_id = (SELECT topic_id "
                             "FROM personas.persona_topics WHERE run_date <= $d ORDER BY run_date DESC, n_personas "
                             "DESC LIMIT 1) LIMIT 1", {"d": prev})[0]
        con.execute("UPDATE personas.staged_persona_embeddings SET embedding = $v WHERE run_date = $d",
                    {"v": vec, "d": D2})
    n = len(webhook[1])
    out = daily.gate_personas(settings, D2)
    assert out["blocking"] == [] and "topic_mix_drift" in out["warned"] and out["topic_js_distance"] > 0.5
    row = latest(settings, D2, "topic_mix_drift")
    assert not row["success"] and row["severity"] == "warn"
    assert json.loads(row["observed_value"]) == pytest.approx(out["topic_js_distance"], abs=1e-4)
    alert = read_alerts(settings).row(-1, named=True)
    assert alert["error_type"] == "GateWarning" and "topic_mix_drift" in alert["failing_check"]
    assert "topic_mix_drift" in webhook[1][n]["text"]
    assert "topic_mix_drift (warn)" in page_text(row["docs_page"])
    _restage(settings, D2)


def test_severity_config_and_unknown_names(wh):
    from persona_tasks.errors import PersonaEtlError

    settings = wh["settings"]
    bad = settings.model_copy(update={"gates": settings.gates.model_copy(update={"severity": {"volum": "warn"}})})
    with pytest.raises(PersonaEtlError, match="volum"):
        daily.gate_personas(bad, D2)


def test_data_docs_keep_only_the_last_runs(wh):
    """Pruning bounds the site: after more runs than docs_keep_runs, each suite keeps that many results/pages."""
    from persona_tasks.gates import site

    settings = wh["settings"]
    keep = settings.model_copy(update={"gates": settings.gates.model_copy(update={"docs_keep_runs": 2})})
    for _ in range(3):
        daily.gate_personas(keep, D2)
    ctx = site.context(keep)
    keys = [k for k in ctx.validation_results_store.list_keys()
            if k.expectation_suite_identifier.name == "gate_personas.run"]
    assert len(keys) == 2
    pages = list((site.docs_dir(keep) / "validations" / "gate_personas" / "run").rglob("*.html"))
    assert len(pages) == 2


def test_demo_prints_each_days_gate_results_and_the_data_docs(wh, capsys):
    """What ``make demo`` prints after the DAG run: per run date the checks and failures, and the Data Docs index."""
    from persona_tasks.demo import show_gates
    from persona_tasks.gates import site

    show_gates(wh["settings"])
    out = capsys.readouterr().out
    assert f"  {D1}: " in out and f"  {D2}: " in out and "checks, 0 blocking" in out
    assert str(site.docs_dir(wh["settings"]) / "index.html") in out
    assert (site.docs_dir(wh["settings"]) / "index.html").is_file()
