"""`PolicyCache`: a transformers Cache whose slots shrink to what a `CachePolicy` keeps.

Each slot behaves like a `DynamicLayer` (K/V concatenated per step) and also records the original position of
every entry and the policy's running score. The generation loop (generate.py) brackets every forward with
`begin_step(positions)` and `end_step()`; `end_step` asks the policy which entries to keep and gathers K, V,
positions and scores. Eviction waits for the end of the step because transformers sizes the attention mask from
the cache length before the layers run: evicting inside the step would desynchronise mask and keys.

Kept keys carry their RoPE at the original positions, and new tokens are fed with their original positions, so
relative distances stay true (the H2O / Keyformer convention). The causal mask transformers builds from the cache
length is still right after eviction: every cached entry precedes every new query, and within the step the new
keys sit after the cached ones in the same order as the queries.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..cache_stats import cache_nbytes
from .base import CachePolicy, SlotView, StepInfo

__all__ = ["PolicyCache", "PolicyLayer", "tokens_held"]


class PolicyLayer(DynamicLayer):
    """A DynamicLayer plus per-entry original positions (int32) and, if the policy ranks by score, running fp32
    scores ([B, H_kv, L] each). This bookkeeping is real memory and `cache_nbytes` counts it."""

    def __init__(self, track_scores: bool = True, fresh_scores: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.track_scores = track_scores
        self.fresh_scores = fresh_scores  # zero every score when a step's keys arrive (`CachePolicy.fresh_scores`)
        self.positions: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        # Per-head budgets (`CachePolicy.ragged`): heads keep different numbers of entries, stored at one length
        # with padding entries (position -1, zero K/V) in front; attention.py masks them out, `held` skips them.
        self.ragged = False

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor):
        keys, values = super().update(key_states, value_states)
        batch, heads, new = key_states.shape[:3]
        new_pos = positions.to(key_states.device, torch.int32).view(1, 1, new).expand(batch, heads, new)
        self.positions = new_pos.clone() if self.positions is None else torch.cat([self.positions, new_pos], dim=-1)
        if self.track_scores and (self.fresh_scores or self.scores is None):
            self.scores = torch.zeros(self.positions.shape, dtype=torch.float32, device=key_states.device)
        elif self.track_scores:
            new_scores = torch.zeros(batch, heads, new, dtype=torch.float32, device=key_states.device)
            self.scores = torch.cat([self.scores, new_scores], dim=-1)
        return keys, values

    def keep(self, index: torch.Tensor, ragged: bool = False) -> None:
        """Keep entries ``index`` [B, H_kv, k] (ascending; with ``ragged``, -1 entries first are padding)."""
        pad = index < 0 if ragged else None
        if ragged:
            index = index.clamp(min=0)
        gather = index.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, gather.expand(-1, -1, -1, self.values.shape[-1]))
        self.positions = self.positions.gather(2, index)
        if self.scores is not None:
            self.scores = self.scores.gather(2, index)
        if ragged:
            self.ragged = True
            self.keys = self.keys.masked_fill(pad.unsqueeze(-1), 0)
            self.values = self.values.masked_fill(pad.unsqueeze(-1), 0)
            self.positions = self.positions.masked_fill(pad, -1)
            if self.scores is not None:
                self.scores = self.scores.masked_fill(pad, 0)

    def held(self) -> torch.Tensor:
        """Entries really held per sequence and KV head, [B, H_kv] (padding excluded)."""
        if self.ragged:
            return (self.positions >= 0).sum(-1)
        return torch.full(self.positions.shape[:2], self.positions.shape[-1], device=self.positions.device)

    def held_share(self) -> float | None:
        """Share of the stored entries that are real (None: all of them); `cache_nbytes` counts only those."""
        if not self.ragged or self.positions is None:
            return None
        return float((self.positions >= 0).float().mean())

    def reset(self) -> None:
        super().reset()
        self.positions = self.scores = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a policy cache cannot be cropped: positions are no longer contiguous")


class PolicyCache(Cache):
    """Cache for one batch of equal-length sequences run under ``policy`` (see module docstring)."""

    def __init__(self, policy: CachePolicy, prompt_len: int, max_new_tokens: int):
        super().__init__(layer_class_to_replicate=PolicyLayer)
        self.policy = policy
        self.step = StepInfo(prompt_len=prompt_len, max_new_tokens=max_new_tokens)
        self._positions: torch.Tensor | None = None
        self._token = None
        self.peak_nbytes = 0  # measured at the end of each prefill step, before its eviction: the prefill's peak
        # Frozen: no more eviction, and attention / pushed scores are ignored (the question-independent mode of
        # generate.greedy_generate freezes the cache once the context is compressed).
        self.frozen = False
        policy.start(prompt_len, max_new_tokens)

    def freeze(self) -> None:
        """From now on keep every entry and let no step's scores reach the policy."""
        self.frozen = True

    # -- the step protocol driven by the generation loop -------------------------------------------------------
    def begin_step(self, positions: torch.Tensor, decode_step: int) -> None:
        """The next forward feeds tokens at these original ``positions`` ([q] ints)."""
        self._positions = positions.reshape(-1)
        self.step.new_tokens = self._positions.numel()
        self.step.seen += self.step.new_tokens
        self.step.decode_step = decode_step

    def end_step(self) -> None:
        """Evict per the policy in every slot (prefill: after each chunk; decode: after each token)."""
        if self.step.is_prefill:
            self.peak_nbytes = max(self.peak_nbytes, cache_nbytes(self))
        if self.frozen or (not self.step.is_prefill and not self.policy.evict_during_decode):
            return
        self.step.num_slots = len(self.layers)
        for slot, layer in enumerate(self.layers):
            if layer.keys is None:
                continue
            view = SlotView(slot, layer.keys, layer.values, layer.positions, layer.scores)
            index = self.policy.select(view, self.step)
            if index is not None:
                layer.keep(index.to(layer.keys.device), ragged=self.policy.ragged)

    # -- transformers Cache API ---------------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self._positions is None:
            raise RuntimeError(
                "PolicyCache.update outside a step: drive it with swiftkv_train.policies.greedy_generate "
                "(model.generate does not announce original positions or step ends)."
            )
        while len(self.layers) <= layer_idx:
            self.layers.append(PolicyLayer(track_scores=self.policy.uses_scores,
                                           fresh_scores=self.policy.fresh_scores))
        if self._positions.numel() != key_states.shape[-2]:
            raise RuntimeError(
                f"step announced {self._positions.numel()} tokens but the model cached {key_states.shape[-2]}"
            )
        return self.layers[layer_idx].append(key_states, value_states, self._positions)

    # -- score inputs ------------------------------------------------------------------------------------------
    def add_attention_scores(self, slot: int, contribution: torch.Tensor) -> None:
        """Fold one step's per-key attention contribution [B, H_kv, L] into the slot's running score."""
        if self.frozen:
            return
        layer = self.layers[slot]
        layer.scores = self.policy.accumulate(layer.scores, contribution.to(layer.scores))

    def set_token_scores(self, slot: int, scores: torch.Tensor) -> None:
        """Scores of the step's NEW tokens, [B, H_kv, q], computed by the model (a learned scorer; it calls
        `active.record_token_scores`)."""
        if self.frozen:
            return
        layer = self.layers[slot]
        new = scores.shape[-1]
        layer.scores[..., -new:] = scores.to(layer.scores)

    def tokens_held(self) -> float:
        """Entries held per slot and KV head, averaged over slots, heads and the batch (padding excluded): the
        number of entries of every slot when the budget is uniform; per-layer / per-head budgets (budgets.py)
        keep this mean at the budget."""
        held = [layer.held().float().mean() for layer in self.layers if layer.keys is not None]
        if not held:
            return 0
        mean = float(torch.stack(held).mean())
        return int(mean) if mean == int(mean) else mean


def tokens_held(cache) -> float:
    """Entries a cache holds per layer (slot) and KV head: `PolicyCache.tokens_held`, else its length."""
    return cache.tokens_held() if isinstance(cache, PolicyCache) else cache.get_seq_length(0)

