"""Groupwise DPO: the Plackett-Luce likelihood of a group's ranking over DPO's implicit rewards.

For a prompt x with K candidates y_1..y_K the implicit reward of candidate i is (DPO, Rafailov et al. 2023)

    r_i = beta * (log pi_theta(y_i | x) - log pi_ref(y_i | x)).

The quality objective ranks the group (best first; an invalid candidate ranks last). Plackett-Luce gives a
ranking pi the probability prod_{s=1..K} exp(r_pi(s)) / sum_{t>=s} exp(r_pi(t)); the loss is its negative log,

    L = - sum_i [ r_i - logsumexp_{j in D(i)} r_j ],   D(i) = {i} + {j : rank_j > rank_i}  (strictly worse),

averaged over groups. With K = 2 and no tie this is -log sigmoid(r_best - r_other): trl's ``sigmoid`` DPO loss
(tests/test_train_loss.py checks it against DPOTrainer's own loss path).

Ties (equal ranks: several invalid candidates, equal objectives): a tied block is a set with no order. Each member
of the block is compared only with the strictly worse candidates (``D(i)`` above excludes its tied peers), so no
order is imposed inside a block and a group whose candidates are all tied contributes 0 (no signal, no gradient).
Without ties ``D(i)`` is exactly the Plackett-Luce risk set {j : rank_j >= rank_i}. With ties the value is not a
normalised likelihood (every member of a block is scored as if it came first in it); that is the intended
behaviour: the data says "these are better than those", nothing more.

Padding: groups of different sizes share a batch; ``mask`` marks real candidates (padded ones take no part).

``best_vs_rest_dpo_loss`` is the pairwise arm's loss on the same batches: trl's sigmoid DPO loss over the pairs
trl's DPOTrainer arm trains on (each best-ranked candidate against each strictly worse one), averaged over pairs,
so that pairwise and groupwise DPO can be compared at the same cost (each prompt run once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupLoss:
    """The loss and what gets logged with it (all detached except ``loss``)."""

    loss: torch.Tensor          # mean over groups with at least one strict preference (best-vs-rest: over pairs)
    rewards: torch.Tensor       # (B, K) implicit rewards, detached
    margin: torch.Tensor        # mean over groups of (reward of the best block's mean) - (mean of the others)
    #                             (best-vs-rest: mean reward difference over its pairs, trl's rewards/margins)
    ranking_accuracy: torch.Tensor  # share of the loss's pairs whose rewards are ordered as the ranks
    n_pairs: int                # pairs in the batch (groupwise: every strictly ordered pair; best-vs-rest: its pairs)


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * (log pi_theta - log pi_ref), per candidate."""
    return beta * (policy_logps - ref_logps)


def _checked_mask(policy_logps: torch.Tensor, ref_logps: torch.Tensor, ranks: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """The (groups, candidates) mask of a batch, after checking that its tensors agree in shape."""
    if policy_logps.shape != ref_logps.shape or policy_logps.shape != ranks.shape or policy_logps.dim() != 2:
        raise ValueError(f"policy_logps {tuple(policy_logps.shape)}, ref_logps {tuple(ref_logps.shape)} and ranks "
                         f"{tuple(ranks.shape)} must be the same (groups, candidates) shape")
    if mask is None:
        mask = torch.ones_like(ranks, dtype=torch.bool)
    mask = mask.to(torch.bool)
    return mask


def best_block(ranks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, K) bool: the real candidates of each group's best rank (its best block)."""
    lowest = torch.where(mask, ranks, torch.full_like(ranks, torch.iinfo(ranks.dtype).max)).min(dim=-1, keepdim=True)
    return mask & (ranks == lowest.values)


def groupwise_dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, ranks: torch.Tensor, beta: float,
                       mask: torch.Tensor | None = None) -> GroupLoss:
    """Plackett-Luce DPO loss of a batch of groups.

    ``policy_logps`` / ``ref_logps``: (B, K) summed completion log-probabilities under the policy and the
    reference; ``ranks``: (B, K) integers, 0 = best, equal values = tied; ``mask``: (B, K) bool, False for padding.
    """
    mask = _checked_mask(policy_logps, ref_logps, ranks, mask)
    r = implicit_rewards(policy_logps, ref_logps, beta)
    rk = ranks.to(r.device)
    # worse[b, i, j]: j is a real candidate strictly worse than i
    worse = (rk[:, None, :] > rk[:, :, None]) & mask[:, None, :] & mask[:, :, None]
    eye = torch.eye(r.shape[1], dtype=torch.bool, device=r.device)[None]
    risk = worse | (eye & mask[:, :, None])
    neg_inf = torch.finfo(r.dtype).min
    denom = torch.logsumexp(torch.where(risk, r[:, None, :].expand_as(risk), torch.full_like(risk, neg_inf,
                                                                                             dtype=r.dtype)), dim=-1)
    # candidates with nothing strictly worse (the last block, padding) contribute exactly 0
    has_worse = worse.any(dim=-1)
    terms = torch.where(has_worse, r - denom, torch.zeros_like(r))
    group_has_pair = has_worse.any(dim=-1)
    per_group = -terms.sum(dim=-1)
    n_groups = int(group_has_pair.sum())
    loss = per_group[group_has_pair].sum() / n_groups if n_groups else (r * 0.0).sum()

    with torch.no_grad():
        rd = r.detach()
        n_pairs = int(worse.sum())
        correct = (worse & (rd[:, :, None] > rd[:, None, :])).sum()
        accuracy = correct.float() / n_pairs if n_pairs else torch.tensor(float("nan"))
        best = best_block(rk, mask)
        others = mask & ~best
        best_mean = (rd * best).sum(-1) / best.sum(-1).clamp(min=1)
        other_mean = (rd * others).sum(-1) / others.sum(-1).clamp(min=1)
        margin = (best_mean - other_mean)[group_has_pair].mean() if n_groups else torch.tensor(float("nan"))
    return GroupLoss(loss=loss, rewards=rd, margin=margin, ranking_accuracy=accuracy, n_pairs=n_pairs)


def best_vs_rest_dpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, ranks: torch.Tensor, beta: float,
                          mask: torch.Tensor | None = None) -> GroupLoss:
    """Pairwise DPO (trl's ``sigmoid`` loss, -log sigmoid(r_chosen - r_rejected)) of a batch of groups, over every
    pair (i, j) with i in its group's best block and j strictly worse: the pairs of ``trainer.pair_rows``. The mean
    is over pairs, as trl averages over the pairs of its batch; ``margin`` and ``ranking_accuracy`` are trl's
    ``rewards/margins`` and ``rewards/accuracies`` of those pairs. Shapes as ``groupwise_dpo_loss``."""
    mask = _checked_mask(policy_logps, ref_logps, ranks, mask)
    r = implicit_rewards(policy_logps, ref_logps, beta)
    rk = ranks.to(r.device)
    best = best_block(rk, mask)
    pairs = best[:, :, None] & (rk[:, None, :] > rk[:, :, None]) & mask[:, None, :]
    diff = r[:, :, None] - r[:, None, :]
    n_pairs = int(pairs.sum())
    loss = -torch.nn.functional.logsigmoid(diff[pairs]).mean() if n_pairs else (r * 0.0).sum()
    with torch.no_grad():
        d = diff.detach()[pairs]
        margin = d.mean() if n_pairs else torch.tensor(float("nan"))
        accuracy = (d > 0).float().mean() if n_pairs else torch.tensor(float("nan"))
    return GroupLoss(loss=loss, rewards=r.detach(), margin=margin, ranking_accuracy=accuracy, n_pairs=n_pairs)


def ranks_from_scores(scores: list[float | None], valid: list[bool], tie_tolerance: float = 0.0) -> list[int]:
    """Dense ranks (0 = best) of a group: valid candidates by score, descending; invalid ones (or a missing/NaN
    score) share the last rank. Consecutive valid scores within ``tie_tolerance`` of the first score of their block
    are tied (a block is closed when a score falls further below its first member)."""
    import math

    ok = [bool(v) and s is not None and not math.isnan(float(s)) for s, v in zip(scores, valid)]
    order = sorted((i for i in range(len(scores)) if ok[i]), key=lambda i: -float(scores[i]))  # type: ignore[arg-type]
    ranks = [0] * len(scores)
    rank, head = -1, None
    for i in order:
        s = float(scores[i])  # type: ignore[arg-type]
        if head is None or head - s > tie_tolerance:
            rank, head = rank + 1, s
        ranks[i] = rank
    for i in range(len(scores)):
        if not ok[i]:
            ranks[i] = rank + 1
    return ranks
