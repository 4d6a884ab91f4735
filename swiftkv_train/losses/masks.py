"""Which positions a distillation loss counts, from causal-LM labels."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


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
