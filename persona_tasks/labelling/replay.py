"""Labels made on another machine, replayed: the inputs a labeller would see go out as a file, a worker (a GPU
machine with no warehouse, no polars, no DuckDB) labels them, and the labels come back as a file.

Why: a GPU-queue worker can label thousands of clusters in seconds, while the scoring that judges them (quality,
the evaluation's Hit@10) needs the warehouse and the embedder. ``write_inputs`` exports the clusters exactly as the
labeller receives them (PII-scrubbed upstream, k-anonymously masked), ``label_inputs_file`` labels such a file with
any labeller, and ``ReplayLabeller`` answers a later ``label`` call from the labels file, for exactly those inputs:
each label is keyed by a digest of its whole input, so a label can never be attached to a cluster whose text,
evidence ids or order differ from what was labelled (that raises, naming the cluster).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from persona_tasks.errors import PersonaEtlError
from persona_tasks.labelling.types import ClusterInput, PersonaLabel

FORMAT = "persona-etl-labels/1"
CANDIDATES_FORMAT = "persona-etl-candidates/1"


class ReplayError(PersonaEtlError):
    """A labels file that does not answer the clusters asked for."""


def input_digest(c: ClusterInput) -> str:
    """md5 of the whole input (ids, texts, centrality, contrast texts): what the labeller saw."""
    d = asdict(c)
    d["centrality"] = [round(float(x), 6) for x in (d["centrality"] or [])]
    return hashlib.md5(json.dumps(d, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_inputs(clusters: list[ClusterInput], path: Path, meta: dict | None = None) -> Path:
    """The clusters as the labeller would receive them, to JSON (``{"meta": ..., "inputs": [...]}``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta or {}, "inputs": [asdict(c) for c in clusters]}, ensure_ascii=False))
    tmp.replace(path)
    return path


def read_inputs(path: Path) -> list[ClusterInput]:
    data = json.loads(Path(path).read_text())
    rows = data["inputs"] if isinstance(data, dict) else data
    return [ClusterInput(**d) for d in rows]


def label_inputs_file(inputs_path: Path, out_path: Path, labeller: Any, meta: dict | None = None) -> dict:
    """Label every cluster of ``inputs_path`` with ``labeller``; write the labels with their input digests and the
    labeller's stats to ``out_path``. Returns the stats (with ``wall_s``)."""
    clusters = read_inputs(inputs_path)
    t0 = time.perf_counter()
    labels = labeller.label(clusters) if clusters else []
    wall = time.perf_counter() - t0
    stats = dict(labeller.stats.as_dict()) if hasattr(labeller, "stats") else {}
    stats.update(wall_s=round(wall, 3), clusters=len(clusters))
    out = {"format": FORMAT, "model_version": getattr(labeller, "model_version", labeller.name),
           "labeller": labeller.name, "meta": meta or {}, "stats": stats,
           "labels": [{"digest": input_digest(c), **asdict(p)} for c, p in zip(clusters, labels)]}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, ensure_ascii=False))
    return stats


def _missing(c: ClusterInput, what: str, paths: list) -> ReplayError:
    return ReplayError(f"cluster {c.cluster_id!r} of user {c.user_id!r}: no {what} for this input in "
                       f"{', '.join(map(str, paths))} (the inputs changed since they were exported)")


class _ReplayStats:
    """The stats the labelling run recorded, summed over the files (LabellerStats' ``as_dict`` shape)."""

    def __init__(self, parts: list[dict]):
        self.parts = parts

    def as_dict(self) -> dict[str, Any]:
        keys = ("clusters", "prompts", "prompt_tokens", "generated_tokens", "generate_s", "llm_accepted",
                "fallbacks", "regenerations", "generation_errors")
        d: dict[str, Any] = {k: sum(p.get(k, 0) or 0 for p in self.parts) for k in keys}
        problems: dict[str, int] = {}
        for p in self.parts:
            for k, v in (p.get("problems") or {}).items():
                problems[k] = problems.get(k, 0) + v
        d["problems"] = problems
        g = d["generate_s"]
        d["prompts_per_s"] = round(d["prompts"] / g, 3) if g else None
        d["tokens_per_s"] = round(d["generated_tokens"] / g, 2) if g else None
        d["fallback_rate"] = round(d["fallbacks"] / d["clusters"], 4) if d["clusters"] else 0.0
        d["replayed"] = True
        return d


class ReplayLabeller:
    """A labeller that answers from labels files written by ``label_inputs_file`` (same inputs only)."""

    def __init__(self, paths: list[Path] | Path):
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        self.by_digest: dict[str, dict] = {}
        versions, names, parts = set(), set(), []
        for p in paths:
            data = json.loads(Path(p).read_text())
            if data.get("format") != FORMAT:
                raise ReplayError(f"{p}: not a labels file (format {data.get('format')!r}, expected {FORMAT})")
            versions.add(data["model_version"])
            names.add(data["labeller"])
            parts.append(data.get("stats") or {})
            for row in data["labels"]:
                self.by_digest[row["digest"]] = row
        if len(versions) > 1:
            raise ReplayError(f"labels files of several model versions: {sorted(versions)}")
        self.model_version = versions.pop() if versions else "replay"
        self.name = names.pop() if len(names) == 1 else "llm"
        self.stats = _ReplayStats(parts)
        self.paths = paths

    def label(self, clusters: list[ClusterInput]) -> list[PersonaLabel]:
        out = []
        for c in clusters:
            row = self.by_digest.get(input_digest(c))
            if row is None:
                raise _missing(c, "label", self.paths)
            out.append(PersonaLabel(**{k: v for k, v in row.items() if k != "digest"}))
        return out


def write_candidates(inputs_path: Path, out_path: Path, llm: Any, num_candidates: int, seed: int) -> dict:
    """Sampled candidates (``LLMLabeller.label_candidates``) for every cluster of ``inputs_path``: their raw
    completions, keyed by input digest, to ``out_path`` (a GPU worker's share of building preference groups)."""
    clusters = read_inputs(inputs_path)
    t0 = time.perf_counter()
    cands = llm.label_candidates(clusters, num_candidates=num_candidates, seed=seed) if clusters else []
    stats = dict(llm.stats.as_dict())
    stats.update(wall_s=round(time.perf_counter() - t0, 3), clusters=len(clusters),
                 candidates=sum(len(cs) for cs in cands), valid=sum(c.persona is not None for cs in cands for c in cs))
    out = {"format": CANDIDATES_FORMAT, "model_version": llm.model_version, "num_candidates": num_candidates,
           "seed": seed, "stats": stats,
           "candidates": [{"digest": input_digest(c), "user_id": c.user_id, "cluster_id": c.cluster_id,
                           "completions": [x.completion for x in cs]} for c, cs in zip(clusters, cands)]}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(out, ensure_ascii=False))
    return stats


class ReplayCandidates:
    """``label_candidates`` answered from a candidates file: the completions a worker sampled, checked and turned
    into personas here by ``llm`` (an ``LLMLabeller``: its prompts, validation and persona building; its model is
    not called). For ``train.groups.build_groups``."""

    def __init__(self, llm: Any, path: Path):
        data = json.loads(Path(path).read_text())
        if data.get("format") != CANDIDATES_FORMAT:
            raise ReplayError(f"{path}: not a candidates file (format {data.get('format')!r})")
        self.llm, self.path = llm, Path(path)
        self.model_version = data["model_version"]
        self.num_candidates = data["num_candidates"]
        self.stats = _ReplayStats([data.get("stats") or {}])
        self.by_digest = {row["digest"]: row["completions"] for row in data["candidates"]}

    def label_candidates(self, clusters: list[ClusterInput], num_candidates: int | None = None,
                         seed: int | None = None) -> list:
        if num_candidates is not None and num_candidates != self.num_candidates:
            raise ReplayError(f"{self.path}: {self.num_candidates} candidates per cluster, {num_candidates} asked for")
        comps = []
        for c in clusters:
            found = self.by_digest.get(input_digest(c))
            if found is None:
                raise _missing(c, "candidates", [self.path])
            comps.append(found)
        return self.llm.candidates_from_completions(clusters, comps)
