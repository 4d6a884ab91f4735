"""The bi-branch CSKV cache: a full-precision window of recent tokens plus compressed (optionally quantized) features.

Self-contained (torch, transformers and siblings only): shipped with ``trust_remote_code`` exports.

Per layer and batch row (every tensor has the batch first; all are tensor attributes of the layer object, so
``cache_nbytes`` measures them):

- window (the last ``W`` tokens): ``keys``/``values`` ``[B, H_kv, w, D]`` from the original projections (keys after
  RoPE, as in a plain cache) and their compressed features ``window_key_features [B, w, r_k]``,
  ``window_value_features [B, w, r_v]`` (``c = A·x``, kept so a token leaving the window needs no recomputation);
- compressed branch (older tokens), unquantized: ``key_features [B, T, r_k]`` (pre-RoPE), ``value_features
  [B, T, r_v]``;
- compressed branch, quantized: ``value_packed [B, T, ceil(r_v*bits/8)]`` uint8 with ``value_scale``/``value_min``
  ``[B, T, ceil(r_v/G)]`` (per token); ``key_packed [B, n, r_k, ceil(G*bits/8)]`` uint8 with ``key_scale``/``key_min``
  ``[B, n, r_k]`` (per channel, blocks of G tokens) and ``key_features [B, <G, r_k]``, the unquantized residual of the
  last partial block;
- ``first_position [B]`` (int64): the position of cache index 0; cached token t sits at ``first_position + t``
  (positions are contiguous per row, as ``generate`` makes them, left padding included).

The attention (``modeling_llama_cskv``) calls :meth:`CSKVCacheLayer.append` with new K/V and features; the layer moves
tokens leaving the window into the compressed branch. The attention then reconstructs the compressed tokens
(``dequantize -> B·c -> RoPE at their positions``). Prefill (an empty cache) attends to the exact K/V of the prompt.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

try:  # the shared KV quantizer: beside this file in an export, swiftkv_train.remote_code otherwise.
    from .quant_llama_cskv import dequantize_key_blocks, dequantize_values, quantize_key_blocks, quantize_values
except ImportError:
    from swiftkv_train.remote_code.quant_llama_cskv import (
        dequantize_key_blocks, dequantize_values, quantize_key_blocks, quantize_values,
    )

_TENSOR_FIELDS = (
    "keys",
    "values",
    "window_key_features",
    "window_value_features",
    "key_features",
    "value_features",
    "key_packed",
    "key_scale",
    "key_min",
    "value_packed",
    "value_scale",
    "value_min",
    "first_position",
)


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A slice that keeps a larger storage alive is copied, so dropped tokens really free their memory."""
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone()
    return t


class CSKVCacheLayer(CacheLayerMixin):
    """One layer of the bi-branch cache (see the module docstring for the layout)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, window: int, quant_bits: int | None = None, group_size: int = 32):
        super().__init__()
        self.window, self.quant_bits, self.group_size = window, quant_bits, group_size
        self.seq_length = 0  # tokens seen (window + compressed)
        for name in _TENSOR_FIELDS[2:]:
            setattr(self, name, None)

    # ---- filling --------------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, key_features=None,
                            value_features=None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        rk = key_features.shape[-1] if key_features is not None else 0
        rv = value_features.shape[-1] if value_features is not None else 0
        empty = dict(dtype=self.dtype, device=self.device)
        self.keys = key_states.new_zeros((b, h, 0, d))
        self.values = value_states.new_zeros((b, h, 0, d))
        self.window_key_features = torch.zeros((b, 0, rk), **empty)
        self.window_value_features = torch.zeros((b, 0, rv), **empty)
        self.key_features = torch.zeros((b, 0, rk), **empty)
        if self.quant_bits is None:
            self.value_features = torch.zeros((b, 0, rv), **empty)
        else:
            per_byte = 8 // self.quant_bits
            g = self.group_size
            u8 = dict(dtype=torch.uint8, device=self.device)
            self.key_packed = torch.zeros((b, 0, rk, -(-g // per_byte)), **u8)
            self.key_scale = torch.zeros((b, 0, rk), **empty)
            self.key_min = torch.zeros((b, 0, rk), **empty)
            self.value_packed = torch.zeros((b, 0, -(-rv // per_byte)), **u8)
            self.value_scale = torch.zeros((b, 0, -(-rv // g)), **empty)
            self.value_min = torch.zeros((b, 0, -(-rv // g)), **empty)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "CSKVCache stores compressed features, not plain K/V: it is filled by the llama_cskv attention in CSKV "
            "mode (model.cskv(True)). Use a DynamicCache for the original model (cskv(False))."
        )

    def append(self, key_states, value_states, key_features, value_features, position_ids) -> None:
        """Add new tokens: full K/V (keys after RoPE) ``[B, H, S, D]`` and features ``[B, S, r]``.

        Tokens that no longer fit in the window move to the compressed branch (quantized when configured).
        """
        new = key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states, key_features, value_features)
            positions = position_ids.expand(key_states.shape[0], -1)
            # Positions are contiguous per row: cache index 0 sits at (last position - (S - 1)).
            self.first_position = (positions[:, -1] - (new - 1)).to(torch.int64).clone()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.window_key_features = torch.cat([self.window_key_features, key_features], dim=1)
        self.window_value_features = torch.cat([self.window_value_features, value_features], dim=1)
        self.seq_length += new
        overflow = self.keys.shape[-2] - self.window
        if overflow > 0:
            self._compress(self.window_key_features[:, :overflow], self.window_value_features[:, :overflow])
            self.keys = _owned(self.keys[:, :, overflow:])
            self.values = _owned(self.values[:, :, overflow:])
            self.window_key_features = _owned(self.window_key_features[:, overflow:])
            self.window_value_features = _owned(self.window_value_features[:, overflow:])

    def _compress(self, key_features: torch.Tensor, value_features: torch.Tensor) -> None:
        if self.quant_bits is None:
            self.key_features = torch.cat([self.key_features, key_features], dim=1)
            self.value_features = torch.cat([self.value_features, value_features], dim=1)
            return
        bits, g = self.quant_bits, self.group_size
        packed, scale, minimum = quantize_values(value_features, bits, g)
        self.value_packed = torch.cat([self.value_packed, packed], dim=1)
        self.value_scale = torch.cat([self.value_scale, scale], dim=1)
        self.value_min = torch.cat([self.value_min, minimum], dim=1)
        # Keys are quantized per channel over whole blocks of g tokens; the partial block waits unquantized.
        residual = torch.cat([self.key_features, key_features], dim=1)
        full = (residual.shape[1] // g) * g
        if full:
            packed, scale, minimum = quantize_key_blocks(residual[:, :full].contiguous(), bits, g)
            self.key_packed = torch.cat([self.key_packed, packed], dim=1)
            self.key_scale = torch.cat([self.key_scale, scale], dim=1)
            self.key_min = torch.cat([self.key_min, minimum], dim=1)
        self.key_features = _owned(residual[:, full:])

    # ---- reading --------------------------------------------------------------------------------------------------
    @property
    def num_compressed(self) -> int:
        return self.seq_length - (self.keys.shape[-2] if self.is_initialized else 0)

    def compressed_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Key (pre-RoPE) and value features ``[B, T, r]`` of the compressed tokens, oldest first, dequantized."""
        if self.quant_bits is None:
            return self.key_features, self.value_features
        bits, g = self.quant_bits, self.group_size
        keys = dequantize_key_blocks(self.key_packed, self.key_scale, self.key_min, bits, g)
        keys = torch.cat([keys, self.key_features], dim=1)
        values = dequantize_values(
            self.value_packed, self.value_scale, self.value_min, bits, g, self.window_value_features.shape[-1]
        )
        return keys, values

    def compressed_positions(self) -> torch.Tensor:
        """Original positions ``[B, T]`` of the compressed tokens (for RoPE after reconstruction)."""
        steps = torch.arange(self.num_compressed, device=self.first_position.device)
        return self.first_position[:, None] + steps

    # ---- CacheLayerMixin ------------------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seq_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _map_tensors(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))

    def reset(self) -> None:
        for name in _TENSOR_FIELDS:
            setattr(self, name, None)
        self.seq_length = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_tensors(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_tensors(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_tensors(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("CSKVCache cannot be cropped (compressed tokens cannot move back to the window).")

    def offload(self):
        self._map_tensors(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self._map_tensors(lambda t: t.to(self.device, non_blocking=True))


class CSKVCache(Cache):
    """One :class:`CSKVCacheLayer` per decoder layer, configured from a ``LlamaCSKVConfig``."""

    def __init__(self, config):
        layers = [
            CSKVCacheLayer(config.cskv_window, config.cskv_quant_bits, config.cskv_quant_group_size)
            for _ in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)


__all__ = ["CSKVCache", "CSKVCacheLayer"]
