"""The cache-policy interface: given one cache slot's K (post-RoPE), V, positions and scores, keep some entries.

A policy never touches the model. The `PolicyCache` (cache.py) stores, per cache slot, the keys and values exactly
as the model produced them (RoPE already applied, so every kept token keeps its ORIGINAL position), plus the
original position of each entry and one running score per entry and KV head. At the end of every forward step
(each prefill chunk, each decoded token) the cache asks the policy which entries to keep.

A policy is a dataclass whose fields ARE its settings (declared once, with their defaults; checked once, in
`validate`, when it is built; listed by `settings()` in results files and by the eval CLI), and it registers itself
in `POLICIES` by declaring ``name``::

    @dataclass(kw_only=True)
    class KeepTheMiddle(BudgetedPolicy):
        name = "middle"
        margin: int = 4  # a setting: build_policy("middle", budget="50%", margin=8)

        def ranking(self, view, step): ...  # [B, H_kv, L], higher = kept (or override `select` itself)

A ranking policy (one that defines `ranking` and `protected`) also runs under the budget wrappers of budgets.py
(PyramidKV per-layer, AdaKV per-head budgets) with no code of its own.

Where scores come from, by policy:

- none (full cache, StreamingLLM): `select` looks at positions only;
- attention (H2O, Keyformer, SnapKV): the attention hook (attention.py) recomputes the scaled, masked logits of the
  step's query rows against the slot's keys, block by block, and hands each block to `attention_contribution`;
  the per-key result is added to the running score (`accumulate`);
- the step's queries (ExpectedAttention): with ``scores_queries`` the hook hands the raw queries, their positions
  and the model's RoPE to `query_scores` (`StepQueries`), for scores that model attention still to come;
- the keys alone (Knorm): `ranking` reads ``view.keys``;
- pushed by the model (a learned scorer inside it, e.g. trained retaining heads): while `scores_from(model)` is
  active, the model calls `record_token_scores(module, scores)` (active.py) with one score per new token and KV
  head, and the policy ranks by it. See `LearnedScorePolicy`; a method that trains such a scorer ships its policy
  (a subclass whose `scores_from` hooks the model) in its own folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import SwiftKVInputError

__all__ = ["Budget", "StepInfo", "StepQueries", "SlotView", "CachePolicy", "BudgetedPolicy", "POLICIES", "build_policy",
           "recent_plus_top_k"]


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
    num_slots: int = 0  # cache slots of the model (known from the end of the first step: every layer has run)

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


@dataclass
class StepQueries:
    """One step's queries as the attention hook sees them, for a policy that scores from the queries themselves
    (``scores_queries``) rather than from attention logits. Shapes: query [B, H_q, q, D] (RoPE applied),
    keys/values [B, H_kv, K, D] (the slot's entries, this step's included), key_positions [B, H_kv, K] (-1 =
    padding, see `CachePolicy.ragged`)."""

    query: torch.Tensor
    positions: torch.Tensor  # [q] original positions of the query rows
    keys: torch.Tensor
    values: torch.Tensor
    key_positions: torch.Tensor
    scaling: float
    #: positions [n] -> (cos, sin), each [n, D] fp32: the model's own RoPE (attention scaling included)
    rope: typing.Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# name -> policy class, filled as each policy class is defined (a subclass that declares ``name`` registers itself).
POLICIES: dict[str, type[CachePolicy]] = {}

_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _plain_type(hint) -> tuple[type | None, bool]:
    """(bool/int/float/str, optional) for a field annotated with one of those (or ``X | None``); (None, _) else."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in args
    rest = [a for a in args if a is not type(None)]
    return (rest[0] if len(rest) == 1 and rest[0] in _KINDS else None), optional


@dataclass(kw_only=True)
class CachePolicy:
    """The interface (it keeps everything). A policy subclasses it (or `BudgetedPolicy`) as a dataclass.

    Per sequence the cache calls ``start`` once; per step and slot, the attention hook calls
    ``attention_contribution`` (only if ``needs_attention``) and the cache then calls ``select``. Settings are the
    dataclass fields (``init=False`` fields are per-sequence state, not settings); ``validate`` checks them once,
    when the policy is built, after their types have been checked against the annotations.
    """

    #: Registry name (``build_policy(name)``, ``policies.names`` of the eval CLI); empty = not a policy by itself.
    name: ClassVar[str] = ""
    #: True if `select` needs scores from the attention hook (the hook is skipped otherwise: no extra compute).
    needs_attention: ClassVar[bool] = False
    #: True if `select` reads ``view.scores`` (attention-based or pushed by the model); False saves the memory.
    uses_scores: ClassVar[bool] = False
    # The two traits below are class attributes here; a policy may make either a setting (a field) instead.
    #: Query rows scored per step: None = every row of the step; n = only the last n rows (SnapKV-style window).
    observation_window = None
    #: False = evict only once, right after the prompt (SnapKV); True = after every step (H2O, Keyformer, ...).
    evict_during_decode = True
    #: True if the attention hook should hand `query_scores` the step's queries (`StepQueries`) instead of calling
    #: `attention_contribution` with logits (a policy that models FUTURE attention from query statistics).
    scores_queries: ClassVar[bool] = False
    #: True if the score describes the current step only (TOVA: the last query's attention): the cache zeroes
    #: every entry's score when a step's keys arrive, so contributions of the layers sharing a slot still add up.
    fresh_scores: ClassVar[bool] = False
    #: True if `select` may return -1 entries (padding): the slot then keeps a different number of entries per KV
    #: head (cache.py stores them at one length, padding masked out of attention and not counted as held).
    ragged: ClassVar[bool] = False

    #: Entries kept per slot for the current sequence (the budget resolved against its prompt); None = all.
    capacity: int | None = field(default=None, init=False, repr=False, compare=False)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if not name:
            return  # an intermediate class (e.g. BudgetedPolicy)
        known = POLICIES.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise TypeError(f"two cache policies are named {name!r}: {known} and {cls}")
        POLICIES[name] = cls

    # ---- settings --------------------------------------------------------------------------------------------
    @classmethod
    def setting_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def describe_settings(cls) -> str:
        """``budget (required), recent_share=0.5, ...``: the settings and their defaults, for errors and help."""
        def one(f):
            if f.metadata.get("required"):
                return f"{f.name} (required)"
            if f.default is not dataclasses.MISSING:
                return f"{f.name}={f.default!r}"
            if f.default_factory is not dataclasses.MISSING:
                return f"{f.name}={f.default_factory()!r}"
            return f.name
        return ", ".join(one(f) for f in cls.setting_fields()) or "none"

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in self.setting_fields():
            kind, optional = _plain_type(hints[f.name])
            value = getattr(self, f.name)
            if kind is None or (value is None and optional):
                continue
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
                setattr(self, f.name, value)
            if not ok:
                self.refuse(f.name, f"must be {_KINDS[kind]}{' or null' if optional else ''}")
        self.validate()

    def validate(self) -> None:
        """Check the settings (types are already checked); raise with `refuse`. Subclasses call super()."""

    def refuse(self, setting: str, rule: str):
        """Raise the error for a bad setting: the policy, the setting, its value and what it must be."""
        raise SwiftKVInputError(f"cache policy {self.name!r}: {setting}={getattr(self, setting)!r} {rule}.")

    def settings(self) -> dict:
        """Every setting (and the name), for results files; the budget in words."""
        out = {"name": self.name, "budget": None}
        for f in self.setting_fields():
            value = getattr(self, f.name)
            out[f.name] = value.describe() if isinstance(value, Budget) else value
        return out

    # ---- the protocol ----------------------------------------------------------------------------------------
    def scores_from(self, model) -> contextlib.AbstractContextManager:
        """While this context is active, ``model`` pushes the scores the policy ranks by (a policy fed by a scorer
        inside the model hooks it here; refuse a model without one). Default: nothing to hook."""
        return contextlib.nullcontext()

    def start(self, prompt_len: int, max_new_tokens: int) -> None:
        """A new sequence: reset per-sequence state (a budgeted policy resolves its budget against the prompt)."""
        self.capacity = None

    def attention_contribution(self, slot: int, logits: torch.Tensor, row_start: int, step: StepInfo) -> torch.Tensor:
        """Per-key score of one block of query rows.

        ``logits``: fp32 [B, H_kv, G, r, K] scaled QK^T of r query rows (G query heads per KV head) against all K
        keys, with masked entries at -inf. ``row_start`` is the first row's index within the step's queries.
        Default (H2O): attention probabilities summed over query heads and rows -> [B, H_kv, K].
        """
        return torch.softmax(logits, dim=-1).sum(dim=(2, 3))

    def query_scores(self, slot: int, queries: StepQueries, step: StepInfo) -> torch.Tensor | None:
        """Per-key score [B, H_kv, K] from the step's queries (only if ``scores_queries``), folded in with
        `accumulate`; None = no update."""
        return None

    def accumulate(self, old: torch.Tensor, contribution: torch.Tensor) -> torch.Tensor:
        """Running score update; ``old`` already has zeros for this step's new entries."""
        return old + contribution

    def select(self, view: SlotView, step: StepInfo) -> torch.Tensor | None:
        """Indices to keep, [B, H_kv, k] ascending, or None to keep everything."""
        return None


@dataclass(kw_only=True)
class BudgetedPolicy(CachePolicy):
    """A policy that keeps at most ``budget`` entries per slot and KV head (``capacity`` once the prompt is known).

    ``budget``: tokens (512), a share of the prompt ("50%", 0.5) or a compression ratio ("4x"); see `Budget`.
    """

    budget: Budget | int | float | str | None = field(default=None, kw_only=False, metadata={"required": True})

    def validate(self) -> None:
        super().validate()
        if self.budget is None:
            raise SwiftKVInputError(
                f"cache policy {self.name!r} needs a budget: budget=512 (tokens), '50%' (of the prompt) or '4x' "
                "(compression ratio)."
            )
        try:
            self.budget = Budget.parse(self.budget)
        except SwiftKVInputError as err:
            raise SwiftKVInputError(f"cache policy {self.name!r}: {err}") from None

    def start(self, prompt_len: int, max_new_tokens: int) -> None:
        super().start(prompt_len, max_new_tokens)
        self.capacity = self.budget.resolve(prompt_len)

    def protected(self) -> tuple[int, int]:
        """(oldest, newest): how many of the first and of the last entries every eviction keeps whatever their
        score (attention sinks, a recent window, stabilizers), once ``capacity`` is known. Default: none."""
        return 0, 0

    def keep_top(self, ranking: torch.Tensor) -> torch.Tensor | None:
        """`select` for a policy that ranks entries: the protected ends plus the best-ranked rest, up to capacity."""
        oldest, newest = self.protected()
        return recent_plus_top_k(ranking, self.capacity, recent=newest, sinks=oldest)

    def ranking(self, view: SlotView, step: StepInfo) -> torch.Tensor:
        """How much each entry deserves to stay, [B, H_kv, L] (higher = kept first). A ranking policy defines it;
        `select` keeps the protected ends plus the best-ranked rest, and the budget wrappers (budgets.py) reuse
        it to spread the budget over layers or heads."""
        raise NotImplementedError(f"cache policy {self.name!r} does not rank entries")

    def select(self, view: SlotView, step: StepInfo) -> torch.Tensor | None:
        return self.keep_top(self.ranking(view, step))

    def slot_capacity(self, slot: int) -> int:
        """Entries kept per KV head in cache slot ``slot`` (on average over its heads): ``capacity`` unless a
        wrapper spreads the budget unevenly (budgets.py)."""
        return self.capacity

    def slot_protected(self, slot: int) -> tuple[int, int]:
        """`protected` as it applies in slot ``slot``."""
        return self.protected()

    def check_share(self, setting: str) -> None:
        """``setting`` must be a share in [0, 1]."""
        if not 0 <= getattr(self, setting) <= 1:
            self.refuse(setting, "must be a share between 0 and 1")


def build_policy(name: str, **settings) -> CachePolicy:
    """A policy by registered name (``full``, ``streaming_llm``, ``h2o``, ...; see `POLICIES`) with its settings."""
    cls = POLICIES.get(name)
    if cls is None:
        raise SwiftKVInputError(f"unknown cache policy {name!r}: use one of {', '.join(sorted(POLICIES))}.")
    unknown = sorted(set(settings) - {f.name for f in cls.setting_fields()})
    if unknown:
        raise SwiftKVInputError(
            f"cache policy {name!r} has no setting {', '.join(map(repr, unknown))}: its settings are "
            f"{cls.describe_settings()}."
        )
    return cls(**settings)


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
