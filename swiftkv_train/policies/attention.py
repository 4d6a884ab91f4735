"""The attention hook: plain SDPA for the output, plus attention scores for the policy, computed blockwise.

SDPA (and FlashAttention) never expose the attention probabilities, and a full S x S matrix for a long prompt is
too big. So after SDPA has produced the output, the hook recomputes the scaled logits of the step's query rows
(all rows, or the last ``policy.observation_window`` rows) against the keys it was given, ``row_block`` rows at
a time, and hands each masked block to the policy. Peak extra memory: B x H_q x row_block x K floats.

The output comes from transformers' own SDPA function with the same mask, so a policy that evicts nothing gives
bit-identical logits to the stock ``sdpa`` implementation.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from .active import active_cache, cache_slot

__all__ = ["POLICY_ATTENTION", "attention_rows", "cache_slot", "register"]

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
            block = attention_mask[:, :, start:stop, -k_len:]  # [B or 1, 1, r, K]
            block = block.unsqueeze(2)  # broadcast over G
            if block.dtype == torch.bool:
                logits = logits.masked_fill(~block, float("-inf"))
            else:
                logits = logits + block.float()
        yield start, logits


def policy_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    output = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    **kwargs)
    cache = active_cache()
    scoring = cache is not None and cache.policy.needs_attention
    if scoring and (cache.step.is_prefill or cache.policy.evict_during_decode):
        slot = cache_slot(module)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        total = None
        with torch.no_grad():
            for start, logits in attention_rows(query, key, attention_mask, scale, cache.policy.observation_window):
                part = cache.policy.attention_contribution(slot, logits, start, cache.step)
                total = part if total is None else total + part
        if total is not None:
            cache.add_attention_scores(slot, total)
    return output


def register() -> None:
    """Make ``POLICY_ATTENTION`` a valid attention implementation (with SDPA's mask format). Idempotent."""
    AttentionInterface.register(POLICY_ATTENTION, policy_sdpa_attention)
    AttentionMaskInterface.register(POLICY_ATTENTION, sdpa_mask)
