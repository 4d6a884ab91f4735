"""What every logits loss shares: input checks, reductions, the chunked engine and the registry of components.

A logits loss compares the next-token distributions of a student and a teacher that share one LM head, from their
final normed hidden states. With Llama-3 vocabularies (V = 128k) the two [B, S, V] fp32 logit tensors, plus what
autograd keeps for the backward pass, would dominate memory. The engine here (`_ChunkedLogitLoss`) therefore works
on row chunks of the flattened positions and, in the same pass, computes the gradient with respect to the student
hidden states; autograd only ever keeps that [N, H] gradient, never an [N, V] tensor. A component (`LogitLoss`
subclass: kl.py, jsd.py) only says what its divergence and its gradient are on one chunk of logits.

Conventions shared by every component:

* ``mask`` selects the positions that count (assistant tokens); ``None`` means all positions.
  Use `kl_mask_from_labels` to build it from causal-LM labels.
* The teacher side is a fixed target: no gradient flows into ``teacher_hidden``, and teacher
  logits use the LM head as a constant.
* Both models' logits are divided by the temperature T and the loss is scaled by T² (Hinton's convention, so the
  gradient's scale does not depend on T).
* Arithmetic is fp32 whatever the input dtype; losses come back as fp32 scalars and gradients in
  the dtype of the input they belong to.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import ClassVar

import torch
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

# "mean":          sum over masked positions / number of masked positions. Every assistant
#                  token weighs the same whatever the padding or prompt length; this is the
#                  default because it keeps the loss scale independent of the prompt share.
# "batchmean_all": sum over masked positions / (B * S), i.e. masked-out positions count as zeros
#                  (the ArcticTraining reference behaviour).
# "sum":           plain sum over masked positions (for callers that normalise themselves, e.g.
#                  across gradient-accumulation micro-batches or data-parallel ranks).
REDUCTIONS = ("mean", "batchmean_all", "sum")

# name -> LogitLoss subclass, filled as each component's module is imported (this package imports them all).
LOGIT_LOSSES: dict[str, type[LogitLoss]] = {}


def check_inputs(student_hidden, teacher_hidden, lm_head_weight, mask, temperature, reduction):
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


def normaliser(num_positions: int, num_masked: int, reduction: str) -> float:
    if reduction == "mean":
        # An all-masked batch contributes 0 (not 0/0 = NaN).
        return float(max(num_masked, 1))
    if reduction == "batchmean_all":
        return float(max(num_positions, 1))
    return 1.0


# A divergence on one chunk: (z_s, z_t) = temperature-scaled student/teacher logits [C, V] fp32 ->
# (sum over the chunk's rows of the divergence, its gradient with respect to z_s [C, V]). The gradient may reuse
# the inputs' memory; the engine scales it in place.
Divergence = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _ChunkedLogitLoss(torch.autograd.Function):
    """Loss and its input gradients in one chunked forward pass; backward only rescales."""

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, lm_head_weight, mask, temperature, chunk_size, reduction,
                divergence):
        hidden_size = student_hidden.shape[-1]
        s_flat = student_hidden.reshape(-1, hidden_size)
        t_flat = teacher_hidden.reshape(-1, hidden_size)
        num_positions = s_flat.shape[0]
        # Only masked rows need logits: skipping prompt/padding rows saves their V-sized work.
        if mask is None:
            rows = torch.arange(num_positions, device=s_flat.device)
        else:
            rows = mask.reshape(-1).nonzero().squeeze(1)
        scale = 1.0 / normaliser(num_positions, rows.numel(), reduction)

        # Transient fp32 copy of the head (no-op when it is fp32 already): costs V·H·4 bytes
        # once per call, but keeps logits exact enough for the tiny KLs between a distilled
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
            value, grad_z = divergence(s_chunk @ w32.T / temperature, t_chunk @ w32.T / temperature)
            loss += value * (temperature**2 * scale)
            # d (T² · D) / d student_logits = T² · (1/T) · dD/dz_s, times the reduction scale.
            d_logits = grad_z.mul_(temperature * scale)
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
        # The teacher is a target (no grad); the other arguments are not tensors to differentiate.
        return grad_s, None, grad_w, None, None, None, None, None


_WARNED: set[str] = set()


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message, *args)


@dataclasses.dataclass(frozen=True)
class LogitLoss:
    """One logits loss: ``loss(student_hidden, teacher_hidden, lm_head_weight, mask, *, temperature, chunk_size,
    reduction, fused) -> fp32 scalar``.

    A subclass sets ``name`` (it then registers itself in `LOGIT_LOSSES`), declares its own settings as dataclass
    fields (e.g. JSD's ``beta``) and implements ``divergence`` (one chunk, see `Divergence`). One with a fused kernel
    sets ``has_fused_kernel`` and overrides ``fused_kernel``.

    Args of a call:
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
        fused: use the component's fused (Triton) kernel where it can run (CUDA, or the Triton interpreter);
            the torch chunked path otherwise. A component without a fused kernel says so once in the log
            instead of pretending.

    Returns an fp32 scalar. Backward returns the gradient precomputed in forward scaled by the upstream gradient,
    so double backward is not supported.
    """

    name: ClassVar[str] = ""
    has_fused_kernel: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.name:
            return
        if cls.name in LOGIT_LOSSES and LOGIT_LOSSES[cls.name].__qualname__ != cls.__qualname__:
            raise TypeError(f"two logits losses are named {cls.name!r}: {LOGIT_LOSSES[cls.name]} and {cls}")
        LOGIT_LOSSES[cls.name] = cls

    def divergence(self, z_s: torch.Tensor, z_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def fused_kernel(self, student_hidden: torch.Tensor, lm_head_weight: torch.Tensor) -> Callable | None:
        """The fused loss function (same arguments as a call, without ``fused``) when it can run on these inputs,
        else None."""
        return None

    def __call__(
        self,
        student_hidden: torch.Tensor,
        teacher_hidden: torch.Tensor,
        lm_head_weight: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        temperature: float = 2.0,
        chunk_size: int = 1024,
        reduction: str = "mean",
        fused: bool = False,
    ) -> torch.Tensor:
        check_inputs(student_hidden, teacher_hidden, lm_head_weight, mask, temperature, reduction)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if mask is not None:
            mask = mask.to(device=student_hidden.device, dtype=torch.bool)
        if fused:
            kernel = self.fused_kernel(student_hidden, lm_head_weight)
            if kernel is not None:
                return kernel(student_hidden, teacher_hidden, lm_head_weight, mask, temperature=temperature,
                              chunk_size=chunk_size, reduction=reduction)
            if not self.has_fused_kernel:
                _warn_once(f"{self.name}:none", "the %r logits loss has no fused kernel: fused_loss=true runs its "
                           "torch chunked path", self.name)
            elif student_hidden.is_cuda:
                _warn_once(f"{self.name}:unavailable", "the fused kernel of the %r logits loss cannot run here "
                           "(Triton missing, or an unsupported dtype): running its torch chunked path", self.name)
        return _ChunkedLogitLoss.apply(
            student_hidden, teacher_hidden.detach(), lm_head_weight, mask, float(temperature), int(chunk_size),
            reduction, self.divergence,
        )


def logit_loss(name: str, **settings) -> LogitLoss:
    """The component registered as ``name``, built with the settings it declares as fields; settings it does not
    declare are ignored (so one config can carry every component's settings, e.g. JSD's beta beside ``kl``).

    An unknown name is a ValueError naming the choices."""
    if name not in LOGIT_LOSSES:
        raise ValueError(f"unknown logits loss {name!r}: choose one of {', '.join(sorted(LOGIT_LOSSES))}")
    cls = LOGIT_LOSSES[name]
    declared = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in settings.items() if k in declared})
