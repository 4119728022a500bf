"""Extractive labeller: class-based TF-IDF key terms of a cluster against the user's other clusters.

c-TF-IDF (as in BERTopic), with each of a user's clusters as one class: a term scores high when many of
the cluster's memories contain it and few of the user's other clusters do. Key terms (unigrams, widened to
a frequent bigram such as "espresso machine") are templated into a label and a description. Fast on CPU,
deterministic, grounded by construction: the baseline and the LLM labeller's fallback.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import replace
from functools import lru_cache

from persona_tasks.config import LabellingSettings, Settings
from persona_tasks.labelling.text import PLACEHOLDER, STOP_WORDS, scrub_pii, words
from persona_tasks.labelling.types import ClusterInput, PersonaLabel
from persona_tasks.labelling.validate import check_persona

MODEL_VERSION = "extractive-ctfidf-v1"

_ACTION = re.compile(r"(?:^|;\s*)([a-z]+)(?:\s[\d.]+)?:")
_ACTION_NOUNS = {
    "searched": "searches", "clicked": "clicks", "viewed": "views", "liked": "likes", "carted": "cart adds",
    "added": "cart adds", "purchased": "purchases", "bought": "purchases", "rated": "ratings",
    "tagged": "tags", "offered": "offers", "checkout": "checkouts", "checked": "checkouts",
}

_SINGULAR = {"searches": "search", "cart adds": "cart add", "purchases": "purchase"}
_SINGULAR |= {n: n[:-1] for n in _ACTION_NOUNS.values() if n not in _SINGULAR}


def _readable(text: str) -> str:
    """Scrubbed, lower-cased text with every placeholder ([email], [rare], ...) turned into a phrase break."""
    return PLACEHOLDER.sub("|", scrub_pii(text)).lower()


@lru_cache(maxsize=1 << 16)
def _memory_terms(text: str) -> tuple[frozenset[str], frozenset[str]]:
    """Cached (c-TF-IDF, key terms and evidence ranking each ask for a memory's terms). Unigram and adjacent 2-3-gram content terms of one memory (phrases never cross a ';', ':', bracket,
    stop word or number: "nike air max 90 size 10" gives "nike air max", not "max size")."""
    uni: set[str] = set()
    grams: set[str] = set()
    for part in re.split(r"[;:|\[\]()]", _readable(text)):
        run: list[str] = []
        for tok in re.split(r"(?<![a-z0-9])([0-9][\w.]*)|\s+", part):
            ws = words(tok) if tok else []
            if not ws or tok[:1].isdigit():
                run = [] if tok and tok.strip() else run
                continue
            for w in ws:
                if len(w) < 2 or w in STOP_WORDS:
                    run = []
                    continue
                uni.add(w)
                run.append(w)
                for n in (2, 3):
                    if len(run) >= n:
                        grams.add(" ".join(run[-n:]))
    return frozenset(uni), frozenset(grams)


def ctfidf_scores(classes: list[list[str]]) -> list[dict[str, float]]:
    """c-TF-IDF unigram scores per class; a class is a list of memory texts, a term counts once per memory."""
    counts = [Counter(t for text in texts for t in _memory_terms(text)[0]) for texts in classes]
    totals = [sum(c.values()) for c in counts]
    avg = (sum(totals) / len(totals)) if totals else 0.0
    freq: Counter[str] = Counter()
    for c in counts:
        freq.update(c)
    scores = []
    for c, total in zip(counts, totals):
        scores.append({t: (n / total) * math.log(1.0 + avg / freq[t]) for t, n in c.items()} if total else {})
    return scores


def key_terms(texts: list[str], scores: dict[str, float], k: int) -> list[str]:
    """Top ``k`` terms of a cluster: ranked unigrams, each widened to the longest (then most frequent) 2-3-gram
    holding it that occurs in at least half (and 2+, in clusters of 3+ memories) of the memories holding the
    unigram. A phrase replaces chosen unigrams it contains; other overlaps are dropped. ``texts`` most
    representative first: ties go to the earlier term."""
    uni_count: Counter[str] = Counter()
    gram_count: Counter[str] = Counter()
    first: dict[str, int] = {}
    for text in texts:
        u, g = _memory_terms(text)
        uni_count.update(u)
        gram_count.update(g)
        for w in words(_readable(text)):
            first.setdefault(w, len(first))
    min_support = 2 if len(texts) >= 3 else 1
    by_word: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for g, n in gram_count.items():
        for w in set(g.split()):
            by_word[w].append((len(g.split()), n, g))
    ranked = sorted(scores, key=lambda t: (-round(scores[t], 12), -uni_count[t], first.get(t, len(first)), t))
    chosen: list[str] = []
    for w in ranked:
        if len(chosen) >= k:
            break
        covered = {x for c in chosen for x in c.split()}
        if w in covered:
            continue
        need = max(min_support, math.ceil(0.5 * uni_count[w]))
        cands = sorted((c for c in by_word.get(w, []) if c[1] >= need), key=lambda c: (-c[0], -c[1], c[2]))
        term = w
        for _, _, g in cands:
            gw = set(g.split())
            inside = [c for c in chosen if set(c.split()) <= gw]
            if not (gw & covered) - {x for c in inside for x in c.split()}:
                term = g
                break
        inside = [c for c in chosen if term != w and set(c.split()) <= set(term.split())]
        if inside:
            at = chosen.index(inside[0])
            chosen = [c for c in chosen if c not in inside]
            chosen.insert(at, term)
        else:
            chosen.append(term)
    return chosen


def _join(terms: list[str]) -> str:
    if len(terms) <= 1:
        return "".join(terms)
    return ", ".join(terms[:-1]) + " and " + terms[-1]


def _activity(texts: list[str]) -> str:
    acts: Counter[str] = Counter()
    for t in texts:
        for verb in _ACTION.findall((t or "").lower()):
            if verb in _ACTION_NOUNS:
                acts[_ACTION_NOUNS[verb]] += 1
    if not acts:
        return ""
    top = [f"{n} {noun if n != 1 else _SINGULAR.get(noun, noun)}" for noun, n in acts.most_common(3)]
    return "Activity: " + _join(top) + "."


class ExtractiveLabeller:
    """``ExtractiveLabeller(settings).label(clusters)``: one templated persona per cluster, no model."""

    name = "extractive"

    def __init__(self, settings: Settings | LabellingSettings | None = None):
        if isinstance(settings, Settings):
            settings = settings.labelling
        self.cfg = settings or LabellingSettings()
        self.model_version = MODEL_VERSION

    def label(self, clusters: list[ClusterInput]) -> list[PersonaLabel]:
        by_user: dict[str, list[int]] = defaultdict(list)
        for i, c in enumerate(clusters):
            by_user[c.user_id].append(i)
        out: list[PersonaLabel | None] = [None] * len(clusters)
        for idxs in by_user.values():
            # classes: this user's clusters in the call, then any extra contrast the inputs carry
            # (deduplicated: an "other cluster" may also be one of the inputs)
            classes = [clusters[i].memory_texts for i in idxs]
            seen = {tuple(t) for t in classes}
            for i in idxs:
                for other in clusters[i].other_clusters_texts or []:
                    if other and tuple(other) not in seen:
                        seen.add(tuple(other))
                        classes.append(list(other))
            scores = ctfidf_scores(classes)
            for j, i in enumerate(idxs):
                out[i] = self._one(clusters[i], scores[j])
            for i, lab in zip(idxs, self._distinct([out[i] for i in idxs])):
                out[i] = lab
        return [p for p in out if p is not None]

    def _distinct(self, labels: list[PersonaLabel | None]) -> list[PersonaLabel | None]:
        """One user's labels made distinct (the persona gate blocks duplicates): a repeated label, e.g. two
        clusters with no distinctive terms ("Mixed activity"), gets " (2)", " (3)", ... in cluster order."""
        seen: dict[str, int] = {}
        for k, lab in enumerate(labels):
            if lab is None:
                continue
            key = lab.label.strip().lower()
            seen[key] = seen.get(key, 0) + 1
            if seen[key] == 1:
                continue
            words = lab.label.split()
            while len(words) > 1 and len(words) + 1 > self.cfg.label_max_words:
                words.pop()
            labels[k] = replace(lab, label=f"{' '.join(words)} ({seen[key]})")
        return labels

    def _one(self, c: ClusterInput, scores: dict[str, float]) -> PersonaLabel:
        cfg = self.cfg
        order = c.by_centrality()
        terms = key_terms([c.memory_texts[i] for i in order], scores, max(cfg.extractive_label_terms, cfg.extractive_description_terms))
        label_terms: list[str] = []
        for t in terms[: cfg.extractive_label_terms]:
            if len(" ".join(label_terms + [t]).split()) > cfg.label_max_words:
                break
            label_terms.append(t)
        n = len(c.memory_ids)
        noun = "memory" if n == 1 else "memories"
        if label_terms:
            label = _join(label_terms)
            label = label[0].upper() + label[1:]
            description = f"{n} {noun} mostly about {_join(terms[: cfg.extractive_description_terms])}."
        else:
            label = "Mixed activity"
            description = f"{n} {noun} with no distinctive terms."
        activity = _activity(c.memory_texts)
        if activity:
            description = f"{description} {activity}"
        # evidence: memories holding most of the label terms, most central first
        term_sets = [set(t.split()) for t in label_terms]

        def hits(i: int) -> int:
            u, g = _memory_terms(c.memory_texts[i])
            return sum(1 for ts, t in zip(term_sets, label_terms) if t in g or ts <= u)

        pos = {i: k for k, i in enumerate(order)}
        n_hits = {i: hits(i) for i in order}
        ranked = sorted(order, key=lambda i: (-n_hits[i], pos[i]))
        k = max(1, min(3, cfg.max_evidence))
        evidence = [c.memory_ids[i] for i in ranked[:k] if n_hits[i] > 0] or [c.memory_ids[order[0]]]
        checked = check_persona(label, description, evidence, {m: m for m in c.memory_ids}, cfg)
        return PersonaLabel(
            user_id=c.user_id, cluster_id=c.cluster_id, label=checked.label, description=checked.description,
            evidence_ids=checked.evidence_ids, labeller=self.name, model_version=self.model_version,
            fallback=False, attempts=0, repairs=[],
        )
