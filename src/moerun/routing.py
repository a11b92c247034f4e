"""Routing: router logits -> (expert ids, weights) -> a RoutingPlan that groups tokens by expert.

Shape legend: T tokens, k experts per token, E routed experts, H hidden size,
S = T*k (token, expert) slots, G non-empty expert groups.

Three routing modes cover the supported families:

- ``softmax_topk``: softmax over all experts, top-k, optional renormalisation
  (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).
- ``sigmoid_group_topk``: sigmoid scores, a per-expert bias that only affects the choice,
  group-limited top-k, optional renormalisation and a routed scaling factor (DeepSeek-V3).
- ``topk_softmax``: top-k over the (biased) logits, softmax over the selected ones (GPT-OSS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROUTING_MODES = ("softmax_topk", "sigmoid_group_topk", "topk_softmax")


@dataclass(frozen=True)
class RoutingConfig:
    """How a router turns logits into expert choices.

    Args:
        mode: one of ``ROUTING_MODES``.
        top_k: experts per token.
        renormalize: rescale the selected weights to sum to one (softmax_topk, sigmoid_group_topk).
        n_group: expert groups for group-limited routing (sigmoid_group_topk).
        topk_group: groups each token may choose from (sigmoid_group_topk).
        routed_scaling_factor: multiplier on the final weights.
    """

    mode: str = "softmax_topk"
    top_k: int = 2
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def validate(self, num_experts: int) -> None:
        """Raise ValueError if this config cannot route over ``num_experts`` experts."""
        if self.mode not in ROUTING_MODES:
            raise ValueError(f"unknown routing mode {self.mode!r}; expected one of {', '.join(ROUTING_MODES)}")
        if not 1 <= self.top_k <= num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and the expert count {num_experts}")
        if self.mode == "sigmoid_group_topk":
            if self.n_group < 1 or num_experts % self.n_group:
                raise ValueError(f"n_group={self.n_group} must divide the expert count {num_experts}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}")
            per_group = num_experts // self.n_group
            if per_group < 2:
                raise ValueError("group-limited routing needs at least 2 experts per group")
            if self.top_k > self.topk_group * per_group:
                raise ValueError(
                    f"top_k={self.top_k} exceeds the {self.topk_group * per_group} experts "
                    f"in the {self.topk_group} selectable groups"
                )


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [tokens, experts], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"router logits must be floating point, got {logits.dtype}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("router logits contain NaN or infinite values")


def route_topk_softmax(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, then top-k.

    Args:
        logits: [T, E] router logits, any float dtype.
        top_k: experts per token.
        renormalize: divide the selected probabilities by their sum.

    Returns:
        weights [T, k] float32 and ids [T, k] int64.
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def route_topk_softmax_selected(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the logits, softmax over the selected logits only (GPT-OSS).

    Args:
        logits: [T, E] router logits (router bias already added).
        top_k: experts per token.

    Returns:
        weights [T, k] float32 and ids [T, k] int64.
    """
    top, ids = torch.topk(logits, top_k, dim=-1)  # [T, k]
    # GPT-OSS takes the softmax in the logits' dtype; matching it keeps bf16 outputs identical.
    weights = torch.softmax(top, dim=-1, dtype=top.dtype).float()
    return weights, ids


def route_sigmoid_group_topk(
    logits: torch.Tensor,
    top_k: int,
    score_bias: torch.Tensor | None,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: sigmoid scores, bias-corrected group-limited top-k.

    The bias only steers which experts are chosen; the weights are the unbiased scores.
    A group's score is the sum of its two best biased expert scores.

    Args:
        logits: [T, E] router logits.
        top_k: experts per token.
        score_bias: [E] per-expert correction added to the scores for the choice, or None.
        n_group: number of expert groups (E must be divisible by it).
        topk_group: groups a token may take experts from.
        renormalize: divide the selected scores by their sum.
        routed_scaling_factor: multiplier on the final weights.

    Returns:
        weights [T, k] float32 and ids [T, k] int64.
    """
    num_tokens, num_experts = logits.shape
    scores = logits.float().sigmoid()  # [T, E]
    choice = scores if score_bias is None else scores + score_bias.float()
    if n_group > 1:
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, n_group]
        keep_groups = torch.topk(group_scores, topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
        expert_mask = group_mask.repeat_interleave(num_experts // n_group, dim=1)  # [T, E]
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1, sorted=False).indices  # [T, k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids


def route(
    logits: torch.Tensor, config: RoutingConfig, score_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the routing function named by ``config.mode``.

    Args:
        logits: [T, E] router logits.
        config: the routing configuration.
        score_bias: [E] choice-only bias for ``sigmoid_group_topk``.

    Returns:
        weights [T, k] float32 and ids [T, k] int64.

    Raises:
        ValueError: bad shapes, non-finite logits, or a config that cannot route E experts.
    """
    _check_logits(logits)
    config.validate(logits.shape[1])
    if config.mode != "sigmoid_group_topk":
        if config.mode == "softmax_topk":
            weights, ids = route_topk_softmax(logits, config.top_k, config.renormalize)
        else:
            weights, ids = route_topk_softmax_selected(logits, config.top_k)
        # DeepSeek-V2 scales softmax weights too; skip the multiply in the common case so results stay exact.
        if config.routed_scaling_factor != 1.0:
            weights = weights * config.routed_scaling_factor
        return weights, ids
    if score_bias is not None and score_bias.shape != (logits.shape[1],):
        raise ValueError(
            f"score_bias must have shape ({logits.shape[1]},) to match the logits, got {tuple(score_bias.shape)}"
        )
    return route_sigmoid_group_topk(
        logits,
        config.top_k,
        score_bias,
        config.n_group,
        config.topk_group,
        config.renormalize,
        config.routed_scaling_factor,
    )


SKIP_MODES = ("threshold", "top_p")


@dataclass(frozen=True)
class ExpertSkipping:
    """Dynamic expert skipping: drop the (token, expert) pairs the router weighs least, so those experts are
    neither computed nor read.

    - ``threshold``: drop a token's expert when its router weight is below ``level`` (beta, in [0, 1]) times
      the token's top weight (MC-MoE's online pruning). The ratio is the same for normalised and raw weights,
      so it applies to every routing mode; ``calibrate_threshold`` picks beta for a target skipped share.
    - ``top_p``: take a token's experts in weight order until their cumulative softmax probability reaches
      ``level`` (p, in (0, 1]), at most k ("Harder Tasks Need More Experts"). Softmax top-k routing only: the
      others have no probability over all experts (sigmoid scores; a softmax over the chosen k only).

    A token's top expert is always kept. Where the routing renormalises (or softmaxes over the chosen experts,
    GPT-OSS), the kept weights are rescaled to the original sum; otherwise they keep their values.
    """

    mode: str
    level: float

    def validate(self, routing: RoutingConfig) -> None:
        """Raise ValueError if this skipping cannot apply to ``routing``."""
        if self.mode not in SKIP_MODES:
            raise ValueError(f"unknown expert skipping mode {self.mode!r}; expected one of {', '.join(SKIP_MODES)}")
        if self.mode == "threshold" and not 0.0 <= self.level <= 1.0:
            raise ValueError(f"threshold skipping needs beta in [0, 1], got {self.level}")
        if self.mode == "top_p":
            if not 0.0 < self.level <= 1.0:
                raise ValueError(f"top-p routing needs p in (0, 1], got {self.level}")
            if routing.mode != "softmax_topk":
                raise ValueError(
                    f"top-p routing needs softmax top-k routing (probabilities over all experts); {routing.mode} "
                    "has none: use threshold skipping"
                )


def skip_experts(
    logits: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    skipping: ExpertSkipping,
    config: RoutingConfig,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the pairs ``skipping`` says to: their ids become the sentinel ``num_experts`` (``make_plan`` drops
    them) and their weights zero.

    Args:
        logits: [T, E] router logits (top-p reads the softmax probabilities from them).
        weights: [T, k] float32 router weights, ids: [T, k] int64 expert ids, as ``route`` returns them.
        skipping: what to drop (validated against ``config`` by the caller).
        config: the routing the weights came from.
        num_experts: E, the sentinel id.

    Returns:
        weights [T, k] float32 and ids [T, k] int64, the dropped pairs as sentinels.
    """
    order = weights.argsort(dim=1, descending=True, stable=True)  # [T, k]
    in_order = weights.gather(1, order)
    if skipping.mode == "threshold":
        keep_in_order = in_order >= skipping.level * in_order[:, :1]
    else:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(1, ids).gather(1, order)  # [T, k]
        keep_in_order = (probs.cumsum(dim=1) - probs) < skipping.level  # mass before each expert
        keep_in_order[:, 0] = True
    keep = torch.empty_like(keep_in_order).scatter_(1, order, keep_in_order)  # [T, k]
    kept = torch.where(keep, weights, torch.zeros_like(weights))
    if config.renormalize or config.mode == "topk_softmax":
        kept = kept * (weights.sum(dim=1, keepdim=True) / kept.sum(dim=1, keepdim=True))
    return kept, torch.where(keep, ids, torch.full_like(ids, num_experts))


def calibrate_threshold(weights: torch.Tensor, skip_share: float) -> float:
    """The beta of threshold skipping that drops ``skip_share`` of all (token, expert) pairs of ``weights``.

    Args:
        weights: [T, k] router weights of calibration tokens.
        skip_share: the share of the T*k pairs to drop, in [0, (k-1)/k] (the top expert always stays).

    Returns:
        beta in [0, 1]: midway between the last ratio dropped and the first kept, so the calibration tokens drop
        the share exactly (ties aside).
    """
    num_tokens, top_k = weights.shape
    if not 0.0 <= skip_share <= (top_k - 1) / top_k:
        raise ValueError(f"with top-{top_k} routing at most {(top_k - 1) / top_k:.0%} of pairs can be skipped")
    dropped = round(skip_share * num_tokens * top_k)
    if dropped == 0 or num_tokens == 0:
        return 0.0
    top = weights.max(dim=1, keepdim=True).values.clamp_min(1e-30)
    ratios = (weights / top).sort(dim=1, descending=True).values[:, 1:].flatten().sort().values  # [T*(k-1)]
    last_dropped = float(ratios[dropped - 1])
    first_kept = float(ratios[dropped]) if dropped < ratios.numel() else 1.0
    return min(1.0, (last_dropped + first_kept) / 2 if first_kept > last_dropped else math.nextafter(last_dropped, 2))


@dataclass(frozen=True)
class RoutingPlan:
    """Tokens sorted into contiguous per-expert groups, computed once and shared by both expert GEMMs.

    Slot s of the sorted order is (token ``token_index[s]``, weight ``weights[s]``) and belongs to
    the group whose range [group_starts[g], group_starts[g] + group_counts[g]) contains s.

    Attributes:
        num_tokens: T.
        token_index: [S] int64 token of each sorted slot.
        weights: [S] float32 router weight of each sorted slot.
        counts: [E] int64 slots per expert (zeros included).
        group_experts: [G] int64 ids of the experts that received tokens, ascending.
        group_starts: [G] int64 first sorted slot of each group.
        group_counts: [G] int64 slots in each group (all >= 1).
        top_k: k, slots per token before sentinels were dropped.
        slot_of: [S] int64 position t*k + j in the token-major [T, k] layout of each sorted slot.
    """

    num_tokens: int
    token_index: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    group_experts: torch.Tensor
    group_starts: torch.Tensor
    group_counts: torch.Tensor
    top_k: int
    slot_of: torch.Tensor

    @property
    def num_slots(self) -> int:
        return self.token_index.shape[0]

    @property
    def num_groups(self) -> int:
        return self.group_experts.shape[0]


def make_plan(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Sort (token, expert) slots by expert into contiguous groups, with no Python loop over tokens.

    Ids >= ``num_experts`` are expert-parallel sentinels (transformers' convention): they are dropped.

    Args:
        ids: [T, k] int expert ids.
        weights: [T, k] router weights (any float dtype; stored as float32).
        num_experts: E.

    Returns:
        the RoutingPlan.
    """
    if ids.shape != weights.shape or ids.dim() != 2:
        raise ValueError(
            f"expert ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be [tokens, top_k]"
        )
    num_tokens, top_k = ids.shape
    flat_ids = ids.reshape(-1).long()  # [S]
    if flat_ids.numel() and int(flat_ids.min()) < 0:
        raise ValueError("expert ids must be non-negative")
    # A stable sort keeps each expert's tokens in token order, so results do not depend on sort internals.
    sorted_ids, order = torch.sort(flat_ids, stable=True)  # [S]
    counts = torch.bincount(flat_ids, minlength=num_experts)[:num_experts]  # [E]
    num_valid = int(counts.sum())
    order = order[:num_valid]
    group_experts = torch.nonzero(counts).flatten()  # [G]
    group_counts = counts[group_experts]
    group_starts = torch.cumsum(group_counts, 0) - group_counts
    return RoutingPlan(
        num_tokens=num_tokens,
        token_index=torch.div(order, top_k, rounding_mode="floor"),
        weights=weights.reshape(-1).float()[order],
        counts=counts,
        group_experts=group_experts,
        group_starts=group_starts,
        group_counts=group_counts,
        top_k=top_k,
        slot_of=order,
    )
