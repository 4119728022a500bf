"""Embeddings: real MiniLM forward passes, stored per (memory_id, model_version), incremental runs."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from persona_tasks import embed as E
from persona_tasks.config import load_settings
from persona_tasks.warehouse import connect

TEXTS = {
    "m1": "searched: best espresso machine under 1000; viewed: Breville espresso machine",
    "m2": "searched: breville barista express vs gaggia classic pro",
    "m3": "searched: marathon training plan 16 weeks; clicked: runnersworld.com",
    "m4": "searched: best espresso machine under 1000; viewed: Breville espresso machine",  # same text as m1
    "m5": "viewed: Hoka running shoes; searched: half marathon pace chart",
}


@pytest.fixture(scope="module")
def embedder() -> E.SentenceTransformerEmbedder:
    return E.SentenceTransformerEmbedder(batch_size=8, threads=1)


@pytest.fixture
def settings(tmp_path: Path):
    return load_settings(warehouse=tmp_path / "w.duckdb", threads=1)


def memories(ids: list[str], texts: dict[str, str] = TEXTS) -> pl.DataFrame:
    return pl.DataFrame({"memory_id": ids, "embedding_text": [texts[i] for i in ids]})


def stored(con) -> pl.DataFrame:
    return con.sql(
        "SELECT memory_id, model_version, text_md5, embedding, embedded_at FROM personas.memory_embeddings "
        "ORDER BY memory_id"
    ).pl()


class CountingEmbedder:
    """Wraps an embedder and records what was sent through the model."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[list[str]] = []

    @property
    def model_version(self) -> str:
        return self.inner.model_version

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode(self, texts):
        self.calls.append(list(texts))
        return self.inner.encode(texts)

    @property
    def n_texts(self) -> int:
        return sum(len(c) for c in self.calls)


def test_model_version_names_and_fingerprints_the_model(embedder):
    v = embedder.model_version
    assert v.startswith("all-MiniLM-L6-v2@") and len(v.split("@")[1]) == 12
    assert E.model_version_of(E.default_model_path()) == v  # stable
    assert embedder.dim == 384


def test_real_embeddings_are_normalised_and_semantic(embedder):
    x = embedder.encode([TEXTS["m1"], TEXTS["m2"], TEXTS["m3"]])
    assert x.shape == (3, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2] + 0.2  # espresso vs espresso beats espresso vs marathon


def test_stored_by_memory_and_model_version_and_second_run_embeds_nothing(settings, embedder):
    counting = CountingEmbedder(embedder)
    with connect(settings) as con:
        r1 = E.embed_memories(settings, con, memories(["m1", "m2", "m3", "m4"]), counting)
        assert (r1.n_memories, r1.n_up_to_date, r1.n_reused, r1.n_encoded) == (4, 0, 0, 4)
        assert r1.n_texts_encoded == 3  # m1 and m4 share a text: encoded once
        df = stored(con)
        assert df["memory_id"].to_list() == ["m1", "m2", "m3", "m4"]
        assert set(df["model_version"]) == {embedder.model_version}
        assert df["text_md5"][0] == hashlib.md5(TEXTS["m1"].encode()).hexdigest()
        x = E.embeddings_to_numpy(df["embedding"])
        assert x.shape == (4, 384)
        np.testing.assert_allclose(x[0], x[3])
        np.testing.assert_allclose(x[0], embedder.encode([TEXTS["m1"]])[0], atol=1e-5)

        n_calls = counting.n_texts
        r2 = E.embed_memories(settings, con, memories(["m1", "m2", "m3", "m4"]), counting)
        assert (r2.n_up_to_date, r2.n_new) == (4, 0)
        assert counting.n_texts == n_calls  # nothing went through the model
        assert stored(con).equals(df)


def test_daily_run_embeds_only_new_and_changed_memories(settings, embedder):
    counting = CountingEmbedder(embedder)
    with connect(settings) as con:
        E.embed_memories(settings, con, memories(["m1", "m2", "m3"]), counting)
        before = stored(con)
        counting.calls.clear()
        changed = dict(TEXTS, m2="searched: sourdough starter feeding schedule")
        r = E.embed_memories(settings, con, memories(["m1", "m2", "m3", "m4", "m5"], changed), counting)
        # m4 has m1's text: copied, not encoded; m2's text changed: re-embedded; m5 new
        assert (r.n_up_to_date, r.n_reused, r.n_encoded) == (2, 1, 2)
        assert sorted(t for c in counting.calls for t in c) == sorted([changed["m2"], TEXTS["m5"]])
        after = stored(con)
        assert after.height == 5
        keep = ["m1", "m3"]
        assert after.filter(pl.col("memory_id").is_in(keep)).equals(before.filter(pl.col("memory_id").is_in(keep)))
        new_m2 = after.filter(pl.col("memory_id") == "m2")
        assert new_m2["text_md5"][0] == hashlib.md5(changed["m2"].encode()).hexdigest()


def test_small_chunks_give_the_same_rows(settings, embedder, tmp_path):
    small = load_settings(warehouse=tmp_path / "small.duckdb", threads=1, embedding={"write_chunk": 1})
    ids = ["m1", "m2", "m3", "m4", "m5"]
    with connect(settings) as con, connect(small) as con_small:
        E.embed_memories(settings, con, memories(ids), embedder)
        r = E.embed_memories(small, con_small, memories(ids), embedder)
        assert r.n_encoded == 5
        a, b = stored(con), stored(con_small)
        assert a.select("memory_id", "text_md5").equals(b.select("memory_id", "text_md5"))
        np.testing.assert_allclose(E.embeddings_to_numpy(a["embedding"]), E.embeddings_to_numpy(b["embedding"]),
                                   atol=1e-5)


def test_embeds_marts_intent_memories_by_default(settings, embedder):
    with connect(settings) as con:
        with pytest.raises(E.EmbeddingError, match="persona-etl build"):
            E.embed_memories(settings, con, embedder=embedder)
        con.execute("CREATE SCHEMA marts")
        con.execute("CREATE TABLE marts.intent_memories (memory_id VARCHAR, user_id VARCHAR, embedding_text VARCHAR)")
        con.execute("INSERT INTO marts.intent_memories VALUES ('m1', 'u1', $a), ('m3', 'u1', $b)",
                    {"a": TEXTS["m1"], "b": TEXTS["m3"]})
        r = E.embed_memories(settings, con, embedder=embedder)
        assert (r.n_memories, r.n_encoded) == (2, 2)
        loaded = E.load_embeddings(con, embedder.model_version, ["m3"])
        assert loaded["memory_id"].to_list() == ["m3"]


def test_other_model_version_gets_its_own_rows(settings, embedder):
    class Renamed(CountingEmbedder):
        @property
        def model_version(self) -> str:
            return "other-model@000000000000"

    with connect(settings) as con:
        E.embed_memories(settings, con, memories(["m1"]), embedder)
        r = E.embed_memories(settings, con, memories(["m1"]), Renamed(embedder))
        assert r.n_encoded == 1
        versions = con.sql("SELECT model_version FROM personas.memory_embeddings ORDER BY 1").fetchall()
        assert [v[0] for v in versions] == sorted([embedder.model_version, "other-model@000000000000"])


def test_configurable_model_dir_and_bad_dir(tmp_path: Path):
    s = load_settings(warehouse=tmp_path / "w.duckdb", embedding={"model_path": str(E.default_model_path())})
    assert E.resolve_model_path(s) == E.default_model_path()
    bad = load_settings(warehouse=tmp_path / "w.duckdb", embedding={"model_path": str(tmp_path)})
    with pytest.raises(E.EmbeddingError, match="not a sentence-transformers model directory"):
        E.SentenceTransformerEmbedder.from_settings(bad)


def test_embeddings_to_numpy_handles_list_and_array_columns():
    m = np.arange(12, dtype=np.float32).reshape(4, 3)
    as_list = pl.Series("e", m.tolist(), dtype=pl.List(pl.Float32))
    as_array = pl.Series("e", m, dtype=pl.Array(pl.Float32, 3))
    np.testing.assert_array_equal(E.embeddings_to_numpy(as_list), m)
    np.testing.assert_array_equal(E.embeddings_to_numpy(as_array), m)
    with pytest.raises(E.EmbeddingError):
        E.embeddings_to_numpy(pl.Series("e", [[1.0, 2.0], [1.0]]))


class RecordingEmbedder(E.SentenceTransformerEmbedder):
    """The real MiniLM embedder (real forward passes), recording every batch of texts sent through the model."""

    def __init__(self, **kw):
        super().__init__(batch_size=8, threads=1, **kw)
        self.batches: list[list[str]] = []

    def encode(self, texts):
        self.batches.append(list(texts))
        return super().encode(texts)

    @property
    def batch_sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


@pytest.fixture(scope="module")
def recording() -> RecordingEmbedder:
    return RecordingEmbedder()


def test_dedup_encodes_each_distinct_text_once_with_the_per_memory_vectors(tmp_path, recording):
    # 12 memories over 4 distinct texts, chunks of 2 texts: repeats of a text never straddle two chunks
    texts = [TEXTS["m1"], TEXTS["m2"], TEXTS["m3"], TEXTS["m5"]]
    ids = [f"d{i:02d}" for i in range(12)]
    frame = pl.DataFrame({"memory_id": ids, "embedding_text": [texts[(i * 7) % 4] for i in range(12)]})
    s = load_settings(warehouse=tmp_path / "w.duckdb", threads=1, embedding={"write_chunk": 2})
    recording.batches.clear()
    with connect(s) as con:
        r = E.embed_memories(s, con, frame, recording)
        got = stored(con)
    assert (r.n_memories, r.n_encoded, r.n_reused, r.n_texts_encoded) == (12, 12, 0, 4)
    sent = [t for b in recording.batches for t in b]
    assert sorted(sent) == sorted(texts)  # every distinct text through the model exactly once
    assert recording.batch_sizes == [2, 2]  # one encode per chunk of write_chunk distinct texts
    # same vectors as embedding every memory on its own (real model, one text per call)
    x = E.embeddings_to_numpy(got["embedding"])
    by_id = dict(zip(frame["memory_id"], frame["embedding_text"]))
    one_by_one = np.vstack([E.SentenceTransformerEmbedder.encode(recording, [by_id[m]]) for m in got["memory_id"]])
    np.testing.assert_allclose(x, one_by_one, atol=1e-5)
    for t in texts:  # memories sharing a text share the very same vector
        rows = x[[by_id[m] == t for m in got["memory_id"]]]
        assert len(rows) == 3 and (rows == rows[0]).all()


def test_unchanged_text_reuses_the_stored_vector(settings, recording):
    with connect(settings) as con:
        E.embed_memories(settings, con, memories(["m1", "m2"]), recording)
        first = stored(con)
        recording.batches.clear()
        # next day: m4 repeats m1's text, m5 is new
        r = E.embed_memories(settings, con, memories(["m1", "m2", "m4", "m5"]), recording)
        after = stored(con)
    assert (r.n_up_to_date, r.n_reused, r.n_encoded, r.n_texts_encoded) == (2, 1, 1, 1)
    assert recording.batches == [[TEXTS["m5"]]]  # m1's text did not go through the model again
    v = dict(zip(after["memory_id"], E.embeddings_to_numpy(after["embedding"])))
    assert (v["m4"] == E.embeddings_to_numpy(first["embedding"])[0]).all()  # bit-identical copy of m1's vector


def test_model_version_changes_with_the_cap_and_quantisation(tmp_path):
    base = E.SentenceTransformerEmbedder().model_version
    capped = E.SentenceTransformerEmbedder(max_seq_length=128).model_version
    quant = E.SentenceTransformerEmbedder(quantize=True).model_version
    both = E.SentenceTransformerEmbedder(max_seq_length=128, quantize=True).model_version
    assert len({base, capped, quant, both}) == 4
    assert (capped, quant, both) == (base + "+seq128", base + "+int8", base + "+seq128+int8")
    assert E.SentenceTransformerEmbedder(max_seq_length=256).model_version == base  # the model's own cap
    assert E.SentenceTransformerEmbedder(max_seq_length=64).model_version != capped
    s = load_settings(warehouse=tmp_path / "w.duckdb", embedding={"max_seq_length": 128, "quantize": True})
    assert E.SentenceTransformerEmbedder.from_settings(s).model_version == both
    assert E.SentenceTransformerEmbedder.from_settings(load_settings(warehouse=tmp_path / "w.duckdb")).model_version \
        == base
    with pytest.raises(E.EmbeddingError, match="above the model's own 256"):
        E.SentenceTransformerEmbedder(max_seq_length=512)
    with pytest.raises(E.EmbeddingError, match="cpu"):
        E.SentenceTransformerEmbedder(quantize=True, device="cuda")


def test_capped_and_quantised_encoders_are_real_and_stored_apart(settings, embedder):
    long_text = "; ".join(f"searched: {w} espresso grinder review" for w in ("best", "cheap", "quiet", "manual"))
    capped = E.SentenceTransformerEmbedder(batch_size=8, threads=1, max_seq_length=16)
    quant = E.SentenceTransformerEmbedder(batch_size=8, threads=1, quantize=True)
    full = embedder.encode([long_text, TEXTS["m2"]])
    cut = capped.encode([long_text, TEXTS["m2"]])
    q = quant.encode([long_text, TEXTS["m2"]])
    assert not np.allclose(cut[0], full[0], atol=1e-3)  # the cap truncates a long text ...
    assert cut[0] @ full[0] > 0.5  # ... to its beginning
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert (q * full).sum(axis=1).min() > 0.9  # int8 stays close to fp32 ...
    assert not np.allclose(q, full, atol=1e-4)  # ... but is not the same vectors
    with connect(settings) as con:
        E.embed_memories(settings, con, memories(["m1"]), embedder)
        r = E.embed_memories(settings, con, memories(["m1"]), quant)
        assert (r.n_reused, r.n_encoded) == (0, 1)  # fp32 vectors are never copied into the int8 version
        versions = [v[0] for v in con.sql("SELECT model_version FROM personas.memory_embeddings ORDER BY 1").fetchall()]
    assert versions == sorted([embedder.model_version, embedder.model_version + "+int8"])


# ---- backend = "onnx": the same model exported once to ONNX and run by ONNX Runtime (real exports, real passes) ----

@pytest.fixture(scope="module")
def onnx_models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def onnx_fp32(onnx_models_dir) -> E.OnnxEmbedder:
    return E.OnnxEmbedder(None, onnx_models_dir, batch_size=2, threads=1)


@pytest.fixture(scope="module")
def onnx_int8(onnx_models_dir) -> E.OnnxEmbedder:
    return E.OnnxEmbedder(None, onnx_models_dir, batch_size=2, threads=1, quantize=True)


def test_onnx_vectors_match_the_transformer(embedder, onnx_fp32, onnx_int8):
    texts = list(dict.fromkeys(TEXTS.values())) + ["nph", "searched: " + "espresso grinder review " * 80]
    ref = embedder.encode(texts)
    fp32 = onnx_fp32.encode(texts)  # batch_size 2: several length-sorted batches, put back in input order
    int8 = onnx_int8.encode(texts)
    assert fp32.shape == int8.shape == (len(texts), 384) and fp32.dtype == int8.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5)
    assert (fp32 * ref).sum(axis=1).min() > 0.999  # the long text is truncated at 256 word pieces like torch's
    cos8 = (int8 * ref).sum(axis=1)
    assert cos8[:4].min() > 0.99  # the memories
    # a three-letter query is int8's worst case (0.98-0.99 on the AOL sample, depending on its batch: activations
    # are quantised per batch, as with the transformer's quantize option)
    assert cos8.min() > 0.975
    assert not np.allclose(int8, ref, atol=1e-3)  # int8 is close, not the same
    assert onnx_fp32.dim == 384
    assert onnx_fp32.encode([]).shape == (0, 384)


def test_onnx_model_versions_never_mix_with_the_transformer(embedder, onnx_fp32, onnx_int8, tmp_path):
    base = embedder.model_version
    assert (onnx_fp32.model_version, onnx_int8.model_version) == (base + "+onnx", base + "+onnx-int8")
    capped = E.OnnxEmbedder(None, tmp_path, max_seq_length=128)
    assert capped.model_version == base + "+seq128+onnx"
    assert E.SentenceTransformerEmbedder(quantize=True).model_version not in {onnx_int8.model_version}
    s = load_settings(warehouse=tmp_path / "w.duckdb", threads=1, models_dir=onnx_fp32.models_dir,
                      embedding={"backend": "onnx", "quantize": True})
    configured = E.embedder_from_settings(s)
    assert isinstance(configured, E.OnnxEmbedder) and configured.model_version == onnx_int8.model_version
    assert configured.path == onnx_int8.path and configured.models_dir == onnx_fp32.models_dir


def test_onnx_export_is_cached_and_reused(onnx_fp32, onnx_int8, onnx_models_dir):
    x = onnx_fp32.encode([TEXTS["m1"]])
    onnx_int8.encode([TEXTS["m1"]])
    assert onnx_fp32.path.parent == onnx_models_dir / "onnx"
    files = {p: p.stat().st_mtime_ns for p in (onnx_models_dir / "onnx").rglob("*") if p.is_file()}
    assert {p.name for p in files} == {"model.onnx", "meta.json"} and len(files) == 4  # fp32 and int8 folders
    again = E.OnnxEmbedder(None, onnx_models_dir, batch_size=2, threads=1)
    again_int8 = E.OnnxEmbedder(None, onnx_models_dir, threads=1, quantize=True)
    np.testing.assert_array_equal(again.encode([TEXTS["m1"]]), x)
    again_int8.encode([TEXTS["m1"]])
    assert not again.exported and not again_int8.exported  # loaded the cached export, wrote nothing
    assert {p: p.stat().st_mtime_ns for p in (onnx_models_dir / "onnx").rglob("*") if p.is_file()} == files
    meta = json.loads((onnx_int8.path / "meta.json").read_text())
    assert meta["quantized"] and meta["source_version"] == onnx_fp32.base_version and meta["kept_fp32"]


def test_onnx_embed_memories_stores_its_own_rows(settings, embedder, onnx_fp32):
    with connect(settings) as con:
        E.embed_memories(settings, con, memories(["m1", "m2"]), embedder)
        r = E.embed_memories(settings, con, memories(["m1", "m2"]), onnx_fp32)
        assert (r.n_reused, r.n_encoded) == (0, 2)  # torch vectors are never copied into the onnx version
        got = E.load_embeddings(con, onnx_fp32.model_version)
    np.testing.assert_allclose(E.embeddings_to_numpy(got["embedding"]), onnx_fp32.encode([TEXTS["m1"], TEXTS["m2"]]),
                               atol=1e-6)


def test_onnx_backend_errors(tmp_path, monkeypatch):
    with pytest.raises(E.EmbeddingError, match="CPU only"):
        E.OnnxEmbedder(None, tmp_path, device="cuda")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(E.EmbeddingError, match="needs onnxruntime"):
        E.OnnxEmbedder(None, tmp_path)


def test_openvino_backend_reuses_the_onnx_export_and_names_its_precision(embedder, onnx_fp32, onnx_models_dir):
    onnx_fp32.encode([TEXTS["m1"]])  # the fp32 export exists
    files = {p: p.stat().st_mtime_ns for p in (onnx_models_dir / "onnx").rglob("*") if p.is_file()}
    ov = E.OpenVinoEmbedder(None, onnx_models_dir, batch_size=2, threads=1)
    texts = list(dict.fromkeys(TEXTS.values())) + ["nph"]
    x = ov.encode(texts)
    assert not ov.exported and ov.path == onnx_fp32.path
    assert {p: p.stat().st_mtime_ns for p in (onnx_models_dir / "onnx").rglob("*") if p.is_file()} == files
    # bf16 on a CPU with bf16 instructions, else f32: either way it is in the version, and close to torch
    assert ov.model_version in {embedder.model_version + "+openvino-bf16", embedder.model_version + "+openvino-f32"}
    assert (x * embedder.encode(texts)).sum(axis=1).min() > 0.999
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    s = load_settings(threads=1, models_dir=onnx_models_dir, embedding={"backend": "openvino"})
    assert isinstance(E.embedder_from_settings(s), E.OpenVinoEmbedder)
    with pytest.raises(E.EmbeddingError, match="quantize"):
        E.OpenVinoEmbedder(None, onnx_models_dir, quantize=True)
