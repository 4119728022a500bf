"""Parsing, repair and validation of a persona (the model's raw output, or any label/description pair).

The model is asked for three labelled lines (``Label:``, ``Description:``, ``Evidence:``); a JSON object
``{"label": ..., "description": ..., "evidence": [...]}`` is accepted too. Deterministic *repairs* keep the
meaning (strip markup and surrounding prose, drop evidence ids outside the cluster, keep the first N
sentences, scrub PII); anything else is a *problem* and the caller regenerates or falls back.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from persona_tasks.config import LabellingSettings
from persona_tasks.labelling.text import (
    PLACEHOLDER,
    content_words,
    drop_repeated_words,
    grounded_words,
    scrub_pii,
    words,
)

_FIELD_ALIASES = {
    "label": "label", "persona": "label", "name": "label", "title": "label",
    "description": "description", "desc": "description", "summary": "description",
    "evidence": "evidence", "evidence ids": "evidence", "ids": "evidence", "memories": "evidence",
    "memory ids": "evidence", "sources": "evidence",
}
_FIELD_LINE = re.compile(
    r"^[\s>*#\-]*\**\s*(" + "|".join(sorted(map(re.escape, _FIELD_ALIASES), key=len, reverse=True))
    + r")\s*\**\s*[:=]\s*\**\s*(.*)$",
    re.IGNORECASE,
)
_LOCAL_ID = re.compile(r"\b[mM]\s?(\d{1,3})\b")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")
# what may precede a JSON answer without counting as extra prose (the "Label:" pre-fill, a code fence)
_JSON_LEAD = re.compile(r"^\s*(?:label\s*:)?\s*(?:```(?:json)?)?\s*$", re.IGNORECASE)
# a label is a phrase, not a copied log line: no brackets, pipes, semicolons, braces or URLs
_NOT_A_PHRASE = re.compile(r"[\[\]|;{}<>]|https?:|www\.")
# an asserted age or gender ("a 25-year-old", "in his late 20s", "she", "a man named ...")
_DEMOGRAPHIC = re.compile(
    r"\b\d{1,2}[\s\-]*(?:years?|yrs?)[\s\-]*old\b|\b(?:early|mid|late)[\s\-]*\d0s\b|\baged?\s+\d{1,2}\b"
    r"|\b(?:he|she|him|his|her|hers|himself|herself|man|woman|men|women|boy|girl|guy|lady|mother|father|"
    r"mom|dad|husband|wife|boyfriend|girlfriend)\b|\bnamed\s+[A-Za-z]",
    re.IGNORECASE,
)
def asserts_demographics(text: str) -> bool:
    """Whether ``text`` asserts an age or a gender (the ``demographics`` problem)."""
    return bool(_DEMOGRAPHIC.search(text or ""))


_MARKUP = re.compile(r"^[\s\"'`*_#>\-\[\](){}]+|[\s\"'`*_#\[\](){},;:]+$")


@dataclass
class ParsedOutput:
    label: str | None = None
    description: str | None = None
    evidence: list[str] = field(default_factory=list)  # raw id tokens as written (e.g. "m3")
    extra_text: bool = False  # prose outside the fields was dropped
    via_json: bool = False


@dataclass
class Checked:
    """Outcome of validation: ``ok`` with cleaned fields, or the list of problems."""

    label: str = ""
    description: str = ""
    evidence_ids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _from_json(text: str) -> ParsedOutput | None:
    start = text.find("{")
    while start != -1:
        depth = 0
        for end in range(start, len(text)):
            if text[end] == "{":
                depth += 1
            elif text[end] == "}":
                depth -= 1
                if depth == 0:
                    try:
                        obj = json.loads(text[start:end + 1])
                    except (json.JSONDecodeError, RecursionError):
                        break
                    if isinstance(obj, dict):
                        keys = {_FIELD_ALIASES.get(str(k).strip().lower()): v for k, v in obj.items()}
                        if keys.get("label") is not None or keys.get("description") is not None:
                            ev = keys.get("evidence") or []
                            if isinstance(ev, (str, int)):
                                ev = re.split(r"[,\s;]+", str(ev))
                            return ParsedOutput(
                                label=None if keys.get("label") is None else str(keys["label"]),
                                description=None if keys.get("description") is None else str(keys["description"]),
                                evidence=[str(e).strip() for e in ev if str(e).strip()] if isinstance(ev, list) else [],
                                extra_text=bool(_JSON_LEAD.sub("", text[:start]).strip() or text[end + 1:].strip()),
                                via_json=True,
                            )
                    break
        start = text.find("{", start + 1)
    return None


def parse_output(text: str) -> ParsedOutput:
    """Read label, description and evidence ids from a model's output; tolerant of markup and prose."""
    text = (text or "").replace("\r", "")
    if "{" in text:  # a JSON object (possibly after the "Label:" pre-fill) wins over labelled lines
        parsed = _from_json(text)
        if parsed is not None:
            return parsed
    fields: dict[str, list[str]] = {}
    current: str | None = None
    extra = False
    for line in text.split("\n"):
        m = _FIELD_LINE.match(line)
        if m:
            name = _FIELD_ALIASES[m.group(1).lower()]
            if name in fields:  # a second persona or a repeated field: stop at the first complete one
                extra = extra or bool(text.strip())
                if all(k in fields for k in ("label", "description")):
                    break
            current = name
            fields[name] = [m.group(2).strip()]
        elif current is not None and line.strip():
            if current == "description" and "evidence" not in fields:
                fields[current].append(line.strip())
            elif current == "evidence" and _LOCAL_ID.search(line):
                fields[current].append(line.strip())
            else:
                extra = True
                current = None
        elif line.strip():
            extra = True
    ev_text = " ".join(fields.get("evidence", []))
    evidence = [f"m{int(n)}" for n in _LOCAL_ID.findall(ev_text)]
    # ids written some other way (the real memory ids): keep the raw comma/space separated tokens
    if not evidence and ev_text.strip():
        evidence = [t for t in re.split(r"[\s,;\[\]\"']+", ev_text) if t]
    return ParsedOutput(
        label=" ".join(fields["label"]) if "label" in fields else None,
        description=" ".join(fields["description"]) if "description" in fields else None,
        evidence=evidence,
        extra_text=extra,
    )


def _clean(s: str) -> str:
    s = re.sub(r"\s+", " ", s.replace("**", "").replace("__", "")).strip()
    prev = None
    while prev != s:
        prev = s
        s = _MARKUP.sub("", s).strip()
    return s


def _real_words(text: str) -> list[str]:
    """Words, without the PII placeholders the scrubber writes."""
    return words(PLACEHOLDER.sub(" ", text))


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_SPLIT.split(text.strip()) if s.strip()]


def check_persona(
    label: str | None,
    description: str | None,
    evidence: list[str],
    id_map: dict[str, str],
    settings: LabellingSettings,
    *,
    grounding_texts: list[str] | None = None,
    forbidden_phrases: tuple[str, ...] = (),
    forbidden_words: tuple[str, ...] = (),
) -> Checked:
    """Clean, repair and validate one persona.

    ``id_map`` maps the ids the writer may cite (short local ids such as ``m3``, and the real memory ids)
    to real memory ids; others are dropped (a repair) and no id left is a problem. With
    ``grounding_texts`` (the memories shown) and ``settings.require_grounding``, a persona with no content
    word found in them is a problem for the label, and so is a description with fewer than
    ``min_description_grounding`` of its content words found, and a description with no content word at all
    (``description_no_content``); and so, with
    ``settings.reject_demographics``, is an asserted age or gender. ``forbidden_phrases`` (the prompt's
    example label and instruction wording) and ``forbidden_words`` (the example's topic words, unless the
    memories have them) are problems too: the prompt was copied.
    """
    out = Checked()
    # label (cleaned before scrubbing: the scrubber's [placeholders] must survive the cleaning)
    raw_label = label or ""
    lab = scrub_pii(_clean(raw_label))
    if lab.endswith(".") and not lab.endswith(".."):
        lab = lab.rstrip(".").strip()
    if raw_label and lab != raw_label.strip():
        out.repairs.append("cleaned_label")
    # a model's stutter ("Craigslist and Craigslist", "mets, mets, mets"): each content word once per claim (a repair)
    repeats = grounding_texts is not None and settings.drop_repeated_words
    if repeats and (once := drop_repeated_words(lab)) != lab:
        lab = once
        out.repairs.append("dropped_repeated_word")
    n_words = len(lab.split())
    if not lab:
        out.problems.append("no_label")
    elif not _real_words(lab):
        out.problems.append("label_no_words")
    elif n_words > settings.label_max_words:
        out.problems.append("label_too_long")
    elif "\n" in raw_label.strip():
        out.problems.append("label_multiline")
    elif _NOT_A_PHRASE.search(lab):
        out.problems.append("label_not_a_phrase")
    out.label = lab
    # description
    raw_desc = description or ""
    desc = re.sub(r"\s+", " ", scrub_pii(raw_desc).replace("**", "")).strip().strip("\"'` ")
    sentences = split_sentences(desc)
    if repeats and (once := [drop_repeated_words(t) for t in sentences]) != sentences:
        sentences = once
        out.repairs.append("dropped_repeated_word")
    if len(sentences) > settings.description_max_sentences:
        sentences = sentences[: settings.description_max_sentences]
        out.repairs.append("trimmed_sentences")
    # a sentence with no content word ("Reads about the in which they are.") says nothing: dropped when another
    # sentence remains (a repair; before, it passed because the description as a whole had content words). Only for
    # model output (checked against ``grounding_texts``): the extractive template's count sentence stays
    if len(sentences) > 1 and grounding_texts is not None:
        kept = [t for t in sentences if content_words(PLACEHOLDER.sub(" ", t))]
        if kept and len(kept) < len(sentences):
            sentences = kept
            out.repairs.append("dropped_empty_sentence")
    while len(sentences) > 1 and len(" ".join(sentences)) > settings.description_max_chars:
        sentences = sentences[:-1]
        out.repairs.append("trimmed_sentences")
    desc = " ".join(sentences)
    if desc and desc[-1] not in ".!?":
        desc += "."
        out.repairs.append("added_period")
    if not desc or not _real_words(desc):
        out.problems.append("no_description")
    elif len(desc) > settings.description_max_chars:
        out.problems.append("description_too_long")
    elif len(_real_words(desc)) < settings.description_min_words:
        out.problems.append("description_too_short")
    elif lab and _real_words(desc) == _real_words(lab):
        out.problems.append("description_repeats_label")
    out.description = desc
    if scrub_pii(raw_label) != raw_label or scrub_pii(raw_desc) != raw_desc:
        out.repairs.append("scrubbed_pii")
    # evidence
    ids: list[str] = []
    unknown = 0
    for e in evidence:
        real = id_map.get(e) or id_map.get(e.lower())
        if real is None:
            unknown += 1
        elif real not in ids:
            ids.append(real)
    if unknown:
        out.repairs.append("dropped_unknown_ids")
    if len(ids) > settings.max_evidence:
        ids = ids[: settings.max_evidence]
        out.repairs.append("capped_evidence")
    if not ids:
        out.problems.append("evidence_outside_cluster" if unknown else "no_evidence")
    out.evidence_ids = ids
    # copied prompt, invented demographics, grounding
    both = f"{lab}\n{desc}".lower()
    if any(p.lower() in both for p in forbidden_phrases):
        out.problems.append("copied_prompt")
    if forbidden_words:
        memory_vocab = {w for t in grounding_texts or [] for w in words(t)}
        copied = {w for w in _real_words(f"{lab} {desc}") if w in forbidden_words and w not in memory_vocab}
        if copied and "copied_prompt" not in out.problems:
            out.problems.append("copied_prompt")
    if settings.reject_demographics and _DEMOGRAPHIC.search(both):
        out.problems.append("demographics")
    if grounding_texts is not None and settings.require_grounding:
        if lab and not out.problems.count("label_no_words") and not grounded_words(lab, grounding_texts)[0]:
            out.problems.append("ungrounded_label")
        found, missing = grounded_words(desc, grounding_texts) if desc else ([], [])
        share = len(found) / (len(found) + len(missing)) if found or missing else 1.0
        if desc and _real_words(desc) and not found and not missing:
            # only function, stop and generic words ("A many of the many, with more."): says nothing a reader can
            # use (before, it passed: no content word, so nothing ungrounded)
            out.problems.append("description_no_content")
        elif not found and missing or share < settings.min_description_grounding:
            out.problems.append("ungrounded_description")
    return out
