"""The synthetic generator: determinism, exact sizes, recoverable planted structure, realistic text."""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl
import pytest

from persona_tasks import synth
from persona_tasks.config import Settings

N = 6_000


@pytest.fixture(scope="module")
def events() -> pl.DataFrame:
    return synth.generate_events(N, n_users=80, seed=7, days=5, start="2026-03-02")


def test_deterministic_for_a_seed():
    a = synth.generate_events(3_000, seed=11)
    b = synth.generate_events(3_000, seed=11)
    c = synth.generate_events(3_000, seed=12)
    assert a.equals(b)
    assert not a.equals(c)
    assert not a.select("user_id", "text").equals(c.select("user_id", "text"))


@pytest.mark.parametrize(("n_events", "n_users"), [(1, None), (2, 2), (17, 3), (999, None), (5_000, 1_000), (4_321, 7)])
def test_exact_sizes(n_events, n_users):
    df = synth.generate_events(n_events, n_users=n_users, seed=1)
    assert df.height == n_events
    expected_users = n_users if n_users is not None else max(1, n_events // 60)
    assert df["user_id"].n_unique() == expected_users


def test_columns_and_types(events):
    assert events.columns == [
        "user_id", "event_ts", "event_type", "item_id", "text", "category", "brand", "price",
        "planted_persona", "planted_session", "planted_noise",
    ]
    assert events.schema["event_ts"] == pl.Datetime("us")
    assert events.schema["planted_session"] == pl.Int64
    assert events.schema["price"] == pl.Float64
    assert events.select(pl.col("user_id", "event_ts", "event_type", "text").null_count()).sum_horizontal().item() == 0
    # searches carry a query and no item; the other actions an item with category, brand and price
    searches = events.filter(pl.col("event_type") == "search")
    others = events.filter(pl.col("event_type") != "search")
    assert searches.select(pl.col("item_id", "category", "brand", "price").null_count()).sum_horizontal().item() == 4 * searches.height
    assert others.select(pl.col("item_id", "category", "brand", "price").null_count()).sum_horizontal().item() == 0
    assert (others["price"] > 0).all()


def test_event_types_are_in_the_contract(events):
    allowed = set(Settings().ingest.event_types)
    assert set(events["event_type"].unique()) <= allowed
    assert set(synth.EVENT_TYPES) <= allowed
    assert set(events["event_type"].unique()) == set(synth.EVENT_TYPES)


def test_time_range_and_unique_timestamps(events):
    start = datetime(2026, 3, 2)
    assert events["event_ts"].min() >= start
    assert events["event_ts"].max() < start + timedelta(days=5)
    # one user never has two actions at the same instant (so no two events share a content hash)
    assert events.select("user_id", "event_ts").is_unique().all()
    assert events.equals(events.sort("user_id", "event_ts"))


def test_each_session_is_one_user_and_one_persona(events):
    per_session = events.group_by("planted_session").agg(
        pl.col("user_id").n_unique().alias("users"), pl.col("planted_persona").n_unique().alias("personas")
    )
    assert (per_session["users"] == 1).all()
    assert (per_session["personas"] == 1).all()
    per_user = events.group_by("user_id").agg(pl.col("planted_persona").n_unique().alias("k"))
    assert per_user["k"].min() >= 1
    assert per_user["k"].max() <= 4
    assert per_user["k"].max() >= 2  # multi-persona users exist
    assert set(events["planted_persona"].unique()) <= set(synth.TOPIC_KEYS)


def test_session_gaps_make_sessions_recoverable(events):
    df = events.with_columns(
        gap=(pl.col("event_ts") - pl.col("event_ts").shift(1)).over("user_id"),
        same_session=pl.col("planted_session") == pl.col("planted_session").shift(1).over("user_id"),
        same_day=pl.col("event_ts").dt.date() == pl.col("event_ts").shift(1).over("user_id").dt.date(),
    ).filter(pl.col("gap").is_not_null())
    inside = df.filter("same_session")
    between = df.filter(~pl.col("same_session"))
    assert inside.height > 0 and between.height > 0
    assert inside["gap"].max() < timedelta(minutes=30)
    assert inside["gap"].min() >= timedelta(seconds=1)
    assert inside["same_day"].all()  # no planted session crosses a UTC midnight
    assert between["gap"].min() > timedelta(minutes=30)
    # the sessions rule of docs/ARCHITECTURE.md recovers the planted sessions exactly
    rebuilt = events.with_columns(
        new=(
            (pl.col("user_id") != pl.col("user_id").shift(1))
            | ((pl.col("event_ts") - pl.col("event_ts").shift(1)) > timedelta(minutes=30))
            | (pl.col("event_ts").dt.date() != pl.col("event_ts").shift(1).dt.date())
        ).fill_null(True)
    ).with_columns(session=pl.col("new").cum_sum() - 1)
    assert rebuilt["session"].n_unique() == events["planted_session"].n_unique()
    assert (rebuilt["session"] == rebuilt["planted_session"] - rebuilt["planted_session"].min()).all()


def test_session_action_order_is_realistic(events):
    ordered = events.with_columns(pos=pl.int_range(pl.len()).over("planted_session"))
    firsts = ordered.filter(pl.col("pos") == 0)
    assert (firsts["event_type"] == "search").mean() > 0.7
    assert set(firsts["event_type"].unique()) <= {"search", "view"}
    prev = events.with_columns(
        prev_type=pl.col("event_type").shift(1).over("planted_session"),
        prev_item=pl.col("item_id").shift(1).over("planted_session"),
    )
    carts = prev.filter(pl.col("event_type") == "cart")
    buys = prev.filter(pl.col("event_type") == "purchase")
    assert carts.height > 0 and buys.height > 0
    assert (carts["prev_type"] == "view").all() and (carts["item_id"] == carts["prev_item"]).all()
    assert (buys["prev_type"] == "cart").all() and (buys["item_id"] == buys["prev_item"]).all()
    sizes = events.group_by("planted_session").len()["len"]
    assert 4 <= sizes.mean() <= 8


def test_text_comes_from_the_planted_topic(events):
    topics = {t.key: t for t in synth.TOPICS}
    suffixes = ("", " reddit", " youtube")
    wrong = 0
    for row in events.filter(~pl.col("planted_noise")).iter_rows(named=True):
        t = topics[row["planted_persona"]]
        if row["event_type"] == "search":
            ok = any(row["text"] == q + s for q in t.queries for s in suffixes)
        else:
            ok = row["text"] in t.item_titles and row["brand"] in t.brands
        wrong += not ok
    assert wrong == 0
    noise_share = events["planted_noise"].mean()
    assert 0.0 < noise_share < 0.06


def test_topics_are_rich_and_distinct():
    assert len(synth.TOPICS) >= 20
    assert len(set(synth.TOPIC_KEYS)) == len(synth.TOPICS)
    all_titles = [title for t in synth.TOPICS for title in t.item_titles]
    assert len(all_titles) == len(set(all_titles))
    for t in synth.TOPICS:
        assert len(t.queries) >= 10, t.key
        assert len(t.item_titles) >= 15, t.key
        assert len(t.brands) >= 5, t.key
        for c in t.categories:
            lo, hi = c.price_range
            assert 0 < lo < hi
        for q in t.queries:
            assert q == q.strip() and q.lower() == q and len(q.split()) >= 2, q


def test_catalogue_prices_are_in_range_and_fixed():
    a = synth.generate_events(2_000, seed=1)
    b = synth.generate_events(2_000, seed=2)
    prices = pl.concat([a, b]).drop_nulls("item_id").group_by("item_id").agg(pl.col("price").n_unique())
    assert (prices["price"] == 1).all()  # an item has one price whatever the seed


def test_too_dense_users_are_refused():
    with pytest.raises(ValueError, match="n_users"):
        synth.generate_events(20_000, n_users=1, days=1)
    with pytest.raises(ValueError):
        synth.generate_events(10, n_users=11)
    with pytest.raises(ValueError):
        synth.generate_events(0)


def test_write_events_roundtrip(tmp_path, events):
    path = synth.write_events(events, tmp_path / "sub" / "events.parquet")
    assert pl.read_parquet(path).equals(events)


def test_generate_memories():
    m = synth.generate_memories(50, (2, 6), seed=5)
    assert m.columns == [
        "user_id", "memory_id", "memory_text", "embedding_text", "planted_persona", "planted_session", "n_actions",
        "started_at"
    ]
    assert m.equals(m.sort("user_id", "started_at")) and m.equals(m.sort("planted_session"))
    counts = m.group_by("user_id").len()["len"]
    assert m["user_id"].n_unique() == 50 and counts.min() >= 2 and counts.max() <= 6
    assert m["memory_id"].is_unique().all()
    assert m.equals(synth.generate_memories(50, (2, 6), seed=5))
    assert not m.equals(synth.generate_memories(50, (2, 6), seed=6))
    verbs = tuple(v + ": " for v in synth.ACTION_VERBS.values())
    assert all(t.startswith(verbs) for t in m["memory_text"])
    assert (m["memory_text"].str.len_chars() <= 600).all()
    assert m.group_by("user_id").agg(pl.col("planted_persona").n_unique())["planted_persona"].max() <= 4
    fixed = synth.generate_memories(10, 3, seed=0, max_chars=80)
    assert fixed.height == 30 and (fixed["memory_text"].str.len_chars() <= 80).all()
    assert fixed["memory_text"].str.ends_with("…").any()


def test_memory_text_collapses_consecutive_duplicates():
    df = pl.DataFrame({"g": [1, 1, 1, 1, 2], "t": ["view", "view", "search", "view", "like"], "x": ["a", "a", "q", "a", "b"]})
    out = df.group_by("g", maintain_order=True).agg(
        synth.memory_text(synth.action_part(pl.col("t"), pl.col("x")), 600).alias("m")
    )
    assert out["m"].to_list() == ["viewed: a; searched: q; viewed: a", "liked: b"]


def test_generated_file_ingests_cleanly(tmp_path):
    ingest = pytest.importorskip("persona_tasks.ingest")
    if not hasattr(ingest, "ingest_files"):
        pytest.skip("persona_tasks.ingest.ingest_files not available yet")
    from persona_tasks.config import EventsMapping, IngestSettings
    from persona_tasks.warehouse import connect

    df = synth.generate_events(2_000, seed=3)
    path = synth.write_events(df, tmp_path / "events.parquet")
    settings = Settings(
        warehouse=tmp_path / "w.duckdb",
        ingest=IngestSettings(events=EventsMapping(attributes=synth.EVENTS_MAPPING_ATTRIBUTES)),
    )
    ingest.ingest_files(settings, "events", [path])
    with connect(settings) as con:
        n, = con.execute("SELECT count(*) FROM raw.events").fetchone()
        rejected, = con.execute("SELECT count(*) FROM raw.events_rejected").fetchone()
        brands, = con.execute(
            "SELECT count(*) FROM raw.events WHERE attributes->>'brand' IS NOT NULL"
        ).fetchone()
    assert (n, rejected) == (2_000, 0)
    assert brands == df["brand"].is_not_null().sum()


# ----------------------------------------------------------------------------------------------------------------
# The benchmark's three baselines (bench/bench_memories.py) must compute the same memories, with the semantics of
# docs/ARCHITECTURE.md. They are checked here on hand-made edge cases and on generated events.
# ----------------------------------------------------------------------------------------------------------------
def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_memories.py"
    spec = importlib.util.spec_from_file_location("bench_memories", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _raw_events(df: pl.DataFrame) -> pl.DataFrame:
    """raw.events-like columns; event_id any unique string (the baselines only sort by it)."""
    import hashlib

    return df.with_columns(
        event_id=pl.concat_str(
            pl.col("user_id"), pl.col("event_ts").cast(pl.String), pl.col("event_type"),
            pl.col("item_id").fill_null(""), pl.col("text").fill_null(""), separator="\x1f",
        ).map_elements(lambda s: hashlib.md5(s.encode()).hexdigest(), return_dtype=pl.String),
        source=pl.lit("events"),
    ).select("event_id", "user_id", "event_ts", "event_type", "item_id", "text", "source")


def _run_baselines(bm, raw: pl.DataFrame, tmp_path, gap=30, max_chars=600) -> dict[str, pl.DataFrame]:
    path = tmp_path / "raw.parquet"
    raw.write_parquet(path)
    con = bm.run_duckdb(None, str(path), 2, gap, max_chars)
    outs = {
        "duckdb": con.sql("SELECT * FROM bench_memories").pl(),
        "polars": bm.run_polars(str(path), gap, max_chars),
        "pandas": pl.from_pandas(bm.run_pandas(str(path), gap, max_chars)),
    }
    con.close()
    cols = ["user_id", "session_id", "started_at", "ended_at", "n_actions", "event_types", "memory_text", "event_ids"]
    return {
        k: v.select(
            pl.col("user_id", "session_id").cast(pl.String),
            pl.col("started_at", "ended_at").cast(pl.Datetime("us")),
            pl.col("n_actions").cast(pl.Int64),
            pl.col("event_types", "event_ids").cast(pl.List(pl.String)),
            pl.col("memory_text").cast(pl.String),
        ).select(cols).sort("user_id", "started_at")
        for k, v in outs.items()
    }


def test_bench_baselines_edge_cases(tmp_path):
    bm = _bench_module()
    t = lambda s: datetime.fromisoformat(s)  # noqa: E731
    rows = [
        # user a: gap exactly 30 min stays in the session, 30 min 1 s starts a new one
        ("e01", "a", t("2026-01-01 10:00:00"), "search", None, "espresso grinder"),
        ("e02", "a", t("2026-01-01 10:30:00"), "view", "sku1", "Niche burr grinder"),
        ("e03", "a", t("2026-01-01 10:30:00"), "view", "sku1", "Niche burr grinder"),  # tie: ordered by event_id
        ("e04", "a", t("2026-01-01 11:00:01"), "search", None, "mail me at jo.doe@example.com or +1 (555) 123-4567"),
        # user a: 15 minutes apart but across UTC midnight: two sessions
        ("e05", "a", t("2026-01-01 23:50:00"), "like", "sku2", "Hatch Rest sleep trainer clock"),
        ("e06", "a", t("2026-01-02 00:05:00"), "cart", "sku2", "Hatch Rest sleep trainer clock"),
        # user b: consecutive duplicates collapse, a later repeat does not; unknown type keeps its name
        ("e07", "b", t("2026-01-01 09:00:00"), "view", "sku3", "Trek gravel bike"),
        ("e08", "b", t("2026-01-01 09:01:00"), "view", "sku3", "Trek gravel bike"),
        ("e09", "b", t("2026-01-01 09:02:00"), "click", "sku4", None),
        ("e10", "b", t("2026-01-01 09:03:00"), "view", "sku3", "Trek gravel bike"),
        ("e11", "b", t("2026-01-01 09:04:00"), "purchase", "sku3", "order 12345678"),
    ]
    raw = pl.DataFrame(rows, schema=["event_id", "user_id", "event_ts", "event_type", "item_id", "text"], orient="row")
    raw = raw.with_columns(source=pl.lit("test")).sample(fraction=1.0, shuffle=True, seed=1)
    outs = _run_baselines(bm, raw, tmp_path)
    ref = outs["duckdb"]
    for name, df in outs.items():
        assert df.equals(ref), name
    assert ref["n_actions"].to_list() == [3, 1, 1, 1, 5]
    assert ref["session_id"].to_list() == ["e01", "e04", "e05", "e06", "e07"]
    assert ref["event_ids"].to_list()[0] == ["e01", "e02", "e03"]
    assert ref["memory_text"].to_list() == [
        "searched: espresso grinder; viewed: Niche burr grinder",
        "searched: mail me at [email] or [phone]",
        "liked: Hatch Rest sleep trainer clock",
        "added to cart: Hatch Rest sleep trainer clock",
        "viewed: Trek gravel bike; clicked: sku4; viewed: Trek gravel bike; purchased: order [number]",
    ]
    assert ref["event_types"].to_list()[4] == ["view", "click", "purchase"]
    capped = _run_baselines(bm, raw, tmp_path, max_chars=20)
    for df in capped.values():
        assert df["memory_text"].to_list()[0] == "searched: espresso …"
        assert df.equals(capped["duckdb"])


def test_bench_baselines_recover_planted_sessions(tmp_path):
    bm = _bench_module()
    df = synth.generate_events(3_000, n_users=40, seed=2)
    outs = _run_baselines(bm, _raw_events(df), tmp_path)
    for name, out in outs.items():
        assert out.equals(outs["duckdb"]), name
    planted = (
        df.group_by("planted_session")
        .agg(pl.col("user_id").first(), pl.col("event_ts").min().alias("started_at"), pl.len().cast(pl.Int64).alias("n"))
        .sort("user_id", "started_at")
    )
    assert outs["duckdb"].select("user_id", "started_at", pl.col("n_actions").alias("n")).equals(
        planted.select("user_id", "started_at", "n")
    )


@pytest.mark.slow
def test_bench_harness_tiny(tmp_path):
    bm = _bench_module()
    rc = bm.main(["--sizes", "2000", "--out", str(tmp_path), "--skip", "ingest,dbt_build,dbt_noop"])
    assert rc == 0
    import json

    doc = json.loads((tmp_path / "bench_memories.json").read_text())
    size = doc["sizes"][0]
    assert size["check"]["ok"] and set(size["best"]) == {"duckdb_sql", "duckdb_parquet", "polars_lazy", "pandas"}
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in size["best"].values())
