"""Forward KL(p_teacher ‖ p_student) at temperature T, × T², chunked from hidden states through the LM head.

Fused kernel: `swiftkv_kernels.kd_loss.fused_kl_loss` (Triton) where it can run and ``fused=True``; the torch
chunked engine of base.py otherwise.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .base import LogitLoss


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
    """Reference definition: T² · KL(p_teacher ‖ p_student) at temperature T, plain autograd.

    The fused kernel's torch reference (`swiftkv_kernels.kd_loss.kl_loss_reference`) with every position in one
    chunk: materialises [N, V] logits for both models; use it for tests and small inputs only.
    Same arguments and semantics as `chunked_kl_loss`.
    """
    from swiftkv_kernels.kd_loss import kl_loss_reference

    positions = max(1, math.prod(student_hidden.shape[:-1]))
    return kl_loss_reference(student_hidden, teacher_hidden, lm_head_weight, mask, temperature, positions, reduction)
