"""docs/performance.md is generated from bench/performance.template.md and bench/results/*.json: the committed
document equals its rendering, the prose types no figure, an absent results file reads "not measured", and the
section names other files point at exist."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

import pytest

from persona_tasks.config import PROJECT_DIR


@pytest.fixture(scope="module")
def r():
    spec = importlib.util.spec_from_file_location("render_performance", PROJECT_DIR / "bench" / "render_performance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def headings(text: str) -> list[str]:
    return [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]


def test_performance_doc_is_its_rendering(r):
    doc = r.DOC.read_text()
    assert doc == r.render(), "docs/performance.md is out of date: run `make perf-docs`"
    sections = [h for h in doc.splitlines() if h.startswith("## ")]
    assert len(sections) == len(set(sections)), "a section is repeated"
    order = ["Intent memories", "Embedding", "Per-user clustering", "Persona labelling", "Quality scoring",
             "Quality gates (Great Expectations)", "Daily DAG end to end", "Results files"]
    assert [s[3:].split(":")[0] for s in sections] == order  # one section per stage, in data-flow order
    assert "{{" not in doc and "<!--results" not in doc


def test_template_types_no_figure(r):
    assert r.typed_figures(r.TEMPLATE.read_text()) == []
    # the check does catch one
    assert r.typed_figures("<!--results\n-->\nThe bench ran at 53.2 memories/s, {{ x | .1f }} in all.\n")


def test_every_results_file_is_listed_with_its_origin(r):
    doc = r.DOC.read_text()
    index = doc.split("## Results files", 1)[1]
    for path in r.RESULTS.glob("*.json"):
        if path.stem != r.PROVENANCE:
            assert f"| `{path.name}` |" in index, path.name


def test_an_absent_results_file_reads_not_measured(r, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(r.RESULTS, results)
    (results / "embedding_gpu_h200.json").unlink()
    for arms in results.glob("labelling_arms_*.json"):  # a glob alias matching no file
        arms.unlink()
    out = r.render(results=results)
    assert "*Not measured: bench/results/embedding_gpu_h200.json is absent.*" in out
    assert "*Not measured: bench/results/labelling_arms_*.json is absent.*" in out
    assert "| cuda | float32 | 1024 |" not in out  # the GPU table went with its file
    # the other sections still render, and the rest of the document is unchanged around them
    assert "### On a GPU" in out and "Verdict: default `hdbscan_direct`" in out
    assert headings(out) == headings(r.DOC.read_text())


def test_fields_formats_and_schema_errors(r, tmp_path):
    (tmp_path / "bench_x.json").write_text(json.dumps({
        "rate": 1234.5678, "rows": [{"name": "a", "hit@10": 0.5}], "share": 0.25}))
    template = ("<!--results\nx  bench_x\ny  bench_absent\n-->\n<!--# a note for editors -->\n# T\n\n"
                "Rate {{ x.rate | ,.1f }}, first {{ x.rows[0].name }} at {{ hit(x.rows[0]['hit@10']) }}, "
                "{{ pct(x.share, 0) }}.\n\nNeeds y: {{ y.rate }}.\n\nAlso y: {{ y.other }}.\n\nEnd.\n")
    out = r.render(template, tmp_path)
    body = out.split("\n", 2)[2]
    assert body == ("# T\n\nRate 1,234.6, first a at 50.00, 25%.\n\n"
                    "*Not measured: bench/results/bench_absent.json is absent.*\n\nEnd.\n")
    with pytest.raises(SystemExit, match=r"bench_x.json has no \['nope'\]"):
        r.render("<!--results\nx  bench_x\n-->\n{{ x.nope }}\n", tmp_path)


def test_sections_named_elsewhere_exist(r):
    """Docs and code point at sections as docs/performance.md "Heading": each such heading exists."""
    names = set()
    for path in [*PROJECT_DIR.glob("docs/*.md"), PROJECT_DIR / "README.md", *PROJECT_DIR.glob("persona_tasks/**/*.py")]:
        names |= set(re.findall(r'docs/performance\.md"?\)? "([^"]+)"', path.read_text()))
    assert {"Static embeddings", "Embedding throughput (CPU)", "Persona labelling"} <= names
    heads = headings(r.DOC.read_text())
    assert all(any(h.startswith(n) for h in heads) for n in names), sorted(n for n in names
                                                                           if not any(h.startswith(n) for h in heads))
