"""Forward KL(p_teacher ‖ p_student) at temperature T, × T², chunked from hidden states through the LM head.

Fused kernel: `swiftkv_kernels.kd_loss.fused_kl_loss` (Triton) where it can run and ``fused=True``; the torch
chunked engine of base.py otherwise.
"""

from __future__ import annotations

import dataclasses

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
