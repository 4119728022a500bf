"""The labelling prompt (shared with the DPO trainer): ``build_prompt(cluster, tokenizer, cfg) -> PromptSpec``.

The cluster's most representative memories (by centrality) are shown under short local ids ``m1..mK``
(mapped back to memory ids), each cut to ``memory_max_tokens`` and all within ``prompt_max_tokens`` for the
whole prompt. One worked example (a different topic) fixes the three-line answer format, and the
assistant turn is pre-filled with ``Label:`` so that even a very small model starts in the format.
The completion to parse (or to train on) is ``prefill + generated text``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from persona_tasks.config import LabellingSettings
from persona_tasks.labelling.text import scrub_pii
from persona_tasks.labelling.types import ClusterInput

SYSTEM_PROMPT = (
    "You describe a person from their online activity. Use only what the memories show: "
    "never invent a job, brand, age, place or name. Answer in exactly three lines:\n"
    "Label: a short persona label, at most 8 words\n"
    "Description: one to three sentences about what they are doing\n"
    "Evidence: the ids of the memories you used, like m1, m2"
)
# the memories are intent_memories.embedding_text (queries, titles): the example shows the same kind of text
EXAMPLE_MEMORIES = (
    "m1: tomato seedlings\n"
    "m2: weather tomorrow\n"
    "m3: when to plant tomatoes\n"
    "m4: raised garden bed kit"
)
# every content word of the example answer is a word of its memories (what constrained decoding enforces). The
# example of p3 (a short "Plans ..." sentence, then one listing the memories' phrases) is kept: the p4 example (two
# sentences each listing phrases, as the phrases arm writes them) cost MovieLens skeleton personas 0.085 of
# truthfulness on the same 50 clusters (bench/results/labelling_arms_*_p4.json vs *_p5.json)
EXAMPLE_ANSWER = (
    "Label: Tomato seedlings and a raised garden bed\n"
    "Description: Plans when to plant tomatoes. Looks for tomato seedlings and a raised garden bed kit.\n"
    "Evidence: m1, m3, m4"
)
# phrases of the prompt itself: an answer holding one copied the prompt
PROMPT_PHRASES = ("Tomato seedlings and a raised garden bed", "Tomato seedlings and raised garden bed",
                  "persona label", "at most 8 words", "one to three sentences", "ids of the memories",
                  "what they are doing")
# words of the example's topic: in an answer they are copied from the example (unless the memories have them)
EXAMPLE_TOPIC_WORDS = ("tomato", "tomatoes", "seedling", "seedlings", "garden", "gardener", "gardening",
                       "vegetable", "vegetables", "planting", "raised")
PREFILL = "Label:"
PROMPT_VERSION = "p5"


@dataclass
class PromptSpec:
    """A built prompt. ``text`` is what the model is fed (chat template applied, ``prefill`` at the end)."""

    user_id: str
    cluster_id: str
    messages: list[dict[str, str]]
    text: str
    prefill: str
    local_ids: dict[str, str]  # "m1" -> memory_id (only the memories shown)
    shown_texts: list[str] = field(default_factory=list)  # the (scrubbed, cut) memory texts shown
    n_tokens: int = 0
    # constrained decoding (labelling.constrained): the answer's grammar after the pre-fill; None = free decoding
    grammar: str | None = None


EXAMPLE_KEY_TERMS = "tomato seedlings, raised garden bed"


def _user_message(lines: list[str], key_terms: str | None = None) -> str:
    terms = f"Key terms: {key_terms}\n" if key_terms is not None else ""
    return "Memories:\n" + "\n".join(lines) + "\n" + terms + "Write the persona."


def _messages(lines: list[str], key_terms: str | None = None) -> list[dict[str, str]]:
    """The chat; with ``key_terms`` (the skeleton arm) both the example and the cluster carry a Key terms line."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": _user_message(EXAMPLE_MEMORIES.split("\n"),
                                                  EXAMPLE_KEY_TERMS if key_terms is not None else None)},
        {"role": "assistant", "content": EXAMPLE_ANSWER},
        {"role": "user", "content": _user_message(lines, key_terms)},
    ]


def _bos(tokenizer: Any) -> str:
    """The BOS token text when the model expects one first (its tokenizer adds it by default: Gemma, Llama),
    else "". Prompts are tokenised with ``add_special_tokens=False`` (the chat template writes its own special
    tokens), so the rendered text carries it: without it Gemma 3 answers ``<eos>`` at once."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    try:
        ids = tokenizer("x")["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot tokenise plainly: no BOS
        return ""
    return bos if ids and ids[0] == bos_id else ""


def render(messages: list[dict[str, str]], tokenizer: Any, prefill: str = PREFILL) -> str:
    """Chat template (or a plain fallback for tokenizers without one, e.g. a base model) plus the assistant
    pre-fill, led by the BOS token where the model needs one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant: "
    bos = _bos(tokenizer)
    if bos and not text.startswith(bos):
        text = bos + text
    return text + prefill


def count_tokens(text: str, tokenizer: Any) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _cut(text: str, tokenizer: Any, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[: max(1, max_tokens - 1)], skip_special_tokens=True).rstrip() + "…"


def build_prompt(cluster: ClusterInput, tokenizer: Any, cfg: LabellingSettings,
                 key_terms: str | None = None) -> PromptSpec:
    """The labelling prompt for one cluster; at least one memory is always shown. ``key_terms``: the extractive
    labeller's terms, shown as the skeleton the model phrases (decoding arm ``skeleton``). With a constrained
    arm (``cfg.decoding``) the prompt carries the grammar of its answer."""
    overhead = count_tokens(render(_messages([], key_terms), tokenizer), tokenizer)
    budget = cfg.prompt_max_tokens - overhead
    lines: list[str] = []
    local_ids: dict[str, str] = {}
    shown: list[str] = []
    used = 0
    for pos in cluster.by_centrality()[: cfg.max_memories]:
        k = len(lines) + 1
        text = " ".join(scrub_pii(cluster.memory_texts[pos]).split()) or "(empty)"
        text = _cut(text, tokenizer, cfg.memory_max_tokens)
        line = f"m{k}: {text}"
        n = count_tokens(line + "\n", tokenizer)
        if used + n > budget:
            if lines:
                break
            # even the most central memory does not fit: show a shortened one
            text = _cut(text, tokenizer, max(8, budget - 4))
            line = f"m{k}: {text}"
            n = count_tokens(line + "\n", tokenizer)
        lines.append(line)
        local_ids[f"m{k}"] = cluster.memory_ids[pos]
        shown.append(text)
        used += n
    messages = _messages(lines, key_terms)
    text = render(messages, tokenizer)
    grammar = None
    if cfg.decoding != "free":
        from persona_tasks.labelling.constrained import answer_grammar

        grammar = answer_grammar(shown, len(local_ids), cfg)
    return PromptSpec(
        user_id=cluster.user_id, cluster_id=cluster.cluster_id, messages=messages, text=text, prefill=PREFILL,
        local_ids=local_ids, shown_texts=shown, n_tokens=count_tokens(text, tokenizer), grammar=grammar,
    )
