"""Fused distillation loss: chunked lm_head -> log-softmax -> T²·KL(teacher ‖ student), forward and backward.

A pure op (imports only torch, triton when present, and `kernel_available` from its sibling swiftkv_prefill_kv), in
three parts as in Liger-Kernel: the Triton kernel (`_kl_rows_kernel`), the autograd.Function around it (`_FusedKL`,
behind `fused_kl_loss`) and a plain torch reference (`kl_loss_reference`, also the fallback off CUDA or without
Triton) with the same arguments and result.

Per chunk of C masked rows:

1. ONE cuBLAS GEMM ``[s_chunk; t_chunk] @ W.T`` -> a [2C, V] fp32 logits buffer (bf16/fp16 inputs, fp32
   accumulate and fp32 output via ``torch.mm(..., out_dtype=float32)``; the logits are then as exact as the fp32
   reference's without its fp32 copy of the head).
2. ONE Triton kernel, one program per row: an online-softmax pass over V for the student and teacher rows gives
   both log-partition functions and the teacher-weighted logit difference, hence the KL; a second pass writes
   d loss / d student_logits = T·scale·(p_s − p_t) *in place* over the student logits. In bf16 the gradient is
   written as bf16 into the first half of each fp32 row (row stride 2V in bf16 elements): every fp32 element a
   store overwrites was already read by the same program (the store of block [j, j+B) lands on fp32 columns
   [j/2, (j+B)/2)), and rows never overlap.
3. cuBLAS ``grad_chunk = grad_logits @ W`` (and ``grad_W += grad_logits.T @ s_chunk`` if the head trains).

So a chunk holds one [2C, V] fp32 buffer (two [C, V] "rows"), where a torch chunked loss holds an fp32 copy of the
head plus ~5 [C, V] fp32 temporaries. The gradient is computed in forward and only [N, H] is saved.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

# Where a Triton kernel of this package can run (CUDA, or CPU under ``TRITON_INTERPRET=1``; fp32/fp16/bf16) is one
# rule for all of them, kept in a kernel file that exports ship self-contained.
from .swiftkv_prefill_kv import _SUPPORTED_DTYPES, kernel_available

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "REDUCTIONS", "kernel_available", "fused_kl_loss", "kl_loss_reference"]


# ----------------------------------------------------------------------------------------------------------------
# Arguments, reductions and the torch reference.
# ----------------------------------------------------------------------------------------------------------------

REDUCTIONS = ("mean", "batchmean_all", "sum")


def _check(student_hidden, teacher_hidden, lm_head_weight, mask, temperature, chunk_size, reduction) -> None:
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} must have the same shape")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"lm_head_weight must be [V, H] with H = {student_hidden.shape[-1]}, "
                         f"got {tuple(lm_head_weight.shape)}")
    if mask is not None and mask.shape != student_hidden.shape[:-1]:
        raise ValueError(f"mask must have shape {tuple(student_hidden.shape[:-1])} (hidden without the last dim), "
                         f"got {tuple(mask.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _reduction_scale(num_positions: int, num_masked: int, reduction: str) -> float:
    """1 / the divisor: "mean" = masked positions (an all-masked batch gives 0, not NaN), "batchmean_all" = all
    positions (masked-out ones count as zeros), "sum" = 1."""
    if reduction == "mean":
        return 1.0 / max(num_masked, 1)
    if reduction == "batchmean_all":
        return 1.0 / max(num_positions, 1)
    return 1.0


def _kl_chunk_reference(s_chunk, t_chunk, w, temperature):
    log_p_s = torch.log_softmax(s_chunk.float() @ w.float().t() / temperature, dim=-1)
    log_p_t = torch.log_softmax(t_chunk.float() @ w.detach().float().t() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum()


def kl_loss_reference(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 2.0,
    chunk_size: int = 1024,
    reduction: str = "mean",
) -> torch.Tensor:
    """The torch reference of `fused_kl_loss` (same arguments and result): fp32 logits of ``chunk_size`` masked rows
    at a time, plain autograd for the gradients; each chunk is recomputed in backward (activation checkpointing),
    so one chunk's [C, V] logits are alive at a time, not all N rows'."""
    _check(student_hidden, teacher_hidden, lm_head_weight, mask, temperature, chunk_size, reduction)
    hidden = student_hidden.shape[-1]
    s_flat = student_hidden.reshape(-1, hidden)
    t_flat = teacher_hidden.detach().reshape(-1, hidden)
    if mask is None:
        rows = torch.arange(s_flat.shape[0], device=s_flat.device)
    else:
        rows = mask.to(device=s_flat.device, dtype=torch.bool).reshape(-1).nonzero().squeeze(1)
    parts = []
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start : start + chunk_size]
        parts.append(checkpoint(_kl_chunk_reference, s_flat.index_select(0, idx), t_flat.index_select(0, idx),
                                lm_head_weight, temperature, use_reentrant=False))
    # No masked row: a 0 that still back-propagates (zero gradients) like the fused path.
    total = torch.stack(parts).sum() if parts else (s_flat.float() * 0.0).sum()
    return total * (temperature**2 * _reduction_scale(s_flat.shape[0], rows.numel(), reduction))


# ----------------------------------------------------------------------------------------------------------------
# Logits projection: fp32 output from low-precision inputs without an fp32 copy of the head.
# ----------------------------------------------------------------------------------------------------------------

_OUT_DTYPE_MM: dict[tuple, bool] = {}


def _mm_supports_fp32_out(x: torch.Tensor, w: torch.Tensor) -> bool:
    key = (x.device.type, x.dtype)
    if key not in _OUT_DTYPE_MM:
        try:
            a = torch.ones(2, 2, dtype=x.dtype, device=x.device)
            _OUT_DTYPE_MM[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except Exception:  # noqa: BLE001 - older torch, or backends without aten::mm.dtype (CPU)
            _OUT_DTYPE_MM[key] = False
    return _OUT_DTYPE_MM[key]


def _project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T with fp32 output where the backend can (bf16/fp16 products are exact in fp32, accumulate is fp32).

    Fallback: logits in the input dtype (the kernel upcasts); less exact for bf16 (≈0.1 absolute at |logit|≈20).
    """
    if x.dtype == torch.float32:
        return torch.mm(x, w.t())
    if _mm_supports_fp32_out(x, w):
        return torch.mm(x, w.t(), out_dtype=torch.float32)
    return torch.mm(x, w.t())


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel.
# ----------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _kl_rows_kernel(
        s_ptr,  # student logits rows (fp32, or the input dtype), row stride s_row_stride
        t_ptr,  # teacher logits rows, row stride t_row_stride
        g_ptr,  # gradient rows (may alias s_ptr), row stride g_row_stride
        loss_ptr,  # [rows] fp32 per-row loss (already scaled)
        V,
        s_row_stride,
        t_row_stride,
        g_row_stride,
        inv_t,
        loss_scale,  # T² · reduction scale
        grad_scale,  # T · reduction scale
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * s_row_stride
        t_row = t_ptr + row * t_row_stride
        g_row = g_ptr + row * g_row_stride
        cols = tl.arange(0, BLOCK_V)

        # Pass 1: online log-sum-exp of both rows plus a = Σ exp(z_t − m_t)(z_t − z_s), rescaled like the sums.
        zero = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0)
        m_s = zero - float("inf")
        m_t = zero - float("inf")
        d_s = zero
        d_t = zero
        a_t = zero
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            zs = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            zt = tl.load(t_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            new_m_s = tl.maximum(m_s, tl.max(zs, axis=0))
            d_s = d_s * tl.exp(m_s - new_m_s) + tl.sum(tl.exp(zs - new_m_s), axis=0)
            m_s = new_m_s
            new_m_t = tl.maximum(m_t, tl.max(zt, axis=0))
            alpha = tl.exp(m_t - new_m_t)
            e_t = tl.exp(zt - new_m_t)  # 0 on masked columns
            diff = tl.where(mask, zt - zs, 0.0)  # avoid (-inf) - (-inf) = nan on masked columns
            d_t = d_t * alpha + tl.sum(e_t, axis=0)
            a_t = a_t * alpha + tl.sum(e_t * diff, axis=0)
            m_t = new_m_t
        lse_s = m_s + tl.log(d_s)
        lse_t = m_t + tl.log(d_t)
        # KL(p_t ‖ p_s) = Σ p_t (z_t − z_s) − lse_t + lse_s
        kl = a_t / d_t - lse_t + lse_s
        tl.store(loss_ptr + row, kl * loss_scale)

        # Pass 2: d(T²·KL)/d s = T (p_s − p_t), written over the student logits already consumed.
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            zs = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
            zt = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
            grad = (tl.exp(zs - lse_s) - tl.exp(zt - lse_t)) * grad_scale
            tl.store(g_row + offs, grad.to(g_ptr.dtype.element_ty), mask=mask)


def _kl_rows(logits: torch.Tensor, rows: int, grad_dtype: torch.dtype, temperature: float, scale: float,
             loss_out: torch.Tensor | None = None):
    """Run the kernel on a [2·rows, V] logits buffer (student rows first); returns (per-row loss, grad view)."""
    v = logits.shape[1]
    student, teacher = logits[:rows], logits[rows:]
    if grad_dtype == logits.dtype:
        grad = student  # same dtype: in place, element for element
    else:
        # Narrower gradient dtype: write it into the first half of each (wider) student row, see module doc.
        ratio = logits.element_size() // torch.empty((), dtype=grad_dtype).element_size()
        grad = student.view(grad_dtype)[:, :v]
        assert grad.stride(0) == ratio * v
    loss_rows = torch.empty(rows, dtype=torch.float32, device=logits.device) if loss_out is None else loss_out
    block_v = min(4096, triton.next_power_of_2(v))
    _kl_rows_kernel[(rows,)](
        student, teacher, grad, loss_rows, v,
        student.stride(0), teacher.stride(0), grad.stride(0),
        1.0 / temperature, temperature * temperature * scale, temperature * scale,
        BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )
    return loss_rows, grad


class _FusedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, lm_head_weight, mask, temperature, chunk_size, reduction):
        hidden = student_hidden.shape[-1]
        s_flat = student_hidden.reshape(-1, hidden)
        t_flat = teacher_hidden.reshape(-1, hidden)
        num_positions = s_flat.shape[0]
        w = lm_head_weight.detach()
        # Only masked rows need logits (as in the reference).
        rows = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
        num_rows = num_positions if rows is None else rows.numel()
        scale = _reduction_scale(num_positions, num_rows, reduction)

        want_grad_w = ctx.needs_input_grad[2]
        grad_w32 = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_grad_w else None
        grad_s = torch.zeros_like(s_flat)
        loss_parts = []
        for start in range(0, num_rows, chunk_size):
            if rows is None:
                s_chunk = s_flat[start : start + chunk_size]
                t_chunk = t_flat[start : start + chunk_size]
            else:
                idx = rows[start : start + chunk_size]
                s_chunk = s_flat.index_select(0, idx)
                t_chunk = t_flat.index_select(0, idx)
            c = s_chunk.shape[0]
            x = torch.cat([s_chunk, t_chunk.to(s_chunk.dtype)]).to(w.dtype)
            logits = _project(x, w)  # [2c, V], one GEMM for both models
            del x
            loss_rows, grad_logits = _kl_rows(logits, c, w.dtype, temperature, scale)
            loss_parts.append(loss_rows)
            g_hidden = torch.mm(grad_logits, w)  # cuBLAS accepts the 2V row stride as its leading dimension
            if rows is None:
                grad_s[start : start + c] = g_hidden
            else:
                grad_s.index_copy_(0, idx, g_hidden.to(grad_s.dtype))
            if want_grad_w:
                grad_w32 += torch.mm(grad_logits.t(), s_chunk.to(w.dtype)).float()
            del logits, grad_logits, g_hidden
        loss = torch.cat(loss_parts).sum() if loss_parts else torch.zeros((), device=s_flat.device)

        saved = [grad_s.view_as(student_hidden)]
        if want_grad_w:
            saved.append(grad_w32.to(lm_head_weight.dtype))
        ctx.save_for_backward(*saved)
        ctx.want_grad_w = want_grad_w
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        grad_s = (saved[0] * grad_output).to(saved[0].dtype)
        grad_w = (saved[1] * grad_output).to(saved[1].dtype) if ctx.want_grad_w else None
        return grad_s, None, grad_w, None, None, None, None


def fused_kl_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 2.0,
    chunk_size: int = 1024,
    reduction: str = "mean",
) -> torch.Tensor:
    """T² · KL(p_teacher ‖ p_student) at temperature T over the masked positions, from hidden states and the shared
    LM head ([V, H]) without full logits. ``mask``: bool, the hidden shape without H (None = every position);
    ``reduction``: "mean" over masked positions, "batchmean_all" over all positions, or "sum".

    Uses the Triton path on CUDA (or under ``TRITON_INTERPRET=1`` on CPU), `kl_loss_reference` otherwise.
    Returns an fp32 scalar; the gradient to ``student_hidden`` (and to ``lm_head_weight`` if it requires grad)
    is computed in forward, so double backward is not supported.
    """
    _check(student_hidden, teacher_hidden, lm_head_weight, mask, temperature, chunk_size, reduction)
    if not (kernel_available(student_hidden) and lm_head_weight.dtype in _SUPPORTED_DTYPES):
        return kl_loss_reference(student_hidden, teacher_hidden, lm_head_weight, mask, temperature=temperature,
                                 chunk_size=chunk_size, reduction=reduction)
    if mask is not None:
        mask = mask.to(device=student_hidden.device, dtype=torch.bool)
    return _FusedKL.apply(
        student_hidden, teacher_hidden.detach(), lm_head_weight, mask, float(temperature), int(chunk_size), reduction
    )
