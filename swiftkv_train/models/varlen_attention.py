"""``attn_implementation="varlen"``: packed-row training attention on flash-attention's variable-length kernel.

Packed rows hold several documents whose position ids restart at 0. transformers' SDPA path turns that into a
dense block-diagonal [S, S] mask, which rules out SDPA's flash kernel: every layer then runs the memory-efficient
kernel over the whole S x S square although most of it is masked. Here the documents become one flat batch of
sequences (``cu_seqlens`` from the position-id restarts) for ``torch.nn.attention.varlen.varlen_attn`` (flash
attention, causal inside each document): the attention FLOPs are the documents' own triangles.

It is an attention function registered through transformers' public ``AttentionInterface`` (no patching), used for
training only: it is never stored in an export. Where the flash path cannot run (CPU, a KV cache, a padding mask,
dropout, or a torch without ``varlen_attn``) the same semantics run as SDPA with an explicit mask (the document mask;
behind a KV cache, i.e. when a trained model generates, plain causal + padding).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

NAME = "varlen"

__all__ = [
    "NAME",
    "document_boundaries",
    "document_mask",
    "generation_mask",
    "register_varlen_attention",
    "varlen_attention_forward",
]


def document_boundaries(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, S]: True where a document starts (position does not continue the previous one, and row starts)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def document_mask(position_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, 1, S, S]: causal, inside one document, and (with a 2D ``padding_mask``) not a padding key."""
    seq = position_ids.shape[1]
    docs = document_boundaries(position_ids).long().cumsum(-1)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    allowed = causal[None] & (docs[:, :, None] == docs[:, None, :])
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, -seq:].bool()
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # a query that sees nothing (padding) gets anything, not NaN
    return allowed[:, None]


@functools.cache
def _varlen_kernel():
    """``(varlen_attn, its parameter names)``, or None when this torch has no varlen attention."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _flash_path(query, key, value, position_ids, scaling):
    """[B, H, S, D] -> [B, S, H, D] through varlen_attn over the documents of every row."""
    varlen_attn, params = _varlen_kernel()
    batch, heads, seq, dim = query.shape
    starts = document_boundaries(position_ids).reshape(-1)
    start_index = starts.nonzero().squeeze(-1).to(torch.int32)
    total = torch.tensor([batch * seq], dtype=torch.int32, device=query.device)
    cu_seqlens = torch.cat([start_index, total])
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], dim)
    kwargs = {}
    if k.shape[1] != heads:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)  # causal: nothing to the right
    if "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None:
        q = q * (scaling * dim**0.5)  # the kernel applies 1/sqrt(D)
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)
    return out.view(batch, seq, heads, dim)


def generation_mask(query_len: int, key_len: int, padding_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """Bool [B or 1, 1, q, L] for new queries behind a KV cache (one sequence per row: no documents): causal, and
    not a padding key. None where every query sees every key (one new token, no padding)."""
    if query_len == 1 and padding_mask is None:
        return None
    last_visible = key_len - query_len + torch.arange(query_len, device=device)
    mask = (torch.arange(key_len, device=device)[None, :] <= last_visible[:, None])[None, None]
    if padding_mask is not None:
        mask = mask & padding_mask[:, None, None, -key_len:].bool()
        mask = mask | ~mask.any(-1, keepdim=True)  # a padding query sees nothing: give it anything, not NaN
    return mask


def _masked_path(query, key, value, mask, scaling, dropout):
    """SDPA with an explicit bool mask (None: every query sees every key); [B, S, H, D]."""
    if key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             position_ids=None, **kwargs):
    """transformers attention-function signature: query [B, H, S, D], key/value [B, H_kv, L, D] -> ([B, S, H, D],
    None)."""
    if position_ids is None:
        position_ids = torch.arange(query.shape[2], device=query.device)[None]
    position_ids = position_ids.expand(query.shape[0], -1)
    dropout = dropout if module.training else 0.0
    flash_ok = (
        query.is_cuda
        and _varlen_kernel() is not None
        and attention_mask is None
        and dropout == 0.0
        and key.shape[2] == query.shape[2]
        and query.dtype in (torch.float16, torch.bfloat16)
    )
    if flash_ok:
        return _flash_path(query, key, value, position_ids, scaling), None
    padding = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    elif key.shape[2] != query.shape[2]:  # a KV cache in front: generation
        mask = generation_mask(query.shape[2], key.shape[2], padding, query.device)
    else:
        mask = document_mask(position_ids, padding)
    return _masked_path(query, key, value, mask, scaling, dropout), None


def register_varlen_attention() -> str:
    """Register ``"varlen"`` with transformers (idempotent) and return the name to pass as attn_implementation.

    The mask function is transformers' flash one: None without padding (documents come from position ids), the 2D
    padding mask otherwise."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME
