"""Locret's trained retaining heads as a cache policy of the shared interface (next to H2O, Keyformer, ...).

`locret_scores(model)` hooks every Locret attention layer: after the layer has written the step's K/V into the
policy cache, its retaining head scores the step's new tokens from the same pre-RoPE q/k/v and pushes one score per
token and KV head with `record_token_scores`. `LearnedScorePolicy` then keeps the newest `stabilizers` entries plus
the best-scored others, after every prefill chunk. Positions stay original (the policy cache stores post-RoPE keys),
unlike Locret's own `compacted` default; `model.generate` with the Locret cache remains the paper's exact path.
"""

from __future__ import annotations

import contextlib

import torch

from .baselines import LearnedScorePolicy
from .cache import record_token_scores


def _retaining_layers(model):
    layers = [layer.self_attn for layer in model.model.layers if hasattr(layer.self_attn, "retaining_scores")]
    if not layers:
        raise TypeError(f"{type(model).__name__} has no Locret retaining heads (expected a llama_locret model).")
    return layers


@contextlib.contextmanager
def locret_scores(model):
    """While active, each Locret layer reports its retaining-head scores to the active policy cache."""

    def push(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        with torch.no_grad():
            scores = module.retaining_scores(module.q_proj(hidden), module.k_proj(hidden), module.v_proj(hidden))
        record_token_scores(module, scores)
        return output

    hooks = [attn.register_forward_hook(push, with_kwargs=True) for attn in _retaining_layers(model)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def locret_policy(model, budget=None, stabilizers: int | None = None) -> LearnedScorePolicy:
    """A LearnedScorePolicy with the model's own Locret settings unless given (budget in tokens or a ratio)."""
    _retaining_layers(model)
    cfg = model.config
    return LearnedScorePolicy(cfg.locret_budget if budget is None else budget,
                              stabilizers=cfg.locret_stabilizers if stabilizers is None else stabilizers)
