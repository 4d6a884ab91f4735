"""The budgeted Locret KV cache: entries carry a retaining score and are evicted by it.

Self-contained (torch + transformers only), shipped with exports. Per layer the cache holds, for each KV head,
``keys``/``values`` [B, H_kv, N, D], ``scores`` [B, H_kv, N] (float32, the retaining head's output) and
``positions`` [B, H_kv, N] (int32, each entry's token index in the sequence, for inspection and tests). All
layers and heads hold the same number of entries N (eviction keeps the same count everywhere), so one compacted
position range serves every layer.

Quantized store (``quant_bits`` 2, 4 or 8; Locret combined with CSKV's quantizer: evict, then store quantized).
Every stored entry is kept per token as CSKV's value layout, applied per KV head: ``key_packed``/``value_packed``
[B, H_kv, N_s, packed_size(D, bits)] (uint8 codes, ``8 // bits`` per byte) with ``key_scale``/``key_min`` and
``value_scale``/``value_min`` [B, H_kv, N_s, ceil(D / G)] in the model dtype (one per group of G =
``quant_group_size`` channels along head_dim). ``keys``/``values`` then hold only the current step's entries at
full precision (empty between steps); ``scores``/``positions`` cover the stored entries, then the current ones.
A step's new entries are attended exactly; after the layer's eviction (``finish_layer``) the survivors are
quantized and joined to the store, so only the current chunk is ever held unquantized, and the peak stays
budget + chunk entries. Later steps attend to the dequantized entries (keys then rotated, in compacted mode, as
unquantized ones). Eviction selects with the same rule (``kept_indices_reference`` of ``locret_evict``: ties to
the earlier entry) and gathers codes, scales, minimums, scores and positions with the same indices; per-token
quantization treats each entry on its own, so quantizing the step's entries and then gathering the kept ones
stores exactly the survivors' codes. Every tensor is an attribute of the layer, so ``cache_nbytes`` measures the
packed bytes. The quantizer is CSKV's (``quant_llama_cskv``, shipped beside this file in an export).

The model drives it: ``begin_step`` before a forward, ``update`` in each attention, ``finish_layer`` after each
attention (evicts when scheduled, so only one layer at a time is over budget; then stores quantized), ``end_step``
after the forward.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer

try:  # Eviction kernel: beside this file in an export, from the swiftkv_kernels package otherwise.
    from .locret_evict import kept_indices_reference, kernel_available, locret_evict, locret_evict_reference
except ImportError:
    try:
        from swiftkv_kernels.locret_evict import (
            kept_indices_reference,
            kernel_available,
            locret_evict,
            locret_evict_reference,
        )
    except ImportError:  # neither: the torch path below only
        locret_evict = None

try:  # the shared KV quantizer: beside this file in an export, swiftkv_train.remote_code otherwise.
    from .quant_llama_cskv import dequantize_values, packed_size, quantize_values
except ImportError:
    from swiftkv_train.remote_code.quant_llama_cskv import dequantize_values, packed_size, quantize_values


def _kept_indices_torch(scores, keep: int, protect_newest: int = 0) -> torch.Tensor:
    """``kept_indices_reference``'s rule (a stable sort, unlike ``topk``), for when the kernel file is missing."""
    n = scores.shape[-1]
    ranking = scores.float()
    ranking = torch.where(ranking == 0, torch.zeros_like(ranking), ranking)  # -0.0 ranks as +0.0
    if protect_newest > 0:
        ranking[..., n - min(protect_newest, n) :] = float("inf")
    return torch.sort(ranking, dim=-1, descending=True, stable=True).indices[..., :keep].sort(dim=-1).values


def kept_indices(scores, keep: int, protect_newest: int = 0) -> torch.Tensor:
    """Indices [B, H, keep] (ascending) of the entries an eviction keeps: the kernel file's reference selection
    (the rule every eviction path follows), or its copy above when that file is missing."""
    if locret_evict is None:
        return _kept_indices_torch(scores, keep, protect_newest)
    return kept_indices_reference(scores, keep, protect_newest)


def evict_entries_torch(keys, values, scores, positions, keep: int, protect_newest: int = 0):
    """The ``keep`` best entries per (batch row, KV head) in sequence order, ties to the earlier entry; the newest
    ``protect_newest`` rank as +inf. Used only when the kernel file is missing: the same rule as
    ``locret_evict_reference`` (a stable sort, unlike ``topk``), so every path keeps the same entries."""
    index = _kept_indices_torch(scores, keep, protect_newest)
    index_kv = index.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    return (keys.gather(2, index_kv), values.gather(2, index_kv), scores.float().gather(2, index),
            positions.gather(2, index))


_QUANT_FIELDS = ("key_packed", "key_scale", "key_min", "value_packed", "value_scale", "value_min")


class LocretLayer(DynamicLayer):
    """One layer's entries. Inherits DynamicLayer's bookkeeping; every method that reorders or selects entries is
    overridden so that scores and positions (and the quantized store) stay aligned with keys and values.

    ``quant_bits`` None: ``keys``/``values`` hold every entry. 2, 4 or 8: the entries live in the quantized store
    (see the module docstring), ``keys``/``values`` hold the current step's entries until ``store_pending``."""

    is_croppable = False

    def __init__(self, use_kernels: bool = True, quant_bits: int | None = None, group_size: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.scores: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.use_kernels = use_kernels  # evict with the Triton kernel where it can run (CUDA)
        self.quant_bits, self.group_size = quant_bits, group_size
        for name in _QUANT_FIELDS:
            setattr(self, name, None)

    @property
    def quantized(self) -> bool:
        return self.quant_bits is not None

    @property
    def num_entries(self) -> int:
        return 0 if self.scores is None else self.scores.shape[-1]

    @property
    def num_stored(self) -> int:
        """Entries in the quantized store (0 without quantization)."""
        return 0 if self.key_packed is None else self.key_packed.shape[-2]

    @property
    def num_pending(self) -> int:
        """Entries held at full precision in ``keys``/``values`` (every entry without quantization)."""
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        if self.quantized:  # empty, correctly shaped store and pending buffers
            b, h, _, d = key_states.shape
            dv = value_states.shape[-1]
            self.keys, self.values = key_states.new_zeros((b, h, 0, d)), value_states.new_zeros((b, h, 0, dv))
            for prefix, dim, like in (("key", d, key_states), ("value", dv, value_states)):
                groups = -(-dim // self.group_size)
                setattr(self, f"{prefix}_packed", like.new_zeros((b, h, 0, packed_size(dim, self.quant_bits)),
                                                                dtype=torch.uint8))
                setattr(self, f"{prefix}_scale", like.new_zeros((b, h, 0, groups)))
                setattr(self, f"{prefix}_min", like.new_zeros((b, h, 0, groups)))

    def update(self, key_states, value_states, scores=None, positions=None, *args, **kwargs):
        """Append new entries; return every entry's keys and values at full width (the stored ones dequantized
        when quantized, then the new ones exactly)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if scores is None or positions is None:
            raise ValueError("LocretLayer.update needs the retaining scores and positions of the new entries.")
        if self.num_entries == 0:
            self.scores, self.positions = scores, positions
        else:
            self.scores = torch.cat([self.scores, scores], dim=-1)
            self.positions = torch.cat([self.positions, positions], dim=-1)
        if self.num_pending == 0:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        return self.entries()

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, N, D] of every entry: the store dequantized, then the full-precision ones."""
        if self.num_stored == 0:
            return self.keys, self.values
        keys, values = self.dequantized_store()
        return torch.cat([keys, self.keys], dim=-2), torch.cat([values, self.values], dim=-2)

    def dequantized_store(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized store's keys and values [B, H, N_s, D], in the model dtype."""
        bits, group = self.quant_bits, self.group_size
        keys = dequantize_values(self.key_packed, self.key_scale, self.key_min, bits, group, self.keys.shape[-1])
        values = dequantize_values(self.value_packed, self.value_scale, self.value_min, bits, group,
                                   self.values.shape[-1])
        return keys, values

    def store_pending(self) -> None:
        """Quantize the full-precision entries (per token, groups along head_dim) and join them to the store."""
        if not self.quantized or self.num_pending == 0:
            return
        new = quantize_values(self.keys, self.quant_bits, self.group_size) + quantize_values(
            self.values, self.quant_bits, self.group_size
        )
        for name, part in zip(_QUANT_FIELDS, new, strict=True):
            setattr(self, name, torch.cat([getattr(self, name), part], dim=-2))
        self.keys, self.values = self.keys[..., :0, :].clone(), self.values[..., :0, :].clone()

    def evict(self, keep: int, protect_newest: int = 0) -> None:
        """Keep the ``keep`` highest-scoring entries per (batch row, KV head), in their original order (compacted
        positions rely on it); the newest ``protect_newest`` entries count as +inf for this eviction only (their
        stored scores are unchanged). Ties go to the earlier entry, on every path."""
        if self.num_entries <= keep:
            return
        if self.quantized:
            self._evict_quantized(keep, protect_newest)
            return
        self.keys, self.values, self.scores, self.positions = self._evict_fn()(
            self.keys, self.values, self.scores, self.positions, keep, protect_newest
        )

    def _evict_quantized(self, keep: int, protect_newest: int) -> None:
        """Select with the eviction rule, then gather codes, scales, minimums, scores and positions. The pending
        entries are quantized first: per-token quantization is per entry, so the store ends up with exactly the
        survivors' codes (an evicted entry's codes are dropped by the gather)."""
        self.store_pending()
        index = kept_indices(self.scores, keep, protect_newest)
        for name in _QUANT_FIELDS:
            tensor = getattr(self, name)
            setattr(self, name, tensor.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1])))
        self.scores = self.scores.float().gather(2, index)
        self.positions = self.positions.to(torch.int32).gather(2, index)

    def _evict_fn(self):
        """The Triton kernel when enabled and runnable on these tensors, else the torch reference."""
        if locret_evict is None:
            return evict_entries_torch
        if self.use_kernels and kernel_available(self.keys) and kernel_available(self.values):
            return locret_evict
        return locret_evict_reference

    def get_seq_length(self) -> int:
        return self.num_entries  # entries held; LocretCache.get_seq_length reports tokens processed

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_entries + query_length, 0

    def reset(self) -> None:
        self.scores = self.positions = None
        for name in _QUANT_FIELDS:
            setattr(self, name, None)
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a Locret cache cannot be cropped: evicted entries are gone.")

    def _select(self, fn) -> None:
        if self.num_entries > 0:
            for name in ("keys", "values", "scores", "positions", *_QUANT_FIELDS):
                tensor = getattr(self, name)
                if tensor is not None:
                    setattr(self, name, fn(tensor))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices, ...])


class LocretCache(Cache):
    """Budgeted cache for ``LlamaLocretForCausalLM`` (see the module docstring and ``LocretSettings``).

    ``get_seq_length()`` is the number of tokens processed (as for transformers' sliding-window caches), so that
    ``generate()`` feeds only new tokens; ``num_entries()`` is what the cache holds.
    """

    def __init__(self, num_layers: int, settings, use_kernels: bool = True):
        bits, group = getattr(settings, "quant_bits", None), getattr(settings, "quant_group_size", 32)
        super().__init__(
            layers=[LocretLayer(use_kernels=use_kernels, quant_bits=bits, group_size=group) for _ in range(num_layers)]
        )
        self.settings = settings
        self.use_kernels = use_kernels
        self.tokens_seen = 0
        self.peak_entries = 0  # the most entries any layer held at any moment (measured, for tests and reports)
        self._scheduled_keep: int | None = None
        self._scheduled_protect = 0
        self._local_tokens_left = 0  # upcoming tokens that must never be evicted (the prompt's local tail)
        self._step_local = 0
        self._step_len = 0

    # ---- what the cache holds ---------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tokens_seen

    def num_entries(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].num_entries

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    # ---- driven by the prefill loop -----------------------------------------------------------------------------
    def schedule_eviction(self, keep: int | None, protect_newest: int = 0) -> None:
        """Evict to ``keep`` entries after each layer's attention in the coming forward(s); None: never."""
        self._scheduled_keep, self._scheduled_protect = keep, protect_newest

    def protect_next_tokens(self, count: int) -> None:
        """The next ``count`` tokens get score +inf: no later eviction (decode eviction included) removes them."""
        self._local_tokens_left = count

    # ---- driven by the model ------------------------------------------------------------------------------------
    def begin_step(self, num_new_tokens: int) -> None:
        self._step_len = num_new_tokens
        self._step_local = min(self._local_tokens_left, num_new_tokens)

    def new_positions(self, batch: int, heads: int, device) -> torch.Tensor:
        """Token indices of this step's tokens, shaped like their score rows [B, H_kv, q]."""
        pos = torch.arange(self.tokens_seen, self.tokens_seen + self._step_len, device=device, dtype=torch.int32)
        return pos.expand(batch, heads, -1)

    def update(self, key_states, value_states, layer_idx: int, scores=None, *args, **kwargs):
        """Append this step's entries of layer ``layer_idx``; ``scores`` is [B, H_kv, q]."""
        if scores is None:
            raise ValueError("a LocretCache is filled by LlamaLocretForCausalLM only: every entry needs its score.")
        scores = scores.float()
        if self._step_local:
            scores = scores.clone()
            scores[..., : self._step_local] = float("inf")
        batch, heads = scores.shape[:2]
        positions = self.new_positions(batch, heads, scores.device)
        keys, values = self.layers[layer_idx].update(key_states, value_states, scores, positions)
        self.peak_entries = max(self.peak_entries, keys.shape[-2])
        return keys, values

    def finish_layer(self, layer_idx: int) -> None:
        layer = self.layers[layer_idx]
        if self._scheduled_keep is not None:
            layer.evict(self._scheduled_keep, self._scheduled_protect)
        elif self.settings.decode_eviction and layer.num_entries >= self.settings.budget + self.settings.chunk_size:
            # Amortised: one top-k per chunk_size generated tokens, back to the budget.
            layer.evict(self.settings.budget, self.settings.stabilizers)
        layer.store_pending()  # quantized store: the surviving new entries are quantized now (no-op otherwise)

    def end_step(self) -> None:
        self.tokens_seen += self._step_len
        self._local_tokens_left -= self._step_local
        self._step_len = self._step_local = 0


__all__ = ["LocretCache", "LocretLayer", "evict_entries_torch", "kept_indices"]
