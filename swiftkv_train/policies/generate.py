"""Greedy prefill + decode for any Llama-family model (original, converted by a method, exported) with or without a
policy.

The loop is explicit (not `model.generate`) because an evicting cache needs two things generate does not give:
the ORIGINAL position of each new token (the cache length no longer says it) and a call after every forward step
so the policy can evict. With ``policy=None`` a plain `DynamicCache` is used: the reference run.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from ..errors import SwiftKVInputError
from ..remote_code.transformers_compat import cache_kwarg
from . import attention
from .active import activated
from .base import CachePolicy
from .cache import PolicyCache

__all__ = ["GenerationResult", "greedy_generate", "new_cache", "policy_attention", "prefill", "decode_step"]


@contextlib.contextmanager
def policy_attention(model, cache):
    """Route the model's attention through the scoring hook and report to ``cache`` (no-op for a DynamicCache)."""
    if not isinstance(cache, PolicyCache):
        yield
        return
    current = model.config._attn_implementation
    if current not in ("sdpa", attention.POLICY_ATTENTION):
        raise SwiftKVInputError(
            f"cache policies need attn_implementation='sdpa' (the model uses {current!r}); load the model with "
            "load_pretrained(spec, attn_implementation='sdpa')."
        )
    attention.register()
    model.config._attn_implementation = attention.POLICY_ATTENTION
    try:
        with activated(cache):
            yield
    finally:
        model.config._attn_implementation = current


def new_cache(policy: CachePolicy | None, prompt_len: int, max_new_tokens: int, model=None):
    """The policy's cache; without a policy, the model's own kind (``model.new_cache()``, e.g. a method's compressed
    cache) or a DynamicCache. The loop keeps passing this object, so it must be the one the model fills."""
    if policy is not None:
        return PolicyCache(policy, prompt_len, max_new_tokens)
    make = getattr(model, "new_cache", None)
    return make() if callable(make) else DynamicCache()


def _forward(model, ids, start: int, cache, decode_step: int):
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)
    if isinstance(cache, PolicyCache):
        cache.begin_step(positions, decode_step)
    out = model(input_ids=ids, position_ids=positions.unsqueeze(0).expand(ids.shape[0], -1), use_cache=True,
                logits_to_keep=1, **cache_kwarg(cache))
    if isinstance(cache, PolicyCache):
        cache.end_step()
    return out.logits[:, -1]


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache, chunk: int | None = None) -> torch.Tensor:
    """Run the prompt (in chunks of ``chunk`` tokens if given, evicting after each); returns last logits [B, V]."""
    length = input_ids.shape[1]
    step = chunk or length
    logits = None
    for start in range(0, length, step):
        logits = _forward(model, input_ids[:, start : start + step], start, cache, decode_step=0)
    return logits


@torch.no_grad()
def decode_step(model, token: torch.Tensor, position: int, cache, step_index: int) -> torch.Tensor:
    """Feed one token per sequence ([B, 1]) at ``position``; returns the next logits [B, V]."""
    return _forward(model, token, position, cache, decode_step=step_index)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # [B, n] generated ids
    logits: list[torch.Tensor] = field(default_factory=list)  # per generated token, [B, V] (if kept)
    cache_bytes_after_prefill: int = 0
    cache_bytes_peak: int = 0  # the most the cache held during the prefill (before each eviction)
    tokens_held_after_prefill: int = 0
    prefill_seconds: float = 0.0
    cache: object = None


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, policy: CachePolicy | None = None,
                    prefill_chunk: int | None = None, eos_token_id: int | list[int] | None = None,
                    keep_logits: bool = False) -> GenerationResult:
    """Greedy decoding of a batch of equal-length prompts (no padding) under ``policy`` (None = full cache).

    Stops early once every sequence has produced an EOS id. KV bytes after the prefill, and their peak during it
    (a policy cache measures itself before each eviction), are measured from the cache object (`cache_nbytes`);
    the prefill is timed (CUDA synchronised).
    """
    from ..cache_stats import cache_nbytes

    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise SwiftKVInputError(f"input_ids must be [batch, length>0], got shape {tuple(input_ids.shape)}.")
    if max_new_tokens < 1:
        raise SwiftKVInputError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    prompt_len = input_ids.shape[1]
    cache = new_cache(policy, prompt_len, max_new_tokens, model)
    result = GenerationResult(tokens=input_ids.new_zeros(input_ids.shape[0], 0), cache=cache)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    with policy_attention(model, cache):
        _synchronize(input_ids.device)
        start = time.perf_counter()
        logits = prefill(model, input_ids, cache, prefill_chunk)
        _synchronize(input_ids.device)
        result.prefill_seconds = time.perf_counter() - start
        result.cache_bytes_after_prefill = cache_nbytes(cache)
        result.cache_bytes_peak = max(getattr(cache, "peak_nbytes", 0), result.cache_bytes_after_prefill)
        result.tokens_held_after_prefill = cache.get_seq_length(0)
        for step in range(1, max_new_tokens + 1):
            token = logits.argmax(-1, keepdim=True)
            if keep_logits:
                result.logits.append(logits.float().cpu())
            result.tokens = torch.cat([result.tokens, token], dim=1)
            if eos:
                finished |= torch.isin(token[:, 0], torch.tensor(sorted(eos), device=token.device))
                if bool(finished.all()):
                    break
            if step == max_new_tokens:
                break
            logits = decode_step(model, token, prompt_len + step - 1, cache, step)
    return result
