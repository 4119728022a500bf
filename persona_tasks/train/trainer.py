"""Training arms on preference groups: groupwise DPO (ours), pairwise DPO and SFT (trl's), all LoRA with peft.

``GroupDPOTrainer`` extends trl's ``DPOTrainer`` the way trl's trainers extend transformers' ``Trainer``: it
overrides the data (a group of K completions per prompt instead of a chosen/rejected pair: ``_prepare_dataset``, the
collator, log-probabilities with each prompt run once: ``group_logps``) and the loss (``_compute_loss``: the
Plackett-Luce loss of ``persona_tasks.train.loss``), and keeps the rest: the LoRA wrapping from ``peft_config``, the
reference (the base model with adapters disabled, trl's ``use_adapter``), dropout disabled, checkpoints, and the
metric logging (``rewards/margins``, ``rewards/accuracies`` = ranking accuracy over the strictly ordered pairs,
``rewards/chosen`` / ``rewards/rejected`` = mean reward of the best block / the rest).

Arms (``train_arm``): ``groupwise``; ``pairwise`` (trl ``DPOTrainer``, sigmoid loss, the best candidate against each
strictly worse one); ``pairwise_shared`` (``BestVsRestDPOTrainer``: trl's sigmoid loss on the same pairs, each
prompt run once as in ``groupwise``: the pairwise loss at the groupwise arm's cost); ``sft`` (trl ``SFTTrainer``,
completion-only loss on each group's best valid candidate); ``base`` (no training). Device: CUDA with bf16 when
present (``[training] device``), else CPU fp32 with the thread count of ``[training] threads``.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl.trainer.utils import use_adapter

from persona_tasks.config import TRAINED_ARMS, Settings
from persona_tasks.errors import PersonaEtlError
from persona_tasks.progress import set_threads
from persona_tasks.train.loss import best_block, best_vs_rest_dpo_loss, groupwise_dpo_loss

log = logging.getLogger(__name__)

ARMS = ("base", *TRAINED_ARMS)


class TrainingError(PersonaEtlError):
    """Training cannot run (no usable groups, an unknown arm, no device)."""


# ---------------------------------------------------------------------------------------------------------------
# Data: group rows -> tokens -> padded batches
# ---------------------------------------------------------------------------------------------------------------

def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_group(tokenizer: Any, prompt: str, completions: list[str]) -> dict[str, Any]:
    """Prompt ids and one id list per completion (EOS appended), split where prompt and prompt+completion
    tokenisations diverge (as trl's DPOTrainer does)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = [tokenizer(prompt + c + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for c in completions]
    cut = min([len(prompt_ids)] + [_common_prefix(prompt_ids, f) for f in full])
    return {"prompt_ids": prompt_ids[:cut], "completion_ids": [f[cut:] for f in full]}


@dataclass
class DataCollatorForGroups:
    """Batches of groups, each prompt once (``group_logps_shared_prompt``): ``prompt_ids`` (B, P) right-padded with
    ``prompt_length`` (B,); every candidate of every group is one row of ``completion_ids`` /
    ``completion_attention`` (N, C), right-padded; ``group_index`` / ``slot`` place row n at (group, candidate) of
    the (B, K) ``ranks`` / ``group_mask``. ``max_length`` cuts prompt + completion as one sequence (the
    completion first)."""

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts, comps, gidx, slots = [], [], [], []
        k_max = max(len(e["completion_ids"]) for e in examples)
        ranks = torch.zeros((len(examples), k_max), dtype=torch.long)
        gmask = torch.zeros((len(examples), k_max), dtype=torch.bool)
        for b, e in enumerate(examples):
            prompt = list(e["prompt_ids"])[: self.max_length]
            prompts.append(prompt)
            room = None if self.max_length is None else self.max_length - len(prompt)
            for k, (comp, rank) in enumerate(zip(e["completion_ids"], e["ranks"])):
                comps.append(list(comp)[:room])
                gidx.append(b)
                slots.append(k)
                ranks[b, k] = int(rank)
                gmask[b, k] = True

        def padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            ids = torch.full((len(seqs), max(1, *(len(x) for x in seqs))), self.pad_token_id, dtype=torch.long)
            att = torch.zeros_like(ids)
            for n, x in enumerate(seqs):
                if x:
                    ids[n, : len(x)] = torch.tensor(x)
                    att[n, : len(x)] = 1
            return ids, att

        prompt_ids, prompt_att = padded(prompts)
        completion_ids, completion_att = padded(comps)
        return {"prompt_ids": prompt_ids, "prompt_length": prompt_att.sum(dim=1), "completion_ids": completion_ids,
                "completion_attention": completion_att, "group_index": torch.tensor(gidx),
                "slot": torch.tensor(slots), "ranks": ranks, "group_mask": gmask}


def sequence_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's completion tokens, through trl's fused LM head (as DPOTrainer)."""
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                use_cache=False)
    if getattr(out, "log_probs", None) is not None:
        return out.log_probs.sum(dim=1)  # (N, L-1), zero where the next token is not a completion token
    # a model without trl's fused head (outside a trainer): the same sum from the logits
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * (target != -100)).sum(dim=1)


def group_logps_shared_prompt(model: Any, prompt_ids: torch.Tensor, completion_ids: torch.Tensor,
                              completion_attention: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each of K completions of one prompt, the prompt run once: its keys and values
    (with their gradient) are repeated for the K completions instead of recomputed K times.

    ``prompt_ids``: (P,); ``completion_ids`` / ``completion_attention``: (K, C), right-padded. Equal to
    ``sequence_logps`` on the K full rows (a test holds them together); cheaper because the prompt (the evidence,
    hundreds of tokens) is much longer than a completion (a persona, tens)."""
    k, width = completion_ids.shape
    n_prompt = prompt_ids.shape[0]
    first = model(input_ids=prompt_ids[None], use_cache=True, logits_to_keep=1)
    cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
    cache.batch_repeat_interleave(k)
    attention = torch.cat([completion_attention.new_ones((k, n_prompt)), completion_attention], dim=1)
    positions = torch.arange(n_prompt, n_prompt + width, device=completion_ids.device)
    rest = model(input_ids=completion_ids, attention_mask=attention, cache=cache, use_cache=True,
                 position_ids=positions[None].expand(k, -1))
    # token 0 of each completion is predicted by the prompt's last position, token t by completion position t-1
    logits = torch.cat([first.logits[:, -1:].expand(k, -1, -1), rest.logits[:, :-1]], dim=1).float()
    tok = torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    return (tok * completion_attention).sum(dim=1)


def group_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, K) summed completion log-probs of a ``DataCollatorForGroups`` batch (padding slots 0), one prompt pass
    per group."""
    gidx, slot = batch["group_index"], batch["slot"]
    out = None
    for b in range(batch["ranks"].shape[0]):
        rows = (gidx == b).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        prompt = batch["prompt_ids"][b, : int(batch["prompt_length"][b])]
        att = batch["completion_attention"][rows]
        width = max(1, int(att.sum(dim=1).max()))
        lp = group_logps_shared_prompt(model, prompt, batch["completion_ids"][rows, :width], att[:, :width])
        if out is None:
            out = lp.new_zeros(batch["ranks"].shape)
        out = out.index_put((gidx[rows], slot[rows]), lp)
    if out is None:
        raise TrainingError("a batch without completions")
    return out


class GroupDPOTrainer(DPOTrainer):
    """Groupwise (Plackett-Luce) DPO: trl's DPOTrainer with group data and our loss (module docstring).

    ``train_dataset`` rows: ``prompt`` (the rendered prompt text, pre-fill included), ``completions`` (K strings),
    ``ranks`` (K ints, 0 = best, equal = tied). ``args.precompute_ref_log_probs`` must stay False.
    """

    _tag_names = ["trl", "dpo", "groupwise", "persona-etl"]
    _name = "GroupDPO"
    group_loss = staticmethod(groupwise_dpo_loss)  # (policy, ref, ranks, beta, mask) -> loss.GroupLoss

    def __init__(self, *args: Any, **kwargs: Any):
        a = kwargs.get("args")
        if a is not None and a.precompute_ref_log_probs:
            raise TrainingError("GroupDPOTrainer computes reference log-probs on the fly (adapters disabled); "
                                "set precompute_ref_log_probs=False")
        if kwargs.get("data_collator") is None:
            tok = kwargs["processing_class"]
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            kwargs["data_collator"] = DataCollatorForGroups(tok.pad_token_id, a.max_length if a else None)
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset: Dataset, processing_class: Any, args: DPOConfig, dataset_name: str) -> Dataset:
        first = next(iter(dataset))
        if "prompt_ids" in first:  # already tokenised
            return dataset
        for col in ("prompt", "completions", "ranks"):
            if col not in first:
                raise TrainingError(f"{dataset_name} dataset: column {col!r} missing (prompt, completions, ranks)")
        return dataset.map(lambda ex: {**tokenize_group(processing_class, ex["prompt"], ex["completions"]),
                                       "ranks": ex["ranks"]},
                           remove_columns=[c for c in dataset.column_names if c != "ranks"])

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "completion_ids", "ranks"]

    def _group_logps(self, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy, reference) summed completion log-probs, shaped (B, K) (padding slots 0)."""
        policy = group_logps(model, inputs)
        with torch.no_grad():
            if self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in getattr(unwrapped, "peft_config", {})
                                 else None):
                    ref = group_logps(self.model, inputs)
            else:
                ref = group_logps(self.ref_model, inputs)
        return policy, ref.detach()

    def _compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool) -> Any:
        mode = "train" if self.model.training else "eval"
        policy, ref = self._group_logps(model, inputs)
        res = self.group_loss(policy, ref, inputs["ranks"], self.beta, inputs["group_mask"])
        m = self._metrics[mode]
        if res.n_pairs:
            m["rewards/margins"].append(float(res.margin))
            m["rewards/accuracies"].append(float(res.ranking_accuracy))
        gmask, ranks = inputs["group_mask"], inputs["ranks"]
        best = best_block(ranks, gmask)
        if best.any():
            m["rewards/chosen"].append(float(res.rewards[best].mean()))
        if (gmask & ~best).any():
            m["rewards/rejected"].append(float(res.rewards[gmask & ~best].mean()))
        m["logps/policy"].append(float(policy.detach()[gmask].mean()))
        m["pairs"].append(float(res.n_pairs))
        if return_outputs:
            return res.loss, {"rewards": res.rewards}
        return res.loss


class BestVsRestDPOTrainer(GroupDPOTrainer):
    """Pairwise DPO at the groupwise trainer's cost: trl's sigmoid loss over each group's best-vs-worse pairs (those
    of ``pair_rows``, which trl's DPOTrainer arm trains on), with each group's prompt run once for all its
    candidates (``loss.best_vs_rest_dpo_loss``). Compares the two losses rather than the two implementations."""

    _tag_names = ["trl", "dpo", "pairwise", "persona-etl"]
    _name = "BestVsRestDPO"
    group_loss = staticmethod(best_vs_rest_dpo_loss)


# ---------------------------------------------------------------------------------------------------------------
# Arms
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    arm: str
    adapter_dir: Path | None
    n_groups: int
    n_examples: int  # rows the trainer saw: groups, pairs or SFT examples
    steps: int
    seconds: float
    peak_rss_mb: float
    peak_cuda_mb: float | None
    device: str
    log_history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        return d

    @classmethod
    def read(cls, output_dir: Path) -> TrainResult:
        """The result ``train_arm`` wrote to ``output_dir/train_result.json`` (an adapter scored again later)."""
        d = json.loads((Path(output_dir) / "train_result.json").read_text())
        return cls(**{**d, "adapter_dir": Path(d["adapter_dir"]) if d["adapter_dir"] else None})


def training_device(settings: Settings) -> str:
    want = settings.training.device
    if want == "cuda" and not torch.cuda.is_available():
        raise TrainingError("training.device is cuda but no CUDA device is available")
    return "cuda" if want != "cpu" and torch.cuda.is_available() else "cpu"


def lora_config(settings: Settings) -> Any:
    from peft import LoraConfig

    t = settings.training
    return LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                      target_modules=list(t.lora_target_modules), task_type="CAUSAL_LM")


def _common_args(settings: Settings, output_dir: Path, device: str, batch: int) -> dict[str, Any]:
    t = settings.training
    return dict(output_dir=str(output_dir), per_device_train_batch_size=batch, learning_rate=t.learning_rate,
                num_train_epochs=t.epochs, max_steps=t.max_steps if t.max_steps is not None else -1,
                gradient_accumulation_steps=t.gradient_accumulation_steps, logging_steps=t.logging_steps,
                save_steps=t.save_steps, save_total_limit=2, report_to=[], seed=t.seed, bf16=device == "cuda",
                use_cpu=device == "cpu", gradient_checkpointing=False, dataloader_num_workers=0,
                max_length=t.max_length, disable_tqdm=True)


def group_rows(groups: list[dict]) -> list[dict]:
    """Rows of ``GroupDPOTrainer``: groups with at least one strict preference."""
    return [{"prompt": g["prompt"], "completions": list(g["completions"]), "ranks": [int(r) for r in g["ranks"]]}
            for g in groups if len(set(g["ranks"])) > 1]


def pair_rows(groups: list[dict]) -> list[dict]:
    """Rows of trl's DPOTrainer: each best-ranked candidate against each strictly worse one."""
    out = []
    for g in groups:
        ranks = [int(r) for r in g["ranks"]]
        top = min(ranks)
        for i, ri in enumerate(ranks):
            if ri != top:
                continue
            for j, rj in enumerate(ranks):
                if rj > ri:
                    out.append({"prompt": g["prompt"], "chosen": g["completions"][i],
                                "rejected": g["completions"][j]})
    return out


def sft_rows(groups: list[dict]) -> list[dict]:
    """Rows of trl's SFTTrainer: each group's best valid candidate (the first of the best block)."""
    out = []
    for g in groups:
        ranks = [int(r) for r in g["ranks"]]
        valid = list(g["valid"])
        best = [i for i in range(len(ranks)) if valid[i] and ranks[i] == min(ranks)]
        if best:
            out.append({"prompt": g["prompt"], "completion": g["completions"][best[0]]})
    return out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train_arm(settings: Settings, arm: str, groups: list[dict], output_dir: Path, model: Any = None,
              tokenizer: Any = None) -> TrainResult:
    """Train one arm on ``groups`` (dicts with prompt, completions, ranks, valid) and save its LoRA adapter to
    ``output_dir/adapter``. ``model``/``tokenizer``: the base model to adapt (default: the configured labelling
    model, without any promoted adapter). ``base`` trains nothing."""
    if arm not in ARMS:
        raise TrainingError(f"unknown arm {arm!r}: use one of {', '.join(ARMS)}")
    t = settings.training
    device = training_device(settings)
    threads = t.threads or settings.threads
    if device == "cpu":
        set_threads(threads)
    if arm == "base":
        return TrainResult(arm, None, len(groups), 0, 0, 0.0, _peak_rss_mb(), None, device)
    if model is None or tokenizer is None:
        from persona_tasks.labelling.model import load_causal_lm

        model, tokenizer, _ = load_causal_lm(settings, adapter=False)
    model.to(device)
    model.train()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    k = max((len(g["completions"]) for g in groups), default=2)
    if arm in ("groupwise", "pairwise_shared"):
        rows = group_rows(groups)
        args = DPOConfig(**_common_args(settings, output_dir / "checkpoints", device, t.groups_per_batch),
                         beta=t.beta, precompute_ref_log_probs=False)
        cls = GroupDPOTrainer if arm == "groupwise" else BestVsRestDPOTrainer
        make = lambda ds: cls(model=model, args=args, train_dataset=ds, processing_class=tokenizer,  # noqa: E731
                              peft_config=lora_config(settings))
    elif arm == "pairwise":
        rows = pair_rows(groups)
        # the same sequences per step as the groupwise arm: groups_per_batch * K sequences = that many / 2 pairs
        args = DPOConfig(**_common_args(settings, output_dir / "checkpoints", device,
                                        max(1, t.groups_per_batch * k // 2)),
                         beta=t.beta, loss_type=["sigmoid"], precompute_ref_log_probs=False)
        make = lambda ds: DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,  # noqa: E731
                                     peft_config=lora_config(settings))
    else:
        rows = sft_rows(groups)
        args = SFTConfig(**_common_args(settings, output_dir / "checkpoints", device, t.groups_per_batch),
                         completion_only_loss=True, packing=False)
        make = lambda ds: SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,  # noqa: E731
                                     peft_config=lora_config(settings))
    if not rows:
        raise TrainingError(f"arm {arm}: no usable training rows in {len(groups)} groups (every group tied?)")
    log.info("train %s: %d groups -> %d rows on %s (%s threads)", arm, len(groups), len(rows), device,
             threads if device == "cpu" else "-")
    t0 = time.perf_counter()
    trainer = make(Dataset.from_list(rows))
    out = trainer.train()
    seconds = time.perf_counter() - t0
    adapter_dir = output_dir / "adapter"
    trainer.model.save_pretrained(str(adapter_dir))
    history = [h for h in trainer.state.log_history]
    result = TrainResult(arm, adapter_dir, len(groups), len(rows), int(out.global_step), round(seconds, 2),
                         round(_peak_rss_mb(), 1),
                         round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
                         device, history)
    (output_dir / "train_result.json").write_text(json.dumps(result.as_dict(), indent=1, default=str))
    log.info("train %s: %d steps in %.1fs (%.2f s/step), peak RSS %.0f MB", arm, result.steps, seconds,
             seconds / max(result.steps, 1), result.peak_rss_mb)
    # the trained model is adapted in place: drop the adapter so a caller's base model object stays the base
    if hasattr(trainer.model, "unload"):
        trainer.model.unload()
    return result
