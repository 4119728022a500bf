"""global_umap_hdbscan: one UMAP fitted on a sample of all users' memories, stored, applied with transform."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import polars as pl
import pytest
from test_cluster import mean_ari, planted_vectors

from persona_tasks import cluster as C
from persona_tasks.config import ClusteringSettings, load_settings

STRATEGY = "global_umap_hdbscan"


@pytest.fixture(scope="module")
def planted() -> pl.DataFrame:
    return planted_vectors(24, seed=5)


@pytest.fixture(scope="module")
def model(planted) -> C.GlobalUMAP:
    x = C.embeddings_to_numpy(planted["embedding"])
    return C.fit_global_umap(x, ClusteringSettings(), model_version="test-model@0", fitted_on="2026-01-01")


def _with(model: C.GlobalUMAP) -> C.Strategy:
    cfg = ClusteringSettings()
    return C.Strategy(STRATEGY, C.GlobalUMAPReducer(model), C._hdbscan(cfg))


def test_registered_with_the_configured_reducer():
    cfg = ClusteringSettings(strategy=STRATEGY, global_umap_fit_sample=123)
    s = C.get_strategy(STRATEGY, cfg)
    assert isinstance(s.reducer, C.GlobalUMAPReducer) and s.reducer.model is None
    assert s.reducer.fit_sample == 123


def test_fit_persist_load_transform_gives_identical_labels(planted, model, tmp_path):
    path = model.save(tmp_path / "m")
    loaded = C.GlobalUMAP.load(path)
    assert loaded.meta == model.meta and loaded.meta["model_version"] == "test-model@0"
    x = C.embeddings_to_numpy(planted["embedding"])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert np.array_equal(loaded.transform(x), model.transform(x))
    cfg = ClusteringSettings()
    a = C.cluster_frame(planted, cfg, _with(model))
    b = C.cluster_frame(planted, cfg, _with(loaded))
    c = C.cluster_frame(planted, cfg, _with(C.GlobalUMAP.load(path)))  # a rerun of the day
    assert a.assignments.equals(b.assignments) and a.users.equals(b.users)
    assert a.assignments.equals(c.assignments)
    # refitting on the same sample gives the same model (seeded, single-threaded)
    again = C.fit_global_umap(C.embeddings_to_numpy(planted["embedding"]), cfg, model_version="test-model@0",
                              fitted_on="2026-01-01")
    assert again.meta["sample_digest"] == model.meta["sample_digest"]
    assert np.array_equal(again.embedding, model.embedding)


def test_a_memory_s_coordinates_do_not_depend_on_the_batch(planted, model):
    """Exact neighbours and a fixed weight scale: transforming one user alone, or the users in another order or
    in shards, gives the same coordinates, so a user's clusters do not depend on the day's other users."""
    x = C.embeddings_to_numpy(planted["embedding"])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    whole = model.transform(x)
    assert np.array_equal(model.transform(x[:30]), whole[:30])
    rev = np.arange(x.shape[0])[::-1]
    assert np.array_equal(model.transform(x[rev]), whole[rev])
    assert np.array_equal(model.transform(x, chunk=7), whole)
    settings = load_settings(threads=1, clustering={"strategy": STRATEGY})
    all_at_once = C.cluster_users(settings, planted, global_umap=model)
    parts = [C.cluster_users(settings, planted, shard=i, n_shards=3, global_umap=model) for i in range(3)]
    joined = pl.concat([p.assignments for p in parts]).sort("user_id", "memory_id")
    assert joined.equals(all_at_once.assignments.sort("user_id", "memory_id"))


def test_planted_vectors_recovered(planted, model):
    res = C.cluster_frame(planted, ClusteringSettings(), _with(model))
    assert res.strategy == STRATEGY
    assert mean_ari(res, planted) > 0.95  # 0.998 when written


@pytest.mark.filterwarnings("ignore:n_jobs value")
def test_planted_personas_recovered_from_real_minilm_embeddings():
    """Synth memories embedded with MiniLM (as bench/bench_clustering.py's exact set): the global UMAP fitted on
    another set of synth users' memories (as the daily run fits on all users, not only the day's)."""
    from persona_tasks import synth
    from persona_tasks.embed import SentenceTransformerEmbedder

    emb = SentenceTransformerEmbedder(batch_size=32, threads=1)

    def frame(users: int, seed: int) -> pl.DataFrame:
        mem = synth.generate_memories(users, 24, seed=seed)
        return mem.with_columns(
            pl.Series("embedding", emb.encode(mem["embedding_text"].to_list())),
            pl.col("planted_session").alias("started_at"), pl.col("planted_persona").alias("planted"))

    fit, test = frame(24, 21), frame(16, 12)
    cfg = ClusteringSettings()
    model = C.fit_global_umap(C.embeddings_to_numpy(fit["embedding"]), cfg)
    res = C.cluster_frame(test, cfg, _with(model))
    ari = mean_ari(res, test)
    # 0.925 when written (hdbscan_direct: 0.783 on the same vectors); bench/results/bench_clustering_global_umap.json
    # has the 10,000-user figures
    assert ari > 0.85
    assert res.summary()["coverage"] > 0.95


def _warehouse(tmp_path, planted, version: str):
    from persona_tasks.embed import EMBEDDINGS_TABLE, ensure_schema
    from persona_tasks.warehouse import connect

    settings = load_settings(warehouse=tmp_path / "w.duckdb", threads=1,
                             clustering={"strategy": STRATEGY, "global_umap_refit_days": 7})
    mart = planted.select("memory_id", "user_id", "started_at",
                          pl.format("text {}", pl.col("memory_id")).alias("embedding_text"))
    con = connect(settings)
    ensure_schema(con)
    con.execute("CREATE SCHEMA marts")
    con.register("mart", mart.to_arrow())
    con.execute("CREATE TABLE marts.intent_memories AS SELECT * FROM mart")
    emb = planted.select("memory_id", pl.col("embedding").cast(pl.List(pl.Float32)))
    con.register("emb", emb.to_arrow())
    con.execute(f"INSERT INTO {EMBEDDINGS_TABLE} SELECT e.memory_id, $v, md5(m.embedding_text), e.embedding, "
                "now()::TIMESTAMP FROM emb e JOIN mart m USING (memory_id)", {"v": version})
    return settings, con


def test_stored_fit_is_reused_then_refitted_on_schedule_and_per_embedding_model(planted, tmp_path):
    version = "test-model@000000000000"
    settings, con = _warehouse(tmp_path, planted, version)
    day = date(2026, 1, 2)
    with con:
        first = C.ensure_global_umap(settings, con, version, day)
        assert first == C.global_umap_root(settings) / "test-model-000000000000" / day.isoformat()
        assert first.parent.parent == tmp_path / "models" / "global_umap"
        meta = C.GlobalUMAP.load(first).meta
        assert meta["model_version"] == version and meta["fitted_on"] == day.isoformat()
        assert meta["n_sample"] == planted.height  # fewer memories than global_umap_fit_sample: all of them
        # within refit_days: the same fit; a rerun of an earlier day never uses a later fit
        assert C.ensure_global_umap(settings, con, version, day + timedelta(days=6)) == first
        assert C.find_global_umap(settings, version, day - timedelta(days=1)) is None
        # refit_days later: a new fit (same data, same seed: the same model)
        later = C.ensure_global_umap(settings, con, version, day + timedelta(days=7))
        assert later != first and later.name == (day + timedelta(days=7)).isoformat()
        assert np.array_equal(C.GlobalUMAP.load(later).embedding, C.GlobalUMAP.load(first).embedding)
        # another embedding model: no stored fit for it
        assert C.find_global_umap(settings, "other-model@1", day) is None
        # other UMAP settings: the stored fit does not apply
        other = settings.model_copy(update={"clustering": settings.clustering.model_copy(
            update={"umap_n_components": 3})})
        assert C.find_global_umap(other, version, day) is None


def test_run_clustering_with_the_stored_model_is_repeatable(planted, tmp_path):
    version = "test-model@000000000000"
    settings, con = _warehouse(tmp_path, planted, version)
    with con:
        a = C.run_clustering(settings, con, model_version=version)
        stored = list((C.global_umap_root(settings) / "test-model-000000000000").iterdir())
        b = C.run_clustering(settings, con, model_version=version)
        assert list((C.global_umap_root(settings) / "test-model-000000000000").iterdir()) == stored
        n = con.execute("SELECT count(*) FROM personas.memory_clusters WHERE strategy = $s",
                        {"s": STRATEGY}).fetchall()[0][0]
    assert len(stored) == 1
    assert a.strategy == STRATEGY and a.assignments.equals(b.assignments)
    assert n == planted.height
    assert mean_ari(a, planted) > 0.9


def test_daily_run_fits_once_in_embed_and_every_shard_applies_it(tmp_path_factory):
    """The DAG's task functions with this strategy: the embed step stores the day's fit and the shards load it.
    (A rerun's reuse of the stored fit and identical clusters are tested above without the whole day, which costs
    minutes in CI.)"""
    from persona_tasks import daily
    from persona_tasks.synth import generate_events, write_events
    from persona_tasks.warehouse import connect, query_pl

    day = "2026-01-04"
    tmp = tmp_path_factory.mktemp("daily_global_umap")
    write_events(generate_events(3000, n_users=30, seed=5, days=3, start="2026-01-02"),
                 tmp / "landing" / day / "events.parquet")
    settings = load_settings(
        warehouse=tmp / "wh" / "warehouse.duckdb", threads=2, models_dir=tmp_path_factory.mktemp("models"),
        embedding={"backend": "static"}, ingest={"events": {"attributes": ["category", "brand", "price"]}},
        dbt={"target_path": tmp / "dbt_target"}, gates={"lateness_hours": 48},
        clustering={"strategy": STRATEGY},
        orchestration={"landing_dir": str(tmp / "landing"), "landing_format": "events", "landing_source": "synth",
                       "n_shards": 2})

    first = daily.run_day(settings, day)
    path = first["embed"]["global_umap"]
    assert path is not None and path.startswith(str(tmp / "wh" / "models" / "global_umap"))
    meta = C.GlobalUMAP.load(path).meta
    assert meta["model_version"] == first["embed"]["model_version"] and meta["fitted_on"] == day
    with connect(settings) as con:
        assert set(query_pl(con, "SELECT DISTINCT strategy FROM personas.memory_clusters")["strategy"]) == {STRATEGY}
        assert query_pl(con, "SELECT count(*) AS n FROM personas.current_personas")["n"][0] > 0
