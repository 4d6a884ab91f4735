"""Budget allocation around any ranking policy: PyramidKV (per-layer budgets) and AdaKV (per-head budgets).

A wrapper is a policy of its own (``build_policy("pyramid", inner="snapkv", budget="25%")``): ``inner`` names
the ranking policy (any registered `BudgetedPolicy` that defines `ranking`: snapkv, h2o, tova, knorm, ...) and
``inner_settings`` holds that policy's own settings (``{"pool_kernel": 5}``; on the eval CLI
``'policies.overrides.pyramid.inner_settings={pool_kernel: 5}'``). The wrapper's ``budget`` is the average
entries per slot and KV head; the inner policy scores, ranks and protects exactly as it does alone.

Per-head counts are stored at one length per slot: a head that keeps fewer entries than the slot's longest is
padded in front with entries at position -1 (zero K and V). Padding gets exactly zero attention (attention.py
masks it per head, in the output and in the scores), is ranked below everything, and is not counted as held
(`PolicyCache.tokens_held`, `cache_nbytes`: what a ragged layout, like AdaKV's flattened cache, would store).
The padded tensors themselves are real memory here: a slot costs (longest head) x heads entries until it is
compacted, which is the price of running on plain SDPA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import SwiftKVInputError
from .base import POLICIES, BudgetedPolicy, SlotView, StepInfo, build_policy

__all__ = ["BudgetAllocation", "PyramidKV", "AdaKV", "pyramid_budgets"]


@dataclass(kw_only=True)
class BudgetAllocation(BudgetedPolicy):
    """A budget wrapper: runs ``inner`` (a ranking policy, built with ``inner_settings`` and the wrapper's budget)
    and decides how many entries each slot or head keeps."""

    inner: str = "snapkv"
    inner_settings: dict = field(default_factory=dict)
    policy: BudgetedPolicy | None = field(default=None, init=False, repr=False, compare=False)

    def validate(self):
        super().validate()
        cls = POLICIES.get(self.inner)
        if (cls is None or not issubclass(cls, BudgetedPolicy) or issubclass(cls, BudgetAllocation)
                or cls.ranking is BudgetedPolicy.ranking):
            rankers = sorted(n for n, c in POLICIES.items() if issubclass(c, BudgetedPolicy)
                             and not issubclass(c, BudgetAllocation) and c.ranking is not BudgetedPolicy.ranking)
            self.refuse("inner", f"must name a policy that ranks entries: one of {', '.join(rankers)}")
        if not isinstance(self.inner_settings, dict):
            self.refuse("inner_settings", "must be a mapping of the inner policy's settings")
        if "budget" in self.inner_settings:
            self.refuse("inner_settings", f"must not set a budget: the {self.name!r} budget is the inner policy's")
        try:
            self.policy = build_policy(self.inner, budget=self.budget, **self.inner_settings)
        except SwiftKVInputError as err:
            raise SwiftKVInputError(f"cache policy {self.name!r}: inner_settings: {err}") from None

    # The inner policy's traits and score protocol, unchanged.
    @property
    def needs_attention(self):
        return self.policy.needs_attention

    @property
    def uses_scores(self):
        return self.policy.uses_scores

    @property
    def scores_queries(self):
        return self.policy.scores_queries

    @property
    def fresh_scores(self):
        return self.policy.fresh_scores

    @property
    def observation_window(self):
        return self.policy.observation_window

    @property
    def evict_during_decode(self):
        return self.policy.evict_during_decode

    def settings(self) -> dict:
        out = super().settings()
        out["inner_settings"] = {k: v for k, v in self.policy.settings().items() if k not in ("name", "budget")}
        return out

    def scores_from(self, model):
        return self.policy.scores_from(model)

    def start(self, prompt_len, max_new_tokens):
        super().start(prompt_len, max_new_tokens)
        self.policy.start(prompt_len, max_new_tokens)

    def attention_contribution(self, slot, logits, row_start, step):
        return self.policy.attention_contribution(slot, logits, row_start, step)

    def query_scores(self, slot, queries, step):
        return self.policy.query_scores(slot, queries, step)

    def accumulate(self, old, contribution):
        return self.policy.accumulate(old, contribution)

    def ranking(self, view: SlotView, step: StepInfo):
        return self.policy.ranking(view, step)

    def protected(self):
        return self.slot_protected(None)


def pyramid_budgets(capacity: int, prompt_len: int, slots: int, window: int, beta: float) -> list[int]:
    """PyramidKV's per-layer budgets, summing to ``slots * capacity``.

    The schedule of the PyramidKV reference code (KVCache-Factory, also kvpress's PyramidKVPress): besides the
    protected ``window``, layer l keeps an arithmetic sequence from max_n (lowest layer) down to min_n (top),
    with min_n = (capacity - window) / beta and max_n = 2 (capacity - window) - min_n, so the mean is the capacity;
    max_n is capped at what the prompt has (prompt - window), min_n raised to keep the mean. Rounded by largest
    remainder (ties to lower layers), so the total is exact. Uniform when nothing can be moved (one slot, a budget
    that holds the prompt, or a window that fills the budget).
    """
    if slots <= 1 or capacity >= prompt_len or window >= capacity:
        return [capacity] * slots
    spare = capacity - window
    min_n = spare / beta
    max_n = 2 * spare - min_n
    if max_n > prompt_len - window:
        max_n = prompt_len - window
        min_n = 2 * spare - max_n
    step = (max_n - min_n) / (slots - 1)
    real = [window + max_n - layer * step for layer in range(slots)]
    sizes = [math.floor(r + 1e-9) for r in real]
    short = slots * capacity - sum(sizes)
    by_remainder = sorted(range(slots), key=lambda layer: (-(real[layer] - sizes[layer]), layer))
    for layer in by_remainder[:short]:
        sizes[layer] += 1
    return sizes


@dataclass(kw_only=True)
class PyramidKV(BudgetAllocation):
    """PyramidKV: more entries in lower layers, fewer in upper ones (a linear pyramid); the layers' mean is
    ``budget``. ``beta``: steepness (top layer keeps (budget - window) / beta beyond the window; paper 20).

    Layer budgets come from `pyramid_budgets` over the model's cache slots, with the inner policy's protected
    entries as the window; the inner policy then selects in each slot with that slot's budget (its protected
    ends computed for it). Cai et al. 2024, arXiv:2406.02069.
    """

    name = "pyramid"

    beta: float = 20.0
    budgets: list | None = field(default=None, init=False, repr=False, compare=False)  # per slot, this sequence
    prompt_len: int = field(default=0, init=False, repr=False, compare=False)

    def validate(self):
        super().validate()
        if self.beta < 1:
            self.refuse("beta", "must be >= 1 (1 = uniform budgets; larger = steeper pyramid)")

    def start(self, prompt_len, max_new_tokens):
        super().start(prompt_len, max_new_tokens)
        self.budgets, self.prompt_len = None, prompt_len

    def plan(self, slots: int) -> list[int]:
        if self.budgets is None or len(self.budgets) != slots:
            self.policy.capacity = self.capacity
            window = sum(self.policy.protected())
            self.budgets = pyramid_budgets(self.capacity, self.prompt_len, slots, window, self.beta)
        return self.budgets

    def slot_capacity(self, slot):
        if self.budgets is None:
            raise RuntimeError("PyramidKV budgets are known once the first step has run (they need the slot count)")
        return self.budgets[slot]

    def slot_protected(self, slot):
        self.policy.capacity = self.capacity if slot is None else self.slot_capacity(slot)
        try:
            return self.policy.protected()
        finally:
            self.policy.capacity = self.capacity

    def select(self, view: SlotView, step: StepInfo):
        self.plan(step.num_slots)
        self.policy.capacity = self.budgets[view.slot]
        try:
            return self.policy.select(view, step)
        finally:
            self.policy.capacity = self.capacity


@dataclass(kw_only=True)
class AdaKV(BudgetAllocation):
    """AdaKV: one budget per layer shared by its KV heads (heads x ``budget`` entries), spread by score.

    In every slot each head keeps the inner policy's protected entries (its oldest / newest ones) and its own
    ``alpha_safeguard`` x budget best-ranked entries (AdaKV's safeguard, kvpress default 0.2); the rest of the
    layer budget goes to the best-ranked entries over ALL heads, so heads that spread their attention keep more
    entries and peaked heads fewer. Per-head counts differ: see the module docstring for how they are stored.
    Feng et al. 2024, arXiv:2407.11550 (as kvpress's AdaKVPress).
    """

    name = "adakv"
    ragged = True

    alpha_safeguard: float = 0.2

    def validate(self):
        super().validate()
        self.check_share("alpha_safeguard")

    def slot_protected(self, slot):
        self.policy.capacity = self.capacity
        return self.policy.protected()

    def select(self, view: SlotView, step: StepInfo):
        batch, heads, length = view.positions.shape
        total = heads * self.capacity
        valid = view.positions >= 0
        counts = valid.sum(-1, keepdim=True)  # [B, H, 1]
        if int(counts.sum(dim=1).max()) <= total:
            return None
        self.policy.capacity = self.capacity
        oldest, newest = self.policy.protected()
        oldest = min(oldest, self.capacity)
        newest = min(newest, self.capacity - oldest)
        rank = self.policy.ranking(view, step).float()
        order = valid.cumsum(-1) - 1  # entry's rank by position among its head's real entries
        protected = valid & ((order < oldest) | (order >= counts - newest))
        inf = torch.tensor(float("inf"), device=rank.device)
        # The safeguard: each head's best max(alpha * budget, protected) entries, protected ones first.
        safe = math.floor(self.alpha_safeguard * self.capacity)
        guaranteed = protected
        if safe > 0:
            key = torch.where(protected, inf, torch.where(valid, rank, -inf))
            top = torch.sort(-key, dim=-1, stable=True).indices[..., :safe]
            guaranteed = protected | (torch.zeros_like(valid).scatter_(-1, top, True) & valid)
        # The layer budget over all heads: guaranteed entries, then the best-ranked anywhere.
        key = torch.where(guaranteed, inf, torch.where(valid, rank, -inf)).reshape(batch, heads * length)
        chosen = torch.sort(-key, dim=-1, stable=True).indices[:, :total]
        keep = torch.zeros(batch, heads * length, dtype=torch.bool, device=rank.device).scatter_(-1, chosen, True)
        keep = keep.reshape(batch, heads, length) & valid
        longest = int(keep.sum(-1).max())
        slots = torch.arange(length, device=rank.device).expand(batch, heads, length)
        # Ascending kept indices per head, padded in front with -1 (cache.PolicyLayer.keep, ragged).
        return torch.sort(torch.where(keep, slots, -1), dim=-1).values[..., length - longest:]
