"""The cache-policy interface: given one cache slot's K (post-RoPE), V, positions and scores, keep some entries.

A policy never touches the model. The `PolicyCache` (cache.py) stores, per cache slot, the keys and values exactly
as the model produced them (RoPE already applied, so every kept token keeps its ORIGINAL position), plus the
original position of each entry and one running score per entry and KV head. At the end of every forward step
(each prefill chunk, each decoded token) the cache asks the policy which entries to keep.

Where scores come from, by policy:

- none (full cache, StreamingLLM): `select` looks at positions only;
- attention (H2O, Keyformer, SnapKV): the attention hook (attention.py) recomputes the scaled, masked logits of the
  step's query rows against the slot's keys, block by block, and hands each block to `attention_contribution`;
  the per-key result is added to the running score (`accumulate`);
- pushed by the model (a learned scorer such as Locret's retaining heads): the model calls
  `record_token_scores(layer_idx, scores)` (cache.py) with one score per new token and KV head, and the policy
  ranks by it. See `LearnedScorePolicy`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import SwiftKVInputError

__all__ = ["Budget", "StepInfo", "SlotView", "CachePolicy", "recent_plus_top_k"]


@dataclass(frozen=True)
class Budget:
    """How many cache entries (per slot, per KV head) a policy may keep.

    Exactly one of ``tokens`` (absolute) or ``fraction`` (share of the PROMPT length, resolved once when the
    prompt is known, as Keyformer does) is set. Parse user text with `Budget.parse`: ``"512"`` (tokens),
    ``"50%"`` or ``"0.5"`` (fraction of the prompt), ``"4x"`` (compression ratio: keep a quarter of the prompt).
    """

    tokens: int | None = None
    fraction: float | None = None

    def __post_init__(self):
        if (self.tokens is None) == (self.fraction is None):
            raise SwiftKVInputError("a cache budget needs exactly one of tokens=<int> or fraction=<0..1>.")
        if self.tokens is not None and self.tokens < 1:
            raise SwiftKVInputError(f"budget tokens={self.tokens} must be >= 1.")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise SwiftKVInputError(f"budget fraction={self.fraction} must be in (0, 1] (share of the prompt kept).")

    @classmethod
    def parse(cls, value: "Budget | int | float | str") -> "Budget":
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool):
            raise SwiftKVInputError(f"budget={value!r}: use a token count, a fraction, 'N%' or 'Nx'.")
        if isinstance(value, int):
            return cls(tokens=value)
        if isinstance(value, float):
            return cls(fraction=value)
        text = str(value).strip().lower()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(%|x)?", text)
        if not match:
            raise SwiftKVInputError(
                f"budget={value!r} is not understood: use a token count ('512'), a share of the prompt ('50%' or "
                "'0.5') or a compression ratio ('4x')."
            )
        number, unit = float(match.group(1)), match.group(2)
        if unit == "%":
            return cls(fraction=number / 100)
        if unit == "x":
            if number < 1:
                raise SwiftKVInputError(f"budget={value!r}: a compression ratio must be >= 1x.")
            return cls(fraction=1 / number)
        if "." in match.group(1):
            return cls(fraction=number)
        return cls(tokens=int(number))

    def resolve(self, prompt_len: int) -> int:
        """Entries kept per slot; at least 1."""
        if self.tokens is not None:
            return self.tokens
        return max(1, math.floor(prompt_len * self.fraction))

    def describe(self) -> str:
        return f"{self.tokens} tokens" if self.tokens is not None else f"{self.fraction:.0%} of the prompt"


@dataclass
class StepInfo:
    """Where generation stands when a policy is asked to score or select."""

    prompt_len: int
    max_new_tokens: int
    seen: int = 0  # tokens processed so far, including this step's
    new_tokens: int = 0  # tokens in this step (a prefill chunk or 1)
    decode_step: int = 0  # 0 during prefill; t while feeding the t-th generated token

    @property
    def is_prefill(self) -> bool:
        return self.decode_step == 0


@dataclass
class SlotView:
    """One cache slot as a policy sees it. Shapes: keys/values [B, H_kv, L, D]; positions/scores [B, H_kv, L].

    Entries are in increasing position order per head (the cache keeps them so), so the last entries are the most
    recent tokens.
    """

    slot: int
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor | None

    @property
    def length(self) -> int:
        return self.keys.shape[-2]


class CachePolicy:
    """Base class: the full cache (keeps everything). Subclasses override what they need.

    Per sequence the cache calls ``start`` once; per step and slot, the attention hook calls
    ``attention_contribution`` (only if ``needs_attention``) and the cache then calls ``select``.
    """

    name = "full"
    #: True if `select` needs scores from the attention hook (the hook is skipped otherwise: no extra compute).
    needs_attention = False
    #: True if `select` reads ``view.scores`` (attention-based or pushed by the model); False saves the memory.
    uses_scores = False
    #: Query rows scored per step: None = every row of the step; n = only the last n rows (SnapKV-style window).
    observation_window: int | None = None
    #: False = evict only once, right after the prompt (SnapKV); True = after every step (H2O, Keyformer, ...).
    evict_during_decode = True

    def __init__(self, budget: Budget | int | float | str | None = None):
        self.budget = None if budget is None else Budget.parse(budget)
        self.capacity: int | None = None

    def start(self, prompt_len: int, max_new_tokens: int) -> None:
        """A new sequence: resolve the budget against the prompt and reset per-sequence state."""
        self.capacity = None if self.budget is None else self.budget.resolve(prompt_len)

    def attention_contribution(self, slot: int, logits: torch.Tensor, row_start: int, step: StepInfo) -> torch.Tensor:
        """Per-key score of one block of query rows.

        ``logits``: fp32 [B, H_kv, G, r, K] scaled QK^T of r query rows (G query heads per KV head) against all K
        keys, with masked entries at -inf. ``row_start`` is the first row's index within the step's queries.
        Default (H2O): attention probabilities summed over query heads and rows -> [B, H_kv, K].
        """
        return torch.softmax(logits, dim=-1).sum(dim=(2, 3))

    def accumulate(self, old: torch.Tensor, contribution: torch.Tensor) -> torch.Tensor:
        """Running score update; ``old`` already has zeros for this step's new entries."""
        return old + contribution

    def select(self, view: SlotView, step: StepInfo) -> torch.Tensor | None:
        """Indices to keep, [B, H_kv, k] ascending, or None to keep everything."""
        return None

    def settings(self) -> dict:
        """Every knob, for results files."""
        return {"name": self.name, "budget": None if self.budget is None else self.budget.describe()}


def recent_plus_top_k(scores: torch.Tensor, budget: int, recent: int, sinks: int = 0) -> torch.Tensor | None:
    """Keep the first ``sinks`` entries, the last ``recent`` entries and the top-scoring rest up to ``budget``.

    ``scores`` [B, H, L] (entries in position order). Returns ascending indices [B, H, budget], or None when
    everything fits. Ties go to the earlier entry (stable, so results do not depend on the top-k kernel).
    """
    length = scores.shape[-1]
    if length <= budget:
        return None
    recent = min(recent, budget)
    sinks = min(sinks, budget - recent)
    heavy = budget - recent - sinks
    batch, heads = scores.shape[:2]
    device = scores.device
    fixed = torch.cat([torch.arange(sinks, device=device), torch.arange(length - recent, length, device=device)])
    parts = [fixed.expand(batch, heads, -1)]
    if heavy > 0:
        middle = scores[..., sinks : length - recent].float()
        # Stable descending order: sort by (-score, index).
        order = torch.sort(-middle, dim=-1, stable=True).indices[..., :heavy]
        parts.append(order + sinks)
    keep = torch.cat(parts, dim=-1)
    return torch.sort(keep, dim=-1).values
