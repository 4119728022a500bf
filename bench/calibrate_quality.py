#!/usr/bin/env python
"""Calibrate the persona quality scores on data and measure how well they separate good from bad personas.

Data. A warehouse with personas made by the real pipeline (embed -> cluster -> extractive labeller -> stage):

* ``events`` (default when ``persona_tasks.dbt_runner`` exists): ``synth.generate_events`` -> ingest (events
  format, attributes category/brand/price) -> ``dbt_runner.build`` -> embed, cluster, label.
* ``memories`` (the fallback while the dbt models are not there): ``synth.generate_memories`` written straight
  into ``marts.intent_memories`` (``memory_text`` / ``embedding_text`` lower-cased, as the staging models do) ->
  embed, cluster, label.
* ``aol``: the bundled real AOL sample (``data/aol``): ingest, dbt build, then ``--users`` users with 40-150
  memories (a stable sample) are embedded, clustered and labelled.
* ``warehouse``: an existing warehouse (e.g. the AOL sample after ``make demo``), read-only; its latest staged run.

For synthetic data each cluster's planted topic (majority over its memories) is known and is used to draw
"foreign" material from another topic; on a real warehouse foreign material only comes from another user.

Pairs scored (every persona of the run once in each role):

* ``true``: the persona with its own evidence (its cluster among its user's memories);
* ``shuffled``: the persona (text, claims) against another user's cluster (another topic when known);
* ``swap``: one claim of the persona (label or a description clause, at random) replaced by a claim of a persona
  of another cluster (the same user's other cluster when it has one, else another user's);
* ``brand``: the label gets " from <Brand>", an invented brand-like word found in no memory.

Calibration (on a "fit" half of the users, split by md5 of user_id; every number reported on the other,
"held-out" half):

* ``claim_support_threshold``: Youden's J (max TPR - FPR) of a claim's best cosine to the evidence, the claims of
  true pairs (positives) against those of shuffled pairs (negatives); the middle of the range where J is maximal;
* ``specific_term_penalty``, ``alignment_auc_weight`` and the objective weights: small grids, each value's
  ROC-AUC shown; see docs/quality.md for what was chosen and why.

Usage::

    .venv/bin/python bench/calibrate_quality.py                     # ~120 synthetic users, ~1-2 min on 2 cores
    .venv/bin/python bench/calibrate_quality.py --users 60 --source memories
    .venv/bin/python bench/calibrate_quality.py --source warehouse --warehouse warehouse/warehouse.duckdb
    .venv/bin/python bench/calibrate_quality.py --write-docs        # also rewrite its block in docs/quality.md

Prints a report and writes ``<out>/calibrate_quality_<source>.json`` (``<out>`` default ``bench/out``).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from the checkout
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from persona_tasks.config import QualitySettings, Settings, load_settings  # noqa: E402
from persona_tasks.quality import (  # noqa: E402
    RunData, combine_alignment, embed_claims, load_run, roc_auc, run_model_version, score_run, score_user,
    split_claims,
)
from persona_tasks.warehouse import connect, connect_read_only, query_pl, query_row  # noqa: E402

log = logging.getLogger("calibrate_quality")
DOC = ROOT / "docs" / "quality.md"
AOL_MEMORIES = (40, 150)  # memories per sampled AOL user (the sample has 300 users, most with 100-200)
START, END = "<!-- calibration:{}:start -->", "<!-- calibration:{}:end -->"


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------

def _induce_steps(settings: Settings, con, users: list[str] | None = None, llm_users: int = 0) -> object:
    """embed -> cluster -> label (extractive; the LLM for ``llm_users`` users) -> stage (no publish)."""
    from persona_tasks.embed import embed_memories
    from persona_tasks.induce import cluster_step, label_step, latest_event_date

    run_date = latest_event_date(con)
    memories = query_pl(con, "SELECT memory_id, user_id, embedding_text FROM marts.intent_memories")
    if users is not None:
        memories = memories.filter(pl.col("user_id").is_in(users))
    embed_memories(settings, con, memories=memories)
    cluster_step(settings, con, run_date, users=users)
    label_step(settings, con, run_date, "llm" if llm_users else "extractive", users=users,
               llm_max_users=llm_users or None)
    return run_date


def build_from_aol(settings: Settings, n_users: int, seed: int, llm_users: int = 0) -> tuple[object, None]:
    """The bundled real AOL sample: ingest, dbt build, then a stable sample of users with AOL_MEMORIES memories."""
    from persona_tasks.dbt_runner import build
    from persona_tasks.ingest import ingest_files

    ingest_files(settings, "aol", [settings.project_dir / "data" / "aol" / "aol_sample.tsv.gz"])
    build(settings)
    with connect(settings) as con:
        counts = query_pl(con, "SELECT user_id, count(*) AS n FROM marts.intent_memories GROUP BY user_id")
        eligible = sorted(counts.filter(pl.col("n").is_between(*AOL_MEMORIES))["user_id"].to_list(),
                          key=lambda u: hashlib.md5(f"{seed}:{u}".encode()).hexdigest())
        run_date = _induce_steps(settings, con, users=eligible[:n_users], llm_users=llm_users)
    return run_date, None


def build_from_memories(settings: Settings, n_users: int, seed: int,
                        llm_users: int = 0) -> tuple[object, dict[str, str]]:
    from persona_tasks.synth import generate_memories

    mem = generate_memories(n_users, (6, 30), seed=seed)
    mart = mem.select(
        "memory_id", "user_id", pl.col("started_at").dt.date().alias("event_date"), "started_at",
        pl.col("started_at").alias("ended_at"), "n_actions", pl.col("memory_text").str.to_lowercase(),
        pl.col("embedding_text").str.to_lowercase(),
        pl.lit("synth").alias("source"))
    with connect(settings) as con:
        con.execute("CREATE SCHEMA IF NOT EXISTS marts")
        con.register("_mart", mart.to_arrow())
        con.execute("CREATE OR REPLACE TABLE marts.intent_memories AS SELECT * FROM _mart")
        con.unregister("_mart")
        run_date = _induce_steps(settings, con, llm_users=llm_users)
    return run_date, dict(zip(mem["memory_id"], mem["planted_persona"]))


def build_from_events(settings: Settings, n_users: int, seed: int,
                      llm_users: int = 0) -> tuple[object, dict[str, str]]:
    from persona_tasks.dbt_runner import build
    from persona_tasks.ingest import ingest_files
    from persona_tasks.synth import generate_events, write_events

    events = generate_events(n_users * 100, n_users=n_users, seed=seed, days=5)
    path = write_events(events, settings.warehouse.parent / "events.parquet")
    ingest_files(settings, "events", [path], source="synth")
    build(settings)
    with connect(settings) as con:
        run_date = _induce_steps(settings, con, llm_users=llm_users)
        ev = query_pl(con, "SELECT m.memory_id, r.user_id, r.event_ts, r.event_type, r.text "
                           "FROM marts.intent_memories m, unnest(m.event_ids) AS u(event_id) "
                           "JOIN raw.events r ON r.event_id = u.event_id")
    planted = events.select("user_id", "event_ts", "event_type", "text", "planted_persona")
    topic = (ev.join(planted, on=["user_id", "event_ts", "event_type", "text"], how="inner")
             .group_by("memory_id").agg(pl.col("planted_persona").mode().first()))
    return run_date, dict(zip(topic["memory_id"], topic["planted_persona"]))


# --------------------------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Pair:
    kind: str            # true | shuffled | swap | brand
    persona: int         # row of the persona in RunData.personas
    fit: bool            # the persona's user is in the fit half
    cohesion: float
    auc: float
    centroid_sim: float
    best: np.ndarray     # per claim: best cosine to an evidence memory
    n_missing: int       # specific terms absent from the evidence
    detail: str = ""     # e.g. where a swapped claim came from
    llm: bool = False    # the persona was written by the LLM labeller (kept out of the calibration)
    missing: tuple[str, ...] = ()


def _is_fit(user_id: str) -> bool:
    return int(hashlib.md5(user_id.encode()).hexdigest()[:8], 16) % 2 == 0


def _brands(rng: np.random.Generator, n: int, corpus: str) -> list[str]:
    """Pronounceable invented brand names that occur nowhere in the memories."""
    cons, vows = list("bdfgklmnprstvz"), list("aeiou")
    out: list[str] = []
    while len(out) < n:
        k = int(rng.integers(2, 4))
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(k)) + rng.choice(["x", "n", "r", "q"])
        if w not in corpus and w.capitalize() not in out:
            out.append(w.capitalize())
    return out


def evaluate(cfg: QualitySettings, data: RunData, user: str, cluster: int, pvec: np.ndarray, claims: list[str],
             cvec: np.ndarray) -> tuple[float, float, float, np.ndarray, list[str]]:
    """(cohesion, auc, centroid cosine, best claim cosines, missing specific terms) of a persona text scored
    against ``cluster`` of ``user``."""
    ps, ms = data.user(user)
    labels = data.memories["cluster_id"].to_numpy()[ms]
    rows = np.flatnonzero(labels == cluster)
    s = score_user(cfg, data.mvec[ms], labels, data.memories["memory_text"].to_list()[ms], pvec[None, :],
                   [cluster], [claims], [cvec], [rows])
    d = s.details[0]
    return float(s.cohesion[0]), float(s.auc[0]), float(s.centroid_sim[0]), np.asarray(d.best_similarity), \
        d.missing_terms


def make_pairs(cfg: QualitySettings, data: RunData, embedder, topic_of: dict[str, str] | None,
               seed: int, llm_personas: set[str] = frozenset()) -> list[Pair]:
    rng = np.random.default_rng(seed)
    P = data.personas
    n = P.height
    users = P["user_id"].to_list()
    clusters = P["cluster_id"].to_list()
    labels_, descs = P["label"].to_list(), P["description"].to_list()
    claims = [split_claims(lab, d) for lab, d in zip(labels_, descs)]
    cvecs = embed_claims(embedder, claims)
    # planted topic of each persona's cluster (majority of its memories), when known
    topic: list[str | None] = [None] * n
    if topic_of:
        mem = data.memories.with_columns(pl.col("memory_id").replace_strict(topic_of, default=None).alias("t"))
        maj = (mem.filter(pl.col("cluster_id") >= 0).group_by("user_id", "cluster_id")
               .agg(pl.col("t").drop_nulls().mode().first()))
        tmap = {(u, c): t for u, c, t in maj.iter_rows()}
        topic = [tmap.get((u, c)) for u, c in zip(users, clusters)]

    def foreign(i: int, same_user_ok: bool) -> int:
        """A persona row of another cluster: the same user's (if allowed and it exists), else another user's,
        of another planted topic when topics are known."""
        cands = [j for j in range(n) if j != i and (users[j] == users[i] if same_user_ok else users[j] != users[i])
                 and (topic[i] is None or topic[j] != topic[i]) and claims[j]]
        if not cands and same_user_ok:
            return foreign(i, False)
        if not cands:
            cands = [j for j in range(n) if users[j] != users[i] and claims[j]]
        return int(rng.choice(cands))

    corpus = " ".join(data.memories["memory_text"].to_list()).lower()
    brands = _brands(rng, n, corpus)
    pairs: list[Pair] = []
    # true and shuffled
    for i in range(n):
        fit = _is_fit(users[i])
        if not claims[i]:
            continue
        c, a, cs, b, m = evaluate(cfg, data, users[i], clusters[i], data.pvec[i], claims[i], cvecs[i])
        llm = P["persona_id"][i] in llm_personas
        pairs.append(Pair("true", i, fit, c, a, cs, b, len(m), llm=llm, missing=tuple(m)))
        j = foreign(i, False)
        c, a, cs, b, m = evaluate(cfg, data, users[j], clusters[j], data.pvec[i], claims[i], cvecs[i])
        pairs.append(Pair("shuffled", i, fit, c, a, cs, b, len(m), llm=llm, missing=tuple(m)))
    # corrupted texts
    texts: list[tuple[int, str, str, str, str]] = []  # (row, kind, label, description, detail)
    for i in range(n):
        if not claims[i]:
            continue
        j = foreign(i, True)
        k = int(rng.integers(len(claims[i])))
        donor = claims[j][int(rng.integers(len(claims[j])))]
        lab, desc = labels_[i], descs[i]
        if k == 0 and claims[i][0] == lab.strip().strip(".!?;:,").strip():
            lab = donor
        else:
            desc = desc.replace(claims[i][k], donor, 1)
        texts.append((i, "swap", lab, desc, "same user" if users[j] == users[i] else "other user"))
        texts.append((i, "brand", f"{labels_[i]} from {brands[i]}", descs[i], brands[i]))
    bad_claims = [split_claims(lab, d) for _, _, lab, d, _ in texts]
    bad_cvecs = embed_claims(embedder, bad_claims)
    bad_pvecs = embedder.encode([f"{lab}. {d}" for _, _, lab, d, _ in texts])
    for (i, kind, _, _, detail), cl, cv, pv in zip(texts, bad_claims, bad_cvecs, bad_pvecs):
        c, a, cs, b, m = evaluate(cfg, data, users[i], clusters[i], pv, cl, cv)
        pairs.append(Pair(kind, i, _is_fit(users[i]), c, a, cs, b, len(m), detail,
                          llm=P["persona_id"][i] in llm_personas, missing=tuple(m)))
    return pairs


# --------------------------------------------------------------------------------------------------------------
# Scores from pairs, for any parameter values
# --------------------------------------------------------------------------------------------------------------

def truth(p: Pair, threshold: float, penalty: float) -> float:
    share = float((p.best >= threshold).mean()) if p.best.size else 1.0
    return share * (1.0 - penalty) ** p.n_missing


def align(p: Pair, w: float) -> float:
    return float(combine_alignment(p.auc, p.centroid_sim, w))


def obj(p: Pair, weights: dict[str, float], threshold: float, penalty: float, w: float) -> float:
    s = {"cohesion": p.cohesion, "alignment": align(p, w), "truthfulness": truth(p, threshold, penalty)}
    tot = sum(weights.values())
    return sum(weights[k] * s[k] for k in weights) / tot


def youden(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float, float, float, tuple[float, float]]:
    """(threshold, J, TPR, FPR, plateau) maximising J = TPR - FPR for the rule score >= threshold.

    J is often maximal over a range of thresholds (the gap between the two distributions): ``plateau`` = (lo, hi]
    is that range (lo: the highest score below it, excluded), and the threshold is its middle, the choice least
    tied to the particular sample."""
    cand = np.unique(np.concatenate([pos, neg]))
    tpr = (pos[None, :] >= cand[:, None]).mean(axis=1)
    fpr = (neg[None, :] >= cand[:, None]).mean(axis=1)
    j = tpr - fpr
    best = np.flatnonzero(j >= j.max() - 1e-12)
    lo_k, hi_k = int(best[0]), int(best[-1])
    # a plateau of non-adjacent maxima is still one rule-set only if contiguous; else keep the first run
    run_end = lo_k
    while run_end + 1 <= hi_k and j[run_end + 1] >= j.max() - 1e-12:
        run_end += 1
    lo = cand[lo_k - 1] if lo_k > 0 else cand[lo_k]
    hi = cand[run_end]
    k = lo_k
    return float((lo + hi) / 2), float(j[k]), float(tpr[k]), float(fpr[k]), (round(float(lo), 3), round(float(hi), 3))


def auc_of(pairs: list[Pair], neg_kind: str | tuple[str, ...], f, fit: bool | None = False) -> float:
    kinds = (neg_kind,) if isinstance(neg_kind, str) else neg_kind
    sel = [p for p in pairs if fit is None or p.fit == fit]
    pos = [f(p) for p in sel if p.kind == "true"]
    neg = [f(p) for p in sel if p.kind in kinds]
    return roc_auc(pos, neg) if pos and neg else float("nan")


def calibrate(pairs: list[Pair], cfg: QualitySettings) -> dict:
    llm_pairs = [p for p in pairs if p.llm]
    pairs = [p for p in pairs if not p.llm]  # calibrate on extractive personas: grounded by construction
    fit = [p for p in pairs if p.fit]
    pos = np.concatenate([p.best for p in fit if p.kind == "true"])
    neg = np.concatenate([p.best for p in fit if p.kind == "shuffled"])
    thr, j, tpr, fpr, plateau = youden(pos, neg)
    held = [p for p in pairs if not p.fit]
    hpos = np.concatenate([p.best for p in held if p.kind == "true"])
    hneg = np.concatenate([p.best for p in held if p.kind == "shuffled"])
    swapped = [p for p in held if p.kind == "swap"]
    out: dict = {
        "claims": {
            "n_true_fit": int(pos.size), "n_shuffled_fit": int(neg.size),
            "threshold": round(thr, 3), "youden_plateau_fit": list(plateau), "youden_j_fit": round(j, 3), "tpr_fit": round(tpr, 3), "fpr_fit": round(fpr, 3),
            "tpr_heldout": round(float((hpos >= thr).mean()), 3), "fpr_heldout": round(float((hneg >= thr).mean()), 3),
            "auc_claim_heldout": round(roc_auc(hpos, hneg), 3),
            "true_claim_cosine_quartiles": np.round(np.quantile(hpos, [0.25, 0.5, 0.75]), 3).tolist(),
            "shuffled_claim_cosine_quartiles": np.round(np.quantile(hneg, [0.25, 0.5, 0.75]), 3).tolist(),
        },
    }
    thr = round(thr, 3)
    pen0, w0 = cfg.specific_term_penalty, cfg.alignment_auc_weight
    out["penalty_grid"] = {
        str(p): {"auc_true_vs_brand_fit": round(auc_of(pairs, "brand", lambda x, p=p: truth(x, thr, p), True), 3),
                 "auc_true_vs_corrupted_fit": round(auc_of(pairs, ("swap", "brand"),
                                                           lambda x, p=p: truth(x, thr, p), True), 3)}
        for p in (0.0, 0.25, 0.5, 0.75, 1.0)}
    out["true_with_missing_terms"] = round(float(np.mean([p.n_missing > 0 for p in pairs if p.kind == "true"])), 3)
    out["brand_detected"] = round(float(np.mean([p.n_missing > 0 for p in pairs if p.kind == "brand"])), 3)
    out["alignment_weight_grid"] = {
        str(w): {"auc_true_vs_shuffled_fit": round(auc_of(pairs, "shuffled", lambda x, w=w: align(x, w), True), 3),
                 "auc_true_vs_swap_fit": round(auc_of(pairs, "swap", lambda x, w=w: align(x, w), True), 3)}
        for w in (0.0, 0.25, 0.5, 0.75, 1.0)}
    grid = []
    for wc, wa in itertools.product(np.arange(0, 1.01, 0.1), repeat=2):
        wt = 1.0 - wc - wa
        if wt < -1e-9:
            continue
        weights = {"cohesion": round(wc, 1), "alignment": round(wa, 1), "truthfulness": round(max(wt, 0.0), 1)}
        a = auc_of(pairs, ("shuffled", "swap", "brand"), lambda x, ws=weights: obj(x, ws, thr, pen0, w0), True)
        grid.append((round(a, 4), weights))
    grid.sort(key=lambda g: -g[0])
    out["objective_weight_grid_top"] = [{"auc_fit": a, **w} for a, w in grid[:8]]
    out["objective_weight_grid_cohesion_0.2"] = [{"auc_fit": a, **w} for a, w in grid if w["cohesion"] == 0.2][:3]
    # held-out report with the configured parameters and the calibrated threshold
    weights = cfg.objective_weights
    scorers = {
        "truthfulness": lambda x: truth(x, thr, pen0),
        "alignment": lambda x: align(x, w0),
        "cohesion": lambda x: x.cohesion,
        "objective": lambda x: obj(x, weights, thr, pen0, w0),
    }
    out["heldout_auc"] = {
        name: {neg: round(auc_of(pairs, neg, f), 3) for neg in ("shuffled", "swap", "brand")}
        | {"corrupted": round(auc_of(pairs, ("swap", "brand"), f), 3)}
        for name, f in scorers.items()}
    out["heldout_swap_by_source"] = {
        src: round(roc_auc([truth(p, thr, pen0) for p in held if p.kind == "true"],
                           [truth(p, thr, pen0) for p in swapped if p.detail == src]), 3)
        for src in ("same user", "other user") if any(p.detail == src for p in swapped)}
    out["heldout_means"] = {
        kind: {name: round(float(np.nanmean([f(p) for p in held if p.kind == kind])), 3) for name, f in scorers.items()}
        for kind in ("true", "shuffled", "swap", "brand")}
    if llm_pairs:
        true_llm = [p for p in llm_pairs if p.kind == "true"]
        out["llm"] = {
            "n_personas": len(true_llm),
            "means": {kind: {name: round(float(np.nanmean([f(p) for p in llm_pairs if p.kind == kind])), 3)
                             for name, f in scorers.items()} for kind in ("true", "shuffled", "swap", "brand")},
            "claims_supported": round(float(np.mean(np.concatenate([p.best for p in true_llm]) >= thr)), 3),
            "with_missing_terms": round(float(np.mean([p.n_missing > 0 for p in true_llm])), 3),
            "missing_terms_examples": sorted({t for p in true_llm for t in p.missing})[:15],
            "truthfulness_auc": {neg: round(auc_of(llm_pairs, neg, scorers["truthfulness"], None), 3)
                                 for neg in ("shuffled", "swap", "brand")},
        }
    out["n_pairs"] = {kind: {"fit": sum(p.kind == kind and p.fit for p in pairs),
                             "heldout": sum(p.kind == kind and not p.fit for p in pairs)}
                      for kind in ("true", "shuffled", "swap", "brand")}
    return out


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------

def markdown(res: dict) -> str:
    c = res["claims"]
    h = res["heldout_auc"]
    lines = [
        f"Run: {res['data']}; {res['n_personas']} personas of {res['n_users']} users "
        f"({res['n_pairs']['true']['fit']} fit / {res['n_pairs']['true']['heldout']} held-out personas with claims); "
        f"{res['seconds']:.0f}s on 2 shared CPU cores (`bench/calibrate_quality.py`{res['args']}).",
        "",
        f"**Claim support threshold: {c['threshold']}** (Youden's J on the fit half: J {c['youden_j_fit']}, "
        f"TPR {c['tpr_fit']}, FPR {c['fpr_fit']}, maximal for thresholds in (lo, hi] = {c['youden_plateau_fit']}, the "
        f"middle taken; {c['n_true_fit']} true vs {c['n_shuffled_fit']} shuffled claims). "
        f"Held out: TPR {c['tpr_heldout']}, FPR {c['fpr_heldout']}, claim-level ROC-AUC {c['auc_claim_heldout']}. "
        f"Best-evidence cosine quartiles, true claims {c['true_claim_cosine_quartiles']}, "
        f"shuffled claims {c['shuffled_claim_cosine_quartiles']}.",
        "",
        "Held-out ROC-AUC, true personas against each kind of bad one (1 = perfect separation, 0.5 = chance):",
        "",
        "| score | vs shuffled | vs claim swapped | vs invented brand | vs corrupted (both) |",
        "|---|---|---|---|---|",
    ]
    for name in ("truthfulness", "alignment", "cohesion", "objective"):
        r = h[name]
        lines.append(f"| {name} | {r['shuffled']} | {r['swap']} | {r['brand']} | {r['corrupted']} |")
    lines += ["", "Held-out means:", "", "| pairs | cohesion | alignment | truthfulness | objective |",
              "|---|---|---|---|---|"]
    for kind, m in res["heldout_means"].items():
        lines.append(f"| {kind} | {m['cohesion']} | {m['alignment']} | {m['truthfulness']} | {m['objective']} |")
    sw = res["heldout_swap_by_source"]
    lines += ["", "Truthfulness, true vs claim swapped, by where the swapped claim came from (held out): "
              + ", ".join(f"{k} {v}" for k, v in sw.items()) + ".",
              "", f"Invented brand flagged as missing in {res['brand_detected']:.0%} of brand-corrupted personas; "
              f"true personas with some specific term missing from their evidence: "
              f"{res['true_with_missing_terms']:.0%}.",
              "", "Grids (fit half):", "",
              "| specific_term_penalty | AUC true vs brand | AUC true vs corrupted |", "|---|---|---|"]
    for p, r in res["penalty_grid"].items():
        lines.append(f"| {p} | {r['auc_true_vs_brand_fit']} | {r['auc_true_vs_corrupted_fit']} |")
    lines += ["", "| alignment_auc_weight | AUC true vs shuffled | AUC true vs swap |", "|---|---|---|"]
    for w, r in res["alignment_weight_grid"].items():
        lines.append(f"| {w} | {r['auc_true_vs_shuffled_fit']} | {r['auc_true_vs_swap_fit']} |")
    lines += ["", "Objective weights (cohesion, alignment, truthfulness), AUC true vs all bad pairs (fit half), best "
              "of a 0.1 grid and best with cohesion 0.2:", ""]
    for g in res["objective_weight_grid_top"][:3] + res["objective_weight_grid_cohesion_0.2"][:1]:
        lines.append(f"- ({g['cohesion']}, {g['alignment']}, {g['truthfulness']}): {g['auc_fit']}")
    if "llm" in res:
        m = res["llm"]
        lines += ["", f"LLM personas ({m['n_personas']}, SmolLM2-135M, kept out of the calibration), all users: "
                  f"means of true pairs {m['means']['true']}; claims supported {m['claims_supported']:.0%}; "
                  f"personas with a specific term missing from the evidence {m['with_missing_terms']:.0%} "
                  f"(e.g. {', '.join(m['missing_terms_examples'][:8]) or '-'}); truthfulness AUC true vs shuffled / "
                  f"swap / brand: {m['truthfulness_auc']['shuffled']} / {m['truthfulness_auc']['swap']} / "
                  f"{m['truthfulness_auc']['brand']}."]
    lines.append(f"\nScoring step (`score_run`) on this run: {res['score_run']}.")
    return "\n".join(lines)


def write_docs(text: str, source: str) -> None:
    """Replace the results block of ``source`` in docs/quality.md (``<!-- calibration:<source>:start -->`` ...)."""
    start, end = START.format(source), END.format(source)
    doc = DOC.read_text()
    if start not in doc or end not in doc:
        raise SystemExit(f"{DOC}: no {start} ... {end} block")
    a, b = doc.index(start) + len(start), doc.index(end)
    DOC.write_text(doc[:a] + "\n" + text + "\n" + doc[b:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", choices=("auto", "events", "memories", "aol", "warehouse"), default="auto")
    ap.add_argument("--users", type=int, default=120)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--warehouse", type=Path, help="existing warehouse for --source warehouse")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--llm-users", type=int, default=0,
                    help="users whose clusters the LLM labeller labels (reported apart, not calibrated on)")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from persona_tasks.embed import embedder_from_settings

    t0 = time.perf_counter()
    source = args.source
    if source == "auto":
        try:
            import persona_tasks.dbt_runner  # noqa: F401
            source = "events"
        except ImportError:
            source = "memories"
    tmp = tempfile.TemporaryDirectory(prefix="calibrate_quality_")
    topic_of: dict[str, str] | None = None
    if source == "warehouse":
        settings = load_settings(warehouse=args.warehouse or load_settings().warehouse)
        con = connect_read_only(settings)
        run_date = query_row(con, "SELECT max(run_date) FROM personas.staged_personas")[0]
        data_desc = f"warehouse {settings.warehouse.name}, staged run {run_date}"
    else:
        settings = load_settings(warehouse=Path(tmp.name) / "wh.duckdb",
                                 dbt={"target_path": Path(tmp.name) / "target"},
                                 ingest={"events": {"attributes": ["category", "brand", "price"]}})
        build = {"events": build_from_events, "memories": build_from_memories, "aol": build_from_aol}[source]
        run_date, topic_of = build(settings, args.users, args.seed, args.llm_users)
        con = connect(settings)
        lo, hi = AOL_MEMORIES
        data_desc = (f"real AOL sample ({args.users} sampled users with {lo}-{hi} memories)" if source == "aol"
                     else f"synthetic ({source}, {args.users} users, seed {args.seed})") + ", extractive labeller"
    try:
        cfg = settings.quality
        embedder = embedder_from_settings(settings)
        version = run_model_version(con, run_date)
        data = load_run(con, run_date, version)
        t1 = time.perf_counter()
        llm = set(query_pl(con, "SELECT persona_id FROM personas.staged_personas WHERE run_date = $d AND "
                                "labeller = 'llm' AND NOT is_fallback", {"d": run_date})["persona_id"].to_list())
        pairs = make_pairs(cfg, data, embedder, topic_of, args.seed, llm)
        res = calibrate(pairs, cfg)
        t_pairs = time.perf_counter() - t1
        if source != "warehouse":
            rep = score_run(settings, con, run_date)
            res["score_run"] = (f"{rep.n_scored}/{rep.n_personas} personas scored in {rep.seconds:.1f}s "
                                f"({rep.n_personas / max(rep.seconds, 1e-9):.0f} personas/s, embedding "
                                f"{rep.n_claims} claims included); means {rep.means}")
        else:
            res["score_run"] = "not run (read-only warehouse)"
    finally:
        con.close()
    res.update(data=data_desc, n_personas=data.personas.height, n_users=len(data.persona_bounds),
               seconds=time.perf_counter() - t0, pairs_seconds=round(t_pairs, 1),
               args=(" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip())
    text = markdown(res)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"calibrate_quality_{source}.json").write_text(json.dumps(res, indent=2, default=str))
    if args.write_docs:
        write_docs(text, source)
        print(f"\nwrote {DOC}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
