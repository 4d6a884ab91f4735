"""KV-cache policies: one interface for the full cache, StreamingLLM, H2O, Keyformer, SnapKV and learned scorers.

    from swiftkv_train.policies import build_policy, greedy_generate
    out = greedy_generate(model, input_ids, max_new_tokens=32, policy=build_policy("keyformer", budget="50%"))

See base.py for the interface (and how a learned scorer such as Locret plugs in), cache.py for the cache,
attention.py for how attention scores are obtained without a full S x S matrix.
"""

from ..errors import SwiftKVInputError
from .base import Budget, CachePolicy, SlotView, StepInfo, recent_plus_top_k
from .baselines import H2O, FullCache, Keyformer, LearnedScorePolicy, SnapKV, StreamingLLM
from .cache import PolicyCache, record_token_scores
from .generate import GenerationResult, decode_step, greedy_generate, new_cache, policy_attention, prefill

POLICIES = {cls.name: cls for cls in (FullCache, StreamingLLM, H2O, Keyformer, SnapKV, LearnedScorePolicy)}


def build_policy(name: str, **settings) -> CachePolicy:
    """A policy by name (``full``, ``streaming_llm``, ``h2o``, ``keyformer``, ``snapkv``) with its settings."""
    if name not in POLICIES:
        raise SwiftKVInputError(f"unknown cache policy {name!r}: use one of {', '.join(POLICIES)}.")
    try:
        return POLICIES[name](**settings)
    except TypeError as err:
        raise SwiftKVInputError(f"policy {name!r}: {err}. Check the setting names.") from None


__all__ = [
    "Budget", "CachePolicy", "SlotView", "StepInfo", "recent_plus_top_k",
    "FullCache", "StreamingLLM", "H2O", "Keyformer", "SnapKV", "LearnedScorePolicy",
    "PolicyCache", "record_token_scores",
    "GenerationResult", "greedy_generate", "new_cache", "policy_attention", "prefill", "decode_step",
    "POLICIES", "build_policy",
]
