"""Teacher-fidelity metrics for a distilled student, accumulated window by window.

For each counted position (next-token target present and mask true) the accumulator sums

* KL(teacher ‖ student) in nats at temperature 1,
* top-1 agreement (the two argmaxes are equal),
* the negative log-likelihood of the next-token target under teacher and under student,

and `compute()` turns the sums into means (perplexity = exp(mean NLL)). Rows are processed in
chunks and upcast to fp32 one chunk at a time, so a caller may hand over a whole [B, S, V]
window of bf16 logits, or use `update_from_hidden` to never build full logits at all.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FidelityAccumulator", "next_token_targets"]

IGNORE_INDEX = -100


def next_token_targets(input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Targets aligned with the logits: position i is scored on token i + 1; the last on nothing.

    If ``labels`` (unshifted, -100 = ignore) are given they are shifted instead of ``input_ids``,
    so only e.g. assistant tokens are scored.
    """
    source = input_ids if labels is None else labels
    targets = torch.full_like(source, IGNORE_INDEX)
    targets[..., :-1] = source[..., 1:]
    return targets


class FidelityAccumulator:
    """Running teacher-vs-student statistics; `update` per window, `compute` at the end.

    Sums are kept in float64 on the CPU so long evaluations do not lose precision. For
    data-parallel evaluation, all-reduce `to_tensor()` across ranks and rebuild with
    `from_tensor`.
    """

    _FIELDS = ("kl_sum", "agree_sum", "nll_teacher_sum", "nll_student_sum", "tokens")

    def __init__(self, chunk_size: int = 1024):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.reset()

    def reset(self) -> None:
        self._sums = torch.zeros(len(self._FIELDS), dtype=torch.float64)

    def _rows(self, targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        keep = targets.reshape(-1) != IGNORE_INDEX
        if mask is not None:
            if mask.shape != targets.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} must equal targets shape {tuple(targets.shape)}")
            keep &= mask.reshape(-1).to(device=keep.device, dtype=torch.bool)
        return keep.nonzero().squeeze(1)

    @torch.no_grad()
    def _accumulate(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """fp32 [n, V] logit rows and [n] targets: add their statistics to the sums."""
        log_p_t = torch.log_softmax(teacher_logits.float(), dim=-1)
        log_p_s = torch.log_softmax(student_logits.float(), dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
        agree = (log_p_t.argmax(-1) == log_p_s.argmax(-1)).sum()
        tgt = targets.unsqueeze(-1)
        nll_t = -log_p_t.gather(-1, tgt).sum()
        nll_s = -log_p_s.gather(-1, tgt).sum()
        batch = torch.stack([kl.double(), agree.double(), nll_t.double(), nll_s.double()]).cpu()
        self._sums[:4] += batch
        self._sums[4] += targets.numel()

    @torch.no_grad()
    def update(
        self,
        teacher_logits: torch.Tensor,
        student_logits: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add a window of logits [..., V] with next-token ``targets`` [...] (-100 = skip).

        ``targets`` must already be aligned with the logits (see `next_token_targets`);
        ``mask`` (same shape as targets) optionally drops more positions.
        """
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits {tuple(teacher_logits.shape)} and student_logits "
                f"{tuple(student_logits.shape)} must have the same shape"
            )
        if teacher_logits.shape[:-1] != targets.shape:
            raise ValueError(
                f"targets shape {tuple(targets.shape)} must equal logits shape without the vocab "
                f"dim {tuple(teacher_logits.shape[:-1])}"
            )
        self._update_chunks(teacher_logits, student_logits, targets, mask, lambda logits: logits)

    @torch.no_grad()
    def update_from_hidden(
        self,
        teacher_hidden: torch.Tensor,
        student_hidden: torch.Tensor,
        lm_head_weight: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Like `update`, from final normed hidden states [..., H] and the shared [V, H] head.

        Logits are built chunk by chunk, so no [B, S, V] tensor ever exists.
        """
        if teacher_hidden.shape != student_hidden.shape or teacher_hidden.shape[:-1] != targets.shape:
            raise ValueError(
                f"hidden shapes {tuple(teacher_hidden.shape)}, {tuple(student_hidden.shape)} and "
                f"targets {tuple(targets.shape)} do not line up"
            )
        w32 = lm_head_weight.float()
        self._update_chunks(teacher_hidden, student_hidden, targets, mask, lambda hidden: hidden.float() @ w32.T)

    def _update_chunks(self, teacher, student, targets, mask, to_logits) -> None:
        """Accumulate the kept rows of teacher/student [..., W] (logits, or hidden states that ``to_logits`` maps to
        logits) ``chunk_size`` rows at a time."""
        width = teacher.shape[-1]
        t_flat, s_flat = teacher.reshape(-1, width), student.reshape(-1, width)
        targets = targets.to(teacher.device)
        rows = self._rows(targets, mask)
        tgt_flat = targets.reshape(-1)
        for start in range(0, rows.numel(), self.chunk_size):
            idx = rows[start : start + self.chunk_size]
            self._accumulate(
                to_logits(t_flat.index_select(0, idx)),
                to_logits(s_flat.index_select(0, idx)),
                tgt_flat.index_select(0, idx),
            )

    @property
    def tokens(self) -> int:
        return int(self._sums[4].item())

    def compute(self) -> dict[str, float]:
        """``{kl, top1, ppl_teacher, ppl_student, tokens}``; NaN statistics when no token counted."""
        kl_sum, agree_sum, nll_t, nll_s, tokens = self._sums.tolist()
        if tokens == 0:
            nan = float("nan")
            return {"kl": nan, "top1": nan, "ppl_teacher": nan, "ppl_student": nan, "tokens": 0}
        return {
            "kl": kl_sum / tokens,
            "top1": agree_sum / tokens,
            "ppl_teacher": math.exp(nll_t / tokens),
            "ppl_student": math.exp(nll_s / tokens),
            "tokens": int(tokens),
        }

    def to_tensor(self) -> torch.Tensor:
        """The raw float64 sums (a copy), suitable for an all-reduce with op SUM."""
        return self._sums.clone()

    @classmethod
    def from_tensor(cls, sums: torch.Tensor, chunk_size: int = 1024) -> "FidelityAccumulator":
        if sums.shape != (len(cls._FIELDS),):
            raise ValueError(f"expected {len(cls._FIELDS)} sums {cls._FIELDS}, got shape {tuple(sums.shape)}")
        acc = cls(chunk_size)
        acc._sums = sums.detach().to(device="cpu", dtype=torch.float64).clone()
        return acc
