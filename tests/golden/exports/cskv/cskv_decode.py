"""CSKV decode attention straight from the compressed cache: no full-precision K/V is ever materialised.

The CSKV cache (``cache_llama_cskv``) keeps the last ``w`` tokens exact (``keys``/``values`` [B, H_kv, w, D], keys
after RoPE) and every older token ``t < T`` only as low-rank features ``c = A·x``: ``c_k`` [r_k] (pre-RoPE) and
``c_v`` [r_v], optionally quantized and packed in uint8:

- values, per token: channel ``i`` of token ``t`` is the code at bits ``(i % per_byte)·bits`` of byte
  ``value_packed[b, t, i // per_byte]`` (``per_byte = 8 // bits``), dequantized as ``code·scale + min`` with
  ``value_scale``/``value_min[b, t, i // G]`` (groups of G channels);
- keys, per channel, in blocks of G tokens: token ``t < n·G`` sits in block ``t // G`` at slot ``j = t % G``; channel
  ``i``'s code is in byte ``key_packed[b, t // G, i, j // per_byte]`` with ``key_scale``/``key_min[b, t // G, i]``;
  tokens ``t >= n·G`` (the last, partial block) are the unquantized residual ``key_features[b, t - n·G]``;
- unquantized (``quant_bits=None``): ``key_features`` [B, T, r_k] and ``value_features`` [B, T, r_v].

Compressed token ``t`` has position ``first_position[b] + t``; its key is ``RoPE(B_k·c_k + b_k)``, its value
``B_v·c_v + b_v`` (``B_k``/``B_v`` = ``k_proj_b``/``v_proj_b`` weights [H_kv·D, r]).

The model's torch path rebuilds all T keys and values ([B, H_kv, T, D] each) at every decode step and runs SDPA over
them. Here (flash-decoding):

1. ``_cskv_partials_kernel`` (Triton), grid (batch, kv head, split of the T tokens). Per tile of BLOCK_T tokens it
   loads the codes (or features), dequantizes in registers, multiplies by this head's rows of ``B_k`` as two halves
   [D/2, r_k] so that RoPE (rotate_half convention, cos/sin of ``position·inv_freq`` in fp32, times the rotary
   ``attention_scaling``) applies in registers, adds ``b_k``, scores every query row of the GQA group at once
   (q tile [n_groups·S_q, D]) and runs an online softmax. Values stay in the rank-r_v feature space: as they carry
   no RoPE, ``Σ_t p_t·(B_v c_t) = B_v·Σ_t p_t c_t``, so the kernel accumulates ``Σ p_t c_t`` [r_v] and ``B_v`` is
   applied once, after the reduction. Each split writes its running max ``m`` (log2 units), sum ``l`` and
   ``acc`` [r_v] (fp32).
2. A small torch epilogue merges the splits, up-projects with ``B_v`` per head (+ ``b_v`` weighted by the
   compressed probability mass), computes the exact window branch (w <= window tokens) with its own log-sum-exp and
   merges both branches.

Requirements: every compressed token precedes every query (the model calls this only when the step's new tokens fit
in the window, which holds them all), so only an optional key mask (left padding) restricts the compressed tokens.
Inference only (no autograd on the Triton path).

Self-contained on purpose (imports only torch, and triton when present): the CSKV export copies this file next to
``modeling_llama_cskv.py`` so ``trust_remote_code`` loading works without ``swiftkv_train`` installed.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:  # Triton is optional: without it (or without CUDA) everything falls back to the torch reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001 - a broken triton install must not break model loading
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "kernel_available", "cskv_decode_attention", "cskv_decode_reference"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QUANT_BITS = (2, 4, 8)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_available(x: torch.Tensor) -> bool:
    """True when the Triton path can run on ``x`` (CUDA tensor, or CPU under ``TRITON_INTERPRET=1``)."""
    if not HAS_TRITON or x.dtype not in _SUPPORTED_DTYPES:
        return False
    return x.is_cuda or (_interpreting() and x.device.type == "cpu")


# ----------------------------------------------------------------------------------------------------------------
# Inputs: validation and the compressed-cache layout.
# ----------------------------------------------------------------------------------------------------------------


class _Compressed(NamedTuple):
    """The compressed branch's tensors (as the cache stores them) and its sizes."""

    bits: int | None
    group: int
    tokens: int  # T
    quantized_tokens: int  # n·G keys in complete quantized blocks (0 when unquantized)
    key_features: torch.Tensor  # [B, T, r_k] unquantized, [B, T - n·G, r_k] residual when quantized
    value_features: torch.Tensor | None
    key_packed: torch.Tensor | None
    key_scale: torch.Tensor | None
    key_min: torch.Tensor | None
    value_packed: torch.Tensor | None
    value_scale: torch.Tensor | None
    value_min: torch.Tensor | None


def _shape(t: torch.Tensor | None, name: str, shape: tuple) -> None:
    if t is None:
        raise ValueError(f"{name} is required for this quantization setting")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _compressed_layout(batch, rank_k, rank_v, quant_bits, group_size, key_features, value_features, key_packed,
                       key_scale, key_min, value_packed, value_scale, value_min) -> _Compressed:
    """Check the cache tensors against the layout of the module docstring; infer T and n·G."""
    if quant_bits is None:
        if key_features is None or value_features is None:
            raise ValueError("unquantized CSKV decode needs key_features and value_features")
        tokens = key_features.shape[1]
        _shape(key_features, "key_features", (batch, tokens, rank_k))
        _shape(value_features, "value_features", (batch, tokens, rank_v))
        return _Compressed(None, group_size, tokens, 0, key_features, value_features, None, None, None, None, None,
                           None)
    if quant_bits not in _QUANT_BITS:
        raise ValueError(f"quant_bits must be None, 2, 4 or 8, got {quant_bits!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")
    per_byte = 8 // quant_bits
    if value_packed is None or key_packed is None:
        raise ValueError("quantized CSKV decode needs key_packed and value_packed")
    tokens, blocks = value_packed.shape[1], key_packed.shape[1]
    _shape(value_packed, "value_packed", (batch, tokens, -(-rank_v // per_byte)))
    _shape(value_scale, "value_scale", (batch, tokens, -(-rank_v // group_size)))
    _shape(value_min, "value_min", (batch, tokens, -(-rank_v // group_size)))
    _shape(key_packed, "key_packed", (batch, blocks, rank_k, -(-group_size // per_byte)))
    _shape(key_scale, "key_scale", (batch, blocks, rank_k))
    _shape(key_min, "key_min", (batch, blocks, rank_k))
    _shape(key_features, "key_features (the residual partial block)", (batch, tokens - blocks * group_size, rank_k))
    if not 0 <= tokens - blocks * group_size < group_size:
        raise ValueError(f"{blocks} key blocks of {group_size} do not match {tokens} value tokens")
    for name, t in (("key_packed", key_packed), ("value_packed", value_packed)):
        if t.dtype != torch.uint8:
            raise ValueError(f"{name} must be uint8, got {t.dtype}")
    return _Compressed(quant_bits, group_size, tokens, blocks * group_size, key_features, None, key_packed, key_scale,
                       key_min, value_packed, value_scale, value_min)


def _check_inputs(query, window_keys, window_values, key_up, value_up, inv_freq, first_position, key_bias, value_bias):
    if query.dim() != 4 or window_keys.dim() != 4:
        raise ValueError("query and window_keys must be [B, H, S, D]")
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, window = window_keys.shape[1], window_keys.shape[2]
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} KV heads")
    _shape(window_keys, "window_keys", (batch, kv_heads, window, head_dim))
    _shape(window_values, "window_values", (batch, kv_heads, window, head_dim))
    if q_len > window:
        raise ValueError(f"the {q_len} queries must be the last tokens of the {window}-token window")
    kv_dim = kv_heads * head_dim
    if key_up.dim() != 2 or key_up.shape[0] != kv_dim or value_up.dim() != 2 or value_up.shape[0] != kv_dim:
        raise ValueError(f"key_up/value_up must be [H_kv*D={kv_dim}, rank], got {tuple(key_up.shape)}, "
                         f"{tuple(value_up.shape)}")
    for name, bias in (("key_bias", key_bias), ("value_bias", value_bias)):
        if bias is not None:
            _shape(bias, name, (kv_dim,))
    _shape(inv_freq, "inv_freq", (head_dim // 2,))
    _shape(first_position, "first_position", (batch,))
    dtypes = {t.dtype for t in (query, window_keys, window_values, key_up, value_up)}
    if len(dtypes) != 1:
        raise ValueError(f"query, window K/V and the B factors must share one dtype, got {sorted(map(str, dtypes))}")
    return batch, q_heads, q_len, head_dim, kv_heads, window


def _mask_rows(mask: torch.Tensor | None, batch: int, q_len: int, keys: int, name: str) -> torch.Tensor | None:
    """A [B or 1, keys] or [B or 1, S, keys] key mask as bool [B, S, keys] (a view where possible)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[:, None, :]
    if mask.dim() != 3 or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, q_len) or mask.shape[2] != keys:
        raise ValueError(f"{name} must be [B, {keys}] or [B, S, {keys}] (B={batch}, S={q_len}), "
                         f"got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        mask = mask != 0
    return mask.expand(batch, q_len, keys)


def _window_allowed(window_mask, batch: int, q_len: int, window: int, device) -> torch.Tensor:
    """Bool [B, S, w]: the given mask, or causal (the S queries are the last S window tokens) when None."""
    given = _mask_rows(window_mask, batch, q_len, window, "window_mask")
    if given is not None:
        return given
    query_pos = torch.arange(q_len, device=device)[:, None] + (window - q_len)
    return (torch.arange(window, device=device)[None, :] <= query_pos)[None].expand(batch, q_len, window)


# ----------------------------------------------------------------------------------------------------------------
# Torch reference (today's model path: dequantize -> B -> RoPE -> cat with the window -> softmax attention).
# ----------------------------------------------------------------------------------------------------------------


def _unpack_codes(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    # explicit size (not -1): a cache with no complete key block yet holds a tensor with 0 elements
    return codes.view(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :num_codes]


def _dequantize_groups(codes, scale, minimum, group_size: int) -> torch.Tensor:
    """``code·scale + min`` over groups of the last dim, fp32 math rounded to the scale's dtype (as the cache)."""
    n, groups = codes.shape[-1], scale.shape[-1]
    cf = F.pad(codes.float(), (0, groups * group_size - n)).view(*codes.shape[:-1], groups, group_size)
    x = cf * scale.float().unsqueeze(-1) + minimum.float().unsqueeze(-1)
    return x.view(*x.shape[:-2], groups * group_size)[..., :n].to(scale.dtype)


def _compressed_features(c: _Compressed, rank_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key (pre-RoPE) and value features [B, T, r] of the compressed tokens, dequantized."""
    if c.bits is None:
        return c.key_features, c.value_features
    codes = _unpack_codes(c.key_packed, c.bits, c.group)  # [B, n, r_k, G]
    blocks = _dequantize_groups(codes, c.key_scale.unsqueeze(-1), c.key_min.unsqueeze(-1), c.group)
    b, n, r, g = blocks.shape
    keys = torch.cat([blocks.transpose(-1, -2).reshape(b, n * g, r), c.key_features], dim=1)
    values = _dequantize_groups(_unpack_codes(c.value_packed, c.bits, rank_v), c.value_scale, c.value_min, c.group)
    return keys, values


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_tables(inv_freq, positions, attention_scaling: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, D] exactly as LlamaRotaryEmbedding builds them (fp32 angles, scaled, rounded to ``dtype``)."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, T, H*D] -> [B, H, T, D] (explicit sizes: T may be 0)."""
    return x.view(*x.shape[:-1], x.shape[-1] // head_dim, head_dim).transpose(1, 2)


def cskv_decode_reference(
    query: torch.Tensor,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    key_up: torch.Tensor,
    value_up: torch.Tensor,
    inv_freq: torch.Tensor,
    first_position: torch.Tensor,
    scaling: float,
    *,
    key_features: torch.Tensor,
    value_features: torch.Tensor | None = None,
    quant_bits: int | None = None,
    group_size: int = 32,
    key_packed: torch.Tensor | None = None,
    key_scale: torch.Tensor | None = None,
    key_min: torch.Tensor | None = None,
    value_packed: torch.Tensor | None = None,
    value_scale: torch.Tensor | None = None,
    value_min: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    value_bias: torch.Tensor | None = None,
    compressed_mask: torch.Tensor | None = None,
    window_mask: torch.Tensor | None = None,
    attention_scaling: float = 1.0,
) -> torch.Tensor:
    """Torch version of `cskv_decode_attention` (same arguments, same result): materialises K/V as the model does."""
    batch, q_heads, q_len, head_dim, kv_heads, window = _check_inputs(
        query, window_keys, window_values, key_up, value_up, inv_freq, first_position, key_bias, value_bias)
    c = _compressed_layout(batch, key_up.shape[1], value_up.shape[1], quant_bits, group_size, key_features,
                           value_features, key_packed, key_scale, key_min, value_packed, value_scale, value_min)
    key_c, value_c = _compressed_features(c, value_up.shape[1])
    key = _heads(F.linear(key_c, key_up, key_bias), head_dim)
    positions = first_position[:, None] + torch.arange(c.tokens, device=first_position.device)
    cos, sin = _rope_tables(inv_freq, positions, attention_scaling, key.dtype)
    key = key * cos.unsqueeze(1) + _rotate_half(key) * sin.unsqueeze(1)
    value = _heads(F.linear(value_c, value_up, value_bias), head_dim)
    keys = torch.cat([key, window_keys], dim=-2)
    values = torch.cat([value, window_values], dim=-2)

    allowed_w = _window_allowed(window_mask, batch, q_len, window, query.device)
    allowed_c = _mask_rows(compressed_mask, batch, q_len, c.tokens, "compressed_mask")
    if allowed_c is None:
        allowed_c = torch.ones(batch, q_len, c.tokens, dtype=torch.bool, device=query.device)
    allowed = torch.cat([allowed_c, allowed_w], dim=-1)
    empty = ~allowed.any(-1, keepdim=True)  # a query that may see nothing gets 0 (not NaN)
    groups = q_heads // kv_heads
    out = F.scaled_dot_product_attention(
        query, keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1),
        attn_mask=(allowed | empty)[:, None], scale=scaling,
    )
    return out.masked_fill(empty[:, None], 0).transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel.
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _operand(x, elem, UPCAST: tl.constexpr):
        """``x`` rounded to the dot operand dtype; kept in fp32 under the interpreter, whose tl.dot multiplies
        bf16 operands as their raw uint16 storage (the rounding, hence the numerics, stay the same)."""
        x = x.to(elem)
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _key_feature_tile(kf_ptr, kf_sb, kf_st, kp_ptr, kp_sb, kp_sn, kp_sr, ks_ptr, km_ptr, kq_sb, kq_sn,
                          b, t, t_valid, r, r_valid, TQ, BITS: tl.constexpr, GROUP: tl.constexpr):
        """Key features [BLOCK_T, BLOCK_R] (fp32) of tokens ``t``, channels ``r``."""
        if BITS == 0:
            ptrs = kf_ptr + b * kf_sb + t[:, None] * kf_st + r[None, :]
            x = tl.load(ptrs, mask=t_valid[:, None] & r_valid[None, :], other=0.0).to(tl.float32)
        else:
            PER_BYTE: tl.constexpr = 8 // BITS
            quantized = t < TQ
            block = t // GROUP
            slot = t % GROUP
            qmask = (t_valid & quantized)[:, None] & r_valid[None, :]
            byte = tl.load(kp_ptr + b * kp_sb + block[:, None] * kp_sn + r[None, :] * kp_sr
                           + (slot // PER_BYTE)[:, None], mask=qmask, other=0)
            shift = ((slot % PER_BYTE) * BITS).to(tl.int32)
            code = (byte.to(tl.int32) >> shift[:, None]) & ((1 << BITS) - 1)
            stats = b * kq_sb + block[:, None] * kq_sn + r[None, :]
            scale = tl.load(ks_ptr + stats, mask=qmask, other=0.0).to(tl.float32)
            minimum = tl.load(km_ptr + stats, mask=qmask, other=0.0).to(tl.float32)
            # The last partial block is kept unquantized: residual token t sits at row t - TQ.
            rmask = (t_valid & (t >= TQ))[:, None] & r_valid[None, :]
            residual = tl.load(kf_ptr + b * kf_sb + (t - TQ)[:, None] * kf_st + r[None, :], mask=rmask,
                               other=0.0).to(tl.float32)
            x = tl.where(quantized[:, None], code.to(tl.float32) * scale + minimum, residual)
        return x

    @triton.jit
    def _value_feature_tile(vf_ptr, vf_sb, vf_st, vp_ptr, vp_sb, vp_st, vs_ptr, vm_ptr, vq_sb, vq_st,
                            b, t, t_valid, rv, rv_valid, BITS: tl.constexpr, GROUP: tl.constexpr):
        """Value features [BLOCK_T, RV_BLOCK] (fp32) of tokens ``t``; 0 outside the valid tokens/channels."""
        mask = t_valid[:, None] & rv_valid[None, :]
        if BITS == 0:
            x = tl.load(vf_ptr + b * vf_sb + t[:, None] * vf_st + rv[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            PER_BYTE: tl.constexpr = 8 // BITS
            byte = tl.load(vp_ptr + b * vp_sb + t[:, None] * vp_st + (rv // PER_BYTE)[None, :], mask=mask, other=0)
            shift = ((rv % PER_BYTE) * BITS).to(tl.int32)
            code = (byte.to(tl.int32) >> shift[None, :]) & ((1 << BITS) - 1)
            stats = b * vq_sb + t[:, None] * vq_st + (rv // GROUP)[None, :]
            scale = tl.load(vs_ptr + stats, mask=mask, other=0.0).to(tl.float32)
            minimum = tl.load(vm_ptr + stats, mask=mask, other=0.0).to(tl.float32)
            x = code.to(tl.float32) * scale + minimum
        return x

    @triton.jit
    def _cskv_partials_kernel(
        q_ptr, q_sb, q_sh, q_ss,  # query [B, H_q, S, D], last dim unit stride
        wk_ptr, wk_s0,  # B_k = k_proj_b.weight [H_kv*D, r_k], last dim unit stride
        kbias_ptr, inv_freq_ptr, pos0_ptr,  # b_k [H_kv*D], inv_freq [D/2] fp32, first_position [B] int64
        kf_ptr, kf_sb, kf_st,  # key features (all, or the residual block) [B, *, r_k]
        kp_ptr, kp_sb, kp_sn, kp_sr,  # key codes [B, n, r_k, ceil(G*bits/8)] uint8
        ks_ptr, km_ptr, kq_sb, kq_sn,  # key scale / min [B, n, r_k]
        vf_ptr, vf_sb, vf_st,  # value features [B, T, r_v]
        vp_ptr, vp_sb, vp_st,  # value codes [B, T, ceil(r_v*bits/8)] uint8
        vs_ptr, vm_ptr, vq_sb, vq_st,  # value scale / min [B, T, ceil(r_v/G)]
        mask_ptr, mask_sb, mask_ss, mask_st,  # key mask (uint8) [B, S, T], strides may be 0
        m_ptr, l_ptr, acc_ptr,  # outputs [B, H_kv, P, M], [B, H_kv, P, M], [B, H_kv, P, M, r_v] fp32
        T, TQ, S, M, RANK_K, RANK_V, TOKENS_PER_SPLIT, N_SPLITS,
        qk_scale,  # softmax scaling * log2(e): scores are kept in log2 units
        rope_scale,  # the rotary embedding's attention_scaling
        H_KV: tl.constexpr, N_GROUPS: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_RK: tl.constexpr, RV_BLOCK: tl.constexpr,
        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_KEY_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        """Program (b, kv head h, split): online softmax over the split's compressed tokens for all GQA rows."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        split = tl.program_id(2)
        elem = q_ptr.dtype.element_ty  # dot operands in the model dtype (bf16/fp16 tensor cores), fp32 accumulate
        D: tl.constexpr = 2 * HALF

        # Query rows m = g*S + s (head h*N_GROUPS + g, query s), split in RoPE halves.
        rows = tl.arange(0, BLOCK_M)
        row_valid = rows < M
        s_row = rows % S
        d = tl.arange(0, HALF_BLOCK)
        d_valid = d < HALF
        q_head = (h * N_GROUPS + rows // S).to(tl.int64)
        q_off = b * q_sb + q_head[:, None] * q_sh + s_row[:, None] * q_ss + d[None, :]
        q_mask = row_valid[:, None] & d_valid[None, :]
        q1 = _operand(tl.load(q_ptr + q_off, mask=q_mask, other=0.0), elem, UPCAST_DOT)
        q2 = _operand(tl.load(q_ptr + q_off + HALF, mask=q_mask, other=0.0), elem, UPCAST_DOT)

        w_rows = (h * D + d).to(tl.int64) * wk_s0  # this head's rows of B_k, first half
        inv_freq = tl.load(inv_freq_ptr + d, mask=d_valid, other=0.0).to(tl.float32)
        if HAS_KEY_BIAS:
            bias1 = tl.load(kbias_ptr + h * D + d, mask=d_valid, other=0.0).to(tl.float32)
            bias2 = tl.load(kbias_ptr + h * D + HALF + d, mask=d_valid, other=0.0).to(tl.float32)
        pos0 = tl.load(pos0_ptr + b)
        rv = tl.arange(0, RV_BLOCK)
        rv_valid = rv < RANK_V

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, RV_BLOCK], tl.float32)
        start = split * TOKENS_PER_SPLIT
        end = tl.minimum(start + TOKENS_PER_SPLIT, T)
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_valid = t < end
            # K = c_k @ B_k^T, as its two RoPE halves [BLOCK_T, D/2], over chunks of the rank.
            k1 = tl.zeros([BLOCK_T, HALF_BLOCK], tl.float32)
            k2 = tl.zeros([BLOCK_T, HALF_BLOCK], tl.float32)
            for r0 in range(0, RANK_K, BLOCK_RK):
                r = r0 + tl.arange(0, BLOCK_RK)
                r_valid = r < RANK_K
                c = _key_feature_tile(kf_ptr, kf_sb, kf_st, kp_ptr, kp_sb, kp_sn, kp_sr, ks_ptr, km_ptr, kq_sb,
                                      kq_sn, b, t, t_valid, r, r_valid, TQ, BITS, GROUP)
                c = _operand(c, elem, UPCAST_DOT)
                w_mask = r_valid[:, None] & d_valid[None, :]
                w_ptrs = wk_ptr + w_rows[None, :] + r[:, None]  # [BLOCK_RK, D/2]: B_k^T, first half
                w1 = _operand(tl.load(w_ptrs, mask=w_mask, other=0.0), elem, UPCAST_DOT)
                w2 = _operand(tl.load(w_ptrs + HALF * wk_s0, mask=w_mask, other=0.0), elem, UPCAST_DOT)
                k1 = tl.dot(c, w1, k1, input_precision=DOT_PRECISION)
                k2 = tl.dot(c, w2, k2, input_precision=DOT_PRECISION)
            if HAS_KEY_BIAS:
                k1 += bias1[None, :]
                k2 += bias2[None, :]
            # RoPE at position first_position + t: x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1].
            angle = (pos0 + t).to(tl.float32)[:, None] * inv_freq[None, :]
            cos = tl.cos(angle) * rope_scale
            sin = tl.sin(angle) * rope_scale
            key1 = _operand(k1 * cos - k2 * sin, elem, UPCAST_DOT)
            key2 = _operand(k2 * cos + k1 * sin, elem, UPCAST_DOT)
            scores = tl.dot(q1, tl.trans(key1), input_precision=DOT_PRECISION)
            scores = tl.dot(q2, tl.trans(key2), scores, input_precision=DOT_PRECISION) * qk_scale

            allowed = row_valid[:, None] & t_valid[None, :]
            if HAS_MASK:
                keep = tl.load(mask_ptr + b * mask_sb + s_row[:, None] * mask_ss + t[None, :] * mask_st,
                               mask=allowed, other=0)
                allowed = allowed & (keep != 0)
            scores = tl.where(allowed, scores, float("-inf"))
            # Online softmax; a row with nothing allowed so far keeps m = -inf and uses 0 as its reference.
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(scores - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            cv = _value_feature_tile(vf_ptr, vf_sb, vf_st, vp_ptr, vp_sb, vp_st, vs_ptr, vm_ptr, vq_sb, vq_st,
                                     b, t, t_valid, rv, rv_valid, BITS, GROUP)
            acc = tl.dot(_operand(p, elem, UPCAST_DOT), _operand(cv, elem, UPCAST_DOT), acc * alpha[:, None],
                         input_precision=DOT_PRECISION)
            m_i = m_new

        out = ((b * H_KV + h) * N_SPLITS + split) * M + rows
        tl.store(m_ptr + out, m_i, mask=row_valid)
        tl.store(l_ptr + out, l_i, mask=row_valid)
        tl.store(acc_ptr + out[:, None] * RANK_V + rv[None, :], acc, mask=row_valid[:, None] & rv_valid[None, :])


def _next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


def _block_sizes(rank_k: int, rank_v: int, head_dim: int, rows: int) -> dict:
    """Tile sizes: every tl.dot dimension >= 16; a smaller token tile when the value tile [BLOCK_T, r_v] is wide."""
    rv_block = _next_pow2(rank_v)
    return dict(BLOCK_M=_next_pow2(rows), BLOCK_T=32 if rv_block >= 256 else 64, BLOCK_RK=min(64, _next_pow2(rank_k)),
                RV_BLOCK=rv_block, HALF_BLOCK=_next_pow2(head_dim // 2))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _token_split(batch: int, kv_heads: int, tokens: int, block_t: int, device: torch.device) -> tuple[int, int]:
    """(tokens per split, splits): about two programs per SM, each with whole tiles (flash-decoding)."""
    sms = _num_sms(device)
    tiles = -(-tokens // block_t)
    splits = max(1, min(tiles, -(-2 * sms // (batch * kv_heads))))
    tiles_per_split = -(-tiles // splits)
    return tiles_per_split * block_t, -(-tiles // tiles_per_split)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _triton_partials(query, key_up, key_bias, inv_freq, first_position, c: _Compressed, rank_v: int,
                     compressed_mask, kv_heads: int, scaling: float, attention_scaling: float, workspace=None,
                     tokens_per_split: int | None = None):
    """Per-split (m [log2 units], l, acc) of the compressed branch: [B, H_kv, P, M] twice and [B, H_kv, P, M, r_v].

    ``workspace``: optional preallocated fp32 (m, l, acc) of those shapes (the tests poison them to check that every
    element is written); ``tokens_per_split``: force the split (a multiple of the token tile).
    """
    batch, q_heads, q_len, head_dim = query.shape
    rank_k, groups = key_up.shape[1], q_heads // kv_heads
    rows = groups * q_len
    blocks = _block_sizes(rank_k, rank_v, head_dim, rows)
    if tokens_per_split is None:
        tokens_per_split, splits = _token_split(batch, kv_heads, c.tokens, blocks["BLOCK_T"], query.device)
    else:
        if tokens_per_split % blocks["BLOCK_T"]:
            raise ValueError(f"tokens_per_split must be a multiple of {blocks['BLOCK_T']}")
        splits = -(-c.tokens // tokens_per_split)
    shapes = ((batch, kv_heads, splits, rows), (batch, kv_heads, splits, rows),
              (batch, kv_heads, splits, rows, rank_v))
    if workspace is None:
        workspace = tuple(torch.empty(s, dtype=torch.float32, device=query.device) for s in shapes)
    elif any(tuple(w.shape) != s or w.dtype != torch.float32 or not w.is_contiguous()
             for w, s in zip(workspace, shapes)):
        raise ValueError(f"workspace must be contiguous fp32 tensors of shapes {shapes}")
    m, l, acc = workspace

    def present(t):  # None for what this layout does not use or holds no element
        return None if t is None or t.numel() == 0 else _unit_stride(t)

    q, wk = _unit_stride(query), _unit_stride(key_up)
    kb = key_bias.contiguous() if key_bias is not None else None
    kf, kp, vf, vp = present(c.key_features), present(c.key_packed), present(c.value_features), present(c.value_packed)
    ks, km, vs, vm = present(c.key_scale), present(c.key_min), present(c.value_scale), present(c.value_min)
    if ks is not None and ks.stride() != km.stride():  # the kernel reads scale and min with one set of strides
        ks, km = ks.contiguous(), km.contiguous()
    if vs is not None and vs.stride() != vm.stride():
        vs, vm = vs.contiguous(), vm.contiguous()
    mask = compressed_mask.view(torch.uint8) if compressed_mask is not None else None

    def ptr(t):  # an absent tensor's pointer is never dereferenced (constexpr branches, all-false masks)
        return t if t is not None else q

    def strides(t, *dims):
        return tuple(t.stride(i) if t is not None else 0 for i in dims)

    _cskv_partials_kernel[(batch, kv_heads, splits)](
        q, *strides(q, 0, 1, 2),
        wk, wk.stride(0),
        ptr(kb), inv_freq.float().contiguous(), first_position.contiguous(),
        ptr(kf), *strides(kf, 0, 1),
        ptr(kp), *strides(kp, 0, 1, 2),
        ptr(ks), ptr(km), *strides(ks, 0, 1),
        ptr(vf), *strides(vf, 0, 1),
        ptr(vp), *strides(vp, 0, 1),
        ptr(vs), ptr(vm), *strides(vs, 0, 1),
        ptr(mask), *strides(mask, 0, 1, 2),
        m, l, acc,
        c.tokens, c.quantized_tokens, q_len, rows, rank_k, rank_v, tokens_per_split, splits,
        float(scaling) * _LOG2E, float(attention_scaling),
        H_KV=kv_heads, N_GROUPS=groups, HALF=head_dim // 2, BITS=c.bits or 0, GROUP=c.group,
        HAS_KEY_BIAS=key_bias is not None, HAS_MASK=compressed_mask is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", UPCAST_DOT=not query.is_cuda,
        num_warps=4, **blocks,
    )
    return m, l, acc


# ----------------------------------------------------------------------------------------------------------------
# Epilogue (torch): merge the splits, apply B_v, merge with the exact window branch.
# ----------------------------------------------------------------------------------------------------------------


def _merge_splits(m, l, acc):
    """(m [natural log units, -inf where nothing is allowed], l, acc) over the splits: [B, H_kv, M] and [.., r_v]."""
    m_max = m.amax(dim=2)
    ref = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)
    weight = torch.exp2(m - ref.unsqueeze(2))  # 0 for splits that saw nothing
    return m_max * _LN2, (l * weight).sum(2), (acc * weight.unsqueeze(-1)).sum(2)


def _window_branch(q_rows, window_keys, window_values, allowed_rows, scaling):
    """Exact attention over the window in fp32: (m, l, numerator [B, H_kv, M, D]) with its own log-sum-exp."""
    scores = torch.matmul(q_rows, window_keys.float().transpose(-1, -2)) * scaling  # [B, H_kv, M, w]
    scores = scores.masked_fill(~allowed_rows, float("-inf"))
    m = scores.amax(-1)
    ref = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(scores - ref.unsqueeze(-1))
    return m, p.sum(-1), torch.matmul(p, window_values.float())


def _combine(m_c, l_c, num_c, m_w, l_w, num_w):
    """Softmax over both branches from their (max, sum, numerator); a row that sees nothing gets 0."""
    m = torch.maximum(m_c, m_w)
    ref = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    a_c, a_w = torch.exp(m_c - ref), torch.exp(m_w - ref)
    total = a_c * l_c + a_w * l_w
    num = a_c.unsqueeze(-1) * num_c + a_w.unsqueeze(-1) * num_w
    return num / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)


def _cskv_decode_triton(query, window_keys, window_values, key_up, value_up, inv_freq, first_position, scaling,
                        c: _Compressed, key_bias, value_bias, compressed_mask, window_mask, attention_scaling,
                        workspace=None, tokens_per_split=None):
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, window = window_keys.shape[1], window_keys.shape[2]
    groups, rank_v = q_heads // kv_heads, value_up.shape[1]
    rows = groups * q_len
    # Query row m = g*S + s of KV head h is query head h*groups + g (repeat_kv order), query s.
    q_rows = query.float().reshape(batch, kv_heads, rows, head_dim)
    allowed_w = _window_allowed(window_mask, batch, q_len, window, query.device)
    allowed_rows = allowed_w[:, None, None].expand(batch, 1, groups, q_len, window).reshape(batch, 1, rows, window)
    m_w, l_w, num_w = _window_branch(q_rows, window_keys, window_values, allowed_rows, scaling)

    if c.tokens == 0:
        zeros = torch.zeros_like(m_w)
        m_c, l_c, num_c = zeros - float("inf"), zeros, torch.zeros_like(num_w)
    else:
        m, l, acc = _triton_partials(query, key_up, key_bias, inv_freq, first_position, c, rank_v, compressed_mask,
                                     kv_heads, scaling, attention_scaling, workspace, tokens_per_split)
        m_c, l_c, acc_c = _merge_splits(m, l, acc)
        # B_v once per head on the reduced features; b_v weighted by the compressed branch's probability mass.
        num_c = torch.einsum("bhmr,hdr->bhmd", acc_c, value_up.float().view(kv_heads, head_dim, rank_v))
        if value_bias is not None:
            num_c = num_c + value_bias.float().view(1, kv_heads, 1, head_dim) * l_c.unsqueeze(-1)
    out = _combine(m_c, l_c, num_c, m_w, l_w, num_w)  # [B, H_kv, M, D]
    out = out.view(batch, q_heads, q_len, head_dim).transpose(1, 2)
    return out.to(query.dtype).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------------------------------------------


def cskv_decode_attention(
    query: torch.Tensor,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    key_up: torch.Tensor,
    value_up: torch.Tensor,
    inv_freq: torch.Tensor,
    first_position: torch.Tensor,
    scaling: float,
    *,
    key_features: torch.Tensor,
    value_features: torch.Tensor | None = None,
    quant_bits: int | None = None,
    group_size: int = 32,
    key_packed: torch.Tensor | None = None,
    key_scale: torch.Tensor | None = None,
    key_min: torch.Tensor | None = None,
    value_packed: torch.Tensor | None = None,
    value_scale: torch.Tensor | None = None,
    value_min: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    value_bias: torch.Tensor | None = None,
    compressed_mask: torch.Tensor | None = None,
    window_mask: torch.Tensor | None = None,
    attention_scaling: float = 1.0,
) -> torch.Tensor:
    """Decode-step attention over a CSKV cache (compressed tokens + exact window): ``[B, S, H_q, D]``.

    Args:
        query: [B, H_q, S, D] new queries after RoPE; H_q a multiple of H_kv (GQA, ``repeat_kv`` head order).
        window_keys, window_values: [B, H_kv, w, D] the exact window (keys after RoPE); the S queries are its last
            S tokens (S <= w), and every compressed token precedes them.
        key_up, value_up: ``k_proj_b.weight`` [H_kv*D, r_k] and ``v_proj_b.weight`` [H_kv*D, r_v].
        inv_freq: [D/2] rotary frequencies (the rotary embedding's ``inv_freq``); ``attention_scaling`` its factor.
        first_position: [B] int64 position of compressed token 0 (token t is at ``first_position + t``).
        scaling: softmax scale (``head_dim ** -0.5`` for Llama).
        key_features, value_features, key_packed, key_scale, key_min, value_packed, value_scale, value_min,
            quant_bits, group_size: the cache's compressed branch, exactly as ``CSKVCacheLayer`` stores it (module
            docstring); unquantized: ``key_features``/``value_features`` [B, T, r]; quantized: the packed tensors
            and the residual partial key block in ``key_features``.
        key_bias, value_bias: optional [H_kv*D] biases of the original k/v projections.
        compressed_mask: optional bool key mask over the compressed tokens, [B, T] or [B, S, T] (True = attend).
        window_mask: optional bool [B, w] or [B, S, w] mask over the window; None = causal (query s sees window
            tokens up to its own).

    Uses the Triton kernel when `kernel_available` (CUDA, or the CPU interpreter), `cskv_decode_reference`
    otherwise. Inference only: the Triton path carries no autograd graph.
    """
    batch, _, q_len, _, _, window = _check_inputs(query, window_keys, window_values, key_up, value_up, inv_freq,
                                                  first_position, key_bias, value_bias)
    c = _compressed_layout(batch, key_up.shape[1], value_up.shape[1], quant_bits, group_size, key_features,
                           value_features, key_packed, key_scale, key_min, value_packed, value_scale, value_min)
    if not kernel_available(query):
        return cskv_decode_reference(
            query, window_keys, window_values, key_up, value_up, inv_freq, first_position, scaling,
            key_features=key_features, value_features=value_features, quant_bits=quant_bits, group_size=group_size,
            key_packed=key_packed, key_scale=key_scale, key_min=key_min, value_packed=value_packed,
            value_scale=value_scale, value_min=value_min, key_bias=key_bias, value_bias=value_bias,
            compressed_mask=compressed_mask, window_mask=window_mask, attention_scaling=attention_scaling)
    with torch.no_grad():
        return _cskv_decode_triton(query, window_keys, window_values, key_up, value_up, inv_freq, first_position,
                                   scaling, c, key_bias, value_bias,
                                   _mask_rows(compressed_mask, batch, q_len, c.tokens, "compressed_mask"),
                                   window_mask, attention_scaling)
