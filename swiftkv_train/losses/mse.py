"""Hidden-state MSE between student and teacher (no LM head involved)."""

from __future__ import annotations

import torch


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
