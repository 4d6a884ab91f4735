"""Locret Llama: the Llama model plus one trained retaining head per layer and a budgeted, chunked prefill.

Self-contained: imports only torch, transformers and the sibling files, so the same files serve the package and
``trust_remote_code`` exports.

- Without a ``LocretCache`` (training, plain forward, ``DynamicCache``) every module is exactly the Llama one and
  the heads are not run.
- With a ``LocretCache`` each attention also scores its new tokens with the retaining head, stores keys, values
  and scores, and evicts when the prefill loop scheduled it (right after that layer's attention, so at most one
  layer is over budget at a time).
- ``generate()`` runs ``chunked_prefill`` on the prompt (all but its last token) and then the usual transformers
  generation on that cache; the ``locret_*`` config fields can be overridden per call as keyword arguments.
- ``locret_quant_bits`` (2, 4 or 8; None by default) combines Locret with CSKV's quantized cache: evict, then
  store quantized. Each attention attends to its new tokens' exact keys/values and to the stored entries
  dequantized (keys then rotated, in compacted mode); after the layer's eviction the surviving new entries are
  quantized per token (groups of ``locret_quant_group_size`` channels along head_dim) into the cache, so only the
  current chunk is held at full precision (``cache_llama_locret`` describes the layout).

Retaining head input layout (per token, per layer): ``cat(q_proj(x), k_proj(x), v_proj(x))`` before RoPE, each
projection in its native head-major order, i.e. [q head 0 .. q head H_q-1, k head 0 .. H_kv-1, v head 0 ..
H_kv-1], each head_dim wide: (H_q + 2 H_kv) * head_dim features -> fc1 (no bias) -> hidden_act -> fc2 -> H_kv
scores (score h ranks KV head h's entry). SmolLM2-135M: (9 + 2*3) * 64 = 960 -> 1024 -> 3. (Qwen2: the outputs
include the projections' biases; Qwen3: before its per-head q/k norms, which the attention applies after.)
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    eager_attention_forward,
)

from .cache_llama_locret import LocretCache
from .configuration_llama_locret import (LlamaLocretConfig, LocretSettings, Qwen2LocretConfig, Qwen3LocretConfig,
                                         settings_error, validate_locret_settings)

try:  # beside this file in an export, one level up in the package
    from .transformers_compat import (accepts_legacy_cache_name, add_family_modules, apply_rope, build_causal_lm,
                                      build_decoder, build_decoder_layer, cache_kwarg, decoder_output,
                                      source_attention_forward, to_heads)
except ImportError:
    from swiftkv_train.remote_code.transformers_compat import (accepts_legacy_cache_name, add_family_modules,
                                                               apply_rope, build_causal_lm, build_decoder,
                                                               build_decoder_layer, cache_kwarg, decoder_output,
                                                               source_attention_forward, to_heads)

SUPPORTED_ATTENTION = ("eager", "sdpa")


class LocretRetainingHead(nn.Module):
    """fc1 (no bias) -> activation -> fc2: one token's concatenated q, k, v -> one score per KV head."""

    def __init__(self, config: LlamaLocretConfig):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        in_features = (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
        self.fc1 = nn.Linear(in_features, config.locret_head_hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.locret_head_hidden_size, config.num_key_value_heads)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(qkv)))


class LlamaLocretAttention(LlamaAttention):
    def __init__(self, config: LlamaLocretConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        add_family_modules(self, config)
        self.retaining_head = LocretRetainingHead(config)

    def retaining_scores(self, query_flat, key_flat, value_flat) -> torch.Tensor:
        """Scores [B, H_kv, S] from the projections' outputs before RoPE ([B, S, H*D] each)."""
        return self.retaining_head(torch.cat([query_flat, key_flat, value_flat], dim=-1)).transpose(1, 2)

    @accepts_legacy_cache_name
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if not isinstance(cache, LocretCache):
            return source_attention_forward(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        input_shape = hidden_states.shape[:-1]
        q_len = input_shape[1]
        query_flat = self.q_proj(hidden_states)
        key_flat = self.k_proj(hidden_states)
        value_flat = self.v_proj(hidden_states)
        scores = self.retaining_scores(query_flat, key_flat, value_flat)
        query = to_heads(query_flat, self.head_dim, getattr(self, "q_norm", None))
        key = to_heads(key_flat, self.head_dim, getattr(self, "k_norm", None))
        value = to_heads(value_flat, self.head_dim)

        cos, sin = position_embeddings
        if cache.settings.position_mode == "compacted":
            # Keys are cached before RoPE; cos/sin span every entry (positions 0..N-1) and are re-applied each step.
            keys, values = cache.update(key, value, self.layer_idx, scores)
            if cos.shape[1] != keys.shape[2]:
                raise RuntimeError(f"layer {self.layer_idx}: {keys.shape[2]} cache entries, {cos.shape[1]} positions")
            query = apply_rope(query, cos[:, -q_len:], sin[:, -q_len:])
            keys = apply_rope(keys, cos, sin)
        else:
            query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
            keys, values = cache.update(key, value, self.layer_idx, scores)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, query, keys, values, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        del keys, values  # let an eviction free the pre-eviction tensors
        cache.finish_layer(self.layer_idx)
        return attn_output, attn_weights


class LlamaLocretDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: LlamaLocretConfig, layer_idx: int):
        build_decoder_layer(self, config, layer_idx, LlamaLocretAttention)


def chunk_causal_mask(num_new: int, num_cached: int, dtype, device) -> torch.Tensor | None:
    """Additive mask [1, 1, q, N+q]: new token i sees every cached entry and new tokens 0..i; None for q = 1."""
    if num_new == 1:
        return None
    total = num_cached + num_new
    last_visible = num_cached + torch.arange(num_new, device=device)
    allowed = torch.arange(total, device=device)[None, :] <= last_visible[:, None]
    mask = torch.zeros(num_new, total, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


class LlamaLocretModel(LlamaModel):
    config_class = LlamaLocretConfig
    _no_split_modules = ["LlamaLocretDecoderLayer"]

    def __init__(self, config: LlamaLocretConfig):
        build_decoder(self, config, LlamaLocretDecoderLayer)
        self.post_init()

    @accepts_legacy_cache_name
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if not isinstance(cache, LocretCache):
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **cache_kwarg(cache),
                **kwargs,
            )
        return self.locret_forward(cache, input_ids, inputs_embeds, attention_mask)

    def locret_forward(self, cache: LocretCache, input_ids=None, inputs_embeds=None, attention_mask=None):
        """One step on a LocretCache. Positions come from the cache (passed ``position_ids`` are ignored: they
        would be the original positions, which compacted mode replaces)."""
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            raise ValueError("the Locret cache does not support padding: pass unpadded prompts (one per row).")
        if self.config._attn_implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"the Locret cache needs attention {' or '.join(SUPPORTED_ATTENTION)}, not "
                f"{self.config._attn_implementation!r}: call model.set_attn_implementation('sdpa')."
            )
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        num_new = hidden_states.shape[1]
        num_cached = cache.num_entries()
        device = hidden_states.device
        if cache.settings.position_mode == "compacted":
            positions = torch.arange(num_cached + num_new, device=device)
        else:
            positions = torch.arange(cache.tokens_seen, cache.tokens_seen + num_new, device=device)
        position_embeddings = self.rotary_emb(hidden_states, position_ids=positions[None])
        mask = chunk_causal_mask(num_new, num_cached, hidden_states.dtype, device)

        cache.begin_step(num_new)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                use_cache=True,
                **cache_kwarg(cache),
            )
        cache.end_step()
        return decoder_output(self, hidden_states, None, cache)


class LlamaLocretForCausalLM(LlamaForCausalLM):
    config_class = LlamaLocretConfig
    _no_split_modules = ["LlamaLocretDecoderLayer"]

    decoder_class = LlamaLocretModel

    def __init__(self, config: LlamaLocretConfig):
        build_causal_lm(self, config, self.decoder_class)
        self.post_init()

    # ---- settings -----------------------------------------------------------------------------------------------
    def locret_settings(self, **overrides) -> LocretSettings:
        """Validated settings: the config's ``locret_*`` fields, replaced by any ``locret_*`` keyword given."""
        stripped = {}
        for key, value in overrides.items():
            if not key.startswith("locret_"):
                raise settings_error(f"unknown Locret setting {key!r}: names start with locret_.")
            stripped[key[len("locret_") :]] = value
        return validate_locret_settings(self.config.locret_settings(**stripped))

    def retaining_head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if ".retaining_head." in n]

    def lean_export_spec(self) -> tuple[set[str], dict]:
        return set(), {}  # nothing is teacher-only: the backbone is the model

    # ---- budgeted prefill ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def chunked_prefill(self, input_ids: torch.LongTensor, **overrides) -> LocretCache:
        """Process the whole prompt ``input_ids`` [B, P] (no padding) into a budgeted ``LocretCache``.

        The first ``P - n_local`` tokens go in chunks of ``chunk_size``; after each chunk every layer keeps its
        ``budget - n_local`` best entries per KV head (the newest ``stabilizers`` always kept, except after the
        last chunk). The last ``n_local`` tokens are then appended, never to be evicted. Decoding continues from
        the returned cache (``model(next_ids, cache=cache)`` or ``generate``)."""
        return self._budgeted_prefill(input_ids, self.locret_settings(**overrides), trailing_local=0)

    @torch.no_grad()
    def _budgeted_prefill(self, input_ids, settings: LocretSettings, trailing_local: int) -> LocretCache:
        """``trailing_local`` prompt tokens are not in ``input_ids``: the caller feeds them next (generate feeds the
        last prompt token itself); they count as local tokens."""
        batch, length = input_ids.shape
        local_total = min(max(settings.n_local, trailing_local), length + trailing_local)
        local_here = local_total - trailing_local
        evictable = length - local_here
        keep = settings.budget - local_total
        chunk = settings.chunk_size
        cache = LocretCache(self.config.num_hidden_layers, settings, use_kernels=self.config.use_kernels)
        for start in range(0, evictable, chunk):
            end = min(start + chunk, evictable)
            protect = 0 if end == evictable else min(settings.stabilizers, keep)
            cache.schedule_eviction(keep, protect)
            self.model(input_ids=input_ids[:, start:end], cache=cache)
        cache.schedule_eviction(None)
        cache.protect_next_tokens(local_total)
        for start in range(evictable, length, chunk):
            self.model(input_ids=input_ids[:, start : min(start + chunk, length)], cache=cache)
        return cache

    # ---- generation ---------------------------------------------------------------------------------------------
    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' ``generate`` after a budgeted chunked prefill of the prompt.

        Extra keywords: any ``locret_*`` config field (``locret_budget``, ``locret_chunk_size``,
        ``locret_stabilizers``, ``locret_n_local``, ``locret_position_mode``, ``locret_decode_eviction``,
        ``locret_quant_bits``, ``locret_quant_group_size``) for this call (``locret_quant_bits=None`` turns a
        configured quantization off), and ``locret_enabled=False`` for plain full-cache generation. Given
        a cache (``cache`` or ``past_key_values``) or ``inputs_embeds``, generation is the plain one."""
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("locret_")}
        enabled = overrides.pop("locret_enabled", None)
        enabled = self.config.locret_enabled if enabled is None else enabled
        settings = self.locret_settings(**overrides)  # validated even when unused: a typo should not pass silently
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        given_cache = any(kwargs.get(name) is not None for name in ("cache", "past_key_values"))
        if not enabled or input_ids is None or given_cache:
            return super().generate(inputs, generation_config, **kwargs)
        beams = kwargs.get("num_beams") or getattr(generation_config or self.generation_config, "num_beams", 1)
        if (beams or 1) > 1 or (kwargs.get("num_return_sequences") or 1) > 1:
            raise ValueError(
                "Locret generation supports one sequence per prompt (num_beams=1, num_return_sequences=1)."
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise ValueError("Locret generation does not support padded batches: pass unpadded prompts.")
        cache = self._budgeted_prefill(input_ids[:, :-1], settings, trailing_local=1)
        return super().generate(inputs, generation_config, **cache_kwarg(cache), **kwargs)


# The same model made from the other source families (transformers_compat.source_family: what their layers add).
class Qwen2LocretModel(LlamaLocretModel):
    config_class = Qwen2LocretConfig


class Qwen2LocretForCausalLM(LlamaLocretForCausalLM):
    config_class = Qwen2LocretConfig
    decoder_class = Qwen2LocretModel


class Qwen3LocretModel(LlamaLocretModel):
    config_class = Qwen3LocretConfig


class Qwen3LocretForCausalLM(LlamaLocretForCausalLM):
    config_class = Qwen3LocretConfig
    decoder_class = Qwen3LocretModel


__all__ = [
    "Qwen2LocretForCausalLM",
    "Qwen2LocretModel",
    "Qwen3LocretForCausalLM",
    "Qwen3LocretModel",
    "LlamaLocretAttention",
    "LlamaLocretDecoderLayer",
    "LlamaLocretForCausalLM",
    "LlamaLocretModel",
    "LocretRetainingHead",
]
