"""Static word-piece embeddings distilled from the configured sentence-transformers model (``backend = "static"``).

Why: on 2 CPU cores MiniLM encodes 40-90 memories/s, so a day of 1M events (~170k memories, plus the persona texts
and claims that labelling and scoring embed) spends over an hour in the transformer. A static embedder encodes a
text as a weighted mean of per-word-piece vectors: thousands of texts/s, at a measured cost in quality (see
docs/performance.md "Static embeddings": planted-persona ARI and AOL Hit@10 against MiniLM).

The recipe (after model2vec, Tulkens & van Dongen 2024, and "all-but-the-top", Mu & Viswanath 2018), version
``static-v1``:

1. Distil: every word piece ``t`` of the model's vocabulary goes through the model alone (``[CLS] t [SEP]``);
   its vector is the mean of the three output token states (the model's mean pooling, before normalisation).
   30,522 pieces for all-MiniLM-L6-v2: about 30 s on 2 cores, once per model; the result is cached under
   ``models_dir/static/<model_version>/`` (written to a temporary folder and renamed, so concurrent workers never
   read half a model).
2. Weights: 1 for content pieces, 0 for special tokens, pieces with no letter or digit, stop words and the
   template verbs of ``intent_memories.memory_text`` ("searched:", "clicked:", ...): they are in nearly every
   memory and would pull all of a user's memories together.
3. Post-process: subtract the mean content-piece vector and remove the top ``STATIC_PCS_REMOVED`` (4 = d/100 for
   384 dimensions, the rule of thumb of Mu & Viswanath) principal directions of the content pieces. Raw static
   vectors share a large common direction (every pair of texts has cosine > 0.3), so the clustering's similarity
   thresholds would merge every user's memories into one cluster.

Encoding: the text's word pieces (no special tokens, no truncation) are looked up and averaged with the weights,
then L2-normalised; a text with no content piece falls back to the unweighted mean of its pieces. The vectors are
stored under ``<model_version>+static-v1``: they never mix with the transformer's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import numpy as np

from persona_tasks.errors import PersonaEtlError
from persona_tasks.progress import Progress, set_threads

log = logging.getLogger(__name__)

STATIC_RECIPE = "static-v1"
STATIC_PCS_REMOVED = 4
# the action verbs that stg_events puts before every part of memory_text (see its `described` CTE)
TEMPLATE_WORDS = frozenset({"searched", "clicked", "viewed", "liked", "added", "cart", "offered", "checked",
                            "out", "purchased", "rated", "tagged"})
_ALNUM = re.compile(r"[a-z0-9]")
_ENCODE_CHUNK = 8192


class StaticEmbeddingError(PersonaEtlError):
    """The static model cannot be distilled or read."""


def content_weights(vocab: dict[str, int], special: set[str]) -> np.ndarray:
    """1.0 for content word pieces, 0.0 for special tokens, punctuation, stop words and template verbs."""
    from persona_tasks.labelling.text import STOP_WORDS

    w = np.zeros(max(vocab.values()) + 1, dtype=np.float32)
    for piece, i in vocab.items():
        core = piece[2:] if piece.startswith("##") else piece
        if piece in special or not _ALNUM.search(core.lower()):
            continue
        if piece.lower() in STOP_WORDS or piece.lower() in TEMPLATE_WORDS:
            continue
        w[i] = 1.0
    return w


def distil_vectors(model_path: Path, threads: int, batch: int = 1024) -> tuple[np.ndarray, object]:
    """One vector per word piece: the model's mean-pooled output for ``[CLS] piece [SEP]``. Returns
    ``(vectors (V, d) float32, the model's fast tokenizer)``."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    set_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise StaticEmbeddingError(f"{model_path}: backend = \"static\" needs a fast (tokenizer.json) tokenizer")
    model = AutoModel.from_pretrained(str(model_path), local_files_only=True).eval()
    n_vocab = len(tokenizer)
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    out: np.ndarray | None = None
    with Progress("static distil", total=n_vocab, unit="word pieces") as progress, torch.inference_mode():
        for start in range(0, n_vocab, batch):
            ids = torch.arange(start, min(n_vocab, start + batch))
            cols = [ids] if cls_id is None else [torch.full_like(ids, cls_id), ids]
            cols += [] if sep_id is None else [torch.full_like(ids, sep_id)]
            x = torch.stack(cols, 1)
            states = model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state.mean(1)
            if out is None:
                out = np.zeros((n_vocab, states.shape[1]), dtype=np.float32)
            out[start:start + len(ids)] = states.float().numpy()
            progress.update(len(ids))
    assert out is not None
    return out, tokenizer


def post_process(vectors: np.ndarray, weights: np.ndarray, n_pcs: int = STATIC_PCS_REMOVED) -> np.ndarray:
    """Centre on the mean content piece and remove the top ``n_pcs`` principal directions of the content pieces."""
    content = weights > 0
    mu = vectors[content].mean(0)
    centred = vectors - mu
    if n_pcs > 0:
        _, _, vt = np.linalg.svd(centred[content], full_matrices=False)
        top = vt[:n_pcs]
        centred = centred - (centred @ top.T) @ top
    return centred.astype(np.float32)


def static_dir(models_dir: Path, base_version: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.@+-]", "_", base_version)
    return Path(models_dir) / "static" / f"{safe}+{STATIC_RECIPE}"


def build_static_model(model_path: Path, target: Path, base_version: str, threads: int) -> Path:
    """Distil and post-process, then publish ``target`` atomically (temporary sibling folder + rename)."""
    t0 = time.perf_counter()
    raw, tokenizer = distil_vectors(model_path, threads)
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens)
    weights = content_weights(vocab, special)[: raw.shape[0]]
    if weights.shape[0] < raw.shape[0]:
        weights = np.pad(weights, (0, raw.shape[0] - weights.shape[0]))
    vectors = post_process(raw, weights)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        np.save(tmp / "vectors.npy", vectors)
        np.save(tmp / "weights.npy", weights)
        tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        tmp.chmod(0o755)  # mkdtemp makes it private; workers of other users share models_dir
        (tmp / "meta.json").write_text(json.dumps({
            "recipe": STATIC_RECIPE, "source_model": str(model_path), "source_version": base_version,
            "vocab": int(raw.shape[0]), "dim": int(raw.shape[1]), "content_pieces": int((weights > 0).sum()),
            "pcs_removed": STATIC_PCS_REMOVED, "distil_seconds": round(time.perf_counter() - t0, 1)}, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "meta.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("static embeddings: distilled %d word pieces of %s in %.1fs into %s", raw.shape[0], base_version,
             time.perf_counter() - t0, target)
    return target


class StaticEmbedder:
    """Weighted mean of distilled word-piece vectors, behind the ``Embedder`` protocol (see the module docstring).

    ``model_path``: the sentence-transformers model it is distilled from; ``models_dir``: where the distilled
    model is cached. The distillation runs on first use."""

    def __init__(self, model_path: Path, models_dir: Path, *, base_version: str, threads: int | None = None):
        self.model_path = Path(model_path)
        self.models_dir = Path(models_dir)
        self.threads = threads or 1
        # the model_version of the model it is distilled from (embed.model_version_of): given by the caller, so
        # this module needs nothing from persona_tasks.embed (which builds it)
        self.base_version = base_version
        self.model_version = f"{self.base_version}+{STATIC_RECIPE}"
        self.path = static_dir(self.models_dir, self.base_version)
        self._loaded: tuple[np.ndarray, np.ndarray, object] | None = None

    def _load(self) -> tuple[np.ndarray, np.ndarray, object]:
        if self._loaded is None:
            from tokenizers import Tokenizer

            if not (self.path / "meta.json").exists():
                build_static_model(self.model_path, self.path, self.base_version, self.threads)
            try:
                vectors = np.load(self.path / "vectors.npy")
                weights = np.load(self.path / "weights.npy")
                tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
            except Exception as e:  # noqa: BLE001 - any unreadable file means the same thing
                raise StaticEmbeddingError(f"{self.path}: cannot read the static model ({e}); delete the folder "
                                           "to distil it again") from e
            tokenizer.no_truncation()
            tokenizer.no_padding()
            self._loaded = (vectors, weights, tokenizer)
        return self._loaded

    @property
    def dim(self) -> int:
        return int(self._load()[0].shape[1])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors, weights, tokenizer = self._load()
        out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        # progress and rate in the log for large calls only (the embed step logs its own per chunk)
        show = len(texts) >= 4 * _ENCODE_CHUNK
        with Progress("static encode", total=len(texts), unit="texts") if show else nullcontext() as progress:
            for start in range(0, len(texts), _ENCODE_CHUNK):
                chunk = list(texts[start:start + _ENCODE_CHUNK])
                out[start:start + len(chunk)] = self._encode_chunk(chunk, vectors, weights, tokenizer)
                if progress is not None:
                    progress.update(len(chunk))
        return out

    @staticmethod
    def _encode_chunk(texts: list[str], vectors: np.ndarray, weights: np.ndarray, tokenizer) -> np.ndarray:
        enc = tokenizer.encode_batch([t or "" for t in texts], add_special_tokens=False)
        lens = np.fromiter((len(e.ids) for e in enc), dtype=np.int64, count=len(enc))
        ids = np.fromiter((i for e in enc for i in e.ids), dtype=np.int64, count=int(lens.sum()))
        out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        if ids.size == 0:
            return out
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        nz = lens > 0
        w = weights[ids]
        summed = np.add.reduceat(vectors[ids] * w[:, None], starts[nz], axis=0)
        wsum = np.add.reduceat(w, starts[nz])
        # no content piece: the plain mean of the text's pieces
        fallback = wsum == 0
        if fallback.any():
            plain = np.add.reduceat(vectors[ids], starts[nz], axis=0)
            summed[fallback] = plain[fallback]
        out[nz] = summed
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


@lru_cache(maxsize=4)
def cached_static_embedder(model_path: Path, models_dir: Path, threads: int, base_version: str) -> StaticEmbedder:
    """One loaded static model per process and configuration."""
    return StaticEmbedder(model_path, models_dir, threads=threads, base_version=base_version)
