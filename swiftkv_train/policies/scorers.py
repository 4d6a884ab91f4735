"""Ranking policies from the kvpress family: TOVA (last query's attention), Knorm (key norms), ExpectedAttention
(attention that future queries are expected to pay). Each ranks entries (`ranking`), so each also runs under the
per-layer / per-head budget wrappers (budgets.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import BudgetedPolicy, SlotView, StepInfo, StepQueries

__all__ = ["TOVA", "Knorm", "ExpectedAttention", "rotate_half", "unrotate", "mean_rotation"]


@dataclass(kw_only=True)
class TOVA(BudgetedPolicy):
    """TOVA: keep the entries the LAST query attends to most, re-scored and evicted after every step.

    Score of an entry = softmax attention of the step's last query row, averaged over query heads:
    ``head_average="layer"`` averages all heads of the layer, so every KV head keeps the same tokens (the TOVA
    paper's choice, and kvpress's TOVAPress, reviewed by its authors); ``"group"`` averages the query heads of each
    KV head (GQA group) separately. The newest entry is always kept (kvpress does the same; TOVA itself barely
    differs: a token's attention to itself is usually high). Oren et al. 2024, arXiv:2401.06104.
    """

    name = "tova"
    needs_attention = True
    uses_scores = True
    fresh_scores = True  # the last query's attention only, not a running sum
    observation_window = 1  # the last query row of each step

    head_average: str = "layer"

    def validate(self):
        super().validate()
        if self.head_average not in ("layer", "group"):
            self.refuse("head_average", "must be 'layer' (all heads keep the same tokens) or 'group' (per KV head)")

    def attention_contribution(self, slot, logits, row_start, step):
        probs = torch.softmax(logits, dim=-1).mean(dim=(2, 3))  # [B, H_kv, K]: over the group's heads, one row
        if self.head_average == "layer":
            probs = probs.mean(dim=1, keepdim=True).expand_as(probs)
        return probs

    def protected(self):
        return 0, min(1, self.capacity)

    def ranking(self, view: SlotView, step: StepInfo):
        return view.scores


@dataclass(kw_only=True)
class Knorm(BudgetedPolicy):
    """Knorm: keep the keys with the SMALLEST L2 norm (low-norm keys draw high attention); no attention needed.

    Norms of the cached (post-RoPE) keys, which RoPE leaves unchanged. ``sink_tokens``: first positions always
    kept (0 = none, as in kvpress's KnormPress); ``evict_during_decode``: false = compress the prompt once (kvpress),
    true = keep the budget while decoding too. Devoto et al. 2024, arXiv:2406.11430.
    """

    name = "knorm"

    sink_tokens: int = 0
    evict_during_decode: bool = False

    def validate(self):
        super().validate()
        if self.sink_tokens < 0:
            self.refuse("sink_tokens", "must be >= 0 (the first positions always kept)")

    def protected(self):
        return min(self.sink_tokens, self.capacity), 0

    def ranking(self, view: SlotView, step: StepInfo):
        return -view.keys.float().norm(dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's pairing of dimension i with i + D/2: (x1, x2) -> (-x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE: x was ``q * cos + rotate_half(q) * sin`` (cos, sin [n, D], x [..., n, D]); returns q. A scaled
    RoPE (cos, sin times an attention factor s) is inverted too: each pair is a rotation times s."""
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def mean_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The average of RoPE's matrices over positions: R = mean_p (diag(cos_p) + diag(sin_p) P), [D, D], where
    P x = rotate_half(x) (RoPE applied to q is R q)."""
    dim = cos.shape[-1]
    eye = torch.eye(dim, dtype=cos.dtype, device=cos.device)
    swap = rotate_half(eye.T).T  # the matrix P: P @ x == rotate_half(x)
    return torch.diag(cos.mean(0)) + torch.diag(sin.mean(0)) @ swap


@dataclass(kw_only=True)
class ExpectedAttention(BudgetedPolicy):
    """ExpectedAttention: keep the entries future queries are expected to attend to (kvpress's definition).

    The queries seen so far (positions >= ``sink_tokens``; RoPE undone) give a mean μ and covariance Σ per query
    head. Future queries sit at the next ``future_positions`` positions, so μ and Σ are moved there by the average
    RoPE matrix R̄: μ' = R̄μ, Σ' = R̄ΣR̄ᵀ. For a Gaussian query, E[exp(q·k·s)] = exp(s μ'·k + s²/2 kᵀΣ'k) (s the
    attention scaling); the score is its softmax over the keys (sinks excluded), averaged over the KV group's query
    heads, times ‖v‖ if ``use_vnorm`` (plus ``epsilon`` first). ``use_covariance=false`` drops the kᵀΣ'k term
    (mean only: cheaper, D instead of D² per key, and what the method reduces to for a sharply peaked query
    distribution). The first ``sink_tokens`` positions are always kept.

    Statistics are exact running sums (float64) over every query of the prompt (kvpress: the whole context), so a
    chunked prefill scores each chunk with what it has seen so far, and the last chunk with exactly kvpress's
    statistics. Like kvpress it compresses the prompt once (``evict_during_decode`` false). kvpress's
    ExpectedAttentionPress (Devoto et al. 2025, arXiv:2510.00636).
    """

    name = "expected_attention"
    needs_attention = True
    uses_scores = True
    scores_queries = True
    fresh_scores = True
    evict_during_decode = False

    future_positions: int = 512
    sink_tokens: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    # slot -> (count, sum of q [B, H_q, D], sum of q qᵀ [B, H_q, D, D]) of the current sequence
    stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def validate(self):
        super().validate()
        if self.future_positions < 1:
            self.refuse("future_positions", "must be >= 1 (future query positions averaged over)")
        if self.sink_tokens < 0:
            self.refuse("sink_tokens", "must be >= 0 (the first positions always kept)")
        if self.epsilon < 0:
            self.refuse("epsilon", "must be >= 0")

    def start(self, prompt_len, max_new_tokens):
        super().start(prompt_len, max_new_tokens)
        self.stats = {}

    def protected(self):
        return min(self.sink_tokens, self.capacity), 0

    def ranking(self, view: SlotView, step: StepInfo):
        return view.scores

    def _update_stats(self, slot: int, queries: StepQueries) -> None:
        rows = queries.positions >= self.sink_tokens
        if not bool(rows.any()):
            return
        cos, sin = queries.rope(queries.positions[rows])
        q = unrotate(queries.query[:, :, rows].float(), cos, sin).double()  # [B, H_q, n, D] before RoPE
        count, total, outer = self.stats.get(slot, (0, 0.0, 0.0))
        total = total + q.sum(dim=2)
        if self.use_covariance:
            outer = outer + torch.einsum("bhnd,bhne->bhde", q, q)
        self.stats[slot] = (count + q.shape[2], total, outer)

    def query_scores(self, slot, queries: StepQueries, step: StepInfo):
        self._update_stats(slot, queries)
        if slot not in self.stats:
            return None
        count, total, outer = self.stats[slot]
        mean = total / count
        future = torch.arange(step.seen, step.seen + self.future_positions, device=queries.query.device)
        rotation = mean_rotation(*queries.rope(future)).double()
        mean = mean @ rotation.T  # R̄ μ, [B, H_q, D]
        keys = queries.keys.float()
        groups = queries.query.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(groups, dim=1)  # [B, H_q, K, D]
        logits = queries.scaling * torch.einsum("bhkd,bhd->bhk", keys, mean.float())
        if self.use_covariance:
            cov = outer / count - mean_outer(total / count)
            cov = (rotation @ cov @ rotation.T).float()
            logits = logits + queries.scaling**2 / 2 * torch.einsum("bhkd,bhde,bhke->bhk", keys, cov, keys)
        scored = queries.key_positions.repeat_interleave(groups, dim=1) >= self.sink_tokens  # padding is -1
        probs = torch.softmax(logits.masked_fill(~scored, float("-inf")), dim=-1).nan_to_num(0.0)
        batch, kv_heads = queries.keys.shape[:2]
        scores = probs.reshape(batch, kv_heads, groups, -1).mean(dim=2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * queries.values.float().norm(dim=-1)
        return scores


def mean_outer(mean: torch.Tensor) -> torch.Tensor:
    return mean.unsqueeze(-1) * mean.unsqueeze(-2)
