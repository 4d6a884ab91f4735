"""Generalized Jensen-Shannon divergence between teacher and student, × T², chunked through the LM head.

With M = (1 − β)·p_student + β·p_teacher, JSD_β = β·KL(p_teacher ‖ M) + (1 − β)·KL(p_student ‖ M), and, as in
Liger-Kernel's ``chunked_loss/jsd_loss.py`` (and TRL's GKD), the two ends are the plain KLs: β = 0 is the forward
KL(p_teacher ‖ p_student) (equal to the ``kl`` component), β = 1 the reverse KL(p_student ‖ p_teacher). Logits are
divided by T and, unlike Liger, the loss is scaled by T² like the ``kl`` component.

No fused kernel: ``fused=True`` runs the torch chunked path (and says so once in the log).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .base import LogitLoss


@dataclasses.dataclass(frozen=True)
class JSD(LogitLoss):
    """T² · JSD_β(p_teacher, p_student) over the masked positions (see `LogitLoss` for the call)."""

    name = "jsd"
    # Weight of the teacher in the mixture, in [0, 1]: 0 = forward KL, 0.5 = symmetric JSD, 1 = reverse KL.
    beta: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"JSD beta must be in [0, 1], got {self.beta}")

    def divergence(self, z_s, z_t):
        beta = float(self.beta)
        log_p_s = torch.log_softmax(z_s, dim=-1)
        log_p_t = torch.log_softmax(z_t, dim=-1)
        if beta == 0.0:  # forward KL(p_t ‖ p_s), gradient p_s − p_t
            p_t = log_p_t.exp()
            return (p_t * (log_p_t - log_p_s)).sum(), log_p_s.exp() - p_t
        p_s = log_p_s.exp()
        # Both other cases are c·KL(p_s ‖ R) (+ a term constant in z_s) with R = p_t (β = 1, c = 1) or the
        # mixture (c = 1 − β). Its gradient: ∂/∂p_s of β·KL(p_t ‖ M) + (1 − β)·KL(p_s ‖ M) is (1 − β)(log p_s −
        # log M) (the 1/M terms cancel), so dJSD/dz_s = c · p_s ⊙ (f − Σ p_s f) with f = log p_s − log R.
        if beta == 1.0:
            f = log_p_s - log_p_t
            coef, teacher_term = 1.0, None
        else:
            log_m = torch.logaddexp(log_p_s + math.log1p(-beta), log_p_t + math.log(beta))
            f = log_p_s - log_m
            coef, teacher_term = 1.0 - beta, (log_p_t.exp() * (log_p_t - log_m)).sum()
        kl_s = (p_s * f).sum(-1, keepdim=True)  # KL(p_s ‖ R) per row
        value = coef * kl_s.sum()
        if teacher_term is not None:
            value = value + beta * teacher_term
        grad = f.sub_(kl_s).mul_(p_s).mul_(coef)
        return value, grad
