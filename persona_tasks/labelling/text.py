"""Text helpers shared by the labellers: PII scrubbing, word tokenisation, stop words, grounding.

``memory_text`` is PII-masked upstream (staging); the scrubber here is a second line of defence applied
to text that reaches a model and, above all, to every label and description before it is published.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
# phone numbers: optional +country, digits with separators, at least 7 digits in all
_PHONE = re.compile(r"(?<![\w])(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{2,4}\)[\s.\-]?)?\d{2,4}(?:[\s.\-]\d{2,4}){1,4}(?![\w])")
_LONG_DIGITS = re.compile(r"\d{6,}")
# what the scrubber (and the k-anonymous term mask, labelling.privacy) writes in place of a hidden string
PLACEHOLDER = re.compile(r"\[(?:email|phone|number|rare)\]")
_URL_QUERY = re.compile(r"(https?://[^\s?#;]+|\b[\w\-]+(?:\.[\w\-]+)+/[^\s?#;]*)[?#][^\s;]*")


def _phone_sub(m: re.Match[str]) -> str:
    return "[phone]" if sum(ch.isdigit() for ch in m.group(0)) >= 7 else m.group(0)


def scrub_pii(text: str) -> str:
    """Mask e-mail addresses, phone numbers, digit runs of 6+ and URL query strings."""
    if not text:
        return text
    text = _EMAIL.sub("[email]", text)
    text = _URL_QUERY.sub(r"\1", text)
    text = _PHONE.sub(_phone_sub, text)
    return _LONG_DIGITS.sub("[number]", text)


# words of the memory_text format ("searched: ...; clicked: ...; rated 4.5: ...") and of the web
FORMAT_WORDS = frozenset(
    """searched search searches clicked click clicks viewed view views liked like likes carted cart
    added offer offered checkout checked purchased purchase bought rated rating tagged tag www com org net
    http https html htm php asp aspx index email phone number co uk io de fr ca au edu gov""".split()
)
STOP_WORDS = frozenset(ENGLISH_STOP_WORDS) | FORMAT_WORDS

# words that say what kind of persona it is rather than what it is about: they ground nothing
GENERIC_PERSONA_WORDS = frozenset(
    """user users person people someone individual persona personas enthusiast enthusiasts lover lovers fan fans
    interested interest interests shopper shoppers buyer buyers seeker seekers researcher planner hobbyist
    explorer curious activity activities memories memory cluster topic topics various mixed general
    often frequently mostly mainly likes enjoys looking looks searching browsing browses regularly""".split()
)

# words that open a new claim inside a sentence ("Looks for tents, but also reads about kayaks": two claims, each
# checked against the evidence on its own; labelling.support.split_claims): the grammar arms may not write them mid-sentence
CLAUSE_WORDS = ("but", "while", "whereas", "although")

FUNCTION_WORDS_FILE = Path(__file__).with_name("function_words.txt")


@lru_cache(maxsize=1)
def function_words() -> frozenset[str]:
    """The closed list of function and connective words a persona may use besides its evidence's own words
    (``function_words.txt``; constrained decoding draws from it): they ground nothing and are not content."""
    out: list[str] = []
    for line in FUNCTION_WORDS_FILE.read_text().splitlines():
        out += line.split("#", 1)[0].split()
    return frozenset(w.lower() for w in out)


# words start with a letter at a word start ("256gb" is no word, "gb" inside it neither)
_WORD = re.compile(r"(?<![A-Za-z0-9])(?:[A-Za-z][A-Za-z0-9'&+\-]*[A-Za-z0-9]|[A-Za-z])")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters first; digits-only tokens are dropped)."""
    return [w.lower().strip("'") for w in _WORD.findall(text or "")]


def content_words(text: str) -> list[str]:
    fw = function_words()
    return [w for w in words(text) if len(w) >= 3 and w not in STOP_WORDS and w not in GENERIC_PERSONA_WORDS
            and w not in fw]


def has_public_content(texts: Iterable[str]) -> bool:
    """Whether any text holds a content word outside the placeholders ([rare], [email], ...): what a persona of
    these memories can be grounded in."""
    return any(content_words(PLACEHOLDER.sub(" ", t or "")) for t in texts)


def _stem(w: str) -> str:
    """A word's grounding key: its first 5 letters after a plural ``s`` is dropped ("tents" = "tent", "cars" =
    "car"; before, a plural of a word under 5 letters was ungrounded against its singular). "ss" stays."""
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    return w[:5]


def content_stems(text: str) -> set[str]:
    """The grounding keys (``_stem``) of the content words of ``text``."""
    return {_stem(w) for w in content_words(PLACEHOLDER.sub(" ", text or ""))}


def grounded_words(text: str, memory_texts: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split the content words of ``text`` into those found in the memories (``_stem``: 5-letter prefix match,
    plural ``s`` ignored) and not."""
    vocab = {_stem(w) for t in memory_texts for w in words(t)}
    vocab |= {_stem(p) for t in memory_texts for w in words(t) for p in re.split(r"[\-.&+]", w) if p}
    found, missing = [], []
    for w in content_words(text):
        parts = [w] + [p for p in re.split(r"[\-.&+']", w) if len(p) >= 3 and p not in STOP_WORDS]
        (found if any(_stem(p) in vocab for p in parts) else missing).append(w)
    return found, missing


def grounding_score(text: str, memory_texts: Iterable[str]) -> float:
    """Share of the content words of ``text`` that occur in the memories (1.0 when it has none)."""
    found, missing = grounded_words(text, list(memory_texts))
    n = len(found) + len(missing)
    return len(found) / n if n else 1.0


_TOKEN_PUNCT = re.compile(r"^(.*?)([,;:.!?]*)$")


def drop_repeated_words(sentence: str) -> str:
    """One sentence (or a label) with each content word said once. Why: under the grammar arms a small model pads
    a claim by repeating a cluster word ("Looks for mets, mets, mets.", "Craigslist and Craigslist"); a reader sees
    a stutter, and the repeat adds nothing.

    A word equal to the word right before it is dropped ("mets mets", "many many"). A later occurrence of a content
    word (``content_words``, case-insensitive) is dropped alone when a content word follows it (a modifier: "adult
    divorce and adult bible" -> "... and bible"); when it ends a phrase, the function words that only led up to it
    go too ("more rates on miller," and "and Craigslist" leave nothing behind; a lead-in is any word that names
    nothing: a function or stop word), unless a content word stands right before it: then it is the head of a
    compound ("Red Firecracker and Green Firecracker") and stays. A dropped
    word's trailing punctuation moves to the word kept before it. Text without a repeat is unchanged."""
    toks = [_TOKEN_PUNCT.match(t).groups() for t in sentence.split()]
    kept: list[list[str]] = []  # [core, punctuation]
    seen: set[str] = set()

    def key(core: str) -> str:
        return core.lower().strip("'")

    content = [content_words(core) == [key(core)] for core, _ in toks]

    def leads_in(core: str) -> bool:  # a word that names nothing: a function or stop word ("about", "many")
        return bool(words(core)) and not content_words(core)

    for i, (core, punct) in enumerate(toks):
        prev = kept[-1] if kept else None
        if prev is not None and not prev[1] and key(prev[0]) == key(core) and words(core):
            if punct:
                prev[1] = punct
            continue
        if not (content[i] and key(core) in seen):
            kept.append([core, punct])
            if content[i]:
                seen.add(key(core))
            continue
        if not punct and i + 1 < len(toks) and content[i + 1]:
            continue  # a modifier of the next word: dropped alone
        if prev is not None and not prev[1] and not leads_in(prev[0]):
            kept.append([core, punct])  # the head of a compound ("Green Firecracker"): kept
            continue
        while len(kept) > 1 and not kept[-1][1] and leads_in(kept[-1][0]):
            kept.pop()  # the function words that led up to it ("about miller", "and Craigslist")
        if punct:
            kept[-1][1] = punct
    return " ".join(core + punct for core, punct in kept)
