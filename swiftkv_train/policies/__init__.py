"""KV-cache policies: one interface for the full cache, StreamingLLM, H2O, Keyformer, SnapKV, TOVA, Knorm,
ExpectedAttention, learned scorers, and the PyramidKV / AdaKV budget wrappers around any ranking policy.

    from swiftkv_train.policies import build_policy, greedy_generate
    out = greedy_generate(model, input_ids, max_new_tokens=32, policy=build_policy("keyformer", budget="50%"))

A policy is a dataclass whose fields are its settings and registers itself in ``POLICIES`` by declaring ``name``
(see base.py). baselines.py and scorers.py hold the training-free ones, budgets.py the per-layer / per-head budget
wrappers; a method that trains a scorer ships its policy in its own
folder (``swiftkv_train/methods/<name>/policy.py``; importing ``swiftkv_train.methods`` registers it). cache.py is
the cache, active.py what a running generation shares with the model, attention.py how attention scores are
obtained without a full S x S matrix, generate.py the prefill/decode loop.
"""

from .active import record_token_scores
from .base import (POLICIES, Budget, BudgetedPolicy, CachePolicy, SlotView, StepInfo, StepQueries, build_policy,
                   recent_plus_top_k)
from .baselines import H2O, FullCache, Keyformer, LearnedScorePolicy, SnapKV, StreamingLLM
from .budgets import AdaKV, BudgetAllocation, PyramidKV
from .scorers import TOVA, ExpectedAttention, Knorm
from .cache import PolicyCache
from .generate import GenerationResult, decode_step, greedy_generate, new_cache, policy_attention, prefill

__all__ = [
    "Budget", "BudgetedPolicy", "CachePolicy", "SlotView", "StepInfo", "recent_plus_top_k",
    "StepQueries", "FullCache", "StreamingLLM", "H2O", "Keyformer", "SnapKV", "LearnedScorePolicy",
    "TOVA", "Knorm", "ExpectedAttention", "BudgetAllocation", "PyramidKV", "AdaKV",
    "PolicyCache", "record_token_scores",
    "GenerationResult", "greedy_generate", "new_cache", "policy_attention", "prefill", "decode_step",
    "POLICIES", "build_policy",
]
