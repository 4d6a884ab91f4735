"""CSKV Llama: low-rank K/V factors and a bi-branch compressed KV cache, as subclasses of the transformers Llama classes.

Self-contained: imports only torch, transformers and sibling files, so the same files serve the package and
``trust_remote_code`` exports.

Every layer keeps its original ``k_proj``/``v_proj`` (they give the exact K/V of the recent window) and adds
``k_proj_a``/``v_proj_a`` (A: hidden -> r) and ``k_proj_b``/``v_proj_b`` (B: r -> kv_dim). Older tokens keep only
``c = A·x``; their K/V are rebuilt as ``B·c`` (+ the original bias, if any), keys then rotated at their original
positions.

- Teacher mode (``config.cskv = False``): exactly the original Llama (plain ``DynamicCache``).
- Student mode (``config.cskv = True``):
  * with a cache (``generate``): the prompt is attended exactly (prefill); afterwards every forward appends its tokens
    to the :class:`CSKVCache` and attends to exactly what the cache holds: the last ``W`` tokens exact, older tokens
    reconstructed (and dequantized when quantization is on). On CUDA with Triton (``config.use_kernels``, inference,
    at most ``W`` new tokens) the ``cskv_decode`` kernel computes that attention straight from the compressed
    features; otherwise the older tokens' K/V are materialised and attended with the configured attention;
  * without a cache: exact attention (the whole input is a prompt), unless ``cskv_decode_from=P`` is passed: then
    queries at index ``>= P`` see what one-token-at-a-time decoding after a P-token prefill would see (keys older than
    ``W`` reconstructed, with the cache's quantization of complete key blocks), which is what fidelity evaluation
    and the end-to-end KL use (``P = 0``: every position decoded from the compressed cache).
"""

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    eager_attention_forward,
    repeat_kv,
)

from .cache_llama_cskv import CSKVCache, CSKVCacheLayer
from .configuration_llama_cskv import LlamaCSKVConfig, Qwen2CSKVConfig, Qwen3CSKVConfig

try:  # beside this file in an export, one level up in the package
    from .transformers_compat import (CACHE_ARG, accepts_legacy_cache_name, add_family_modules, apply_rope,
                                      build_causal_lm, build_decoder, build_decoder_layer, cache_kwarg,
                                      causal_lm_output, decoder_output, embed_inputs, has_qk_norm,
                                      source_attention_forward, source_query_key_value, to_heads)
except ImportError:
    from swiftkv_train.remote_code.transformers_compat import (CACHE_ARG, accepts_legacy_cache_name,
                                                               add_family_modules, apply_rope, build_causal_lm,
                                                               build_decoder, build_decoder_layer, cache_kwarg,
                                                               causal_lm_output, decoder_output, embed_inputs,
                                                               has_qk_norm, source_attention_forward,
                                                               source_query_key_value, to_heads)
try:  # the shared KV quantizer, likewise
    from .quant_llama_cskv import fake_quant_keys, fake_quant_values
except ImportError:
    from swiftkv_train.remote_code.quant_llama_cskv import fake_quant_keys, fake_quant_values

try:  # Decode attention over the compressed cache: beside this file in an export, from swiftkv_kernels otherwise.
    from .cskv_decode import cskv_decode_attention, kernel_available
except ImportError:
    try:
        from swiftkv_kernels.cskv_decode import cskv_decode_attention, kernel_available
    except ImportError:  # neither: the torch path only
        cskv_decode_attention = None


def decode_key_masks(attention_mask, q_len: int, compressed: int, window: int):
    """The model's attention mask split for the decode kernel: ``(compressed, window)`` bool masks
    ([B, S, T] / [B, S, w], or [B, T] / [B, S, w]; None = every compressed token / causal window), or None when the
    mask has a form the kernel does not take (then the torch path runs).

    Accepts no mask, a 4-D mask over the ``T + w`` cached keys (bool: True = attend; float: 0 = attend, as the
    sdpa and eager masks are) and a 2-D padding mask (1 = keep) to which the window's causality is added.
    """
    if attention_mask is None:
        return None, None
    if not isinstance(attention_mask, torch.Tensor):
        return None
    keys = compressed + window
    if attention_mask.dim() == 4:
        if attention_mask.shape[1] != 1 or attention_mask.shape[2] != q_len or attention_mask.shape[3] != keys:
            return None
        allowed = attention_mask[:, 0] if attention_mask.dtype == torch.bool else attention_mask[:, 0] == 0
        return allowed[..., :compressed], allowed[..., compressed:]
    if attention_mask.dim() == 2 and attention_mask.shape[1] == keys:
        keep = attention_mask.bool()
        device = attention_mask.device
        causal = torch.arange(window, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None] + (
            window - q_len)
        return keep[:, :compressed], keep[:, None, compressed:] & causal
    return None


class LlamaCSKVAttention(LlamaAttention):
    """Llama attention (with the source family's q/k/v biases or q/k norms) plus the CSKV factors A (``*_proj_a``)
    and B (``*_proj_b``) of keys and values. A Qwen3 key rebuilt from its features goes through ``k_norm`` before
    RoPE, as the original key does."""

    def __init__(self, config: LlamaCSKVConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        add_family_modules(self, config)
        kv_dim = config.cskv_kv_dim
        rank_k, rank_v = config.cskv_rank("key", layer_idx), config.cskv_rank("value", layer_idx)
        self.k_proj_a = nn.Linear(config.hidden_size, rank_k, bias=False)
        self.k_proj_b = nn.Linear(rank_k, kv_dim, bias=False)
        self.v_proj_a = nn.Linear(config.hidden_size, rank_v, bias=False)
        self.v_proj_b = nn.Linear(rank_v, kv_dim, bias=False)

    # ---- the compressed path ------------------------------------------------------------------------------------
    def compress(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed key and value features ``c = A·x``: ``[B, S, r_k]``, ``[B, S, r_v]``."""
        return self.k_proj_a(hidden_states), self.v_proj_a(hidden_states)

    def reconstruct_key(self, key_features: torch.Tensor, positions: torch.Tensor, rotary) -> torch.Tensor:
        """``RoPE(k_norm(B_k·c + b_k))`` (``k_norm``: Qwen3's, where the layer has it) at ``positions [B, T]`` ->
        ``[B, H, T, D]``."""
        key = self.k_proj_b(key_features)
        if self.k_proj.bias is not None:
            key = key + self.k_proj.bias
        key = to_heads(key, self.head_dim, getattr(self, "k_norm", None))
        cos, sin = rotary(key, positions)
        return apply_rope(key, cos, sin)

    def reconstruct_value(self, value_features: torch.Tensor) -> torch.Tensor:
        """``B_v·c + b_v`` -> ``[B, H, T, D]``."""
        value = self.v_proj_b(value_features)
        if self.v_proj.bias is not None:
            value = value + self.v_proj.bias
        return to_heads(value, self.head_dim)

    @accepts_legacy_cache_name
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        cskv_rotary=None,
        cskv_allowed: torch.Tensor | None = None,
        cskv_decode_from: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.config.cskv:
            return source_attention_forward(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        query, key, value = source_query_key_value(self, hidden_states, position_embeddings)

        if cache is not None:
            layer, prefill = self._append_to_cache(hidden_states, key, value, cache, position_ids)
            if not prefill:
                attn = self._kernel_decode(query, layer, attention_mask, cskv_rotary)
                if attn is not None:
                    return self.o_proj(attn.reshape(*hidden_states.shape[:-1], -1)), None
                key, value = self._materialised_key_value(layer, cskv_rotary)
        elif cskv_decode_from is not None:
            return self._simulated_decode(hidden_states, query, key, value, position_ids, cskv_rotary, cskv_allowed,
                                          cskv_decode_from)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    def _append_to_cache(self, hidden_states, key, value, cache, position_ids) -> tuple[CSKVCacheLayer, bool]:
        """Append the new tokens to this layer's CSKV cache; (the layer, whether this was the prefill)."""
        layer = cache.layers[self.layer_idx]
        if not isinstance(layer, CSKVCacheLayer):
            raise TypeError(f"CSKV mode needs a CSKVCache, got a layer of type {type(layer).__name__}.")
        prefill = layer.get_seq_length() == 0
        key_features, value_features = self.compress(hidden_states)
        layer.append(key, value, key_features, value_features, position_ids)
        return layer, prefill

    def _materialised_key_value(self, layer: CSKVCacheLayer, rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of everything the cache holds: the compressed tokens rebuilt (dequantize, B, RoPE), then the window."""
        if rotary is None:
            raise RuntimeError("LlamaCSKVAttention needs `cskv_rotary` (the model's rotary embedding) with a cache.")
        if layer.num_compressed == 0:  # everything still fits in the window (a prompt shorter than W)
            return layer.keys, layer.values
        key_c, value_c = layer.compressed_features()
        rebuilt_key = self.reconstruct_key(key_c, layer.compressed_positions(), rotary)
        rebuilt_value = self.reconstruct_value(value_c)
        return torch.cat([rebuilt_key, layer.keys], dim=-2), torch.cat([rebuilt_value, layer.values], dim=-2)

    def _kernel_decode(self, query, layer: CSKVCacheLayer, attention_mask, rotary) -> torch.Tensor | None:
        """Attention output [B, S, H, D] straight from the compressed cache (the ``cskv_decode`` Triton kernel), or
        None where it does not apply: no kernel/CUDA, ``config.use_kernels`` off, training or a gradient needed
        (inference-only kernel), ZeRO-3 partitioned weights, no compressed token yet, more new tokens than the
        window (then some compressed tokens would follow a query), mixed dtypes, or a mask form the kernel does not
        take."""
        if cskv_decode_attention is None or not getattr(self.config, "use_kernels", True):
            return None
        if has_qk_norm(self.config):  # the kernel rebuilds keys without Qwen3's per-head k_norm
            return None
        if not kernel_available(query) or query.dtype != self.k_proj_b.weight.dtype:
            return None
        q_len, compressed = query.shape[-2], layer.num_compressed
        if self.training or rotary is None or compressed == 0 or q_len > layer.window:
            return None
        factors = (self.k_proj_b.weight, self.v_proj_b.weight)
        if any(hasattr(w, "ds_id") for w in factors):  # ZeRO-3: only module calls gather the weights
            return None
        if torch.is_grad_enabled() and (query.requires_grad or any(w.requires_grad for w in factors)):
            return None
        masks = decode_key_masks(attention_mask, q_len, compressed, layer.keys.shape[-2])
        if masks is None:
            return None
        return cskv_decode_attention(
            query, layer.keys, layer.values, self.k_proj_b.weight, self.v_proj_b.weight, rotary.inv_freq,
            layer.first_position, self.scaling,
            key_features=layer.key_features, value_features=layer.value_features, quant_bits=layer.quant_bits,
            group_size=layer.group_size, key_packed=layer.key_packed, key_scale=layer.key_scale,
            key_min=layer.key_min, value_packed=layer.value_packed, value_scale=layer.value_scale,
            value_min=layer.value_min, key_bias=self.k_proj.bias, value_bias=self.v_proj.bias,
            compressed_mask=masks[0], window_mask=masks[1], attention_scaling=rotary.attention_scaling,
        )

    def _simulated_decode(self, hidden_states, query, key, value, position_ids, rotary, allowed, decode_from):
        """Attention as cached decoding would compute it: see the module docstring (``cskv_decode_from``)."""
        config = self.config
        window, bits, group = config.cskv_window, config.cskv_quant_bits, config.cskv_quant_group_size
        seq = hidden_states.shape[1]
        key_features, value_features = self.compress(hidden_states)
        positions = position_ids.expand(hidden_states.shape[0], -1)
        if bits is not None:
            value_features = fake_quant_values(value_features, bits, group)
        rebuilt_value = self.reconstruct_value(value_features)
        branches_k = [key, self.reconstruct_key(key_features, positions, rotary)]
        branches_v = [value, rebuilt_value]

        q_idx = torch.arange(seq, device=query.device)[:, None]
        k_idx = torch.arange(seq, device=query.device)[None, :]
        exact = (q_idx - k_idx < window) | (q_idx < decode_from)
        if bits is None:
            masks = [allowed & exact, allowed & ~exact]
        else:
            # Query i has i - W + 1 compressed tokens; the complete blocks of G among them are quantized.
            quantized_upto = torch.div((q_idx - window + 1).clamp_min(0), group, rounding_mode="floor") * group
            key_quantized = k_idx < quantized_upto
            masks = [allowed & exact, allowed & ~exact & ~key_quantized, allowed & ~exact & key_quantized]
            branches_k.append(self.reconstruct_key(fake_quant_keys(key_features, bits, group), positions, rotary))
            branches_v.append(rebuilt_value)
        mask = torch.cat(masks, dim=-1)
        mask = mask | ~mask.any(-1, keepdim=True)  # padding queries see nothing: give them anything, not NaN
        key_all = repeat_kv(torch.cat(branches_k, dim=-2), self.num_key_value_groups)
        value_all = repeat_kv(torch.cat(branches_v, dim=-2), self.num_key_value_groups)
        attn = torch.nn.functional.scaled_dot_product_attention(
            query, key_all, value_all, attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0, scale=self.scaling,
        )
        attn = attn.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(attn), None


class LlamaCSKVDecoderLayer(LlamaDecoderLayer):
    """The Llama decoder layer with CSKV attention (the CSKV keyword arguments reach the attention via kwargs)."""

    def __init__(self, config: LlamaCSKVConfig, layer_idx: int):
        build_decoder_layer(self, config, layer_idx, LlamaCSKVAttention)


def allowed_keys(batch: int, seq: int, attention_mask, position_ids, device) -> torch.Tensor:
    """Bool [B, 1, S, S]: causal, within the same packed document (position restarts), not a padding key."""
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None, None].expand(batch, 1, seq, seq)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        given = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return allowed & given[..., -seq:, -seq:]
    if position_ids is not None:
        positions = position_ids.expand(batch, -1)
        restart = torch.ones_like(positions, dtype=torch.bool)
        restart[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        document = restart.long().cumsum(-1)
        allowed = allowed & (document[:, None, :, None] == document[:, None, None, :])
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        allowed = allowed & attention_mask[:, None, None, -seq:].bool()
    return allowed


class LlamaCSKVModel(LlamaModel):
    config_class = LlamaCSKVConfig

    def __init__(self, config: LlamaCSKVConfig):
        build_decoder(self, config, LlamaCSKVDecoderLayer)
        self.post_init()

    def _checked_cache(self, cache, use_cache: bool):
        """The cache for this mode: a CSKVCache in CSKV mode (an empty DynamicCache is swapped for one)."""
        cskv = self.config.cskv
        if cache is None:
            if not use_cache:
                return None
            return CSKVCache(self.config) if cskv else DynamicCache(config=self.config)
        if cskv and not isinstance(cache, CSKVCache):
            if cache.get_seq_length() == 0:
                return CSKVCache(self.config)
            raise ValueError(
                "CSKV mode (cskv=True) needs a CSKVCache, but a non-empty "
                f"{type(cache).__name__} was passed; start generation with an empty cache."
            )
        if not cskv and isinstance(cache, CSKVCache):
            raise ValueError("a CSKVCache holds compressed features; the original model (cskv=False) needs a DynamicCache.")
        return cache

    @accepts_legacy_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cskv_decode_from: int | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Llama forward; ``cskv_decode_from`` (no cache, CSKV mode): see the module docstring."""
        config = self.config
        inputs_embeds = embed_inputs(self, input_ids, inputs_embeds)
        use_cache = config.use_cache if use_cache is None else use_cache
        if cskv_decode_from is not None and (cache is not None or use_cache):
            raise ValueError("cskv_decode_from simulates decoding without a cache: pass use_cache=False and no cache.")
        cache = self._checked_cache(cache, use_cache)
        batch, seq = inputs_embeds.shape[:2]
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(seq, device=inputs_embeds.device) + past_seen).unsqueeze(0)

        simulate = config.cskv and cskv_decode_from is not None
        extra = {}
        if simulate:
            causal_mask = None
            extra["cskv_allowed"] = allowed_keys(batch, seq, attention_mask, position_ids, inputs_embeds.device)
            extra["cskv_decode_from"] = int(cskv_decode_from)
        else:
            causal_mask = create_causal_mask(
                config=config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **cache_kwarg(cache),
            )
        if config.cskv:
            extra["cskv_rotary"] = self.rotary_emb
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden = [hidden_states] if output_hidden_states else None
        for layer in self.layers[: config.num_hidden_layers]:
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                **cache_kwarg(cache),
                **extra,
                **kwargs,
            )
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        return decoder_output(self, hidden_states, all_hidden, cache if use_cache else None)


class LlamaCSKVForCausalLM(LlamaForCausalLM):
    config_class = LlamaCSKVConfig
    decoder_class = LlamaCSKVModel

    def __init__(self, config: LlamaCSKVConfig):
        build_causal_lm(self, config, self.decoder_class)
        self.post_init()

    def cskv(self, enabled: bool = True) -> "LlamaCSKVForCausalLM":
        """Switch between the student (True) and the original model (False); same weights, one copy."""
        self.config.cskv = bool(enabled)
        return self

    def new_cache(self) -> Cache:
        """An empty cache of the kind the current mode fills: a CSKVCache in CSKV mode, a DynamicCache otherwise
        (for decoding loops that keep their own cache object across steps)."""
        return self.model._checked_cache(None, use_cache=True)

    def cskv_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The low-rank factors A and B of every layer (what CSKV trains)."""
        return [(n, p) for n, p in self.named_parameters() if n.rsplit(".", 2)[-2] in CSKV_FACTOR_NAMES]

    def lean_export_spec(self) -> tuple[set[str], dict]:
        """Nothing can be dropped: the student needs the original k/v_proj (window), q/o, A and B; the export is
        switched to CSKV mode. (Teacher mode stays available in a lean export.)"""
        return set(), {"cskv": True}

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """``generate`` builds a DynamicCache; in CSKV mode hand it a CSKVCache instead."""
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_ARG)
        if self.config.cskv and type(cache) is DynamicCache and cache.get_seq_length() == 0:
            model_kwargs[CACHE_ARG] = self.new_cache()
        return result

    @accepts_legacy_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        cskv_decode_from: int | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        kwargs.pop("output_attentions", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            cskv_decode_from=cskv_decode_from,
            **kwargs,
        )
        return causal_lm_output(self, outputs, logits_to_keep, labels, **kwargs)


# The same model made from the other source families (transformers_compat.source_family: what their layers add).
class Qwen2CSKVModel(LlamaCSKVModel):
    config_class = Qwen2CSKVConfig


class Qwen2CSKVForCausalLM(LlamaCSKVForCausalLM):
    config_class = Qwen2CSKVConfig
    decoder_class = Qwen2CSKVModel


class Qwen3CSKVModel(LlamaCSKVModel):
    config_class = Qwen3CSKVConfig


class Qwen3CSKVForCausalLM(LlamaCSKVForCausalLM):
    config_class = Qwen3CSKVConfig
    decoder_class = Qwen3CSKVModel


CSKV_FACTOR_NAMES = ("k_proj_a", "k_proj_b", "v_proj_a", "v_proj_b")

__all__ = [
    "CSKV_FACTOR_NAMES",
    "LlamaCSKVAttention",
    "LlamaCSKVDecoderLayer",
    "LlamaCSKVModel",
    "LlamaCSKVForCausalLM",
    "Qwen2CSKVForCausalLM",
    "Qwen2CSKVModel",
    "Qwen3CSKVForCausalLM",
    "Qwen3CSKVModel",
    "allowed_keys",
    "apply_rope",
    "to_heads",
    "decode_key_masks",
]
