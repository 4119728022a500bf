"""Calibrate the sensitive-category thresholds on the hand-labelled persona sample, and report precision/recall.

Data: ``data/sensitive_categories/labelled_personas.csv`` (``source, text, categories``): persona texts
(``"label. description"``) of the extractive labeller on the bundled AOL and MovieLens samples (a random sample of
personas whose text holds a word of a category's keyword list, and a random sample of the others), plus a few
written ones for the rare categories (source ``written``); every row labelled by hand with the categories a
reader would say the persona reveals (``;``-separated; empty = none). Labelling rule: the persona's label or
description names the category's subject as an interest of the user (a condition, a treatment, a faith, a
party, explicit sexual material, an orientation); passing mentions count.

Per category, the threshold on the persona's score (``persona_tasks.sensitive.SensitiveClassifier``) is the one of
best F1 on all rows (ties: the higher threshold); precision and recall are also reported held out: 2-fold
cross-validation (folds by md5 of the text), the threshold chosen on one fold and applied to the other.

Usage: python bench/calibrate_sensitive.py [--write]   (--write stores the thresholds in categories.json)
Writes bench/results/sensitive_calibration.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from persona_tasks.config import load_settings  # noqa: E402
from persona_tasks.embed import embedder_from_settings  # noqa: E402
from persona_tasks.progress import set_threads  # noqa: E402
from persona_tasks.sensitive import SensitiveClassifier, load_categories  # noqa: E402

LABELS = ROOT / "data" / "sensitive_categories" / "labelled_personas.csv"


def best_threshold(scores: np.ndarray, truth: np.ndarray) -> float:
    """The score threshold (predict >= t) of best F1; ties go to the higher threshold."""
    best, best_t = -1.0, float(scores.max()) + 1e-6 if scores.size else 1.0
    for t in np.unique(scores)[::-1]:
        pred = scores >= t
        tp = float((pred & truth).sum())
        f1 = 2 * tp / max(float(pred.sum() + truth.sum()), 1.0)
        if f1 > best + 1e-12:
            best, best_t = f1, float(t)
    return best_t


def prf(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    tp = float((pred & truth).sum())
    p = tp / pred.sum() if pred.sum() else float("nan")
    r = tp / truth.sum() if truth.sum() else float("nan")
    f = 2 * tp / max(float(pred.sum() + truth.sum()), 1.0)
    return {"precision": p, "recall": r, "f1": f, "tp": int(tp), "predicted": int(pred.sum()),
            "positives": int(truth.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="store the thresholds (and model version) in the file")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sensitive_calibration.json")
    args = ap.parse_args()
    settings = load_settings()
    set_threads(settings.threads)
    t0 = time.perf_counter()
    embedder = embedder_from_settings(settings)
    cats = load_categories(settings)
    df = pl.read_csv(LABELS, schema_overrides={"categories": pl.String}).with_columns(
        pl.col("categories").fill_null(""))
    clf = SensitiveClassifier(cats, embedder)
    scores = clf.scores(embedder.encode(df["text"].to_list()))
    fold = np.array([int(hashlib.md5(t.encode()).hexdigest(), 16) % 2 for t in df["text"].to_list()])
    out = {"labelled": str(LABELS.relative_to(ROOT)), "n_rows": df.height, "model_version": embedder.model_version,
           "categories": {}}
    print(f"{df.height} labelled personas, model {embedder.model_version}")
    print(f"{'category':20s} {'pos':>4s} {'threshold':>9s} {'P':>6s} {'R':>6s} {'F1':>6s}  {'held-out P':>10s} "
          f"{'R':>6s}")
    for k, name in enumerate(cats.names):
        truth = df["categories"].str.split(";").list.contains(name).to_numpy()
        s = scores[:, k]
        t_all = best_threshold(s, truth)
        fit = prf(s >= t_all, truth)
        held = np.zeros(df.height, dtype=bool)
        for f in (0, 1):
            t = best_threshold(s[fold != f], truth[fold != f])
            held[fold == f] = s[fold == f] >= t
        cv = prf(held, truth)
        out["categories"][name] = {"threshold": round(t_all, 3), "all_rows": fit, "held_out_2fold": cv,
                                   "previous_threshold": cats.thresholds[name]}
        print(f"{name:20s} {int(truth.sum()):4d} {t_all:9.3f} {fit['precision']:6.2f} {fit['recall']:6.2f} "
              f"{fit['f1']:6.2f}  {cv['precision']:10.2f} {cv['recall']:6.2f}")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.write:
        path = Path(settings.sensitive.categories_file)
        data = json.loads(path.read_text())
        for name, r in out["categories"].items():
            data["categories"][name]["threshold"] = r["threshold"]
        data["model_version"] = embedder.model_version
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote thresholds to {path}")


if __name__ == "__main__":
    main()
