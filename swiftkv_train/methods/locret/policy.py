"""Locret's trained retaining heads as a cache policy of the shared stack (next to H2O, Keyformer, ...): ``locret``.

`LocretPolicy` is the learned-score policy whose scores come from the heads: `scores_from(model)` hooks every Locret
attention layer, so that after the layer has written the step's K/V into the policy cache its retaining head
scores the step's new tokens from the same pre-RoPE q/k/v and pushes one score per token and KV head with
`record_token_scores`. The policy keeps the newest `stabilizers` entries plus the best-scored others, after every
prefill chunk. Positions stay original (the policy cache stores post-RoPE keys), unlike Locret's own `compacted`
default; `model.generate` with the Locret cache remains the paper's exact path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ...errors import SwiftKVInputError
# The module, not its function: swiftkv_train.policies.active imports swiftkv_train.methods, which imports this
# file, so when the policies package is imported first, active is still loading here (used only at run time).
from ...policies import active
from ...policies.baselines import LearnedScorePolicy

__all__ = ["LocretPolicy", "locret_policy", "locret_scores"]


def _retaining_layers(model):
    layers = [layer.self_attn for layer in model.model.layers if hasattr(layer.self_attn, "retaining_scores")]
    if not layers:
        raise SwiftKVInputError(
            f"cache policy 'locret' ranks entries with Locret's retaining heads, and {type(model).__name__} has none: "
            "use a llama_locret model (trained with transform=locret, or its export), or another policy."
        )
    return layers


@contextlib.contextmanager
def locret_scores(model):
    """While active, each Locret layer reports its retaining-head scores to the active policy cache."""

    def push(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        with torch.no_grad():
            scores = module.retaining_scores(module.q_proj(hidden), module.k_proj(hidden), module.v_proj(hidden))
        active.record_token_scores(module, scores)
        return output

    hooks = [attn.register_forward_hook(push, with_kwargs=True) for attn in _retaining_layers(model)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@dataclass(kw_only=True)
class LocretPolicy(LearnedScorePolicy):
    """The learned-score policy fed by a llama_locret model's retaining heads (its settings: budget, stabilizers,
    evict_during_decode)."""

    name = "locret"

    def scores_from(self, model):
        return locret_scores(model)


def locret_policy(model, budget=None, stabilizers: int | None = None) -> LocretPolicy:
    """A LocretPolicy with the model's own Locret settings unless given (budget in tokens or a ratio)."""
    _retaining_layers(model)
    cfg = model.config
    return LocretPolicy(cfg.locret_budget if budget is None else budget,
                        stabilizers=cfg.locret_stabilizers if stabilizers is None else stabilizers)
