"""docs/performance.md: every generated block equals its rendering from bench/results/ (figures cannot drift)."""

from __future__ import annotations

import importlib.util
import json

from persona_tasks.config import PROJECT_DIR


def _renderer():
    spec = importlib.util.spec_from_file_location("render_performance", PROJECT_DIR / "bench" / "render_performance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_performance_doc_is_up_to_date():
    r = _renderer()
    text = r.DOC.read_text()
    assert r.render(text) == text, "docs/performance.md is out of date: run `make perf-docs`"
    # one section per stage, none repeated
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert len(heads) == len(set(heads)) >= 5
    # every block's results file exists (no "not measured" placeholder in the committed document)
    blocks = r.BLOCK.findall(text)
    assert len(blocks) >= 8 and all((r.RESULTS / f"{name}.json").exists() for _, _, name, _, _ in blocks)


def test_a_block_renders_from_its_results_file(tmp_path):
    r = _renderer()
    (tmp_path / "x.json").write_text(json.dumps({
        "users": 3, "seed": 1, "model_version": "m@1", "default_merge_min_similarity": 0.3,
        "rows": [{"text": "embedding_text", "merge_min_similarity": 0.2, "ari": 0.5, "nmi": 0.6,
                  "clusters_per_user": 1.5, "planted_per_user": 2.0}]}))
    doc = "intro\n<!-- bench:clustering_text:x:start -->\nstale\n<!-- bench:clustering_text:x:end -->\nend\n"
    out = r.render(doc, tmp_path)
    assert "stale" not in out and "| embedding_text | 0.2 | 0.500 | 0.600 | 1.50 (2.00) |" in out
    assert out.startswith("intro\n") and out.endswith("end\n")
    missing = r.render(doc.replace(":x:", ":absent:"), tmp_path)
    assert "Not measured: bench/results/absent.json is absent." in missing
