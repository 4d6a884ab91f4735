"""The attention hook: plain SDPA for the output, plus attention scores for the policy, computed blockwise.

SDPA (and FlashAttention) never expose the attention probabilities, and a full S x S matrix for a long prompt is
too big. So after SDPA has produced the output, the hook recomputes the scaled logits of the step's query rows
(all rows, or the last ``policy.observation_window`` rows) against the keys it was given, ``row_block`` rows at
a time, and hands each masked block to the policy. Peak extra memory: B x H_q x row_block x K floats.

The output comes from transformers' own SDPA function with the same mask, so a policy that evicts nothing gives
bit-identical logits to the stock ``sdpa`` implementation.

transformers builds one mask per forward, sized from slot 0's length. When slots hold different numbers of
entries (per-layer budgets) or heads do (per-head budgets: padding entries, position -1), `fit_mask` adapts it to
the keys of this layer: every cached entry precedes the step's queries, so its columns are "attend", except
padding entries, which are masked per head (they get exactly zero attention, in the output and in the scores).
A policy that scores from queries (``scores_queries``: ExpectedAttention) gets them raw, with the model's RoPE.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from .active import active_cache, cache_slot
from .base import StepQueries

__all__ = ["POLICY_ATTENTION", "attention_rows", "cache_slot", "fit_mask", "register"]

POLICY_ATTENTION = "swiftkv_train_policy_sdpa"
ROW_BLOCK = 256


def attention_rows(query, key, attention_mask, scaling: float, rows: int | None = None, row_block: int = ROW_BLOCK):
    """Yield ``(row_start, logits)`` blocks over the last ``rows`` query rows (None = all).

    query [B, H_q, q, D], key [B, H_kv, K, D]; ``logits`` fp32 [B, H_kv, G, r, K] with masked entries at -inf.
    ``attention_mask`` is what SDPA received: a 4D bool (True = attend) or additive float mask, or None for plain
    causal attention (queries are the last q positions of the K keys).
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups, q_len, dim).float()
    key32 = key.float()
    first = 0 if rows is None else max(0, q_len - rows)
    for start in range(first, q_len, row_block):
        stop = min(start + row_block, q_len)
        logits = torch.einsum("bhgrd,bhkd->bhgrk", grouped[:, :, :, start:stop], key32) * scaling
        if attention_mask is None:
            query_pos = torch.arange(start, stop, device=key.device) + (k_len - q_len)
            allowed = torch.arange(k_len, device=key.device)[None, :] <= query_pos[:, None]
            logits = logits.masked_fill(~allowed, float("-inf"))
        else:
            block = attention_mask[:, :, start:stop, -k_len:]  # [B or 1, 1 or H_q, r, K]
            if block.shape[1] == 1:
                block = block.unsqueeze(2)  # broadcast over G
            else:  # per query head (padding entries of per-head budgets)
                block = block.reshape(block.shape[0], kv_heads, groups, block.shape[-2], k_len)
            if block.dtype == torch.bool:
                logits = logits.masked_fill(~block, float("-inf"))
            else:
                logits = logits + block.float()
        yield start, logits


def fit_mask(attention_mask, q_len: int, k_len: int, valid: torch.Tensor | None = None, device=None):
    """The step's mask for a layer whose slot holds ``k_len`` keys (this step's ``q_len`` last).

    ``attention_mask``: what transformers built (4D bool, True = attend, or additive float; None = plain causal),
    possibly for another length: its last ``q_len`` columns are the step's keys, the ones before are cached entries,
    all visible. ``valid`` [B, H_q, K] (False = padding entry) masks entries per head. Unchanged when it fits.
    """
    if attention_mask is None:
        if valid is None and (q_len == 1 or q_len == k_len):
            return None
        rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        attention_mask = (torch.arange(k_len, device=device)[None, :] <= rows)[None, None]
    columns = attention_mask.shape[-1]
    if columns > k_len:
        attention_mask = attention_mask[..., -k_len:]
    elif columns < k_len:
        visible = True if attention_mask.dtype == torch.bool else 0.0
        older = attention_mask.new_full((*attention_mask.shape[:-1], k_len - columns), visible)
        attention_mask = torch.cat([older, attention_mask], dim=-1)
    if valid is None:
        return attention_mask
    valid = valid[:, :, None, :].to(attention_mask.device)
    if attention_mask.dtype == torch.bool:
        return attention_mask & valid
    return attention_mask.masked_fill(~valid, torch.finfo(attention_mask.dtype).min)


_ROPE: dict[int, tuple] = {}


def model_rope(config, device):
    """positions [n] -> (cos, sin) [n, D] fp32 of the model's RoPE (its own class, built once per config)."""
    known = _ROPE.get(id(config))
    if known is None or known[0] is not config:
        known = _ROPE[id(config)] = (config, LlamaRotaryEmbedding(config))
    rotary = known[1].to(device)

    def rope(positions: torch.Tensor):
        probe = torch.empty(0, dtype=torch.float32, device=device)
        cos, sin = rotary(probe, positions.to(device).reshape(1, -1))
        return cos[0].float(), sin[0].float()

    return rope


def policy_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    cache = active_cache()
    layer = valid = None
    if cache is not None:
        slot = cache_slot(module)
        layer = cache.layers[slot] if slot < len(cache.layers) else None
        if layer is not None and (layer.keys is None or layer.keys.shape[-2] != key.shape[-2]):
            layer = None  # not this slot's keys (a model that attends to something else): leave it as it is
        if layer is not None and layer.ragged:
            groups = query.shape[1] // key.shape[1]
            valid = (layer.positions >= 0).repeat_interleave(groups, dim=1)
        attention_mask = fit_mask(attention_mask, query.shape[2], key.shape[2], valid, device=query.device)
    output = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    **kwargs)
    scoring = cache is not None and cache.policy.needs_attention and not getattr(cache, "frozen", False)
    if scoring and (cache.step.is_prefill or cache.policy.evict_during_decode):
        policy = cache.policy
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        total = None
        with torch.no_grad():
            if policy.scores_queries:
                positions = layer.positions if layer is not None else None
                if positions is None:
                    raise RuntimeError(f"cache policy {policy.name!r} scores from queries and needs the slot's keys")
                rows = cache._positions.to(query.device)
                total = policy.query_scores(slot, StepQueries(query, rows, key, value, positions, scale,
                                                              model_rope(module.config, query.device)), cache.step)
            else:
                for start, logits in attention_rows(query, key, attention_mask, scale, policy.observation_window):
                    part = policy.attention_contribution(slot, logits, start, cache.step)
                    total = part if total is None else total + part
        if total is not None:
            cache.add_attention_scores(slot, total)
    return output


def register() -> None:
    """Make ``POLICY_ATTENTION`` a valid attention implementation (with SDPA's mask format). Idempotent."""
    AttentionInterface.register(POLICY_ATTENTION, policy_sdpa_attention)
    AttentionMaskInterface.register(POLICY_ATTENTION, sdpa_mask)
