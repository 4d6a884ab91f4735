"""Training-free eviction baselines (and the learned-score slot) on the one `CachePolicy` interface."""

from __future__ import annotations

import math

import torch

from ..errors import SwiftKVInputError
from .base import CachePolicy, SlotView, StepInfo, recent_plus_top_k

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


def _share(value: float, field: str) -> float:
    if not 0 <= value <= 1:
        raise SwiftKVInputError(f"{field}={value} must be a share between 0 and 1.")
    return float(value)


class FullCache(CachePolicy):
    """Keeps everything: the reference every other policy is compared with."""

    name = "full"

    def __init__(self):
        super().__init__(None)


class _Budgeted(CachePolicy):
    def __init__(self, budget):
        if budget is None:
            raise SwiftKVInputError(f"policy {self.name!r} needs a budget (tokens, '50%' or '4x').")
        super().__init__(budget)


class StreamingLLM(_Budgeted):
    """Attention sinks (the first ``sink_tokens`` positions) plus the most recent tokens, ``budget`` in all."""

    name = "streaming_llm"

    def __init__(self, budget, sink_tokens: int = 4):
        super().__init__(budget)
        if sink_tokens < 0:
            raise SwiftKVInputError(f"sink_tokens={sink_tokens} must be >= 0.")
        self.sink_tokens = sink_tokens

    def select(self, view: SlotView, step: StepInfo):
        budget = self.capacity
        if view.length <= budget:
            return None
        sinks = min(self.sink_tokens, budget)
        zeros = torch.zeros(view.positions.shape, dtype=torch.float32, device=view.keys.device)
        return recent_plus_top_k(zeros, budget, recent=budget - sinks, sinks=sinks)

    def settings(self):
        return {**super().settings(), "sink_tokens": self.sink_tokens}


class H2O(_Budgeted):
    """Heavy hitters: accumulated attention probability (summed over query heads and steps) plus a recent window.

    ``recent_share`` of the budget goes to the newest tokens (H2O uses equal heavy and recent shares).
    """

    name = "h2o"
    needs_attention = True
    uses_scores = True

    def __init__(self, budget, recent_share: float = 0.5, observation_window: int | None = None):
        super().__init__(budget)
        self.recent_share = _share(recent_share, "recent_share")
        self.observation_window = observation_window

    def recent_tokens(self) -> int:
        return math.floor(self.capacity * self.recent_share)

    def select(self, view: SlotView, step: StepInfo):
        return recent_plus_top_k(view.scores, self.capacity, recent=self.recent_tokens())

    def settings(self):
        return {**super().settings(), "recent_share": self.recent_share, "observation_window": self.observation_window}


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

    def __init__(self, budget="60%", recent_share: float = 0.3, tau_init: float = 1.0, tau_end: float = 2.0,
                 seed: int = 0, observation_window: int | None = None):
        super().__init__(budget, recent_share, observation_window)
        if tau_init <= 0 or tau_end <= 0:
            raise SwiftKVInputError(f"tau_init={tau_init} and tau_end={tau_end} must be > 0.")
        self.tau_init, self.tau_end, self.seed = float(tau_init), float(tau_end), int(seed)
        self.max_new_tokens = 1

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

    def settings(self):
        return {**super().settings(), "tau_init": self.tau_init, "tau_end": self.tau_end, "seed": self.seed}


class SnapKV(_Budgeted):
    """SnapKV-style: score the prompt once from its last ``observation_window`` queries (pooled over neighbours),
    keep the top entries plus the window itself, then let the cache grow during decoding."""

    name = "snapkv"
    needs_attention = True
    uses_scores = True
    evict_during_decode = False

    def __init__(self, budget, observation_window: int = 32, pool_kernel: int = 7):
        super().__init__(budget)
        if observation_window < 1 or pool_kernel < 1 or pool_kernel % 2 == 0:
            raise SwiftKVInputError(
                f"observation_window={observation_window} must be >= 1 and pool_kernel={pool_kernel} odd and >= 1."
            )
        self.observation_window, self.pool_kernel = observation_window, pool_kernel

    def select(self, view, step):
        if self.capacity >= view.length:
            return None
        scores = view.scores
        batch, heads, length = scores.shape
        pooled = torch.nn.functional.max_pool1d(
            scores.reshape(batch * heads, 1, length), self.pool_kernel, stride=1, padding=self.pool_kernel // 2
        ).reshape(batch, heads, length)
        return recent_plus_top_k(pooled, self.capacity, recent=min(self.observation_window, self.capacity))

    def settings(self):
        return {**super().settings(), "observation_window": self.observation_window, "pool_kernel": self.pool_kernel}


class LearnedScorePolicy(_Budgeted):
    """Rank by scores the MODEL pushes (`record_token_scores`), e.g. Locret's retaining heads.

    Locret plugs in like this: its attention module computes the causal-importance score of each new token and KV
    head from the pre-RoPE q/k/v it already has, and calls ``record_token_scores(self, scores)`` after its cache
    update. The policy then keeps the ``stabilizers`` newest entries plus the top-scoring rest up to the budget,
    after every prefill chunk (``prefill_chunk`` in `greedy_generate`) and, if ``evict_during_decode``, while
    decoding (Locret itself does not evict during decoding). Positions stay original (Locret's reference re-compacts
    them; with RoPE applied before caching that is not possible here, which is the documented difference).
    """

    name = "learned"
    uses_scores = True

    def __init__(self, budget, stabilizers: int = 0, evict_during_decode: bool = False):
        super().__init__(budget)
        self.stabilizers = stabilizers
        self.evict_during_decode = evict_during_decode

    def select(self, view, step):
        return recent_plus_top_k(view.scores, self.capacity, recent=self.stabilizers)

    def settings(self):
        return {**super().settings(), "stabilizers": self.stabilizers, "evict_during_decode": self.evict_during_decode}
