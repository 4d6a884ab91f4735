"""Measuring Locret's budgeted chunked prefill: the largest cache it holds."""

from __future__ import annotations

import torch

from ...cache_stats import cache_nbytes
from .remote_code import LlamaLocretForCausalLM



def prefill_peak(model: LlamaLocretForCausalLM, ids: torch.Tensor, **settings) -> tuple[int, int, object]:
    """Chunked prefill of ``ids``, measuring the largest cache held: (bytes, entries per layer, final cache).

    Measured right after each layer's attention, before that layer's eviction, where the cache is largest.
    """
    state = {"cache": None, "bytes": 0, "entries": 0}

    def grab_cache(module, args, kwargs):
        state["cache"] = kwargs.get("cache", kwargs.get("past_key_values"))

    def measure(module, args, output):
        cache = state["cache"]
        state["bytes"] = max(state["bytes"], cache_nbytes(cache))
        state["entries"] = max(state["entries"], max(layer.num_entries for layer in cache.layers))

    handles = [model.model.register_forward_pre_hook(grab_cache, with_kwargs=True)]
    handles += [layer.self_attn.o_proj.register_forward_hook(measure) for layer in model.model.layers]
    try:
        cache = model.chunked_prefill(ids, **settings)
    finally:
        for handle in handles:
            handle.remove()
    return state["bytes"], state["entries"], cache
