"""Future-interaction prediction (persona_tasks.evaluate): metrics on hand-built cases, the split rule, the
negatives, and one small `persona-etl evaluate --json` on real AOL users (real MiniLM, real DuckDB)."""

from __future__ import annotations

import gzip
import json
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from persona_tasks.config import PROJECT_DIR
from persona_tasks.evaluate import (
    max_similarity,
    per_query_metrics,
    rank_futures,
    ranking_metrics,
    render_results,
    sample_negatives,
    split_history_future,
)


def memories(counts: dict[str, int]) -> pl.DataFrame:
    t0 = datetime(2030, 1, 1)
    rows = [{"user_id": u, "memory_id": f"{u}-{i:03d}", "started_at": t0 + timedelta(hours=i),
             "text": f"{u} text {i}"}
            for u, n in counts.items() for i in range(n)]
    return pl.DataFrame(rows).sample(fraction=1.0, shuffle=True, seed=1)  # input order must not matter


# --- metrics ----------------------------------------------------------------------------------------------------

def test_hit_and_mrr_on_a_hand_built_ranking():
    # positive ranks: 1st, 3rd, 12th among its candidates
    pos = np.array([0.9, 0.5, 0.1])
    neg = np.array([
        [0.1] * 11 + [0.0],          # nothing above: rank 1
        [0.8, 0.7] + [0.0] * 10,     # two above: rank 3
        [0.2] * 11 + [0.0],          # eleven above: rank 12
    ])
    m = ranking_metrics(pos, neg)
    assert m["hit@1"] == pytest.approx(1 / 3)
    assert m["hit@10"] == pytest.approx(2 / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12) / 3)


def test_ties_count_in_expectation():
    # tied with every one of 99 negatives: a constant scorer gets exactly the random expectation
    q = per_query_metrics(np.zeros(1), np.zeros((1, 99)))
    assert q["hit@1"][0] == pytest.approx(0.01)
    assert q["hit@10"][0] == pytest.approx(0.10)
    assert q["mrr"][0] == pytest.approx(np.mean(1 / np.arange(1, 101)))
    # one strictly above, one tied: rank 2 or 3 with equal chance
    q = per_query_metrics(np.array([0.5]), np.array([[0.9, 0.5, 0.1]]))
    assert q["hit@1"][0] == 0.0 and q["hit@10"][0] == 1.0
    assert q["mrr"][0] == pytest.approx((1 / 2 + 1 / 3) / 2)
    k2 = per_query_metrics(np.array([0.5]), np.array([[0.9, 0.5, 0.1]]), ks=(2,))
    assert k2["hit@2"][0] == pytest.approx(0.5)


def test_a_future_identical_to_a_history_memory_ranks_first_for_nearest_memory():
    rng = np.random.default_rng(0)
    hist = rng.normal(size=(6, 16))
    hist /= np.linalg.norm(hist, axis=1, keepdims=True)
    others = rng.normal(size=(30, 16))
    others /= np.linalg.norm(others, axis=1, keepdims=True)
    future = np.vstack([hist[3:4], others])           # row 0: user u's future, identical to history memory 3
    blocks = [("u", 0, 1), ("v", 1, 31)]
    negatives = sample_negatives(["u"] + ["v"] * 30, 20, seed=0)
    pos, neg = rank_futures({"u": hist}, future, blocks, negatives)
    assert pos[0] == pytest.approx(1.0) and (neg[0] < pos[0]).all()
    assert per_query_metrics(pos[:1], neg[:1])["hit@1"][0] == 1.0
    assert max_similarity(hist, hist[3:4])[0] == pytest.approx(1.0)


# --- split and negatives ------------------------------------------------------------------------------------------

def test_split_rule():
    h, f = split_history_future(memories({"a": 4, "b": 5, "c": 7, "d": 10, "e": 15}), 0.2, 5)
    assert "a" not in h["user_id"].to_list() + f["user_id"].to_list()  # fewer than 5 memories: left out
    n_future = dict(f.group_by("user_id").len().iter_rows())
    assert n_future == {"b": 1, "c": 1, "d": 2, "e": 3}              # max(1, floor(0.2 n))
    n_hist = dict(h.group_by("user_id").len().iter_rows())
    assert n_hist == {"b": 4, "c": 6, "d": 8, "e": 12}
    # the future is the latest memories of each user, and frames are in time order
    for u in n_future:
        assert h.filter(pl.col("user_id") == u)["started_at"].max() < f.filter(pl.col("user_id") == u)["started_at"].min()
    assert f["memory_id"].to_list() == sorted(f["memory_id"].to_list())
    assert f.filter(pl.col("user_id") == "e")["memory_id"].to_list() == ["e-012", "e-013", "e-014"]


def test_negatives_are_deterministic_and_never_the_same_user():
    _, f = split_history_future(memories({f"u{i}": 10 + 5 * i for i in range(8)}), 0.2, 5)
    users = f["user_id"]
    a = sample_negatives(users, 10, seed=3)
    b = sample_negatives(users, 10, seed=3)
    c = sample_negatives(users, 10, seed=4)
    assert a.shape == (f.height, 10)
    assert (a == b).all() and not (a == c).all()
    u = users.to_numpy()
    assert (u[a] != u[:, None]).all()
    assert all(len(set(row)) == len(row) for row in a.tolist())       # without replacement
    # fewer other-user futures than asked: capped by the smallest pool
    small = sample_negatives(["x", "x", "y"], 99, seed=0)
    assert small.shape == (3, 1) and small[:2].tolist() == [[2], [2]] and small[2, 0] in (0, 1)


def test_render_lists_every_table():
    m = {"hit@1": 0.1, "hit@10": 0.4, "mrr": 0.2, "n": 5}
    worse = {"hit@1": 0.05, "hit@10": 0.3, "mrr": 0.1, "n": 5}
    d = {"source": "aol", "granularity": "session", "n_users_total": 3, "n_users": 2, "n_history": 8, "n_future": 5,
         "n_negatives": 3, "methods": {"multi_extractive": m, "single_extractive": worse, "multi_centroid": m},
         "splits": {"repeat": {"n": 2, "methods": {"multi_extractive": m}},
                    "novel": {"n": 3, "methods": {"multi_extractive": worse}}},
         "personas": {"coverage": 0.9, "personas_per_user": 2.0}, "quality": {"extractive": {"cohesion": 0.6}}}
    text = render_results({"protocol": {"future_fraction": 0.2, "min_memories": 5, "n_negatives": 3, "seed": 0,
                                        "llm_max_users": 0, "session_gap_minutes": 30, "movielens_min_rating": 4.0,
                                        "clustering_strategy": "hdbscan_direct"},
                           "model_version": "m@1", "datasets": {"aol": d}})
    assert "## aol" in text and "| multi-persona (extractive labeller) | 10.00 | 40.00 | 20.00 |" in text
    assert "repeat a history memory" in text and "multi-persona beats single-persona on Hit@10" in text



def test_render_reports_the_labeller_arms_and_targets():
    """docs/results.md holds the arms table and, per dataset, whether the untrained LLM labeller met its targets:
    a fallback rate over 10% or a lower truthfulness than the extractive labeller's on the same clusters is named."""
    m = {"hit@1": 0.1, "hit@10": 0.4, "mrr": 0.2, "n": 5}
    worse = {"hit@1": 0.05, "hit@10": 0.3, "mrr": 0.1, "n": 5}
    arm = {"clusters": 4, "fallback_rate": 0.25, "seconds_per_persona": 1.5, "problems": {"ungrounded_label": 2},
           "quality": {"objective": 0.7, "truthfulness": 0.8, "alignment": 0.6}}
    d = {"source": "aol", "granularity": "session", "n_users_total": 3, "n_users": 2, "n_history": 8, "n_future": 5,
         "n_negatives": 3, "methods": {"multi_extractive": m, "single_extractive": worse},
         "llm_sample": {"n_users": 2, "n_future": 5, "methods": {"multi_llm": m, "multi_extractive": worse}},
         "personas": {"coverage": 0.9, "personas_per_user": 2.0,
                      "llm": {"n_users": 2, "n_personas": 4, "fallback_rate": 0.25}},
         "quality": {"extractive": {"cohesion": 0.6}, "llm": {"objective": 0.8, "truthfulness": 0.7},
                     "extractive_llm_sample": {"objective": 0.75, "truthfulness": 0.9}}}
    text = render_results({"protocol": {"future_fraction": 0.2, "min_memories": 5, "n_negatives": 3, "seed": 0,
                                        "llm_max_users": 2, "session_gap_minutes": 30, "movielens_min_rating": 4.0,
                                        "clustering_strategy": "hdbscan_direct", "labelling_decoding": "phrases"},
                           "model_version": "m@1", "datasets": {"aol": d}, "labelling_model": "gemma3-270m",
                           "labelling_arms": [{"file": "labelling_arms_x.json", "model_version": "X@1",
                                               "datasets": {"aol": {"arms": {"phrases": arm}}}}]})
    assert "model `gemma3-270m`, decoding arm `phrases`" in text
    assert "| X | `labelling_arms_x.json` | aol | phrases | 4 | 0.250 | 0.700 | 0.800 | 0.600 | 1.50 | " \
           "ungrounded_label 2 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| aol | 2 | 0.250 |"))
    assert row.endswith("| not fallback, truthfulness |") and "40.00 / 30.00" in row


def test_render_reports_the_training_arms_against_the_promotion_targets():
    """docs/results.md holds the training arms (bench/bench_training.py): an arm whose held-out objective gain has a
    CI touching zero, a fallback over 5% or a Hit@10 below the extractive labels' is named as missing that target."""
    ev = {"aol": {"users": 20, "hit@10": 0.50, "hit@10_extractive": 0.52}}
    held = {"clusters": 100, "fallback_rate": 0.01, "objective": 0.71, "truthfulness": 0.9, "alignment": 0.7}
    arms = {"base": {"heldout": held, "heldout_vs_current": {"mean": 0.0, "ci": [0.0, 0.0]}, "eval": ev,
                     "peak_rss_mb": 3500},
            "groupwise": {"steps": 40, "train_seconds": 1200, "seconds_per_step": 30.0, "peak_rss_mb": 10240,
                          "heldout": {**held, "objective": 0.73}, "heldout_vs_current": {"mean": 0.02, "ci": [0.01, 0.03]},
                          "eval": {"aol": {**ev["aol"], "hit@10": 0.53}}},
            "sft": {"steps": 40, "train_seconds": 200, "seconds_per_step": 5.0, "peak_rss_mb": 3700,
                    "heldout": {**held, "fallback_rate": 0.08}, "heldout_vs_current": {"mean": 0.01, "ci": [-0.01, 0.02]},
                    "eval": ev},
            # judged against the run's own base arm (same decoding) where the run has one, not the snapshot's labels
            # (an adapter trained by an earlier run: its training peak is the arm's peak)
            "pairwise": {"steps": 40, "train_seconds": 1300, "seconds_per_step": 32.5, "peak_rss_mb": 2400,
                         "peak_rss_mb_after_train": 10240, "adapter_reused": True,
                         "heldout": {**held, "objective": 0.72}, "heldout_vs_current": {"mean": 0.03, "ci": [0.02, 0.04]},
                         "heldout_vs_base": {"mean": 0.004, "ci": [-0.002, 0.01]},
                         "eval": {"aol": {**ev["aol"], "hit@10": 0.53}}},
            # evaluated twice (bench_training --attach-eval per file): the larger sample decides the Hit@10 target
            "sft200": {"steps": 40, "train_seconds": 200, "seconds_per_step": 5.0, "peak_rss_mb": 3700,
                       "heldout": {**held, "objective": 0.73}, "heldout_vs_current": {"mean": 0.02, "ci": [0.01, 0.03]},
                       "evals": {"E_20.json": ev, "E_200.json": {"aol": {**ev["aol"], "users": 200, "hit@10": 0.53}}}},
            "sft20": {"steps": 40, "train_seconds": 200, "seconds_per_step": 5.0, "peak_rss_mb": 3700,
                      "heldout": {**held, "objective": 0.73}, "heldout_vs_current": {"mean": 0.02, "ci": [0.01, 0.03]},
                      "evals": {"E_20.json": {"aol": {**ev["aol"], "hit@10": 0.53}},
                                "E_200.json": {"aol": {**ev["aol"], "users": 200}}}}}
    text = render_results({"protocol": {"future_fraction": 0.2, "min_memories": 5, "n_negatives": 3, "seed": 0,
                                        "llm_max_users": 0, "session_gap_minutes": 30, "movielens_min_rating": 4.0,
                                        "clustering_strategy": "hdbscan_direct"},
                           "model_version": "m@1", "datasets": {},
                           "training_arms": [{"file": "training_arms_x.json", "groups_per_batch": 2,
                                              "learning_rate": 2e-4, "arms": arms}]})
    assert "## The retrained labeller: training arms" in text
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| `training_arms_x.json`")}
    assert rows["base"].endswith("| aol 50.00 / 52.00 (20 users, -) | - (untrained) |")
    assert "| 40 x 2 | 0.0002 | 1200 (30.0) | 10.0 |" in rows["groupwise"] and rows["groupwise"].endswith("| all |")
    assert "+0.0200 (+0.0100 .. +0.0300)" in rows["groupwise"]
    assert rows["sft"].endswith("| not fallback, objective, Hit@10 |")
    pairwise = rows["pairwise (adapter trained earlier)"]
    assert "| 1300 (32.5) | 10.0 |" in pairwise and "+0.0040 (-0.0020 .. +0.0100)" in pairwise
    assert pairwise.endswith("| not objective |")
    assert "| aol 50.00 / 52.00 (20 users, -); aol 53.00 / 52.00 (200 users, -) | all |" in rows["sft200"]
    assert rows["sft20"].endswith("| not Hit@10 |")


# --- end to end -------------------------------------------------------------------------------------------------

AOL_USERS = ("2179445", "2413314", "3344799", "3241737", "4586047")  # the smallest users of the sample


@pytest.fixture(scope="module")
def aol_warehouse(tmp_path_factory):
    from persona_tasks.config import DbtSettings, Settings
    from persona_tasks.dbt_runner import build
    from persona_tasks.ingest import ingest_files

    root = tmp_path_factory.mktemp("evaluate")
    with gzip.open(PROJECT_DIR / "data" / "aol" / "aol_sample.tsv.gz", "rt") as src:
        lines = [ln for i, ln in enumerate(src) if i == 0 or ln.split("\t", 1)[0] in AOL_USERS]
    path = root / "aol_small.tsv"
    path.write_text("".join(lines))
    settings = Settings(warehouse=root / "wh.duckdb", dbt=DbtSettings(target_path=root / "target"))
    ingest_files(settings, "aol", [path])
    build(settings)
    return root, settings


def test_cli_evaluate_on_a_few_aol_users(aol_warehouse, monkeypatch):
    from persona_tasks.cli import main

    root, settings = aol_warehouse
    monkeypatch.setenv("PERSONA_ETL_CONFIG", str(root / "none.toml"))
    monkeypatch.setenv("PERSONA_ETL_WAREHOUSE", str(settings.warehouse))
    monkeypatch.setenv("PERSONA_ETL_DBT__TARGET_PATH", str(root / "target"))
    out, doc = root / "results.json", root / "results.md"
    assert main(["evaluate", "--json", str(out), "--datasets", "aol", "--llm-max-users", "0", "--synth-users", "0",
                 "--write-docs", str(doc)]) == 0
    res = json.loads(out.read_text())
    d = res["datasets"]["aol"]
    assert d["n_users_total"] == 5 and d["n_users"] == 4            # 2179445 has fewer than 5 memories
    assert 1 <= d["n_negatives"] <= min(99, d["n_future"] - 1)     # capped by the smallest other-user pool
    methods = d["methods"]
    assert set(methods) == {"multi_extractive", "multi_evidence", "multi_centroid", "single_extractive",
                            "history_centroid", "nearest_memory", "most_recent", "popularity", "random"}
    for m in methods.values():
        assert 0 <= m["hit@1"] <= m["hit@10"] <= 1 and 0 < m["mrr"] <= 1 and m["n"] == d["n_future"]
        lo, hi = m["hit@10_ci"]
        assert lo <= m["hit@10"] + 1e-9 and m["hit@10"] <= hi + 1e-9      # the estimate lies in its interval
    # both negatives rules are evaluated; the configured one (unseen by default) is the primary table
    assert d["negatives"] == "unseen" and set(d["protocols"]) == {"unseen", "any"}
    assert d["protocols"]["unseen"]["methods"]["nearest_memory"]["hit@10"] == methods["nearest_memory"]["hit@10"]
    for c in d["comparisons"]:
        assert c["ci"][0] <= c["delta_hit@10"] + 1e-9 <= c["ci"][1] + 2e-9
    assert {(c["method"], c["baseline"], c["subset"]) for c in d["comparisons"]} >= {
        ("multi_extractive", "multi_centroid", "all"), ("multi_evidence", "nearest_memory", "novel")}
    assert d["splits"]["repeat"]["n"] + d["splits"]["novel"]["n"] == d["n_future"]
    # real personas, real scores: better than chance for the memory-based method on users this distinct
    assert methods["nearest_memory"]["mrr"] > methods["random"]["mrr"]
    assert d["personas"]["personas_per_user"] >= 1 and 0 < d["personas"]["coverage"] <= 1
    q = d["quality"]["extractive"]
    assert all(0 <= q[k] <= 1 for k in ("cohesion", "alignment", "truthfulness", "objective"))
    text = doc.read_text()
    assert "## aol" in text and "nearest history memory" in text
    assert "negatives: unseen" in text and "negatives: any" in text and "95% CI" in text
    # the reference's figures are shown beside the project's on the reference's rule
    assert "Agreement with an independent reference" in text and "50.83" in text
    # a stored run re-renders to the same tables without evaluating again (bench results unchanged in between)
    again = root / "again.md"
    assert main(["evaluate", "--from-json", str(out), "--write-docs", str(again)]) == 0
    assert again.read_text() == text


# --- negatives rule and intervals ---------------------------------------------------------------------------------

def test_unseen_negatives_never_hold_a_text_the_user_had():
    from persona_tasks.evaluate import user_texts

    # u1 and u2 both searched "google"; u3 never did. Under "unseen" no negative of u1 may be "google" text
    future = pl.DataFrame({
        "user_id": ["u1", "u1", "u2", "u2", "u3", "u3", "u4", "u4"],
        "text": ["google", "a1", "google", "b1", "google", "c1", "d1", "d2"],
    })
    history = pl.DataFrame({"user_id": ["u1", "u4"], "text": ["c1", "x"]})
    own = user_texts(history, future)
    assert own["u1"] == {"google", "a1", "c1"} and own["u4"] == {"d1", "d2", "x"}
    neg = sample_negatives(future["user_id"], 99, 0, future["text"], own)
    texts = future["text"].to_list()
    users = future["user_id"].to_list()
    for row in range(future.height):
        u = users[row]
        for j in neg[row]:
            assert users[j] != u and texts[j] not in own[u]
    # u1's pool: b1, d1, d2 (google is its own text, c1 is in its history): k = 3 is the smallest pool
    assert neg.shape == (8, 3)
    # the "any" rule keeps today's draws: other users' rows, the google of others included
    anyneg = sample_negatives(future["user_id"], 99, 0)
    assert anyneg.shape == (8, 6) and any(texts[j] == "google" for j in anyneg[0])


def test_bootstrap_interval_covers_the_mean_and_pairs_users():
    from persona_tasks.evaluate import bootstrap_ci, bootstrap_weights

    rng = np.random.default_rng(0)
    user = np.repeat(np.arange(50), 4)
    a = rng.random(200)
    w = bootstrap_weights(50, 500, 1)
    assert w.shape == (500, 50) and (w.sum(axis=1) == 50).all()
    lo, hi = bootstrap_ci(a, user, w)
    assert lo < a.mean() < hi and hi - lo < 0.2
    # a paired difference of identical methods is exactly zero; a constant shift gives a point interval
    assert bootstrap_ci(a, user, w, baseline=a) == (0.0, 0.0)
    lo, hi = bootstrap_ci(a + 0.1, user, w, baseline=a)
    assert abs(lo - 0.1) < 1e-9 and abs(hi - 0.1) < 1e-9


def test_soft_maximum_prefers_a_candidate_near_several_profile_vectors():
    # two candidates with the same best cosine (0.8): the one also close to a second profile vector ranks higher
    # under a temperature, and they tie under the plain maximum
    prof = np.array([[1.0, 0.0], [0.0, 1.0]])
    cand = np.array([[0.8, 0.6], [0.8, -0.6]])
    hard = max_similarity(prof, cand)
    soft = max_similarity(prof, cand, temperature=0.05)
    assert hard[0] == hard[1] == 0.8
    assert soft[0] > soft[1] >= 0.8 - 1e-6
    # a very low temperature is the maximum again
    assert np.allclose(max_similarity(prof, cand, temperature=1e-4), hard, atol=1e-4)


def test_llm_sample_labelled_elsewhere_is_replayed(aol_warehouse, monkeypatch, tmp_path):
    """--export-llm-inputs writes what the LLM would see; labels of exactly those inputs (made by a GPU worker,
    here by the extractive labeller) come back through --llm-labels; labels of other inputs are refused."""
    from persona_tasks.cli import main
    from persona_tasks.labelling import ExtractiveLabeller
    from persona_tasks.labelling.replay import ReplayError, ReplayLabeller, label_inputs_file, read_inputs

    root, settings = aol_warehouse
    monkeypatch.setenv("PERSONA_ETL_CONFIG", str(root / "none.toml"))
    monkeypatch.setenv("PERSONA_ETL_WAREHOUSE", str(settings.warehouse))
    monkeypatch.setenv("PERSONA_ETL_DBT__TARGET_PATH", str(root / "target"))
    common = ["evaluate", "--datasets", "aol", "--llm-max-users", "2", "--synth-users", "0"]
    assert main(common + ["--json", str(tmp_path / "a.json"), "--export-llm-inputs", str(tmp_path / "in")]) == 0
    first = json.loads((tmp_path / "a.json").read_text())["datasets"]["aol"]
    assert "llm_sample" not in first                                             # LLM rows left out
    inputs = read_inputs(tmp_path / "in" / "aol.json")
    assert len({c.user_id for c in inputs}) == 2 and all(c.memory_texts for c in inputs)
    stats = label_inputs_file(tmp_path / "in" / "aol.json", tmp_path / "labels.json", ExtractiveLabeller(settings))
    assert stats["clusters"] == len(inputs)
    assert main(common + ["--json", str(tmp_path / "b.json"), "--llm-labels", str(tmp_path / "labels.json")]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    d = res["datasets"]["aol"]
    assert d["llm_sample"]["n_users"] == 2 and "multi_llm" in d["llm_sample"]["methods"]
    assert d["personas"]["llm"]["n_personas"] == json.loads((tmp_path / "in" / "aol.json").read_text())["meta"]["multi"]
    assert res["llm_labels_replayed"] == [str(tmp_path / "labels.json")]
    # the extractive baseline does not depend on where the LLM labels came from
    assert d["methods"]["multi_extractive"] == first["methods"]["multi_extractive"]
    replay = ReplayLabeller(tmp_path / "labels.json")
    assert [p.label for p in replay.label(inputs)] == [p.label for p in ExtractiveLabeller(settings).label(inputs)]
    changed = inputs[0]
    changed.memory_texts = ["something else"] + changed.memory_texts[1:]
    with pytest.raises(ReplayError, match=f"user {changed.user_id!r}"):
        replay.label([changed])
