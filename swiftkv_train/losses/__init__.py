"""Distillation losses as components, chosen by name in a recipe (e.g. ``transform.<method>.logits_loss=jsd``).

- ``base.py``: the shared checks, reductions (`REDUCTIONS`), the chunked engine that never holds the full
  [B, S, V] logits, and `LogitLoss`, the interface of a logits loss; each subclass registers itself by name in
  `LOGIT_LOSSES` (`logit_loss(name, **settings)` builds one).
- ``kl.py``: forward KL(teacher ‖ student) at temperature T, × T² (fused Triton kernel: swiftkv_kernels.kd_loss).
- ``jsd.py``: generalized JSD with β (no fused kernel).
- ``mse.py``: hidden-state MSE.
- ``masks.py``: which positions count, from causal-LM labels.

Every logits loss is called as ``loss(student_hidden, teacher_hidden, lm_head_weight, mask, *, temperature,
chunk_size, reduction, fused)``. A new one is a new module here with a `LogitLoss` subclass, imported below.
"""

from .base import LOGIT_LOSSES, REDUCTIONS, LogitLoss, logit_loss
from .jsd import JSD
from .kl import KL
from .masks import IGNORE_INDEX, kl_mask_from_labels
from .mse import hidden_mse_loss

__all__ = [
    "IGNORE_INDEX",
    "JSD",
    "KL",
    "LOGIT_LOSSES",
    "REDUCTIONS",
    "LogitLoss",
    "hidden_mse_loss",
    "kl_mask_from_labels",
    "logit_loss",
]
