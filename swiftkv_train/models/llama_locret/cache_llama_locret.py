"""The budgeted Locret KV cache: entries carry a retaining score and are evicted by it.

Self-contained (torch + transformers only), shipped with exports. Per layer the cache holds, for each KV head,
``keys``/``values`` [B, H_kv, N, D], ``scores`` [B, H_kv, N] (float32, the retaining head's output) and
``positions`` [B, H_kv, N] (int32, each entry's token index in the sequence, for inspection and tests). All
layers and heads hold the same number of entries N (eviction keeps the same count everywhere), so one compacted
position range serves every layer.

The model drives it: ``begin_step`` before a forward, ``update`` in each attention, ``finish_layer`` after each
attention (evicts when scheduled, so only one layer at a time is over budget), ``end_step`` after the forward.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer

try:  # Eviction kernel: beside this file in an export, from the swiftkv_kernels package otherwise.
    from .locret_evict import kernel_available, locret_evict, locret_evict_reference
except ImportError:
    try:
        from swiftkv_kernels.locret_evict import kernel_available, locret_evict, locret_evict_reference
    except ImportError:  # neither: the torch path below only
        locret_evict = None


def evict_entries_torch(keys, values, scores, positions, keep: int, protect_newest: int = 0):
    """The ``keep`` best entries per (batch row, KV head) in sequence order, ties to the earlier entry; the newest
    ``protect_newest`` rank as +inf. Used only when the kernel file is missing: the same rule as
    ``locret_evict_reference`` (a stable sort, unlike ``topk``), so every path keeps the same entries."""
    n = scores.shape[-1]
    ranking = scores.float()
    ranking = torch.where(ranking == 0, torch.zeros_like(ranking), ranking)  # -0.0 ranks as +0.0
    if protect_newest > 0:
        ranking[..., n - min(protect_newest, n) :] = float("inf")
    index = torch.sort(ranking, dim=-1, descending=True, stable=True).indices[..., :keep].sort(dim=-1).values
    index_kv = index.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    return (keys.gather(2, index_kv), values.gather(2, index_kv), scores.float().gather(2, index),
            positions.gather(2, index))


class LocretLayer(DynamicLayer):
    """One layer's entries. Inherits DynamicLayer's bookkeeping; every method that reorders or selects entries is
    overridden so that scores and positions stay aligned with keys and values."""

    is_croppable = False

    def __init__(self, use_kernels: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.scores: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.use_kernels = use_kernels  # evict with the Triton kernel where it can run (CUDA)

    @property
    def num_entries(self) -> int:
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def update(self, key_states, value_states, scores=None, positions=None, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if scores is None or positions is None:
            raise ValueError("LocretLayer.update needs the retaining scores and positions of the new entries.")
        if self.num_entries == 0:
            self.keys, self.values, self.scores, self.positions = key_states, value_states, scores, positions
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.scores = torch.cat([self.scores, scores], dim=-1)
            self.positions = torch.cat([self.positions, positions], dim=-1)
        return self.keys, self.values

    def evict(self, keep: int, protect_newest: int = 0) -> None:
        """Keep the ``keep`` highest-scoring entries per (batch row, KV head), in their original order (compacted
        positions rely on it); the newest ``protect_newest`` entries count as +inf for this eviction only (their
        stored scores are unchanged). Ties go to the earlier entry, on every path."""
        if self.num_entries <= keep:
            return
        self.keys, self.values, self.scores, self.positions = self._evict_fn()(
            self.keys, self.values, self.scores, self.positions, keep, protect_newest
        )

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
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a Locret cache cannot be cropped: evicted entries are gone.")

    def _select(self, fn) -> None:
        if self.num_entries > 0:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.scores, self.positions = fn(self.scores), fn(self.positions)

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
        super().__init__(layers=[LocretLayer(use_kernels=use_kernels) for _ in range(num_layers)])
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

    def end_step(self) -> None:
        self.tokens_seen += self._step_len
        self._local_tokens_left -= self._step_local
        self._step_len = self._step_local = 0


__all__ = ["LocretCache", "LocretLayer", "evict_entries_torch"]
