"""Constrained decoding of personas with llguidance: valid, grounded answers by construction.

The answer's shape is a grammar (``persona_grammar``): ``Label:`` 1-``label_max_words`` words, ``Description:`` 1-3
sentences, ``Evidence:`` 1-``max_evidence`` ids among the memories shown. The label and the description may only
use the cluster's own words (the words of the memories shown to the model, after PII scrubbing and k-anonymous
masking: ``[rare]`` never becomes a word) and a small closed list of function and connective words
(``function_words.txt``): every content word of a persona is then found in its evidence, so the groundedness
checks of ``validate.check_persona`` hold by construction, and no word the model was not shown (a brand, a
place, an age) can appear.

The grammar is enforced token by token by llguidance (``GrammarConstraint``: one ``LLMatcher`` per generated row,
a token bitmask applied to the logits), so it works with batched ``model.generate`` and sampling alike.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from persona_tasks.config import LabellingSettings
from persona_tasks.labelling.text import (
    CLAUSE_WORDS,
    PLACEHOLDER,
    content_stems,
    content_words,
    function_words,
    words,
)
from persona_tasks.labelling.validate import asserts_demographics

# a word of the vocabulary: what labelling.text.words yields, bounded in length (a 40-letter "word" is noise)
_MAX_WORD_CHARS = 30


def cluster_vocabulary(shown_texts: list[str], max_words: int = 400) -> list[str]:
    """The cluster's own words: lower-cased words of the memories shown, placeholders removed, most frequent
    first (at most ``max_words``). Words that would assert an age or a gender (``man``, ``girls``, ``wife``: the
    validator's demographics rule) are left out even when a query holds them, so no persona can assert one."""
    counts: dict[str, int] = {}
    for t in shown_texts:
        for w in words(PLACEHOLDER.sub(" ", t or "")):
            if (1 < len(w) <= _MAX_WORD_CHARS or w in ("a", "i")) and not asserts_demographics(w):
                counts[w] = counts.get(w, 0) + 1
    return sorted(counts, key=lambda w: (-counts[w], w))[:max_words]


def _alternation(ws: list[str]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(set(ws), key=lambda w: (-len(w), w))) + ")"


def _capitalised(ws: list[str]) -> list[str]:
    """Each word or phrase with its first letter upper-cased: the form that opens a label or a sentence."""
    return [w[:1].upper() + w[1:] for w in ws]


ARTICLES = frozenset({"a", "an", "the"})


def _chunk(others: str | None, articles: str | None, content: str, run: int) -> str:
    """A regex of one chunk: at most ``run`` non-content words (``others``; an article only as the last of them),
    then a content word."""
    if run <= 0:
        return content
    parts = [p for p in (others, articles) if p]
    if not parts:
        return content
    last = "(?:" + "|".join(parts) + ")"
    lead = f"(?:{others} ){{0,{run - 1}}}" if others and run > 1 else ""
    return f"{lead}(?:{last} )?{content}"


# the most content words of one description sentence (each after at most function_run_max other words)
_SENTENCE_CHUNKS_MAX = 6


def persona_grammar(vocabulary: list[str], n_ids: int, cfg: LabellingSettings) -> str:
    """The Lark grammar (llguidance dialect) of one cluster's answer, after the ``Label:`` pre-fill.

    Words are of two kinds: the cluster's content words (``labelling.text.content_words``) and the rest (the closed
    function list, and the cluster's stop words such as "how" or "my"). Every claim, the label and each description
    sentence, is a run of *chunks*: at most ``cfg.function_run_max`` non-content words, then a content word; a claim
    holds ``cfg.claim_min_content_words`` chunks or more (as many as the cluster has, when fewer). So a claim always
    names what the cluster is about, in more than one word where it can ("Looks for espresso grinder reviews.",
    not "Looks at china."), and cannot drift into function words ("A many, many, more, results.")."""
    content = sorted({w for w in vocabulary if content_words(w)}) or sorted(set(vocabulary)) or ["activity"]
    # no clause word ("but", "while"): support.split_claims cuts a sentence there, and the clause after it would be
    # a claim of its own with no minimum of content words ("but also looks at cars")
    other = sorted((set(vocabulary) | set(function_words())) - set(content) - set(CLAUSE_WORDS))
    # an article stands right before a content word ("the jack", never "A in the jack", "a, the" or "the many"):
    # in a run of non-content words it can only come last
    articles = sorted(set(other) & ARTICLES)
    rest = sorted(set(other) - ARTICLES) or articles
    c_low, c_cap = _alternation(content), _alternation(_capitalised(content))
    r_low, r_cap = _alternation(rest), _alternation(_capitalised(rest))
    a_low = _alternation(articles) if articles else None
    n_low, n_cap = _alternation(other), _alternation(_capitalised(other))
    run = max(0, cfg.function_run_max)
    k_min = max(1, min(cfg.claim_min_content_words, len(content)))
    chunk = _chunk(r_low, a_low, c_low, run)
    if cfg.sentence_openers and run:
        # a closed opener ("Looks for", "Compares"), then the first chunk, which opens with an article right before
        # a content word, a content word, or one of the cluster's own stop words ("Looks for the jack", "Looks for
        # how to make ...", never "Looks for in the jack")
        own_stop = sorted(set(other) - set(function_words()))
        art = f"(?:{a_low} )?" if a_low else ""
        alts = [f"{art}{c_low}"]
        if own_stop:
            alts.append(f"{_alternation(own_stop)} "
                        + _chunk(r_low, a_low, c_low, run - 1))
        first = f"{_alternation(list(description_openers()))} (?:{'|'.join(alts)})"
    elif run:
        # capitalised first word: a content word, an article right before one, or another word opening a chunk
        cap_art = f"|{_alternation(_capitalised(articles))} {c_low}" if articles else ""
        tail = _chunk(r_low, a_low, c_low, run - 1)
        first = f"(?:{r_cap} {tail}{cap_art}|{c_cap})"
    else:
        first = c_cap
    # a description sentence: its first chunk, 2+ chunks separated by " " or ", ", a full stop
    k_max = max(k_min, _SENTENCE_CHUNKS_MAX)
    sentence = f"{first}(?:(?:, | ){chunk}){{{k_min - 1},{k_max - 1}}}\\."
    # the label opens with a content word (a label of function words only, "Looking for a", says nothing), then
    # chunks of at most one non-content word ("of", "and") and a content word, within label_max_words
    max_label = max(1, cfg.label_max_words)
    l_content = f"(?:{c_low}|{c_cap})"
    l_other = f"(?:{n_low}|{n_cap})"
    more = max(0, (max_label - 1) // 2) if run else max_label - 1
    l_min = min(k_min - 1, more)
    l_chunk = f"(?:{l_other} )?{l_content}" if run else l_content
    n = max(1, n_ids)
    ident = "m(?:" + "|".join(str(i) for i in range(n, 0, -1)) + ")"
    max_ev = max(1, min(cfg.max_evidence, n))
    max_sent = max(1, cfg.description_max_sentences)
    return "\n".join([
        'start: " " LABEL "\\nDescription: " DESC "\\nEvidence: " EVID "\\n"',
        f"LABEL: /{l_content}(?: {l_chunk}){{{l_min},{more}}}/",
        f"DESC: /{sentence}(?: {sentence}){{0,{max_sent - 1}}}/",
        f"EVID: /{ident}(?:, {ident}){{0,{max_ev - 1}}}/",
    ])


OPENERS_FILE = Path(__file__).with_name("description_openers.txt")
_MAX_NGRAM = 6
# a phrase does not open with a preposition, conjunction or article ("of america", "for sale")
_NO_PHRASE_START = frozenset("""a an the of for to in on at by with and or but from into about over between than as
is are was be""".split())


@lru_cache(maxsize=1)
def description_openers() -> tuple[str, ...]:
    """The closed list of sentence openers of the ``phrases`` arm (``description_openers.txt``)."""
    lines = (line.split("#", 1)[0].strip() for line in OPENERS_FILE.read_text().splitlines())
    return tuple(line for line in lines if line)


def memory_phrases(shown_texts: list[str], max_words: int = _MAX_NGRAM) -> list[str]:
    """The cluster's own phrases: every run of 1-``max_words`` consecutive words of a memory shown (split at
    ``;``, placeholders and punctuation other than word-inner ``-&'+``) that ends with a content word and does not
    open with a preposition, conjunction or article, lower-cased.
    "puppies for sale in florida", "bank of america", "when to plant tomatoes"."""
    out: dict[str, None] = {}
    for t in shown_texts:
        for part in re.split(r";|\[(?:email|phone|number|rare)\]|[,.:!?()|/\"]", t or ""):
            ws = [w for w in words(part) if len(w) <= _MAX_WORD_CHARS and not asserts_demographics(w)]
            for j in range(len(ws)):
                if not content_words(ws[j]):
                    continue
                for i in range(max(0, j - max_words + 1), j + 1):
                    if ws[i] not in _NO_PHRASE_START:
                        out[" ".join(ws[i:j + 1])] = None
    return list(out)


def phrase_grammar(shown_texts: list[str], n_ids: int, cfg: LabellingSettings) -> str:
    """The ``phrases`` arm's grammar (llguidance Lark) after the ``Label:`` pre-fill: the label is one or two of
    the cluster's phrases ("Tomato seedlings and raised garden bed kit"), each description sentence a closed opener
    and a list of the cluster's phrases ("Looks for tomato seedlings and raised garden bed kit."). Against the
    word-level ``constrained`` grammar this rules out runs of function words ("A many of the many, with more.")
    and keeps the memories' own word order, so each sentence reads like, and is checked against, its evidence."""
    phrases = memory_phrases(shown_texts) or ["activity"]
    max_label = max(1, cfg.label_max_words)
    # the label: a phrase of at most 3 words, then optionally "and" and one of at most 4 (3 + 1 + 4 = 8 words)
    first_n, second_n = min(3, max_label), min(4, max_label - 4)
    first = [p for p in phrases if len(p.split()) <= first_n] or phrases[:1]
    second = [p for p in phrases if len(p.split()) <= second_n] if second_n >= 1 else []
    np_ = _alternation(phrases)  # no determiners: a small model scatters them ("the target, a toysrus")
    label = f"(?:{_alternation(first)}|{_alternation(_capitalised(first))})"
    if second:
        label += f"(?: and {_alternation(second)})?"
    opener = _alternation(list(description_openers()))
    k = max(1, cfg.phrases_per_sentence)
    more = f"(?:(?:, {np_}){{0,{k - 2}}} and {np_})?" if k >= 2 else ""
    sentence = f"{opener} {np_}{more}\\."
    n = max(1, n_ids)
    ident = "m(?:" + "|".join(str(i) for i in range(n, 0, -1)) + ")"
    max_ev = max(1, min(cfg.max_evidence, n))
    max_sent = max(1, cfg.description_max_sentences)
    return "\n".join([
        'start: " " LABEL "\\nDescription: " DESC "\\nEvidence: " EVID "\\n"',
        f"LABEL: /{label}/",
        f"DESC: /{sentence}(?: {sentence}){{0,{max_sent - 1}}}/",
        f"EVID: /{ident}(?:, {ident}){{0,{max_ev - 1}}}/",
    ])


def answer_grammar(shown_texts: list[str], n_ids: int, cfg: LabellingSettings) -> str | None:
    """The grammar of the configured decoding arm (None for ``free``)."""
    if cfg.decoding == "free":
        return None
    if cfg.decoding == "phrases":
        return phrase_grammar(shown_texts, n_ids, cfg)
    return persona_grammar(cluster_vocabulary(shown_texts), n_ids, cfg)


def matched_evidence(label: str, description: str, shown_texts: list[str], max_evidence: int) -> list[str]:
    """Evidence of a grammar-written persona: the local ids (``m1``...) of the memories shown its words come from.
    Per claim (the label, each sentence) the memory sharing most of its content words (the most central on a tie),
    then the other memories sharing any, most shared first, at most ``max_evidence``. A small model's own
    citation is mostly counting (``m1, m2, m3, m4, m5``) whatever it wrote; quality scores truthfulness against
    the evidence, so the evidence is where the persona's words are."""
    from persona_tasks.labelling.validate import split_sentences

    mem = [content_stems(t) for t in shown_texts]
    out: list[int] = []
    for claim in [label] + split_sentences(description or ""):
        cs = content_stems(claim)
        best = max(range(len(mem)), key=lambda k: (len(cs & mem[k]), -k), default=None)
        if best is not None and cs & mem[best] and best not in out:
            out.append(best)
    every = content_stems(f"{label} {description}")
    rest = sorted((k for k in range(len(mem)) if k not in out and every & mem[k]),
                  key=lambda k: (-len(every & mem[k]), k))
    return [f"m{k + 1}" for k in (out + rest)[: max(1, max_evidence)]]


def ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of a Hugging Face (fast) tokenizer, built once per tokenizer."""
    cached = getattr(tokenizer, "_persona_ll_tokenizer", None)
    if cached is None:
        import llguidance.hf

        cached = llguidance.hf.from_tokenizer(tokenizer)
        try:
            tokenizer._persona_ll_tokenizer = cached
        except AttributeError:  # pragma: no cover - a tokenizer refusing attributes
            pass
    return cached


@lru_cache(maxsize=4)
def _executor(threads: int) -> Any:
    import llguidance

    return llguidance.LLExecutor(num_threads=threads)


def grammar_constraint(tokenizer: Any, grammars: list[str], prompt_len: int, threads: int = 1) -> Any:
    """A transformers LogitsProcessor that keeps row ``i`` of a batch inside ``grammars[i]``.

    ``threads`` > 1: the rows' masks are computed in parallel by llguidance's executor (native threads, no GIL);
    a large GPU batch is otherwise bound by this per-row CPU work. The masks are the same either way (tested)."""
    import llguidance
    import llguidance.torch as llt
    from transformers import LogitsProcessor

    lt = ll_tokenizer(tokenizer)
    executor = _executor(threads) if threads > 1 and len(grammars) > 1 else None

    class GrammarConstraint(LogitsProcessor):
        def __init__(self) -> None:
            self.matchers = [llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_lark(g)) for g in grammars]
            for m in self.matchers:
                if m.is_error():
                    raise ValueError(f"persona grammar rejected by llguidance: {m.get_error()}")
            self.consumed = 0  # generated positions already fed to the matchers (every row advances together)
            self.bitmask = llt.allocate_token_bitmask(len(grammars), lt.vocab_size)

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            new_tokens = input_ids[:, prompt_len + self.consumed:].tolist()  # one transfer for the whole batch
            self.consumed = input_ids.shape[1] - prompt_len
            for i, m in enumerate(self.matchers):
                new = new_tokens[i]
                if new and not m.is_stopped() and not m.is_error():
                    m.consume_tokens(new)
                if executor is None:
                    llt.fill_next_token_bitmask(m, self.bitmask, i)
            if executor is not None:
                llt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(self.matchers)], self.bitmask)
            width = min(scores.shape[-1], lt.vocab_size)
            llt.apply_token_bitmask_inplace(scores[:, :width], self.bitmask.to(scores.device))
            if scores.shape[-1] > width:  # the model's padded vocabulary beyond the tokenizer's: never allowed
                scores[:, width:] = float("-inf")
            return scores

    return GrammarConstraint()
