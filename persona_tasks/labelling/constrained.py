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
from typing import Any

from persona_tasks.config import LabellingSettings
from persona_tasks.labelling.text import PLACEHOLDER, content_words, function_words, words

# a word of the vocabulary: what labelling.text.words yields, bounded in length (a 40-letter "word" is noise)
_MAX_WORD_CHARS = 30


def cluster_vocabulary(shown_texts: list[str], max_words: int = 400) -> list[str]:
    """The cluster's own words: lower-cased words of the memories shown, placeholders removed, most frequent
    first (at most ``max_words``). Words that would assert an age or a gender (``man``, ``girls``, ``wife``: the
    validator's demographics rule) are left out even when a query holds them, so no persona can assert one."""
    from persona_tasks.labelling.validate import asserts_demographics

    counts: dict[str, int] = {}
    for t in shown_texts:
        for w in words(PLACEHOLDER.sub(" ", t or "")):
            if (1 < len(w) <= _MAX_WORD_CHARS or w in ("a", "i")) and not asserts_demographics(w):
                counts[w] = counts.get(w, 0) + 1
    return sorted(counts, key=lambda w: (-counts[w], w))[:max_words]


def _alternation(ws: list[str]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(set(ws), key=lambda w: (-len(w), w))) + ")"


def persona_grammar(vocabulary: list[str], n_ids: int, cfg: LabellingSettings) -> str:
    """The Lark grammar (llguidance dialect) of one cluster's answer, after the ``Label:`` pre-fill."""
    vocab = sorted(set(vocabulary) | set(function_words()))
    lower = _alternation(vocab)
    capital = _alternation([w[:1].upper() + w[1:] for w in vocab])
    word = f"(?:{lower}|{capital})"
    # the label starts with one of the cluster's content words, so it always names what the cluster is about
    # (a label of function words only, "Looking for a", fails the validator's ungrounded_label)
    content = [w for w in vocabulary if content_words(w)] or list(vocabulary) or ["activity"]
    head = f"(?:{_alternation(content)}|{_alternation([w[:1].upper() + w[1:] for w in content])})"
    max_label = max(1, cfg.label_max_words)
    sentence = f"{capital}(?:(?:, | ){lower}){{2,11}}\\."
    n = max(1, n_ids)
    ident = "m(?:" + "|".join(str(i) for i in range(n, 0, -1)) + ")"
    max_ev = max(1, min(cfg.max_evidence, n))
    max_sent = max(1, cfg.description_max_sentences)
    return "\n".join([
        'start: " " LABEL "\\nDescription: " DESC "\\nEvidence: " EVID "\\n"',
        f"LABEL: /{head}(?: {word}){{0,{max_label - 1}}}/",
        f"DESC: /{sentence}(?: {sentence}){{0,{max_sent - 1}}}/",
        f"EVID: /{ident}(?:, {ident}){{0,{max_ev - 1}}}/",
    ])


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


def grammar_constraint(tokenizer: Any, grammars: list[str], prompt_len: int) -> Any:
    """A transformers LogitsProcessor that keeps row ``i`` of a batch inside ``grammars[i]``."""
    import llguidance
    import llguidance.torch as llt
    from transformers import LogitsProcessor

    lt = ll_tokenizer(tokenizer)

    class GrammarConstraint(LogitsProcessor):
        def __init__(self) -> None:
            self.matchers = [llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_lark(g)) for g in grammars]
            for m in self.matchers:
                if m.is_error():
                    raise ValueError(f"persona grammar rejected by llguidance: {m.get_error()}")
            self.consumed = [0] * len(grammars)
            self.bitmask = llt.allocate_token_bitmask(len(grammars), lt.vocab_size)

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            gen = input_ids[:, prompt_len:]
            for i, m in enumerate(self.matchers):
                new = gen[i, self.consumed[i]:].tolist()
                self.consumed[i] = gen.shape[1]
                if new and not m.is_stopped() and not m.is_error():
                    m.consume_tokens(new)
                llt.fill_next_token_bitmask(m, self.bitmask, i)
            width = min(scores.shape[-1], lt.vocab_size)
            llt.apply_token_bitmask_inplace(scores[:, :width], self.bitmask.to(scores.device))
            if scores.shape[-1] > width:  # the model's padded vocabulary beyond the tokenizer's: never allowed
                scores[:, width:] = float("-inf")
            return scores

    return GrammarConstraint()
