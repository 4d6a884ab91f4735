"""Fused SwiftKV prefill K/V: RMSNorm(h_M) -> one GEMM over every group's K/V weights -> RoPE(K) in cache layout.

The unfused path (``LlamaSwiftKVModel.swiftkv_key_values``) runs one norm, 2·G small GEMMs, G RoPEs (several
elementwise kernels each) and G cache copies. Here it is three launches whatever G is:

1. ``_rmsnorm_kernel`` (Triton): LlamaRMSNorm, rounding exactly where transformers rounds.
2. one cuBLAS GEMM ``normed @ W_cat.T`` with ``W_cat = [K_0; V_0; K_1; V_1; ...]`` ([G·2·kv_dim, hidden]).
3. ``_rope_scatter_kernel`` (Triton): reads that [N, G·2·kv_dim] row-major result once, applies RoPE to the K
   parts and writes K and V into one [G, 2, B, H_kv, S, D] buffer, so every ``buf[g, 0]`` / ``buf[g, 1]`` is a
   contiguous [B, H_kv, S, D] tensor, the layout the model's cache and attention take.

Two more inference ops for the decoder layers of the SwiftKV model (the prefill's first M layers are most of its
time; their eager RMSNorm and SiLU-times-up each make several passes over [tokens, width] tensors):

4. ``rms_norm``: LlamaRMSNorm in one pass (the same Triton kernel as step 1).
5. ``silu_mul``: ``silu(gate) * up`` in one pass (the MLP's activation), rounding where torch rounds.

Inference only (no autograd): training keeps the torch path.

Self-contained on purpose (imports only torch, and triton when present): the SwiftKV export copies this file next
to ``modeling_llama_swiftkv.py`` so ``trust_remote_code`` loading works without ``swiftkv_train`` installed.
"""

from __future__ import annotations

import os

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

__all__ = [
    "HAS_TRITON",
    "kernel_available",
    "rms_norm",
    "silu_mul",
    "fused_swiftkv_kv",
    "swiftkv_kv_reference",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows of the intermediate [N, G·2·kv_dim] GEMM result processed at a time: bounds that transient to ~512 MiB
# (bf16) at long contexts while keeping each GEMM large enough to run near peak.
_MAX_GEMM_ELEMENTS = 1 << 28


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_available(x: torch.Tensor) -> bool:
    """True when the Triton path can run on ``x`` (CUDA tensor, or CPU under ``TRITON_INTERPRET=1``)."""
    if not HAS_TRITON or x.dtype not in _SUPPORTED_DTYPES:
        return False
    return x.is_cuda or (_interpreting() and x.device.type == "cpu")


# ----------------------------------------------------------------------------------------------------------------
# Torch reference (the same maths as the model's unfused path).
# ----------------------------------------------------------------------------------------------------------------


def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As LlamaRMSNorm: fp32 statistics (fp64 stays fp64), round to the input dtype, then scale by the weight.
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up  # LlamaMLP's act_fn(gate_proj(x)) * up_proj(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def swiftkv_kv_reference(
    h_m: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    kv_weight_cat: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_groups: int,
    num_kv_heads: int,
    head_dim: int,
    kv_bias_cat: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Unfused torch version of `fused_swiftkv_kv`: [(K_g, V_g)] with K_g = RoPE(norm(h_M) @ W_K,g.T), [B,H_kv,S,D]."""
    _check(h_m, kv_weight_cat, cos, sin, num_groups, num_kv_heads, head_dim, kv_bias_cat)
    b, s, _ = h_m.shape
    kv_dim = num_kv_heads * head_dim
    normed = _rms_norm_reference(h_m, norm_weight, eps)
    cos_, sin_ = cos.unsqueeze(1), sin.unsqueeze(1)
    out = []
    for g in range(num_groups):
        rows_k = slice(2 * g * kv_dim, (2 * g + 1) * kv_dim)
        rows_v = slice((2 * g + 1) * kv_dim, (2 * g + 2) * kv_dim)
        bias_k = kv_bias_cat[rows_k] if kv_bias_cat is not None else None
        bias_v = kv_bias_cat[rows_v] if kv_bias_cat is not None else None
        key = F.linear(normed, kv_weight_cat[rows_k], bias_k).view(b, s, num_kv_heads, head_dim).transpose(1, 2)
        value = F.linear(normed, kv_weight_cat[rows_v], bias_v).view(b, s, num_kv_heads, head_dim).transpose(1, 2)
        key = key * cos_ + _rotate_half(key) * sin_
        out.append((key.contiguous(), value.contiguous()))
    return out


def _check(h_m, kv_weight_cat, cos, sin, num_groups, num_kv_heads, head_dim, kv_bias_cat):
    if h_m.dim() != 3:
        raise ValueError(f"h_m must be [B, S, hidden], got {tuple(h_m.shape)}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    rows = num_groups * 2 * num_kv_heads * head_dim
    if tuple(kv_weight_cat.shape) != (rows, h_m.shape[-1]):
        raise ValueError(
            f"kv_weight_cat must be [G*2*kv_dim, hidden] = {(rows, h_m.shape[-1])}, got {tuple(kv_weight_cat.shape)}"
        )
    if kv_bias_cat is not None and tuple(kv_bias_cat.shape) != (rows,):
        raise ValueError(f"kv_bias_cat must be [{rows}], got {tuple(kv_bias_cat.shape)}")
    b, s = h_m.shape[:2]
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or t.shape[1] != s or t.shape[2] != head_dim:
            raise ValueError(f"{name} must be [B or 1, S, head_dim] = [{b}, {s}, {head_dim}], got {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels.
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, x_row_stride, y_row_stride, H, eps, BLOCK_H: tl.constexpr):
        """One row per program; the whole hidden row sits in registers (hidden <= 16K)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        mask = cols < H
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        # Round to the input dtype before the weight, as LlamaRMSNorm does, so both paths see the same GEMM input.
        normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * y_row_stride + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
        """Flat elementwise; rounds silu(gate) to the dtype before the product, as the two torch ops do."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + offs, (act * u).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_scatter_kernel(
        kv_ptr,  # [n_rows, G*2*HKV*D] GEMM result, row stride kv_row_stride
        cos_ptr,
        sin_ptr,  # [B or 1, S, D] (batch stride 0 when shared)
        out_ptr,  # [G, 2, B, HKV, S, D] contiguous
        row0,  # global index (b*S + s) of the first row of kv_ptr
        n_rows,
        S,
        B,
        kv_row_stride,
        cos_b_stride,
        cos_s_stride,
        sin_b_stride,
        sin_s_stride,
        HKV: tl.constexpr,
        D: tl.constexpr,
        HALF: tl.constexpr,  # D // 2
        HALF_BLOCK: tl.constexpr,  # next power of two >= HALF
        BLOCK_N: tl.constexpr,
    ):
        """Program (token block, g*HKV + h): RoPE on K, copy V, both written in cache layout."""
        pid_n = tl.program_id(0)
        pid_gh = tl.program_id(1)
        g = pid_gh // HKV
        h = pid_gh % HKV
        local = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = local < n_rows
        rows = local + row0  # global flattened (b, s): every offset below is int64
        b = rows // S
        s = rows % S
        c = tl.arange(0, HALF_BLOCK)
        mask = row_mask[:, None] & (c < HALF)[None, :]

        src_k = kv_ptr + local[:, None] * kv_row_stride + ((2 * g) * HKV + h) * D + c[None, :]
        src_v = src_k + HKV * D  # V_g follows K_g in the concatenated weight
        cos_row = cos_ptr + b[:, None] * cos_b_stride + s[:, None] * cos_s_stride + c[None, :]
        sin_row = sin_ptr + b[:, None] * sin_b_stride + s[:, None] * sin_s_stride + c[None, :]

        k1 = tl.load(src_k, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(src_k + HALF, mask=mask, other=0.0).to(tl.float32)
        v1 = tl.load(src_v, mask=mask, other=0.0)
        v2 = tl.load(src_v + HALF, mask=mask, other=0.0)
        cos1 = tl.load(cos_row, mask=mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_row + HALF, mask=mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_row, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_row + HALF, mask=mask, other=0.0).to(tl.float32)
        # x*cos + rotate_half(x)*sin with rotate_half(x) = [-x2, x1]; fp32 math, one rounding.
        o1 = k1 * cos1 - k2 * sin1
        o2 = k2 * cos2 + k1 * sin2

        plane = S * D  # one (g, kv, b, h) plane of the output
        dst_k = out_ptr + ((((2 * g) * B + b) * HKV + h) * plane + s * D)[:, None] + c[None, :]
        dst_v = out_ptr + ((((2 * g + 1) * B + b) * HKV + h) * plane + s * D)[:, None] + c[None, :]
        ty = out_ptr.dtype.element_ty
        tl.store(dst_k, o1.to(ty), mask=mask)
        tl.store(dst_k + HALF, o2.to(ty), mask=mask)
        tl.store(dst_v, v1.to(ty), mask=mask)
        tl.store(dst_v + HALF, v2.to(ty), mask=mask)


def _rms_norm_triton(x2d: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    n, hidden = x2d.shape
    y = torch.empty((n, hidden), dtype=out_dtype, device=x2d.device)
    block = triton.next_power_of_2(hidden)
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _rmsnorm_kernel[(n,)](x2d, weight, y, x2d.stride(0), y.stride(0), hidden, float(eps), BLOCK_H=block,
                          num_warps=num_warps)
    return y


def _no_grad_needed(*tensors: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm forward: one Triton pass where it can run (and no gradient is needed), else the reference."""
    usable = kernel_available(x) and weight.dtype in _SUPPORTED_DTYPES and x.shape[-1] <= 16384
    if not usable or not _no_grad_needed(x, weight) or x.numel() == 0:
        return _rms_norm_reference(x, weight, eps)
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out = _rms_norm_triton(x2d, weight, eps, torch.promote_types(weight.dtype, x.dtype))
    return out.view(*x.shape[:-1], x.shape[-1])


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: one Triton pass where it can run (and no gradient is needed), else torch."""
    usable = (kernel_available(gate) and gate.dtype == up.dtype and gate.shape == up.shape
              and gate.is_contiguous() and up.is_contiguous())
    if not usable or not _no_grad_needed(gate, up) or gate.numel() == 0:
        return _silu_mul_reference(gate, up)
    out = torch.empty_like(gate)
    block = 2048
    _silu_mul_kernel[(triton.cdiv(gate.numel(), block),)](gate, up, out, gate.numel(), BLOCK=block, num_warps=8)
    return out


def _fused_triton(h_m, norm_weight, eps, kv_weight_cat, cos, sin, num_groups, num_kv_heads, head_dim, kv_bias_cat,
                  out=None):
    b, s, hidden = h_m.shape
    n = b * s
    kv_dim = num_kv_heads * head_dim
    cols = num_groups * 2 * kv_dim
    x2d = h_m.reshape(n, hidden)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    normed = _rms_norm_triton(x2d, norm_weight, eps, torch.promote_types(norm_weight.dtype, h_m.dtype))
    if normed.dtype != kv_weight_cat.dtype:  # as nn.Linear would fail otherwise; only mixed-precision setups
        normed = normed.to(kv_weight_cat.dtype)
    out_dtype = kv_weight_cat.dtype

    shape = (num_groups, 2, b, num_kv_heads, s, head_dim)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=h_m.device)
    elif tuple(out.shape) != shape or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of shape {shape}")
    if n == 0:
        return [(out[g, 0], out[g, 1]) for g in range(num_groups)]
    # RoPE tables: keep the last dim unit-stride; batch stride 0 when shared by every sequence.
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0
    sin_b = sin.stride(0) if sin.shape[0] > 1 else 0

    half_block = triton.next_power_of_2(head_dim // 2)
    block_n = 32 if head_dim > 64 else 64
    rows_per_gemm = max(block_n, (_MAX_GEMM_ELEMENTS // cols) // block_n * block_n)
    for row0 in range(0, n, rows_per_gemm):
        rows = min(rows_per_gemm, n - row0)
        kv = F.linear(normed[row0 : row0 + rows], kv_weight_cat, kv_bias_cat)  # cuBLAS, fp32 accumulate
        grid = (triton.cdiv(rows, block_n), num_groups * num_kv_heads)
        _rope_scatter_kernel[grid](
            kv, cos, sin, out, row0, rows, s, b, kv.stride(0),
            cos_b, cos.stride(1), sin_b, sin.stride(1),
            HKV=num_kv_heads, D=head_dim, HALF=head_dim // 2, HALF_BLOCK=half_block, BLOCK_N=block_n, num_warps=4,
        )
    return [(out[g, 0], out[g, 1]) for g in range(num_groups)]


def fused_swiftkv_kv(
    h_m: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    kv_weight_cat: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_groups: int,
    num_kv_heads: int,
    head_dim: int,
    kv_bias_cat: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K/V of every AcrossKV group from ``h_M`` in one fused pass; [(K_g, V_g)] each [B, H_kv, S, D] contiguous.

    Args:
        h_m: [B, S, hidden] residual stream entering layer M.
        norm_weight, eps: ``norm_swiftkv``'s weight and epsilon.
        kv_weight_cat: [G·2·H_kv·D, hidden], rows [K_0; V_0; K_1; V_1; ...] (group-major).
        cos, sin: [B or 1, S, D] RoPE tables as produced by the model's rotary embedding.
        kv_bias_cat: optional [G·2·H_kv·D] bias (``attention_bias`` models).
        out: optional contiguous [G, 2, B, H_kv, S, D] buffer (dtype of ``kv_weight_cat``) to write into
            (Triton path only; the reference ignores it).

    The K/V of all groups are views into one [G, 2, B, H_kv, S, D] buffer. Without Triton or off CUDA this is
    `swiftkv_kv_reference`. Inference only: the result carries no autograd graph on the Triton path.
    """
    _check(h_m, kv_weight_cat, cos, sin, num_groups, num_kv_heads, head_dim, kv_bias_cat)
    if kernel_available(h_m):
        with torch.no_grad():
            return _fused_triton(h_m, norm_weight, eps, kv_weight_cat, cos, sin, num_groups, num_kv_heads,
                                 head_dim, kv_bias_cat, out)
    return swiftkv_kv_reference(h_m, norm_weight, eps, kv_weight_cat, cos, sin, num_groups, num_kv_heads,
                                head_dim, kv_bias_cat)
