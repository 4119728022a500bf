"""Special categories of personal data in personas: classify each persona, then keep, flag or suppress it.

Personas about sexual content, health, religion, political views or sexual orientation are special categories of
personal data in most privacy law (GDPR art. 9 and its peers). Every persona of a run is classified before it is
published (``publish.publish_run``):

* **Classifier.** Each category is described by a few anchor texts (``data/sensitive_categories/categories.json``);
  a persona's score for a category is the highest cosine between its text embedding (``"label. description"``,
  the vector already stored in ``personas.staged_persona_embeddings``) and the category's anchors. A persona
  belongs to every category whose score reaches that category's threshold.
* **Thresholds** are calibrated on a hand-labelled sample of real personas (``labelled_personas.csv`` beside the
  categories; ``bench/calibrate_sensitive.py`` picks, per category, the threshold of best F1 and reports
  precision and recall, held out by 2-fold cross-validation) for one embedding model; ``[sensitive] thresholds``
  overrides them per category. With another embedding model the run logs a warning: calibrate again.
* **Policy** (``[sensitive] policy``, per category): ``flag`` (default) publishes the persona with the category in
  ``personas.sensitive_categories``, a column analysts filter on; ``keep`` publishes it unmarked; ``suppress``
  does not publish it at all (nor its evidence or embedding) and counts it in ``personas.induction_runs
  .n_suppressed``. A persona in several categories is suppressed when any of them says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from persona_tasks.config import Settings
from persona_tasks.errors import PersonaEtlError

log = logging.getLogger(__name__)

POLICIES = ("keep", "flag", "suppress")


class SensitiveCategoriesError(PersonaEtlError):
    """The categories file or the [sensitive] settings are unusable."""


@dataclass(frozen=True)
class SensitiveCategories:
    """Category names (file order), their anchor texts and thresholds, and the model they were calibrated for."""

    names: tuple[str, ...]
    anchors: dict[str, tuple[str, ...]]
    thresholds: dict[str, float]
    model_version: str | None


def load_categories(settings: Settings, path: Path | None = None) -> SensitiveCategories:
    """The categories file (default ``[sensitive] categories_file``) with ``[sensitive] thresholds`` applied."""
    cfg = settings.sensitive
    path = Path(path or cfg.categories_file)
    try:
        data = json.loads(path.read_text())
        cats = data["categories"]
        names = tuple(cats)
        anchors = {c: tuple(cats[c]["anchors"]) for c in names}
        thresholds = {c: float(cats[c]["threshold"]) for c in names}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SensitiveCategoriesError(f"sensitive categories file {path}: {exc!r} (expected "
                                       "{\"categories\": {name: {\"anchors\": [...], \"threshold\": x}}})") from exc
    unknown = (set(cfg.policy) | set(cfg.thresholds)) - set(names)
    if unknown:
        raise SensitiveCategoriesError(f"[sensitive] names unknown categories {sorted(unknown)}; {path} defines "
                                       f"{list(names)}")
    if any(not a for a in anchors.values()):
        raise SensitiveCategoriesError(f"sensitive categories file {path}: every category needs anchor texts")
    thresholds.update({c: float(t) for c, t in cfg.thresholds.items()})
    return SensitiveCategories(names, anchors, thresholds, data.get("model_version"))


class SensitiveClassifier:
    """Scores persona embeddings against the categories' anchors (encoded once with the pipeline's embedder)."""

    def __init__(self, categories: SensitiveCategories, embedder):
        self.categories = categories
        texts = [t for c in categories.names for t in categories.anchors[c]]
        vecs = np.asarray(embedder.encode(texts), dtype=np.float32)
        self._anchors = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        self._owner = np.repeat(np.arange(len(categories.names)),
                                [len(categories.anchors[c]) for c in categories.names])
        self._thresholds = np.array([categories.thresholds[c] for c in categories.names])
        if categories.model_version and categories.model_version != embedder.model_version:
            log.warning("sensitive categories were calibrated for %s, not %s: run bench/calibrate_sensitive.py",
                        categories.model_version, embedder.model_version)

    def scores(self, vecs: np.ndarray) -> np.ndarray:
        """``(n, categories)``: each persona's highest cosine to each category's anchors."""
        x = np.asarray(vecs, dtype=np.float32)
        if x.shape[0] == 0:
            return np.zeros((0, len(self.categories.names)))
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sims = x @ self._anchors.T
        out = np.full((x.shape[0], len(self.categories.names)), -1.0)
        for k in range(len(self.categories.names)):
            out[:, k] = sims[:, self._owner == k].max(axis=1)
        return out

    def classify(self, vecs: np.ndarray) -> list[list[str]]:
        """The categories of each persona (file order; empty when none)."""
        hits = self.scores(vecs) >= self._thresholds[None, :]
        names = self.categories.names
        return [[names[k] for k in np.flatnonzero(row)] for row in hits]


def apply_policy(categories: list[list[str]], policy: dict[str, str]) -> tuple[list[list[str]], list[bool]]:
    """(the categories to publish in ``sensitive_categories``, whether to suppress) per persona. ``keep``
    categories are dropped from the flags; a ``suppress`` category suppresses the persona."""
    flags, suppress = [], []
    for cats in categories:
        suppress.append(any(policy.get(c, "flag") == "suppress" for c in cats))
        flags.append([c for c in cats if policy.get(c, "flag") == "flag"])
    return flags, suppress


def classify_personas(settings: Settings, persona_ids: list[str], vecs: np.ndarray,
                      embedder=None) -> pl.DataFrame:
    """``persona_id, sensitive_categories (list), suppressed (bool), categories_found (list)`` of the personas."""
    from persona_tasks.embed import embedder_from_settings

    clf = SensitiveClassifier(load_categories(settings), embedder or embedder_from_settings(settings))
    found = clf.classify(vecs)
    flags, suppress = apply_policy(found, settings.sensitive.policy)
    return pl.DataFrame({"persona_id": persona_ids, "sensitive_categories": flags, "suppressed": suppress,
                         "categories_found": found},
                        schema={"persona_id": pl.String, "sensitive_categories": pl.List(pl.String),
                                "suppressed": pl.Boolean, "categories_found": pl.List(pl.String)})


__all__ = ["POLICIES", "SensitiveCategories", "SensitiveCategoriesError", "SensitiveClassifier", "apply_policy",
           "classify_personas", "load_categories"]
