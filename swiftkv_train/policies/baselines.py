"""Training-free eviction baselines (and the learned-score slot) on the one `CachePolicy` interface.

Each is a dataclass whose fields are its settings, with their defaults; `validate` checks what the types do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .base import Budget, BudgetedPolicy, CachePolicy, SlotView, StepInfo

__all__ = [
    "FullCache",
    "StreamingLLM",
    "H2O",
    "Keyformer",
    "SnapKV",
    "LearnedScorePolicy",
    "keyformer_noise_seed",
    "gumbel_noise",
]


@dataclass(kw_only=True)
class FullCache(CachePolicy):
    """Keeps everything: the reference every other policy is compared with."""

    name = "full"


@dataclass(kw_only=True)
class StreamingLLM(BudgetedPolicy):
    """Attention sinks (the first ``sink_tokens`` positions) plus the most recent tokens, ``budget`` in all."""

    name = "streaming_llm"

    sink_tokens: int = 4

    def validate(self):
        super().validate()
        if self.sink_tokens < 0:
            self.refuse("sink_tokens", "must be >= 0 (the first positions always kept)")

    def protected(self):
        sinks = min(self.sink_tokens, self.capacity)
        return sinks, self.capacity - sinks  # everything kept is protected: no ranking

    def ranking(self, view: SlotView, step: StepInfo):
        return torch.zeros(view.positions.shape, dtype=torch.float32, device=view.keys.device)


def _check_window(policy: BudgetedPolicy) -> None:
    if policy.observation_window is not None and policy.observation_window < 1:
        policy.refuse("observation_window", "must be >= 1 (the last query rows scored) or null (every row)")


@dataclass(kw_only=True)
class H2O(BudgetedPolicy):
    """Heavy hitters: accumulated attention probability (summed over query heads and steps) plus a recent window.

    ``recent_share`` of the budget goes to the newest tokens (H2O uses equal heavy and recent shares);
    ``observation_window``: score only the last n query rows of each step (null = every row).
    """

    name = "h2o"
    needs_attention = True
    uses_scores = True

    recent_share: float = 0.5
    observation_window: int | None = None

    def validate(self):
        super().validate()
        self.check_share("recent_share")
        _check_window(self)

    def recent_tokens(self) -> int:
        return math.floor(self.capacity * self.recent_share)

    def protected(self):
        return 0, self.recent_tokens()

    def ranking(self, view: SlotView, step: StepInfo):
        return view.scores


def keyformer_noise_seed(seed: int, slot: int, step: int, row_start: int) -> int:
    """Seed of the Gumbel noise for one (slot, decode step, query-row block): reproducible and order-free."""
    return (seed * 1_000_003 + slot * 10_007 + step * 101 + row_start) % (2**63 - 1)


def gumbel_noise(shape, seed: int, device) -> torch.Tensor:
    """Standard Gumbel(0, 1) samples: -log(-log(U)), U uniform in (0, 1), from a generator on ``device`` seeded
    ``seed`` (drawn where it is used: a CPU draw copied to the GPU made Keyformer's prefill 10x slower there).
    Reproducible per device type; CPU and CUDA streams differ."""
    generator = torch.Generator(device=device).manual_seed(seed)
    uniform = torch.rand(shape, generator=generator, dtype=torch.float32, device=device).clamp_(1e-10, 1 - 1e-7)
    return -torch.log(-torch.log(uniform))


@dataclass(kw_only=True)
class Keyformer(H2O):
    """Keyformer: Gumbel-regularised scores accumulated over decoding, recent window, budget from the prompt.

    Per step t (0 = the prompt, t = t-th generated token) and per query row: softmax((logits + ζ) / τ_t) with fresh
    Gumbel noise ζ, τ_t = τ_init + t·(τ_end − τ_init)/max_new_tokens; summed over query heads and rows and added to
    the running score. Budget k = ⌊prompt·kv_share⌋ and recent window w = ⌊k·recent_share⌋ are fixed at the prompt
    (paper defaults kv 50–60 %, recent 30 %, τ 1 → 2). Noise for (slot, step, row block) comes from
    `keyformer_noise_seed`, so runs are reproducible. Unlike the reference (which sums over the batch and shares
    one mask between beams) each sequence keeps its own scores.
    """

    name = "keyformer"

    budget: Budget | int | float | str | None = field(default="60%", kw_only=False)
    recent_share: float = 0.3
    tau_init: float = 1.0
    tau_end: float = 2.0
    seed: int = 0
    max_new_tokens: int = field(default=1, init=False, repr=False, compare=False)  # of the current sequence

    def validate(self):
        super().validate()
        for setting in ("tau_init", "tau_end"):
            if getattr(self, setting) <= 0:
                self.refuse(setting, "must be > 0 (a softmax temperature)")

    def start(self, prompt_len, max_new_tokens):
        super().start(prompt_len, max_new_tokens)
        self.max_new_tokens = max(1, max_new_tokens)

    def temperature(self, decode_step: int) -> float:
        return self.tau_init + decode_step * (self.tau_end - self.tau_init) / self.max_new_tokens

    def attention_contribution(self, slot, logits, row_start, step):
        noise = gumbel_noise(logits.shape, keyformer_noise_seed(self.seed, slot, step.decode_step, row_start),
                             logits.device)
        tau = self.temperature(step.decode_step)
        return torch.softmax((logits + noise) / tau, dim=-1).sum(dim=(2, 3))


@dataclass(kw_only=True)
class SnapKV(BudgetedPolicy):
    """SnapKV-style: score the prompt once from its last ``observation_window`` queries (pooled over neighbours,
    ``pool_kernel`` wide), keep the top entries plus the window itself, then let the cache grow during decoding."""

    name = "snapkv"
    needs_attention = True
    uses_scores = True
    evict_during_decode = False

    observation_window: int = 32
    pool_kernel: int = 7

    def validate(self):
        super().validate()
        _check_window(self)
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            self.refuse("pool_kernel", "must be odd and >= 1 (a centred max-pool width)")

    def protected(self):
        return 0, min(self.observation_window, self.capacity)  # the observation window itself

    def ranking(self, view, step):
        scores = view.scores
        batch, heads, length = scores.shape
        return torch.nn.functional.max_pool1d(
            scores.reshape(batch * heads, 1, length), self.pool_kernel, stride=1, padding=self.pool_kernel // 2
        ).reshape(batch, heads, length)

    def select(self, view, step):
        if self.capacity >= view.length:
            return None  # (the pooling is not needed)
        return super().select(view, step)


@dataclass(kw_only=True)
class LearnedScorePolicy(BudgetedPolicy):
    """Rank by scores the MODEL pushes (`record_token_scores`): a scorer trained into the model.

    A scorer plugs in like this: the model's attention module computes the importance score of each new token and
    KV head from what it already has, and calls ``record_token_scores(self, scores)`` after its cache update (a
    forward hook installed by the policy's `scores_from(model)` can do it for a model that does not). The policy
    then keeps the ``stabilizers`` newest entries plus the top-scoring rest up to the budget, after every prefill
    chunk (``prefill_chunk`` in `greedy_generate`) and, if ``evict_during_decode``, while decoding. Positions stay
    original (with RoPE applied before caching they cannot be re-compacted here).
    """

    name = "learned"
    uses_scores = True

    stabilizers: int = 0
    evict_during_decode: bool = False

    def validate(self):
        super().validate()
        if self.stabilizers < 0:
            self.refuse("stabilizers", "must be >= 0 (the newest entries always kept)")

    def protected(self):
        return 0, self.stabilizers

    def ranking(self, view, step):
        return view.scores
