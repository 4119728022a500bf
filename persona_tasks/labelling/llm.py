"""LLM labeller: a causal LM writes each cluster's persona; invalid output is repaired, regenerated, or
replaced by the extractive labeller. It never raises on model output or generation failures.

Attempt 1 is greedy; attempts 2..``max_attempts`` sample (temperature/top_p, seeded). Generation is batched
with left padding, prompts sorted by length; progress and tokens/s are logged, never memory text.
``label_candidates`` samples several candidates per cluster for preference training (DPO).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from persona_tasks.config import Settings
from persona_tasks.labelling.extractive import ExtractiveLabeller
from persona_tasks.labelling.model import load_causal_lm, prepare_tokenizer
from persona_tasks.labelling.prompt import EXAMPLE_TOPIC_WORDS, PROMPT_PHRASES, PromptSpec, build_prompt
from persona_tasks.labelling.text import has_public_content
from persona_tasks.labelling.types import ClusterInput, PersonaLabel
from persona_tasks.labelling.support import ClaimSupport
from persona_tasks.labelling.validate import Checked, ParsedOutput, check_persona, parse_output, split_sentences
from persona_tasks.progress import Progress, set_threads

log = logging.getLogger(__name__)

_EVIDENCE_DONE = re.compile(r"\n[\s*#>\-]*\**\s*evidence\b[^\n]*\n", re.IGNORECASE)
_EVIDENCE_LINE = re.compile(r"\n[\s*#>\-]*\**\s*evidence\b([^\n]*)$", re.IGNORECASE)


def _persona_stop(tokenizer: Any, prompt_len: int, prefill: str, id_limits: list[int], max_label_chars: int,
                  max_line_chars: int) -> Any:
    """A stopping criterion, per row: stop once the Evidence line is complete (the answer is done), or once
    the answer is certainly invalid (a line far over the length caps, more ids than memories shown): a small
    model otherwise runs on to ``max_new_tokens`` (counting m1, m2, ... m40 or repeating a word)."""
    import torch
    from transformers import StoppingCriteria

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            done = []
            for text, limit in zip(texts, id_limits):
                text = prefill + text
                last = text.rsplit("\n", 1)[-1]
                ev = _EVIDENCE_LINE.search(text)
                done.append(bool(
                    _EVIDENCE_DONE.search(text)
                    or len(last) > (max_label_chars if "\n" not in text.strip() else max_line_chars)
                    or (ev is not None and len(re.findall(r"\d+", ev.group(1))) > limit + 1)
                ))
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return _Stop()


def _stopping_criteria(labeller: Any, prompts: list[PromptSpec], prompt_len: int, n: int) -> Any:
    """The free arm's stopping criterion (``_persona_stop``), or None under a grammar: a grammar ends with the
    Evidence line and then allows only the end-of-sequence token, so every row already stops where the criterion
    would stop it; the criterion's decode of every row at every step (O(batch x length^2)) is then pure cost, a
    large share of a GPU batch's time. Same outputs either way (tests/test_labelling.py)."""
    if any(p.grammar for p in prompts) and labeller._grammar_eos_stops:
        return None
    from transformers import StoppingCriteriaList

    cfg = labeller.cfg
    return StoppingCriteriaList([_persona_stop(labeller.tokenizer, prompt_len, prompts[0].prefill,
                                               [len(p.local_ids) for p in prompts for _ in range(n)],
                                               max(80, 16 * cfg.label_max_words),
                                               max(200, 2 * cfg.description_max_chars))])


def _generated_repetition_penalty(prompt_len: int, penalty: float, exempt: list[int]) -> Any:
    """Repetition penalty (CTRL-style) on tokens the answer itself has already used, not on the prompt's:
    copying words from the memories stays free while loops ("Horror; Horror; Horror") are damped. The
    answer format's own tokens (field names, punctuation, m1..m20) are exempt."""
    import torch
    from transformers import LogitsProcessor

    class _Penalty(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            gen = input_ids[:, prompt_len:]
            if gen.shape[1] == 0:
                return scores
            used = torch.zeros_like(scores, dtype=torch.bool)
            used.scatter_(1, gen, True)
            if exempt:
                used[:, exempt] = False
            penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
            return torch.where(used, penalised, scores)

    return _Penalty()


@dataclass
class LabellerStats:
    clusters: int = 0
    prompts: int = 0  # generated sequences (a cluster retried twice counts 3)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    generate_s: float = 0.0
    llm_accepted: int = 0
    repaired: int = 0  # accepted personas that needed at least one repair
    regenerations: int = 0
    fallbacks: int = 0
    generation_errors: int = 0  # failed generate calls (single prompts, after splitting batches)
    problems: Counter = field(default_factory=Counter)
    repairs: Counter = field(default_factory=Counter)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.generate_s if self.generate_s > 0 else 0.0

    @property
    def prompts_per_s(self) -> float:
        return self.prompts / self.generate_s if self.generate_s > 0 else 0.0

    @property
    def fallback_rate(self) -> float:
        return self.fallbacks / self.clusters if self.clusters else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["problems"], d["repairs"] = dict(self.problems), dict(self.repairs)
        d.update(tokens_per_s=round(self.tokens_per_s, 2), prompts_per_s=round(self.prompts_per_s, 3),
                 fallback_rate=round(self.fallback_rate, 4))
        return d


@dataclass
class Candidate:
    """One generated persona for a cluster, valid or not (``persona`` is None when invalid)."""

    prompt: PromptSpec
    completion: str  # prefill + generated text, as parsed (and as a DPO completion)
    checked: Checked
    persona: PersonaLabel | None
    sampled: bool


class LLMLabeller:
    """``LLMLabeller(settings).label(clusters)``; pass ``model``/``tokenizer`` to reuse a loaded model."""

    name = "llm"

    def __init__(self, settings: Settings, model: Any = None, tokenizer: Any = None,
                 model_version: str | None = None, claim_support: ClaimSupport | None = None):
        self.settings = settings
        self.cfg = settings.labelling
        # the truthfulness test at labelling time ([labelling] check_claim_support); the embedding model loads on
        # first use
        self._claim_support = claim_support
        if model is None or tokenizer is None:
            model, tokenizer, model_version = load_causal_lm(settings)
        else:
            set_threads(settings.threads)
            prepare_tokenizer(tokenizer)
            model.eval()
            model_version = model_version or f"{getattr(model.config, 'name_or_path', '') or 'custom'}@unversioned"
        self.model, self.tokenizer, self.model_version = model, tokenizer, model_version
        fmt = "Label: x\nDescription: y.\nEvidence: " + ", ".join(f"m{i}" for i in range(1, 21)) + "\n"
        self._format_token_ids = sorted({int(t) for t in tokenizer(fmt, add_special_tokens=False)["input_ids"]}
                                        - {int(t) for t in tokenizer("x y", add_special_tokens=False)["input_ids"]})
        self.extractive = ExtractiveLabeller(settings)
        self._grammar_threads = self.cfg.grammar_threads or max(1, int(settings.threads or 1))
        self.stats = LabellerStats()
        eos = tokenizer.eos_token_id
        self._eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for e in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if e is not None:
                self._eos_ids.add(int(e))
        # a finished grammar allows only the tokenizer's eos; generation stops on it when it is one of ours
        self._grammar_eos_stops = tokenizer.eos_token_id in self._eos_ids

    # ---------------------------------------------------------------- generation
    def generate(self, prompts: list[PromptSpec], *, do_sample: bool, num_return_sequences: int = 1,
                 seed: int = 0, desc: str = "label-llm") -> list[list[str] | None]:
        """Completions (prefill + generated text) per prompt; None where generation failed."""
        import torch

        out: list[list[str] | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: prompts[i].n_tokens)
        bs = max(1, self.cfg.batch_size)
        if do_sample:
            torch.manual_seed(seed)
        with Progress(desc, total=len(prompts), unit="prompts", extra_unit="tokens", logger=log) as prog:
            for start in range(0, len(order), bs):
                idx = order[start:start + bs]
                before = self.stats.generated_tokens
                for i, comps in zip(idx, self._generate_batch([prompts[i] for i in idx], do_sample,
                                                              num_return_sequences)):
                    out[i] = comps
                prog.update(len(idx), tokens=self.stats.generated_tokens - before)
        return out

    def _generate_batch(self, prompts: list[PromptSpec], do_sample: bool, n: int) -> list[list[str] | None]:
        """One batch; on an error (e.g. out of memory) split it in halves, down to single prompts."""
        import torch

        try:
            enc = self.tokenizer([p.text for p in prompts], return_tensors="pt", padding=True,
                                 add_special_tokens=False)
            device = next(self.model.parameters()).device
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            kw: dict[str, Any] = dict(max_new_tokens=self.cfg.max_new_tokens, do_sample=do_sample,
                                      num_return_sequences=n, pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=sorted(self._eos_ids) or None)
            stop = _stopping_criteria(self, prompts, enc["input_ids"].shape[1], n)
            if stop is not None:
                kw["stopping_criteria"] = stop
            from transformers import LogitsProcessorList

            processors = []
            if self.cfg.repetition_penalty != 1.0:
                processors.append(_generated_repetition_penalty(
                    enc["input_ids"].shape[1], self.cfg.repetition_penalty, self._format_token_ids))
            if any(p.grammar for p in prompts):
                from persona_tasks.labelling.constrained import grammar_constraint

                # last: the mask decides what may follow, after every other change to the scores
                processors.append(grammar_constraint(self.tokenizer, [p.grammar for p in prompts for _ in range(n)],
                                                     enc["input_ids"].shape[1], self._grammar_threads))
            if processors:
                kw["logits_processor"] = LogitsProcessorList(processors)
            if do_sample:
                kw.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p)
            t0 = time.perf_counter()
            with torch.inference_mode():
                seqs = self.model.generate(**enc, **kw)
            self.stats.generate_s += time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a failed batch must not end the run
            if len(prompts) > 1:
                log.warning("generation failed for a batch of %d (%s); retrying in halves",
                            len(prompts), type(e).__name__)
                _empty_cache()
                h = len(prompts) // 2
                return (self._generate_batch(prompts[:h], do_sample, n)
                        + self._generate_batch(prompts[h:], do_sample, n))
            log.warning("generation failed for cluster %s (%s)", prompts[0].cluster_id, type(e).__name__)
            self.stats.generation_errors += 1
            _empty_cache()
            return [None]
        in_len = enc["input_ids"].shape[1]
        self.stats.prompts += len(prompts) * n
        self.stats.prompt_tokens += int(enc["attention_mask"].sum()) * n
        gen = seqs[:, in_len:].tolist()
        pad_id = self.tokenizer.pad_token_id
        texts: list[str] = []
        for row in gen:
            k = next((j for j, t in enumerate(row) if t in self._eos_ids or t == pad_id), len(row))
            self.stats.generated_tokens += min(k + 1, len(row))  # the closing eos is generated too
            texts.append(self.tokenizer.decode(row[:k], skip_special_tokens=True))
        return [[prompts[i].prefill + texts[i * n + j] for j in range(n)] for i in range(len(prompts))]

    # ---------------------------------------------------------------- validation
    def check(self, prompt: PromptSpec, completion: str) -> Checked:
        """Parse and validate one completion. Under a grammar arm the evidence is the memories the persona's words
        come from (``constrained.matched_evidence``), not the ids the model wrote (mostly m1..m5 in order); the
        free arm keeps the model's citation."""
        return self._finish(prompt, completion, *self._first_pass(prompt, completion))

    def check_all(self, items: list[tuple[PromptSpec, str]]) -> list[Checked | Exception]:
        """``check`` of many completions, with the claim-support embeddings of all of them computed in one encode
        call (a GPU batch is not held up by one small call per persona). An exception raised while checking one
        completion is returned in its place."""
        firsts: list[tuple[ParsedOutput, Checked] | Exception] = []
        for p, text in items:
            try:
                firsts.append(self._first_pass(p, text))
            except Exception as e:  # noqa: BLE001 - the caller decides (counted, or raised)
                firsts.append(e)
        if self.cfg.check_claim_support:
            self.claim_support.prefetch([t for (p, _), f in zip(items, firsts)
                                         if not isinstance(f, Exception) and f[1].ok
                                         for t in self.claim_support.texts(*self._claim_inputs(p, f[1]))])
        out: list[Checked | Exception] = []
        for (p, text), f in zip(items, firsts):
            try:
                out.append(f if isinstance(f, Exception) else self._finish(p, text, *f))
            except Exception as e:  # noqa: BLE001
                out.append(e)
        return out

    def _first_pass(self, prompt: PromptSpec, completion: str) -> tuple[ParsedOutput, Checked]:
        parsed = parse_output(completion)
        return parsed, self._validate(prompt, parsed.label, parsed.description, parsed.evidence)

    def _finish(self, prompt: PromptSpec, completion: str, parsed: ParsedOutput, checked: Checked) -> Checked:
        if checked.ok and self.cfg.check_claim_support:
            checked = self._check_claims(prompt, checked, parsed.evidence)
        if parsed.extra_text:
            checked.repairs.insert(0, "dropped_extra_text")
        if parsed.via_json:
            checked.repairs.insert(0, "parsed_json")
        if not (completion or "").strip() or completion.strip() == prompt.prefill:
            checked.problems = ["empty_output"]
        return checked

    def _validate(self, prompt: PromptSpec, label: str | None, description: str | None,
                  cited: list[str]) -> Checked:
        evidence = cited
        if prompt.grammar is not None and label is not None and self.cfg.grammar_evidence == "matched":
            from persona_tasks.labelling.constrained import matched_evidence

            evidence = matched_evidence(label, description or "", prompt.shown_texts, self.cfg.max_evidence) or cited
        return check_persona(label, description, evidence, prompt.local_ids, self.cfg,
                             grounding_texts=prompt.shown_texts, forbidden_phrases=PROMPT_PHRASES,
                             forbidden_words=EXAMPLE_TOPIC_WORDS)

    @property
    def claim_support(self) -> ClaimSupport:
        if self._claim_support is None:
            from persona_tasks.embed import embedder_from_settings

            self._claim_support = ClaimSupport(embedder_from_settings(self.settings),
                                               self.settings.quality.claim_support_threshold)
        return self._claim_support

    @staticmethod
    def _claim_inputs(prompt: PromptSpec, checked: Checked) -> tuple[str, list[str], list[str]]:
        """(label, description sentences, texts of the cited memories as shown) of a valid persona."""
        shown = dict(zip(prompt.local_ids.values(), prompt.shown_texts))
        evidence = [shown[i] for i in checked.evidence_ids if i in shown] or prompt.shown_texts
        return checked.label, split_sentences(checked.description), evidence

    def _check_claims(self, prompt: PromptSpec, checked: Checked, cited: list[str]) -> Checked:
        """The quality scorer's support test on a valid persona, against the memories it cites (as shown): an
        unsupported label is a problem (``unsupported_label``); description sentences with an unsupported claim are
        dropped (``dropped_unsupported_claim``) and the rest validated again (its evidence matched again), or, when
        none is left, ``unsupported_description``."""
        label, sentences, evidence = self._claim_inputs(prompt, checked)
        label_ok, kept = self.claim_support.keep_supported(label, sentences, evidence)
        if not label_ok:
            checked.problems.append("unsupported_label")
        elif not kept:
            checked.problems.append("unsupported_description")
        elif len(kept) < len(sentences):
            again = self._validate(prompt, checked.label, " ".join(kept), cited)
            again.repairs = list(dict.fromkeys(checked.repairs + ["dropped_unsupported_claim"] + again.repairs))
            return again
        return checked

    def _persona(self, prompt: PromptSpec, checked: Checked, attempts: int) -> PersonaLabel:
        return PersonaLabel(
            user_id=prompt.user_id, cluster_id=prompt.cluster_id, label=checked.label,
            description=checked.description, evidence_ids=checked.evidence_ids, labeller=self.name,
            model_version=self.model_version, fallback=False, attempts=attempts, repairs=list(checked.repairs),
        )

    def _key_terms(self, clusters: list[ClusterInput]) -> list[str | None]:
        """The skeleton and phrases arms' key terms per cluster: the extractive labeller's label (its top c-TF-IDF
        terms against the user's other clusters in the call); None for the other arms."""
        if self.cfg.decoding not in ("skeleton", "phrases") or not clusters:
            return [None] * len(clusters)
        return [re.sub(r"\s+and\s+", ", ", p.label).lower() if p.label != "Mixed activity" else ""
                for p in self.extractive.label(clusters)]

    def _prompts(self, clusters: list[ClusterInput]) -> list[PromptSpec | None]:
        out: list[PromptSpec | None] = []
        for c, terms in zip(clusters, self._key_terms(clusters)):
            try:
                out.append(build_prompt(c, self.tokenizer, self.cfg, terms))
            except Exception as e:  # noqa: BLE001 - e.g. a tokenizer without a usable chat template
                log.warning("prompt failed for cluster %s (%s)", c.cluster_id, type(e).__name__)
                self.stats.problems["prompt_error"] += 1
                out.append(None)
        return out

    # ---------------------------------------------------------------- public API
    def label(self, clusters: list[ClusterInput]) -> list[PersonaLabel]:
        """One persona per cluster, in input order: the model's, or the extractive one after
        ``max_attempts`` invalid answers (``fallback=True``)."""
        t0 = time.perf_counter()
        n = len(clusters)
        self.stats.clusters += n
        prompts = self._prompts(clusters)
        results: list[PersonaLabel | None] = [None] * n
        # a cluster whose memories shown hold no public content word (all masked as [rare], or only stop words)
        # cannot be described from its evidence: the extractive persona at once, no generation
        blank = {i for i, p in enumerate(prompts) if p is not None and not has_public_content(p.shown_texts)}
        self.stats.problems["no_public_terms"] += len(blank)
        if not blank:
            del self.stats.problems["no_public_terms"]
        pending = [i for i in range(n) if prompts[i] is not None and i not in blank]
        max_attempts = max(1, self.cfg.max_attempts)
        for attempt in range(1, max_attempts + 1):
            if not pending:
                break
            if attempt > 1:
                self.stats.regenerations += len(pending)
            comps = self.generate([prompts[i] for i in pending], do_sample=attempt > 1,
                                  seed=self.cfg.seed + attempt, desc=f"label-llm attempt {attempt}")
            done = [(i, comp[0]) for i, comp in zip(pending, comps) if comp is not None]
            if len(done) < len(pending):
                self.stats.problems["generation_error"] += len(pending) - len(done)
            checks = self.check_all([(prompts[i], text) for i, text in done])  # type: ignore[misc]
            for (i, _), checked in zip(done, checks):
                p = prompts[i]
                assert p is not None
                if isinstance(checked, Exception):  # a parser bug must not end the run
                    log.warning("validation failed for cluster %s (%s)", p.cluster_id, type(checked).__name__)
                    self.stats.problems["validation_error"] += 1
                    continue
                if checked.ok:
                    results[i] = self._persona(p, checked, attempt)
                    self.stats.llm_accepted += 1
                    if checked.repairs:
                        self.stats.repaired += 1
                        self.stats.repairs.update(set(checked.repairs))
                else:
                    self.stats.problems.update(set(checked.problems))
            pending = [i for i in pending if results[i] is None]
        missing = [i for i in range(n) if results[i] is None]
        if missing:
            self._fallback(clusters, missing, results, max_attempts, prompts, blank)
        log.info("label-llm: %d clusters in %.1fs: %d by the model (%d repaired), %d fallbacks; "
                 "%d prompts, %.1f generated tokens/s, %.2f prompts/s; problems %s",
                 n, time.perf_counter() - t0, n - len(missing), sum(1 for r in results if r and r.repairs),
                 len(missing), self.stats.prompts, self.stats.tokens_per_s, self.stats.prompts_per_s,
                 dict(self.stats.problems))
        return [r for r in results if r is not None]

    def _fallback(self, clusters: list[ClusterInput], missing: list[int], results: list[PersonaLabel | None],
                  attempts: int, prompts: list[PromptSpec | None], blank: set[int] = frozenset()) -> None:
        # the extractive labeller contrasts a cluster with the user's other clusters: give it those
        users = {clusters[i].user_id for i in missing}
        idx = [i for i, c in enumerate(clusters) if c.user_id in users]
        ext = dict(zip(idx, self.extractive.label([clusters[i] for i in idx])))
        for i in missing:
            p = ext[i]
            p.fallback = True
            p.attempts = attempts if prompts[i] is not None and i not in blank else 0
            results[i] = p
            self.stats.fallbacks += 1

    def label_candidates(self, clusters: list[ClusterInput], num_candidates: int | None = None,
                         seed: int | None = None) -> list[list[Candidate]]:
        """``num_candidates`` sampled candidates per cluster (valid or not), for preference training, under the
        configured decoding arm (its grammar applies to sampling too). No retries and no fallback; a cluster whose
        prompt or generation failed, or whose memories shown hold no public content word, gets an empty list."""
        k = max(1, num_candidates or self.cfg.num_candidates)
        prompts = self._prompts(clusters)
        ok = self._candidate_positions(prompts)
        comps = self.generate([prompts[i] for i in ok], do_sample=True, num_return_sequences=k,
                              seed=self.cfg.seed if seed is None else seed, desc="label-llm candidates")
        return self._candidates(clusters, prompts, dict(zip(ok, comps)))

    def candidates_from_completions(self, clusters: list[ClusterInput],
                                    completions: list[list[str] | None]) -> list[list[Candidate]]:
        """The candidates of completions generated elsewhere for these clusters (``labelling.replay``: a GPU
        worker's), through the same prompts, checks and personas as ``label_candidates``; no model call."""
        prompts = self._prompts(clusters)
        return self._candidates(clusters, prompts, {i: completions[i] for i in self._candidate_positions(prompts)})

    @staticmethod
    def _candidate_positions(prompts: list[PromptSpec | None]) -> list[int]:
        return [i for i, p in enumerate(prompts) if p is not None and has_public_content(p.shown_texts)]

    def _candidates(self, clusters: list[ClusterInput], prompts: list[PromptSpec | None],
                    comps: dict[int, list[str] | None]) -> list[list[Candidate]]:
        out: list[list[Candidate]] = [[] for _ in clusters]
        items = [(i, text) for i, comp in comps.items() for text in comp or []]
        checks = self.check_all([(prompts[i], text) for i, text in items])  # type: ignore[misc]
        for (i, text), checked in zip(items, checks):
            p = prompts[i]
            assert p is not None
            if isinstance(checked, Exception):
                raise checked
            out[i].append(Candidate(prompt=p, completion=text, checked=checked, sampled=True,
                                    persona=self._persona(p, checked, 1) if checked.ok else None))
        return out


def _empty_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001  # pragma: no cover
        pass
