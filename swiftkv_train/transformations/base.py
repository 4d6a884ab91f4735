"""What a transformation is to the shared trainer: a model conversion plus a loss.

The trainer (``swiftkv_train.train.trainer``) owns the loop, DeepSpeed, data, checkpoints, logging and export; a
transformation only says how to build the student from the loaded model, which parameters train, and what the
loss of one batch is. SwiftKV, CSKV and Locret are subclasses; nothing here copies the loop.
"""

from abc import ABC, abstractmethod

import torch
from torch import nn


class Transformation(ABC):
    """Subclasses set ``name`` and implement ``build_student`` and ``loss``.

    ``cfg`` is this transformation's own config node (e.g. ``cfg.transform.swiftkv``), ``train_cfg`` the whole run
    config (read-only) for the few fields a loss needs (e.g. the chunk size of the logits loss).
    """

    name: str = ""

    def __init__(self, cfg, train_cfg=None):
        self.cfg = cfg
        self.train_cfg = train_cfg

    # ---- conversion -----------------------------------------------------------------------------------------
    def check_model_config(self, config) -> None:
        """Refuse, from the model's config alone, what ``build_student`` would refuse: the trainer calls this
        before the weights load (seconds instead of a load that can take minutes). Raise SwiftKVInputError."""

    @abstractmethod
    def build_student(self, model: nn.Module) -> nn.Module:
        """Return the model to train (may share ``model``'s frozen tensors). Only trainable parameters may have
        ``requires_grad=True``: the optimizer is built over exactly those."""

    def calibrate(self, student: nn.Module, batches) -> None:
        """Optional data-dependent initialisation before training (e.g. CSKV's activation-aware SVD).

        ``batches`` is an iterable of training batches (dicts of tensors on the student's device)."""

    def trainable_parameters(self, student: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in student.named_parameters() if p.requires_grad]

    # ---- training -------------------------------------------------------------------------------------------
    @abstractmethod
    def loss(self, student: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss of one micro-batch: a dict with ``"loss"`` (the scalar to back-propagate) and any other scalars
        to log (detached). ``batch`` holds ``input_ids``, ``labels``, ``position_ids`` (packed rows) and
        optionally ``attention_mask``."""

    # ---- evaluation -----------------------------------------------------------------------------------------
    def teacher_and_student_hidden(
        self, student: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Final normed hidden states [B, S, H] of the teacher and of the student for fidelity metrics (KL, top-1,
        perplexity through the shared lm_head); None when the transformation does not change the outputs."""
        return None

    # ---- export ---------------------------------------------------------------------------------------------
    def prepare_export(self, student: nn.Module) -> nn.Module:
        """The model to hand to ``save_hf`` (default: the student itself)."""
        return student
