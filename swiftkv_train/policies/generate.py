"""Greedy prefill + decode for any Llama-family model (original, converted by a method, exported) with or without a
policy.

The loop is explicit (not `model.generate`) because an evicting cache needs two things generate does not give:
the ORIGINAL position of each new token (the cache length no longer says it) and a call after every forward step
so the policy can evict. With ``policy=None`` a plain `DynamicCache` is used: the reference run.

Question-independent compression (``question_ids``): the convention of KV-compression benchmarks (NVIDIA kvpress:
"compress the context, then ask"). The context alone is prefilled and compressed; then the question is appended
to the compressed cache and the answer decoded. The question can neither be evicted nor decide what is kept.
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
from .cache import PolicyCache, tokens_held

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
def prefill(model, input_ids: torch.Tensor, cache, chunk: int | None = None, start: int = 0) -> torch.Tensor:
    """Run the prompt (in chunks of ``chunk`` tokens if given, evicting after each); returns last logits [B, V].

    ``start``: position of the first token (tokens already in the cache before it, e.g. a compressed context)."""
    length = input_ids.shape[1]
    step = chunk or length
    logits = None
    for offset in range(0, length, step):
        logits = _forward(model, input_ids[:, offset : offset + step], start + offset, cache, decode_step=0)
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
    # Measured when decoding starts (after the whole prompt: the compressed context plus the question, if any).
    cache_bytes_after_prefill: int = 0
    cache_bytes_peak: int = 0  # the most the cache held during the prefill (before each eviction)
    tokens_held_after_prefill: int = 0
    tokens_held_after_context: int = 0  # what the policy kept of the context (== the above without a question)
    question_tokens: int = 0
    prefill_seconds: float = 0.0  # context and question
    cache: object = None


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, policy: CachePolicy | None = None,
                    prefill_chunk: int | None = None, eos_token_id: int | list[int] | None = None,
                    keep_logits: bool = False, question_ids: torch.Tensor | None = None,
                    stop_when=None) -> GenerationResult:
    """Greedy decoding of a batch of equal-length prompts (no padding) under ``policy`` (None = full cache).

    ``question_ids`` ([B, Lq]; None = the whole prompt is ``input_ids``, compressed as it is prefilled): then
    ``input_ids`` is the CONTEXT. It is prefilled (in chunks of ``prefill_chunk`` if given) and compressed by the
    policy exactly as a prompt would be: the policy's ``start`` gets the context length, so a fractional budget
    ("50%", "4x") is a share of the context (kvpress's compression ratio), and SnapKV's one-time eviction and its
    observation window are at the end of the context. Then the cache is FROZEN (`PolicyCache.freeze`) and the
    question is appended: it is never evicted and its attention rows (or a model's pushed scores) never reach the
    policy, so it cannot influence what was kept. Decoding follows from the question's last logits.

    Decoding stays frozen too, also for policies that evict while decoding (H2O, Keyformer): the answer's query
    rows attend to the question, so scoring them (or evicting by them) would let the question decide which context
    entries survive, which is exactly what this mode rules out; and it keeps the question's entries by
    construction. This is kvpress's convention (compression applies to the context's prefill; the question and
    the answer are appended uncompressed). The cache therefore holds budget + question + answer entries at the
    end. Without ``question_ids`` every policy behaves as before (H2O / Keyformer evict after every decoded token).

    Stops early once every sequence has produced an EOS id, or once ``stop_when(tokens)`` (the generated ids so
    far, [B, n]) returns True. KV bytes and tokens held when decoding starts, and the peak during the prefill (a
    policy cache measures itself before each eviction), are measured from the cache object (`cache_nbytes`); the
    prefill (context + question) is timed (CUDA synchronised).
    """
    from ..cache_stats import cache_nbytes

    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise SwiftKVInputError(f"input_ids must be [batch, length>0], got shape {tuple(input_ids.shape)}.")
    if question_ids is not None and (question_ids.dim() != 2 or question_ids.shape[1] == 0
                                     or question_ids.shape[0] != input_ids.shape[0]):
        raise SwiftKVInputError(
            f"question_ids must be [batch, length>0] with the context's batch ({input_ids.shape[0]}), got shape "
            f"{tuple(question_ids.shape)}; pass question_ids=None to compress the whole prompt."
        )
    if max_new_tokens < 1:
        raise SwiftKVInputError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    context_len = input_ids.shape[1]
    question_len = 0 if question_ids is None else question_ids.shape[1]
    prompt_len = context_len + question_len
    cache = new_cache(policy, context_len, max_new_tokens, model)
    result = GenerationResult(tokens=input_ids.new_zeros(input_ids.shape[0], 0), cache=cache,
                              question_tokens=question_len)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    with policy_attention(model, cache):
        _synchronize(input_ids.device)
        start = time.perf_counter()
        logits = prefill(model, input_ids, cache, prefill_chunk)
        result.tokens_held_after_context = tokens_held(cache)
        if question_ids is not None:
            if isinstance(cache, PolicyCache):
                cache.freeze()
            logits = prefill(model, question_ids.to(input_ids.device), cache, prefill_chunk, start=context_len)
        _synchronize(input_ids.device)
        result.prefill_seconds = time.perf_counter() - start
        result.cache_bytes_after_prefill = cache_nbytes(cache)
        result.cache_bytes_peak = max(getattr(cache, "peak_nbytes", 0), result.cache_bytes_after_prefill)
        result.tokens_held_after_prefill = tokens_held(cache)
        for step in range(1, max_new_tokens + 1):
            token = logits.argmax(-1, keepdim=True)
            if keep_logits:
                result.logits.append(logits.float().cpu())
            result.tokens = torch.cat([result.tokens, token], dim=1)
            if eos:
                finished |= torch.isin(token[:, 0], torch.tensor(sorted(eos), device=token.device))
                if bool(finished.all()):
                    break
            if step == max_new_tokens or (stop_when is not None and stop_when(result.tokens)):
                break
            logits = decode_step(model, token, prompt_len + step - 1, cache, step)
    return result
