"""The policy cache of the running generation, and how a layer reaches it: what the attention hook
(attention.py), the cache's users and a model's own scorer share.

It imports neither attention.py nor cache.py, so both (and generate.py) import it without a cycle.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch

from ..methods import method_of_config

__all__ = ["activated", "active_cache", "cache_slot", "record_token_scores"]

# The cache the attention hook and `record_token_scores` report to (set by `generate.policy_attention`).
_ACTIVE: ContextVar = ContextVar("swiftkv_train.policies.active_cache", default=None)


def active_cache():
    """The `PolicyCache` of the generation running now, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def activated(cache):
    """Make ``cache`` the active one for the duration of the block."""
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def cache_slot(module) -> int:
    """Cache slot a layer's attention reads: its own, or the one its model's method makes it share."""
    method = method_of_config(module.config)
    return method.cache_slot(module.config, module.layer_idx) if method is not None else module.layer_idx


def record_token_scores(module_or_slot, scores: torch.Tensor) -> None:
    """Entry point for a learned scorer inside a model (see `LearnedScorePolicy`).

    Call it from the attention module after its cache update, with the module (or the cache slot index) and
    one score per new token and KV head [B, H_kv, q]. A no-op when no policy cache is active, so the model runs
    unchanged otherwise.
    """
    cache = active_cache()
    if cache is None:
        return
    slot = module_or_slot if isinstance(module_or_slot, int) else cache_slot(module_or_slot)
    cache.set_token_scores(slot, scores)
