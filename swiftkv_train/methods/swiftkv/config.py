"""SwiftKV's settings (``transform.swiftkv`` in a recipe): one dataclass, its own checks."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import SwiftKVInputError
from ...losses import LOGIT_LOSSES, LogitLoss, logit_loss

KV_INITS = ("mean", "least_squares")
KL_REDUCTIONS = ("mean", "batchmean_all")


@dataclass
class SwiftKVConfig:
    # M: later layers take K/V from the input of layer M. None = half of the layers.
    num_key_value_layers: int | None = None
    # g: AcrossKV group size (consecutive later layers sharing one K/V cache entry).
    key_value_group_size: int = 1
    # The logits loss between teacher and student on the masked (assistant) tokens, by name (swiftkv_train.losses):
    # "kl" = forward KL(teacher || student), "jsd" = generalized JSD with jsd_beta (0 = forward KL, 1 = reverse KL).
    # Logits at temperature T, loss scaled by T^2 and weighted by kl_weight.
    logits_loss: str = "kl"
    jsd_beta: float = 0.5
    temperature: float = 2.0
    kl_weight: float = 1.0
    # Reduction of the logits loss. "mean": over masked tokens; "batchmean_all": over all B*S positions (the
    # ArcticTraining convention).
    kl_reduction: str = "mean"
    # MSE between student and teacher hidden states (transformers' hidden_states index; -2 = input of the last
    # layer), weighted; 0 disables it.
    hidden_loss_weight: float = 1.0
    hidden_loss_layer: int = -2
    # The student reuses the teacher's h_M instead of recomputing layers < M (identical result, less compute).
    reuse_teacher_prefix: bool = True
    # Activation checkpointing of the student's later layers (the only layers with gradients).
    gradient_checkpointing: bool = True
    # K/V projection init: "mean" (the reference: each group's own k/v_proj, averaged over an AcrossKV group) or
    # "least_squares" (a ridge fit of the teacher's K/V from norm_swiftkv(h_M) on calibration_batches training
    # batches; kv_init_ridge is relative to the mean input energy).
    kv_init: str = "mean"
    calibration_batches: int = 8
    kv_init_ridge: float = 1.0e-4

    def validate(self) -> None:
        """The checks that need no model (M, g and hidden_loss_layer are checked against the model's config)."""
        if self.logits_loss not in LOGIT_LOSSES:
            raise SwiftKVInputError(
                f"transform.swiftkv.logits_loss={self.logits_loss!r} is unknown: use one of "
                f"{', '.join(sorted(LOGIT_LOSSES))}."
            )
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise SwiftKVInputError(f"transform.swiftkv.jsd_beta={self.jsd_beta} must be in [0, 1].")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise SwiftKVInputError(
                f"transform.swiftkv.kl_reduction={self.kl_reduction!r}: use 'mean' or 'batchmean_all'."
            )
        if self.temperature <= 0:
            raise SwiftKVInputError(f"transform.swiftkv.temperature={self.temperature} must be > 0.")
        if self.kv_init not in KV_INITS:
            raise SwiftKVInputError(
                f"transform.swiftkv.kv_init={self.kv_init!r}: use 'mean' (the reference init) or 'least_squares'."
            )
        batches = self.calibration_batches
        if self.kv_init == "least_squares" and (isinstance(batches, bool) or not isinstance(batches, int)
                                                 or batches < 1):
            raise SwiftKVInputError(f"transform.swiftkv.calibration_batches={batches!r} must be a positive integer.")

    def logits_loss_component(self) -> LogitLoss:
        """The chosen logits loss, with its settings from this config."""
        return logit_loss(self.logits_loss, beta=self.jsd_beta)
