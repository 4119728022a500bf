"""Claims and their support: what a persona asserts, and which of its assertions the evidence bears out.

One definition shared by the labeller (which checks a model's claims before it accepts a persona) and the quality
scorer (``persona_tasks.quality.truthfulness_score``, the share of supported claims): a persona's *claims* are its
label and each sentence / clause of its description that carries a content word (``split_claims``); a claim is
*supported* when its best cosine to an evidence memory's embedding reaches ``[quality] claim_support_threshold``
(``best_cosine``). ``ClaimSupport`` applies that test to a model's persona at labelling time (``[labelling]
check_claim_support``, docs/labelling.md): a description sentence with an unsupported claim is dropped (a repair)
and an unsupported label is a problem, so the labeller samples again. The memories it compares with are the ones
the model was shown (k-anonymously masked), never the raw log text.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from persona_tasks.labelling.text import CLAUSE_WORDS, content_words

SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
# clauses keep their conjunction ("but Zorblax ..."), so a capitalised word after it is not a sentence start
_CLAUSE = re.compile(r"\s*;\s*|,?\s+(?=(?:" + "|".join(CLAUSE_WORDS) + r")\s)", re.IGNORECASE)

# words about the labelling itself, not the user ("3 memories with no distinctive terms")
META_WORDS = frozenset({"distinctive", "term", "terms", "keyword", "keywords", "label", "labels", "description"})


def _claims_of(part: str) -> list[str]:
    out = []
    for clause in _CLAUSE.split(part):
        c = (clause or "").strip().strip(".!?;:,").strip()
        if c and set(content_words(c)) - META_WORDS:
            out.append(c)
    return out


def split_claims(label: str, description: str) -> list[str]:
    """The claims of a persona: its label, and each sentence / clause (``;``, ``but``, ``while`` ...) of its
    description, keeping those with at least one content word (``labelling.text.content_words``, less
    ``META_WORDS``: "Activity: 5 searches and 2 clicks" or "3 memories with no distinctive terms" claim nothing
    about the user). Case-insensitive duplicates dropped."""
    out: list[str] = []
    seen: set[str] = set()
    for part in [label or ""] + SENTENCE_BREAK.split(description or ""):
        for c in _claims_of(part):
            if c.lower() not in seen:
                seen.add(c.lower())
                out.append(c)
    return out


def normalise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def best_cosine(claim_vecs: np.ndarray, evidence_vecs: np.ndarray) -> np.ndarray:
    """Per claim, its cosine to the most similar evidence vector (-1 when there is no evidence)."""
    cv = np.atleast_2d(np.asarray(claim_vecs, dtype=np.float64))
    xv = np.asarray(evidence_vecs, dtype=np.float64)
    if not cv.size:
        return np.zeros(0)
    if not xv.size:
        return np.full(cv.shape[0], -1.0)
    return (normalise_rows(cv) @ normalise_rows(np.atleast_2d(xv)).T).max(axis=1)


class ClaimSupport:
    """The support test of ``quality.truthfulness_score``, applied to one persona at labelling time.

    ``embedder``: anything with ``encode(list[str]) -> np.ndarray`` (``persona_tasks.embed``), the embedding model
    the quality scorer uses. Texts are cached, so a cluster's memories are encoded once however many candidates
    are checked against them."""

    def __init__(self, embedder: Any, threshold: float, cache_size: int = 20_000):
        self.embedder = embedder
        self.threshold = float(threshold)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self.encoded = 0

    def _vectors(self, texts: Sequence[str]) -> np.ndarray:
        """The vectors of ``texts``, new ones encoded in one call. The cache keeps the ``cache_size`` most recently
        used texts (least recently used evicted), and never evicts a text of the call it is answering."""
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if new:
            for t, v in zip(new, np.asarray(self.embedder.encode(new), dtype=np.float64)):
                self._cache[t] = v
            self.encoded += len(new)
        for t in texts:
            self._cache.move_to_end(t)
        out = np.array([self._cache[t] for t in texts]) if texts else np.zeros((0, 1))
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def prefetch(self, texts: Sequence[str]) -> None:
        """Encode ``texts`` now, in one call (``texts`` of many personas), so later tests find them cached."""
        self._vectors(list(dict.fromkeys(t for t in texts if t and t.strip())))

    @staticmethod
    def texts(label: str, sentences: Sequence[str], evidence_texts: Sequence[str]) -> list[str]:
        """What ``keep_supported(label, sentences, evidence_texts)`` encodes: the claims, then the evidence."""
        return _claims_of(label or "") + [c for s in sentences for c in _claims_of(s)] + list(evidence_texts)

    def supported(self, claims: Sequence[str], evidence_texts: Sequence[str]) -> list[bool]:
        """Per claim: is its best cosine to one of ``evidence_texts`` at least the threshold?"""
        claims = list(claims)
        if not claims:
            return []
        ev = [t for t in evidence_texts if t and t.strip()]
        vecs = self._vectors(claims + ev)
        return (best_cosine(vecs[: len(claims)], vecs[len(claims):]) >= self.threshold).tolist()

    def keep_supported(self, label: str, sentences: Sequence[str],
                       evidence_texts: Sequence[str]) -> tuple[bool, list[str]]:
        """``(label supported, the description sentences whose every claim is supported)``. A label or sentence
        without a claim (no content word) asserts nothing and passes."""
        label_claims = _claims_of(label or "")
        per_sentence = [_claims_of(s) for s in sentences]
        flat = label_claims + [c for cs in per_sentence for c in cs]
        ok = iter(self.supported(flat, evidence_texts))
        label_ok = all([next(ok) for _ in label_claims])
        kept = [s for s, cs in zip(sentences, per_sentence) if all([next(ok) for _ in cs])]
        return label_ok, kept
