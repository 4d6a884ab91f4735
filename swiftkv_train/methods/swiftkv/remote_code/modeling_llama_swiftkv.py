"""SwiftKV Llama (SingleInputKV + AcrossKV) as subclasses of the transformers Llama classes.

Self-contained: imports only torch, transformers and the sibling files (configuration, ``transformers_compat``,
the fused kernels when present), so the same file serves the package and ``trust_remote_code`` exports.

- Teacher mode (``config.swiftkv = False``): exactly the original Llama, one cache entry per layer.
- Student mode (``config.swiftkv = True``): layers ``>= M`` take K/V from ``norm_swiftkv(h_M)``; each AcrossKV
  group of g later layers shares one projection and ONE cache entry. When a prompt is processed with a cache
  and only the last position's logits are needed (generate, ``logits_to_keep=1``), the later layers run only
  on the last prompt token: their K/V for every prompt token come from ``h_M`` alone.
"""

from collections.abc import Callable

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
    LlamaMLP,
    LlamaModel,
    LlamaRMSNorm,
    eager_attention_forward,
)

from .configuration_llama_swiftkv import LlamaSwiftKVConfig, Qwen2SwiftKVConfig, Qwen3SwiftKVConfig

try:  # beside this file in an export, one level up in the package
    from .transformers_compat import (accepts_legacy_cache_name, add_family_modules, apply_rope, build_causal_lm,
                                      build_decoder, build_decoder_layer, cache_kwarg, causal_lm_output,
                                      decoder_output, embed_inputs, has_qk_norm, head_norm,
                                      source_attention_forward, to_heads)
except ImportError:
    from swiftkv_train.remote_code.transformers_compat import (accepts_legacy_cache_name, add_family_modules,
                                                               apply_rope, build_causal_lm, build_decoder,
                                                               build_decoder_layer, cache_kwarg, causal_lm_output,
                                                               decoder_output, embed_inputs, has_qk_norm, head_norm,
                                                               source_attention_forward, to_heads)

try:  # Fused prefill kernels: beside this file in an export, from the swiftkv_kernels package otherwise.
    from .swiftkv_prefill_kv import fused_swiftkv_kv, kernel_available, rms_norm, silu_mul
except ImportError:
    try:
        from swiftkv_kernels.swiftkv_prefill_kv import fused_swiftkv_kv, kernel_available, rms_norm, silu_mul
    except ImportError:  # neither: the torch path only
        fused_swiftkv_kv = rms_norm = silu_mul = None


def _fused_inference(config, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a fused Triton op may run on ``x`` with ``weight``: kernels on, CUDA (or the interpreter), no gradient
    needed, weight not ZeRO-3 partitioned (only module calls gather those)."""
    return (
        fused_swiftkv_kv is not None
        and getattr(config, "use_kernels", True)
        and kernel_available(x)
        and not hasattr(weight, "ds_id")
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


# ---- the fused K/V kernel's input: every group's K/V weights in one matrix, cached on the model -------------------

_KV_WEIGHT_CAT_ATTR = "_swiftkv_kv_weight_cat"


def _swiftkv_projections(model) -> list[nn.Linear]:
    base = model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model
    config = base.config
    m, g, layers = config.num_key_value_layers, config.key_value_group_size, config.num_hidden_layers
    projections = []
    for leader in range(m, layers, g):
        attn = base.layers[leader].self_attn
        projections += [attn.k_proj_swiftkv, attn.v_proj_swiftkv]
    return projections


def _fingerprint(t: torch.Tensor) -> tuple:
    # Storage address + in-place version counter: changes on load_state_dict/optimizer steps (in-place, version
    # bump), on .to()/.data swaps (new storage) and on dtype/device moves.
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))


def concat_swiftkv_kv_weights(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[K_0; V_0; K_1; V_1; ...] weights (and biases, or None) of a SwiftKV model, cached on the model: the
    ``kv_weight_cat`` / ``kv_bias_cat`` of ``fused_swiftkv_kv``.

    ``model`` is a ``LlamaSwiftKVForCausalLM`` or ``LlamaSwiftKVModel``. The copy costs G·2·kv_dim·hidden elements
    (256 MiB bf16 for Llama-3.1-8B, M=16, g=1) and is rebuilt whenever any source weight changes (fingerprint of
    pointer, version counter, dtype, device, shape).
    """
    projections = _swiftkv_projections(model)
    if not projections:
        raise ValueError("the model has no SwiftKV layer (num_key_value_layers == num_hidden_layers)")
    weights = [p.weight for p in projections]
    biases = [p.bias for p in projections]
    has_bias = biases[0] is not None
    key = tuple(_fingerprint(t) for t in weights + (biases if has_bias else []))
    owner = model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model
    cached = owner.__dict__.get(_KV_WEIGHT_CAT_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    owner.__dict__.pop(_KV_WEIGHT_CAT_ATTR, None)  # free the stale copy before building the new one
    with torch.no_grad():
        w = torch.cat([t.detach() for t in weights], dim=0)
        b = torch.cat([t.detach() for t in biases], dim=0) if has_bias else None
    # A plain attribute (not a parameter or buffer): never saved, never trained, never moved by .to().
    owner.__dict__[_KV_WEIGHT_CAT_ATTR] = (key, w, b)
    return w, b

class LlamaSwiftKVRMSNorm(LlamaRMSNorm):
    """LlamaRMSNorm (same weight), in one Triton pass at inference on CUDA (``config.use_kernels``)."""

    def __init__(self, config: LlamaSwiftKVConfig):
        super().__init__(config.hidden_size, eps=config.rms_norm_eps)
        self.config = config

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if _fused_inference(self.config, hidden_states, self.weight):
            return rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return super().forward(hidden_states)


class LlamaSwiftKVMLP(LlamaMLP):
    """LlamaMLP (same weights), with ``silu(gate) * up`` in one Triton pass at inference on CUDA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.hidden_act in ("silu", "swish") and _fused_inference(self.config, x, self.gate_proj.weight):
            return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))
        return super().forward(x)


class LlamaSwiftKVAttention(LlamaAttention):
    """Llama attention plus the SwiftKV projections of a later layer.

    ``q_proj_swiftkv`` reads this layer's own normed input; ``k/v_proj_swiftkv`` exist only on the first layer of
    each AcrossKV group and read ``norm_swiftkv(h_M)``. They carry a bias where the source's q/k/v do (Qwen2); for a
    Qwen3 source the SwiftKV query and key go through their own per-head norms (``q_norm_swiftkv`` per layer,
    ``k_norm_swiftkv`` per group), as the source's go through ``q_norm`` / ``k_norm``.
    """

    def __init__(self, config: LlamaSwiftKVConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        add_family_modules(self, config)
        m = config.num_key_value_layers
        self.is_swiftkv_layer = layer_idx >= m
        if not self.is_swiftkv_layer:
            return
        q_dim = config.num_attention_heads * self.head_dim
        kv_dim = config.num_key_value_heads * self.head_dim
        bias = self.q_proj.bias is not None
        if config.swiftkv_lean:
            # The lean checkpoint carries no teacher projections for later layers: do not allocate them.
            del self.q_proj, self.k_proj, self.v_proj
            if has_qk_norm(config):
                del self.q_norm, self.k_norm
        self.q_proj_swiftkv = nn.Linear(config.hidden_size, q_dim, bias=bias)
        if has_qk_norm(config):
            self.q_norm_swiftkv = head_norm(config)
        if config.swiftkv_group_leader(layer_idx) == layer_idx:
            self.k_proj_swiftkv = nn.Linear(config.hidden_size, kv_dim, bias=bias)
            self.v_proj_swiftkv = nn.Linear(config.hidden_size, kv_dim, bias=bias)
            if has_qk_norm(config):
                self.k_norm_swiftkv = head_norm(config)

    def swiftkv_key_value(self, kv_input: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """K (per-head normed for Qwen3, then RoPE) and V of this group from the normed SwiftKV input, shaped
        [B, H_kv, S, D]."""
        key = to_heads(self.k_proj_swiftkv(kv_input), self.head_dim, getattr(self, "k_norm_swiftkv", None))
        value = to_heads(self.v_proj_swiftkv(kv_input), self.head_dim)
        cos, sin = position_embeddings
        return apply_rope(key, cos, sin), value

    @accepts_legacy_cache_name
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        shared_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if shared_key_value is None:
            if not hasattr(self, "q_proj"):
                raise RuntimeError(
                    "This is a lean SwiftKV checkpoint: the original projections of the later layers were dropped, "
                    "so swiftkv(False) (teacher mode) is unavailable. Export with lean=False to keep them."
                )
            return source_attention_forward(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs)

        query = to_heads(self.q_proj_swiftkv(hidden_states), self.head_dim, getattr(self, "q_norm_swiftkv", None))
        cos, sin = position_embeddings
        query = apply_rope(query, cos, sin)
        key, value = shared_key_value
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
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


class LlamaSwiftKVDecoderLayer(LlamaDecoderLayer):
    """The Llama decoder layer with SwiftKV attention; ``shared_key_value`` reaches the attention via kwargs."""

    def __init__(self, config: LlamaSwiftKVConfig, layer_idx: int):
        build_decoder_layer(self, config, layer_idx, LlamaSwiftKVAttention, LlamaSwiftKVMLP, LlamaSwiftKVRMSNorm)


def _last_query_row(attention_mask):
    """Restrict a causal mask to the last query position (None and 2D padding masks need no change)."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        return attention_mask[:, :, -1:, :]
    return attention_mask


class LlamaSwiftKVModel(LlamaModel):
    config_class = LlamaSwiftKVConfig

    def __init__(self, config: LlamaSwiftKVConfig):
        build_decoder(self, config, LlamaSwiftKVDecoderLayer, norm=LlamaSwiftKVRMSNorm(config))
        self.norm_swiftkv = LlamaSwiftKVRMSNorm(config)
        self.post_init()

    def swiftkv_key_values(self, h_m, position_embeddings, cache=None):
        """K/V of every AcrossKV group from ``h_M``; with a cache, written once per group and returned whole.

        Returns a dict: leader layer index -> (key, value) over all cached + new positions.
        """
        config = self.config
        leaders = range(config.num_key_value_layers, config.num_hidden_layers, config.key_value_group_size)
        new_kv = self._fused_key_values(h_m, position_embeddings, leaders)
        if new_kv is None:
            kv_input = self.norm_swiftkv(h_m)
            new_kv = [
                self.layers[leader].self_attn.swiftkv_key_value(kv_input, position_embeddings) for leader in leaders
            ]
        shared = {}
        for leader, (key, value) in zip(leaders, new_kv):
            if cache is not None:
                key, value = cache.update(key, value, config.swiftkv_cache_slot(leader))
            shared[leader] = (key, value)
        return shared

    def _fused_key_values(self, h_m, position_embeddings, leaders):
        """All groups' K/V from the fused Triton kernel, or None where it does not apply (no CUDA/Triton,
        ``config.use_kernels`` off, or a gradient is needed: the kernel is inference-only)."""
        if not _fused_inference(self.config, h_m, self.norm_swiftkv.weight) or has_qk_norm(self.config):
            return None  # (the kernel has no per-head key norm: Qwen3 keys take the torch path)
        if torch.is_grad_enabled():  # the K/V projections must not need a gradient either
            for leader in leaders:
                attn = self.layers[leader].self_attn
                if attn.k_proj_swiftkv.weight.requires_grad or attn.v_proj_swiftkv.weight.requires_grad:
                    return None
        weight, bias = concat_swiftkv_kv_weights(self)
        cos, sin = position_embeddings
        return fused_swiftkv_kv(
            h_m, self.norm_swiftkv.weight, self.norm_swiftkv.variance_epsilon, weight, cos, sin,
            len(leaders), self.config.num_key_value_heads, self.layers[leaders[0]].self_attn.head_dim, bias,
        )

    def run_layers(
        self,
        hidden_states: torch.Tensor,
        start: int,
        end: int,
        position_embeddings,
        attention_mask,
        position_ids=None,
        cache=None,
        shared_key_values=None,
        **kwargs,
    ) -> torch.Tensor:
        """Decoder layers ``start..end-1``; later layers use ``shared_key_values`` when given (student mode)."""
        for layer_idx in range(start, end):
            extra = {}
            if shared_key_values is not None and layer_idx >= self.config.num_key_value_layers:
                extra["shared_key_value"] = shared_key_values[self.config.swiftkv_group_leader(layer_idx)]
            hidden_states = self.layers[layer_idx](
                hidden_states,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                **cache_kwarg(cache),
                **extra,
                **kwargs,
            )
        return hidden_states

    @accepts_legacy_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        last_token_only: bool = False,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Llama forward. ``last_token_only`` (set by the LM head when it keeps one position) lets SwiftKV run
        the later layers on the last position only; the cache still receives K/V for every position."""
        config = self.config
        inputs_embeds = embed_inputs(self, input_ids, inputs_embeds)
        use_cache = config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **cache_kwarg(cache),
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden = [hidden_states] if output_hidden_states else None
        m, num_layers = config.num_key_value_layers, config.num_hidden_layers
        common = dict(position_ids=position_ids, cache=cache, **kwargs)

        swiftkv = config.swiftkv and m < num_layers
        split = m if swiftkv else num_layers
        for layer_idx in range(split):
            hidden_states = self.run_layers(
                hidden_states, layer_idx, layer_idx + 1, position_embeddings, causal_mask, **common
            )
            if all_hidden is not None:
                all_hidden.append(hidden_states)

        if swiftkv:
            shared = self.swiftkv_key_values(hidden_states, position_embeddings, cache)
            if last_token_only and cache is not None and hidden_states.shape[1] > 1:
                # Prefill skip: K/V of every prompt token are cached; only the last token goes further.
                hidden_states = hidden_states[:, -1:]
                position_embeddings = tuple(t[:, -1:] for t in position_embeddings)
                causal_mask = _last_query_row(causal_mask)
                common["position_ids"] = position_ids[:, -1:]
            for layer_idx in range(m, num_layers):
                hidden_states = self.run_layers(
                    hidden_states,
                    layer_idx,
                    layer_idx + 1,
                    position_embeddings,
                    causal_mask,
                    shared_key_values=shared,
                    **common,
                )
                if all_hidden is not None:
                    all_hidden.append(hidden_states)
        return decoder_output(self, hidden_states, all_hidden, cache if use_cache else None)


class LlamaSwiftKVForCausalLM(LlamaForCausalLM):
    config_class = LlamaSwiftKVConfig
    decoder_class = LlamaSwiftKVModel

    def __init__(self, config: LlamaSwiftKVConfig):
        build_causal_lm(self, config, self.decoder_class)
        self.post_init()

    def swiftkv(self, enabled: bool = True) -> "LlamaSwiftKVForCausalLM":
        """Switch between the student (True) and the original model (False); same weights, one copy."""
        if not enabled and self.config.swiftkv_lean:
            raise RuntimeError(
                "This is a lean SwiftKV checkpoint without the teacher's later-layer projections; "
                "swiftkv(False) is unavailable. Export with lean=False to keep them."
            )
        self.config.swiftkv = bool(enabled)
        return self

    def lean_export_spec(self) -> tuple[set[str], dict]:
        """Weights only the teacher uses (original q/k/v, and Qwen3's q/k norms, of the later layers) and the config of
        a lean export."""
        m = self.config.num_key_value_layers
        drop = {
            name
            for name, _ in self.named_parameters()
            if name.startswith("model.layers.")
            and int(name.split(".")[2]) >= m
            and name.split(".")[4] in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm")
        }
        return drop, {"swiftkv": True, "swiftkv_lean": True}

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
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        last_only = isinstance(logits_to_keep, int) and logits_to_keep == 1 and labels is None
        kwargs.pop("output_attentions", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            last_token_only=last_only and not output_hidden_states,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        return causal_lm_output(self, outputs, logits_to_keep, labels, **kwargs)


# The same model made from the other source families (transformers_compat.source_family: what their layers add).
class Qwen2SwiftKVModel(LlamaSwiftKVModel):
    config_class = Qwen2SwiftKVConfig


class Qwen2SwiftKVForCausalLM(LlamaSwiftKVForCausalLM):
    config_class = Qwen2SwiftKVConfig
    decoder_class = Qwen2SwiftKVModel


class Qwen3SwiftKVModel(LlamaSwiftKVModel):
    config_class = Qwen3SwiftKVConfig


class Qwen3SwiftKVForCausalLM(LlamaSwiftKVForCausalLM):
    config_class = Qwen3SwiftKVConfig
    decoder_class = Qwen3SwiftKVModel


__all__ = [
    "LlamaSwiftKVAttention",
    "LlamaSwiftKVDecoderLayer",
    "LlamaSwiftKVModel",
    "LlamaSwiftKVForCausalLM",
    "Qwen2SwiftKVForCausalLM",
    "Qwen2SwiftKVModel",
    "Qwen3SwiftKVForCausalLM",
    "Qwen3SwiftKVModel",
]
