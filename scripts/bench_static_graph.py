"""The preallocated-cache, graph-captured inference path of the speed benchmarks (bench_swiftkv_8b.py).

transformers' eager path (``DynamicCache``) concatenates the whole cache at every layer of every decode step and
launches every op from Python, so a decode step of an 8B model costs host time and cache copies rather than the
model's arithmetic. This is the path a server runs instead, built from transformers' own public pieces so that the
original model and SwiftKV run exactly the same code:

- ``static_cache``: transformers ``StaticLayer``s, one per cache slot (a SwiftKV model has fewer slots than layers),
  allocated once; ``update`` writes the new positions in place.
- ``PACKED_DECODE``: an attention registered through ``AttentionInterface`` (and ``AttentionMaskInterface``).
  A preallocated cache needs a mask over its unused positions, and with a mask transformers' SDPA path repeats K/V
  to every query head (``repeat_kv``: 4x the cache written and read again per layer at Llama-3.1-8B shapes). For
  one query token the query heads of a KV group become that group's query rows instead, so K/V are read once.
  Anything else is transformers' ``sdpa_attention_forward`` unchanged.
- ``Graphed``: one call captured in a CUDA graph and replayed (no Python, no launches on the host per replay).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.cache_utils import Cache, StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_DECODE = "sdpa_packed_decode"


def packed_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA attention; for a single query token with grouped K/V heads, the group's query heads are its query rows
    ([B, H, 1, D] -> [B, H_kv, H/H_kv, D]) so that a mask does not force ``repeat_kv``."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or n_rep == 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, _, d = query.shape
    # query head j*n_rep + r reads KV head j (repeat_kv's order); a [B, 1, 1, L] mask broadcasts over both
    out = F.scaled_dot_product_attention(query.reshape(b, h // n_rep, n_rep, d), key, value,
                                         attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_DECODE, packed_decode_attention)
AttentionMaskInterface.register(PACKED_DECODE, sdpa_mask)


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Run ``model`` with the registered attention ``name`` inside the block (the config is shared by its layers)."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield model
    finally:
        config._attn_implementation = before


# torch picks cuDNN's attention for these shapes on Hopper. cuDNN builds an execution plan per shape (about 2 ms on
# the host) and caches it; a DynamicCache grows by one position per decode step, so every step of every layer
# builds a new plan. Eager decode therefore runs without cuDNN (flash attention takes any length for free).
NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# The graph-captured prefill asks for cuDNN first, as eager prefill gets it (its shapes are fixed: one plan).
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION] + NO_CUDNN


def sdpa_backends(order: list | None):
    """``sdpa_kernel`` over ``order`` in that priority (None: torch's own choice)."""
    if order is None:
        return contextlib.nullcontext()
    return sdpa_kernel(order, set_priority=True)


def static_cache(slots: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype, device) -> Cache:
    """A transformers cache of ``slots`` preallocated ``StaticLayer``s of ``max_len`` positions each."""
    cache = Cache(layers=[StaticLayer(max_cache_len=max_len) for _ in range(slots)])
    cache.early_initialization(batch, num_kv_heads, head_dim, dtype, device)
    return cache


def fill(cache: Cache, context: int, generator: torch.Generator | None = None, chunks: int = 8) -> Cache:
    """Write ``context`` random positions into every slot (decode cost does not depend on the values), a few
    positions at a time so that the transient tensors stay small next to the cache."""
    bounds = [context * i // chunks for i in range(chunks + 1)]
    for slot, layer in enumerate(cache.layers):
        keys = layer.keys
        for lo, hi in zip(bounds, bounds[1:]):
            shape = (keys.shape[0], keys.shape[1], hi - lo, keys.shape[3])
            k = torch.randn(shape, dtype=keys.dtype, device=keys.device, generator=generator)
            v = torch.randn(shape, dtype=keys.dtype, device=keys.device, generator=generator)
            cache.update(k, v, slot)
    return cache


class Graphed:
    """``fn()`` captured once in a CUDA graph; calling replays it and returns the captured output tensors.

    Off CUDA it simply calls ``fn`` (the same code path, eagerly: what the CPU smoke test exercises)."""

    def __init__(self, fn, device: torch.device, warmup: int = 2):
        self.fn = fn
        self.graph = None
        if device.type != "cuda":
            return
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm up off the default stream, as torch.cuda.graph requires
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn()

    def __call__(self):
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.out
