"""Distillation losses that never hold the full [B, S, V] logits of teacher and student.

The student and the teacher share the (frozen) LM head, so the loss is a function of their final
normed hidden states. With Llama-3 vocabularies (V = 128k) the two [B, S, V] fp32 logit tensors,
plus what autograd keeps for the backward pass, would dominate memory. `chunked_kl_loss`
therefore works on row chunks of the flattened positions and, in the same pass, computes the
gradient with respect to the student hidden states; autograd only ever keeps that [N, H]
gradient, never an [N, V] tensor.

Conventions shared by every function here:

* ``mask`` selects the positions that count (assistant tokens); ``None`` means all positions.
  Use `kl_mask_from_labels` to build it from causal-LM labels.
* The teacher side is a fixed target: no gradient flows into ``teacher_hidden``, and teacher
  logits use the LM head as a constant.
* Arithmetic is fp32 whatever the input dtype; losses come back as fp32 scalars and gradients in
  the dtype of the input they belong to.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "REDUCTIONS",
    "chunked_kl_loss",
    "naive_kl_loss",
    "hidden_mse_loss",
    "distillation_loss",
    "kl_mask_from_labels",
]

IGNORE_INDEX = -100

# "mean":          sum over masked positions / number of masked positions. Every assistant
#                  token weighs the same whatever the padding or prompt length; this is the
#                  default because it keeps the loss scale independent of the prompt share.
# "batchmean_all": sum over masked positions / (B * S), i.e. masked-out positions count as zeros
#                  (the ArcticTraining SwiftKV reference behaviour).
# "sum":           plain sum over masked positions (for callers that normalise themselves, e.g.
#                  across gradient-accumulation micro-batches or data-parallel ranks).
REDUCTIONS = ("mean", "batchmean_all", "sum")


def kl_mask_from_labels(labels: torch.Tensor, *, shift: bool = True) -> torch.Tensor:
    """Boolean [B, S] mask of the positions whose next-token distribution should be distilled.

    With Hugging Face causal-LM labels (unshifted: ``labels[i]`` is the token at position i), the
    logits at position i predict ``labels[i + 1]``; ``shift=True`` (default) therefore marks
    position i when ``labels[i + 1] != -100`` and never the last position. ``shift=False`` gives
    the plain ``labels != -100`` mask for labels that are already aligned with the logits.
    """
    valid = labels != IGNORE_INDEX
    if not shift:
        return valid
    mask = torch.zeros_like(valid)
    mask[..., :-1] = valid[..., 1:]
    return mask


def _check_inputs(student_hidden, teacher_hidden, lm_head_weight, mask, temperature, reduction):
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
            f"{tuple(teacher_hidden.shape)} must have the same shape"
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [V, H] with H = {student_hidden.shape[-1]}, "
            f"got {tuple(lm_head_weight.shape)}"
        )
    if mask is not None and mask.shape != student_hidden.shape[:-1]:
        raise ValueError(
            f"mask must have shape {tuple(student_hidden.shape[:-1])} (hidden without the last "
            f"dim), got {tuple(mask.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _normaliser(num_positions: int, num_masked: int, reduction: str) -> float:
    if reduction == "mean":
        # An all-masked batch contributes 0 (not 0/0 = NaN).
        return float(max(num_masked, 1))
    if reduction == "batchmean_all":
        return float(max(num_positions, 1))
    return 1.0


def naive_kl_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference definition: T² · KL(p_teacher ‖ p_student) at temperature T, full logits.

    Materialises [N, V] logits for both models; use it for tests and small inputs only.
    Same arguments and semantics as `chunked_kl_loss`.
    """
    _check_inputs(student_hidden, teacher_hidden, lm_head_weight, mask, temperature, reduction)
    hidden_size = student_hidden.shape[-1]
    s = student_hidden.reshape(-1, hidden_size).float()
    t = teacher_hidden.detach().reshape(-1, hidden_size).float()
    w = lm_head_weight.float()
    log_p_s = torch.log_softmax(s @ w.T / temperature, dim=-1)
    log_p_t = torch.log_softmax(t @ w.detach().T / temperature, dim=-1)
    per_position = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * temperature**2
    if mask is not None:
        keep = mask.reshape(-1).bool()
        per_position = per_position * keep
        num_masked = int(keep.sum())
    else:
        num_masked = per_position.numel()
    return per_position.sum() / _normaliser(per_position.numel(), num_masked, reduction)


class _ChunkedKL(torch.autograd.Function):
    """Loss and its input gradients in one chunked forward pass; backward only rescales."""

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, lm_head_weight, mask, temperature, chunk_size, reduction):
        hidden_size = student_hidden.shape[-1]
        s_flat = student_hidden.reshape(-1, hidden_size)
        t_flat = teacher_hidden.reshape(-1, hidden_size)
        num_positions = s_flat.shape[0]
        # Only masked rows need logits: skipping prompt/padding rows saves their V-sized work.
        if mask is None:
            rows = torch.arange(num_positions, device=s_flat.device)
        else:
            rows = mask.reshape(-1).nonzero().squeeze(1)
        scale = 1.0 / _normaliser(num_positions, rows.numel(), reduction)

        # Transient fp32 copy of the head (no-op when it is fp32 already): costs V·H·4 bytes
        # once per call, but keeps logits exact enough for the tiny KLs between a SwiftKV
        # student and its teacher (bf16 logits of magnitude ~20 carry ~0.1 rounding noise).
        w32 = lm_head_weight.float()
        want_grad_w = ctx.needs_input_grad[2]
        grad_w32 = torch.zeros_like(w32) if want_grad_w else None
        grad_s = torch.zeros_like(s_flat)
        loss = torch.zeros((), dtype=torch.float32, device=s_flat.device)

        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start : start + chunk_size]
            s_chunk = s_flat.index_select(0, idx).float()
            t_chunk = t_flat.index_select(0, idx).float()
            log_p_s = torch.log_softmax(s_chunk @ w32.T / temperature, dim=-1)
            log_p_t = torch.log_softmax(t_chunk @ w32.T / temperature, dim=-1)
            p_t = log_p_t.exp()
            loss += (p_t * (log_p_t - log_p_s)).sum() * (temperature**2 * scale)
            # d loss / d student_logits = T² · (1/T) · (p_s − p_t), times the reduction scale.
            d_logits = (log_p_s.exp() - p_t).mul_(temperature * scale)
            grad_s.index_copy_(0, idx, (d_logits @ w32).to(grad_s.dtype))
            if want_grad_w:
                grad_w32.addmm_(d_logits.T, s_chunk)

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
        # The teacher is a target (no grad); mask, temperature, chunk_size, reduction are not tensors to differentiate.
        return grad_s, None, grad_w, None, None, None, None


def chunked_kl_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 2.0,
    chunk_size: int = 1024,
    reduction: str = "mean",
) -> torch.Tensor:
    """T² · KL(p_teacher ‖ p_student) over masked positions, without full logits.

    Args:
        student_hidden: [..., H] final normed hidden states of the student (gets a gradient).
        teacher_hidden: [..., H] same for the teacher; a target, never differentiated.
        lm_head_weight: [V, H] shared LM head. Usually frozen; if it requires grad it receives
            the gradient through the student logits only (the teacher logits treat it as a
            constant), at the cost of one [V, H] fp32 buffer.
        mask: bool [...] (hidden shape without H); True = position counts. ``None`` = all.
        temperature: softmax temperature T for both models; the loss is scaled by T².
        chunk_size: rows of logits materialised at a time; peak extra memory is a few
            chunk_size × V fp32 buffers.
        reduction: "mean" (divide by number of masked positions), "batchmean_all" (divide by all
            positions, masked-out ones counting as zeros) or "sum". See `REDUCTIONS`.

    Returns:
        fp32 scalar loss. Backward returns the gradient precomputed in forward scaled by the
        upstream gradient, so double backward is not supported.
    """
    _check_inputs(student_hidden, teacher_hidden, lm_head_weight, mask, temperature, reduction)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if mask is not None:
        mask = mask.to(device=student_hidden.device, dtype=torch.bool)
    return _ChunkedKL.apply(
        student_hidden, teacher_hidden.detach(), lm_head_weight, mask, float(temperature), int(chunk_size), reduction
    )


def hidden_mse_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error over all elements of the (masked) positions, fp32; 0 when none count.

    The teacher is a target (detached).
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
            f"{tuple(teacher_hidden.shape)} must have the same shape"
        )
    if mask is not None and mask.shape != student_hidden.shape[:-1]:
        raise ValueError(f"mask must have shape {tuple(student_hidden.shape[:-1])}, got {tuple(mask.shape)}")
    sq = (student_hidden.float() - teacher_hidden.detach().float()).pow(2)
    if mask is None:
        return sq.mean()
    keep = mask.to(device=sq.device, dtype=torch.bool)
    num_elements = int(keep.sum()) * sq.shape[-1]
    # Multiplying by the mask (instead of indexing) keeps the all-masked case a clean 0 with zero grad.
    return (sq * keep.unsqueeze(-1)).sum() / max(num_elements, 1)


def distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 2.0,
    hidden_weight: float = 0.0,
    chunk_size: int = 1024,
    reduction: str = "mean",
) -> dict[str, torch.Tensor]:
    """Training objective: ``loss = kl + hidden_weight · hidden_mse``.

    Returns ``{"loss", "kl", "hidden_mse"}``: ``loss`` carries the graph, the two components are
    detached fp32 scalars for logging. ``hidden_mse`` is always reported; it only joins the
    graph when ``hidden_weight`` is non-zero.
    """
    kl = chunked_kl_loss(
        student_hidden, teacher_hidden, lm_head_weight, mask,
        temperature=temperature, chunk_size=chunk_size, reduction=reduction,
    )
    if hidden_weight:
        mse = hidden_mse_loss(student_hidden, teacher_hidden, mask)
        loss = kl + hidden_weight * mse
    else:
        with torch.no_grad():
            mse = hidden_mse_loss(student_hidden, teacher_hidden, mask)
        loss = kl
    return {"loss": loss, "kl": kl.detach(), "hidden_mse": mse.detach()}
