"""Forward KL(p_teacher ‖ p_student) at temperature T, × T², chunked from hidden states through the LM head.

Fused kernel: `swiftkv_kernels.kd_loss.fused_kl_loss` (Triton) where it can run and ``fused=True``; the torch
chunked engine of base.py otherwise.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import LogitLoss, check_inputs, normaliser


@dataclasses.dataclass(frozen=True)
class KL(LogitLoss):
    """T² · KL(p_teacher ‖ p_student) over the masked positions (see `LogitLoss` for the call)."""

    name = "kl"
    has_fused_kernel = True

    def divergence(self, z_s, z_t):
        log_p_s = torch.log_softmax(z_s, dim=-1)
        log_p_t = torch.log_softmax(z_t, dim=-1)
        p_t = log_p_t.exp()
        # dKL/dz_s = p_s − p_t
        return (p_t * (log_p_t - log_p_s)).sum(), log_p_s.exp() - p_t

    def fused_kernel(self, student_hidden, lm_head_weight):
        try:
            from swiftkv_kernels import kd_loss
        except ImportError:
            return None
        if kd_loss.kernel_available(student_hidden) and kd_loss.kernel_available(lm_head_weight):
            return kd_loss.fused_kl_loss
        return None


def chunked_kl_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 2.0,
    chunk_size: int = 1024,
    reduction: str = "mean",
) -> torch.Tensor:
    """T² · KL(p_teacher ‖ p_student) over masked positions, without full logits: the `KL` component's torch
    chunked path (arguments as in `LogitLoss`)."""
    return KL()(student_hidden, teacher_hidden, lm_head_weight, mask, temperature=temperature,
                chunk_size=chunk_size, reduction=reduction)


def naive_kl_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference definition: T² · KL(p_teacher ‖ p_student) at temperature T, full logits, plain autograd.

    Materialises [N, V] logits for both models; use it for tests and small inputs only.
    Same arguments and semantics as `chunked_kl_loss`.
    """
    check_inputs(student_hidden, teacher_hidden, lm_head_weight, mask, temperature, reduction)
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
    return per_position.sum() / normaliser(per_position.numel(), num_masked, reduction)
