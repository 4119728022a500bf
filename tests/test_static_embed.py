"""Static embeddings (``[embedding] backend = "static"``): distilled from real MiniLM forward passes, cached in
models_dir, stored under their own model version, and good enough to run the daily pipeline end to end."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from persona_tasks import static_embed as S
from persona_tasks.config import load_settings
from persona_tasks.embed import SentenceTransformerEmbedder, embed_memories, embedder_from_settings
from persona_tasks.warehouse import connect, query_pl

ESPRESSO = "searched: best espresso machine under 1000; viewed: Breville espresso machine"
ESPRESSO_2 = "searched: breville barista express vs gaggia classic pro"
MARATHON = "searched: marathon training plan 16 weeks; clicked: runnersworld.com"
MARATHON_2 = "viewed: Hoka running shoes; searched: half marathon pace chart"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def static(models_dir) -> S.StaticEmbedder:
    settings = load_settings(models_dir=models_dir, threads=2, embedding={"backend": "static"})
    emb = embedder_from_settings(settings)
    emb.encode(["warm up: distils the model into models_dir"])
    return emb


def test_distilled_model_is_cached_with_its_recipe(static, models_dir):
    base = SentenceTransformerEmbedder().model_version
    assert static.model_version == f"{base}+static-v1"
    assert static.path.parent == models_dir / "static" and static.path.is_dir()
    meta = json.loads((static.path / "meta.json").read_text())
    vectors = np.load(static.path / "vectors.npy")
    weights = np.load(static.path / "weights.npy")
    assert meta["recipe"] == "static-v1" and meta["source_version"] == base
    assert vectors.shape == (meta["vocab"], 384) == (30522, 384)
    # special tokens, punctuation, stop words and memory_text's template verbs carry no weight
    vocab = json.loads((static.path / "tokenizer.json").read_text())["model"]["vocab"]
    for piece in ("[CLS]", "[SEP]", "[PAD]", ";", ":", "the", "searched", "clicked", "viewed"):
        assert weights[vocab[piece]] == 0.0, piece
    for piece in ("coffee", "marathon", "running"):
        assert weights[vocab[piece]] == 1.0, piece
    assert 0.8 * len(vocab) < meta["content_pieces"] < len(vocab)
    # the common direction is gone: content pieces are centred
    assert np.linalg.norm(vectors[weights > 0].mean(0)) < 1e-3 * np.linalg.norm(vectors[weights > 0], axis=1).mean()
    # a second embedder on the same folder reads it instead of distilling again
    before = (static.path / "vectors.npy").stat().st_mtime_ns
    again = S.StaticEmbedder(static.model_path, models_dir, threads=1, base_version=static.base_version)
    assert np.allclose(again.encode([ESPRESSO]), static.encode([ESPRESSO]))
    assert (static.path / "vectors.npy").stat().st_mtime_ns == before


def test_vectors_are_unit_length_and_grouped_like_minilm(static):
    texts = [ESPRESSO, ESPRESSO_2, MARATHON, MARATHON_2]
    v = static.encode(texts)
    assert v.shape == (4, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sims = v @ v.T
    # same topic closer than across topics, as with the transformer itself
    assert sims[0, 1] > max(sims[0, 2], sims[0, 3])
    assert sims[2, 3] > max(sims[2, 0], sims[2, 1])
    # the order of a batch does not change a text's vector
    assert np.allclose(static.encode(texts[::-1])[::-1], v, atol=1e-6)


def test_template_verbs_do_not_move_a_vector(static):
    a, b = static.encode(["searched: espresso grinder", "clicked: espresso grinder"])
    assert float(a @ b) > 0.9999
    # a text with no content piece falls back to the plain mean of its pieces (still a unit vector)
    only_template = static.encode(["searched: the; clicked: of"])[0]
    assert abs(np.linalg.norm(only_template) - 1.0) < 1e-5


def test_unreadable_model_names_the_folder(models_dir, static, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(models_dir, broken)
    target = S.static_dir(broken, static.base_version)
    (target / "vectors.npy").write_bytes(b"not an array")
    emb = S.StaticEmbedder(static.model_path, broken, threads=1, base_version=static.base_version)
    with pytest.raises(S.StaticEmbeddingError, match=re.escape(str(target))):
        emb.encode([ESPRESSO])


def test_static_vectors_are_stored_under_their_own_version(static, models_dir, tmp_path):
    import polars as pl

    settings = load_settings(warehouse=tmp_path / "w.duckdb", threads=1, models_dir=models_dir)
    mem = pl.DataFrame({"memory_id": ["m1", "m2", "m3"], "embedding_text": [ESPRESSO, ESPRESSO_2, MARATHON]})
    with connect(settings) as con:
        rep_static = embed_memories(settings, con, memories=mem, embedder=static)
        rep_minilm = embed_memories(settings, con, memories=mem,
                                    embedder=SentenceTransformerEmbedder(batch_size=8, threads=1))
        rows = query_pl(con, "SELECT model_version, count(*) AS n, max(len(embedding)) AS d "
                             "FROM personas.memory_embeddings GROUP BY 1 ORDER BY 1")
    assert rep_static.n_encoded == rep_minilm.n_encoded == 3
    assert rows["model_version"].to_list() == sorted([static.model_version, rep_minilm.model_version])
    assert rows["n"].to_list() == [3, 3] and rows["d"].to_list() == [384, 384]


def test_planted_personas_recovered_with_static_vectors(static):
    """The clustering thresholds (tuned on MiniLM) still separate planted personas with static vectors."""
    from persona_tasks.evaluate import planted_recovery

    settings = load_settings(threads=2)
    res = planted_recovery(settings, static, 80)
    assert res["ari"] > 0.65, res
    assert 0.7 * res["planted_per_user"] < res["clusters_per_user"] < 1.3 * res["planted_per_user"], res
