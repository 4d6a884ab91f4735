"""What every export ships beside its model files: the one place that knows which transformers version is installed
(5.17 .. 5.24 are tested), and the few pieces of the Llama forward that all our model files share.

transformers 5.24 renamed the cache argument of models, decoder layers, attention layers, mask builders and
model outputs from ``past_key_values`` to ``cache`` (the old name is still accepted there, with a warning, until
5.40). The model files call transformers with whichever name the installed version declares, and accept both
names from their own callers. Shipped beside the model files in every export, so it imports only torch and
transformers.
"""

import functools
import inspect

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
    rotate_half,
)

# Feature test, not a version compare: the name the installed attention layer declares.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaAttention.forward).parameters else "past_key_values"
_LEGACY_CACHE_ARG = "past_key_values"


def cache_kwarg(cache) -> dict:
    """``{name: cache}`` for a call into transformers (``create_causal_mask``, layers, outputs, generate)."""
    return {CACHE_ARG: cache}


def output_cache(outputs):
    """The cache a model output carries, read under the installed name (no deprecation warning)."""
    return getattr(outputs, CACHE_ARG)


def accepts_legacy_cache_name(forward):
    """Decorator for our ``forward(..., cache=None, ...)``: callers on transformers < 5.24 (``generate``, the
    Llama decoder layer) pass ``past_key_values=``; both names reach the ``cache`` parameter."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if _LEGACY_CACHE_ARG in kwargs:
            legacy = kwargs.pop(_LEGACY_CACHE_ARG)
            if kwargs.get("cache") is not None and legacy is not None:
                raise TypeError("pass the cache once: `cache=` or `past_key_values=`, not both")
            if legacy is not None or "cache" not in kwargs:
                kwargs["cache"] = legacy
        return forward(*args, **kwargs)

    return wrapper


# ---- the Llama forward pieces our model files share -----------------------------------------------------------------

def _llama_norm(config) -> nn.Module:
    return LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


def build_decoder_layer(layer, config, layer_idx: int, attention_class, mlp_class=LlamaMLP, norm=_llama_norm) -> None:
    """``LlamaDecoderLayer.__init__``'s modules (and GradientCheckpointingLayer's state) with our attention (and
    optionally MLP and norm: ``norm(config)`` builds one), in Llama's order."""
    nn.Module.__init__(layer)
    layer.gradient_checkpointing = False
    layer.hidden_size = config.hidden_size
    layer.self_attn = attention_class(config=config, layer_idx=layer_idx)
    layer.mlp = mlp_class(config)
    layer.input_layernorm = norm(config)
    layer.post_attention_layernorm = norm(config)


def build_decoder(model, config, layer_class, norm: nn.Module | None = None) -> None:
    """``LlamaModel.__init__``'s modules with our decoder layers, built once (building Llama's and replacing them
    would allocate every layer twice, which matters at 70B). The caller adds its own modules, then ``post_init``."""
    LlamaPreTrainedModel.__init__(model, config)
    model.padding_idx = config.pad_token_id
    model.vocab_size = config.vocab_size
    model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, model.padding_idx)
    model.layers = nn.ModuleList([layer_class(config, layer_idx) for layer_idx in range(config.num_hidden_layers)])
    model.norm = norm if norm is not None else _llama_norm(config)
    model.rotary_emb = LlamaRotaryEmbedding(config=config)
    model.gradient_checkpointing = False


def build_causal_lm(lm, config, model_class) -> None:
    """``LlamaForCausalLM.__init__``'s modules around our decoder; the caller then runs ``post_init``."""
    LlamaPreTrainedModel.__init__(lm, config)
    lm.model = model_class(config)
    lm.vocab_size = config.vocab_size
    lm.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on one [B, H, S, D] tensor (cos/sin are [B or 1, S, D])."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


# ---- source families: what a Qwen attention layer has beyond Llama's -------------------------------------------------
# Each of our config classes names the family its model was made from in a class attribute ``source_family`` (not a
# config.json field: Llama exports are unchanged). Qwen2 / Qwen2.5: q/k/v carry a bias (o_proj none), whatever
# ``attention_bias`` says. Qwen3: a per-head RMSNorm on q and k (``q_norm`` / ``k_norm``) before RoPE. The rest
# (MLP, norms, RoPE, embeddings) is Llama's.
QKV_BIAS_FAMILIES = ("qwen2",)
QK_NORM_FAMILIES = ("qwen3",)


def source_family(config) -> str:
    return getattr(config, "source_family", "llama")


def has_qk_norm(config) -> bool:
    return source_family(config) in QK_NORM_FAMILIES


def head_norm(config) -> nn.Module:
    """The per-head RMSNorm of q or k (Qwen3's ``q_norm`` / ``k_norm``; same computation as LlamaRMSNorm)."""
    return LlamaRMSNorm(config.head_dim or config.hidden_size // config.num_attention_heads, eps=config.rms_norm_eps)


def add_family_modules(attn: LlamaAttention, config) -> None:
    """After ``LlamaAttention.__init__``: the source family's q/k/v biases (Qwen2) or q/k norms (Qwen3)."""
    if source_family(config) in QKV_BIAS_FAMILIES:
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            if proj.bias is None:
                proj.bias = nn.Parameter(proj.weight.new_zeros(proj.out_features))
    if has_qk_norm(config):
        attn.q_norm, attn.k_norm = head_norm(config), head_norm(config)


def to_heads(x: torch.Tensor, head_dim: int, norm: nn.Module | None = None) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D], through the per-head ``norm`` first where the family has one."""
    x = x.view(*x.shape[:-1], -1, head_dim)
    return (norm(x) if norm is not None else x).transpose(1, 2)


def source_query_key_value(attn, hidden_states: torch.Tensor, position_embeddings):
    """Query and key (per-head normed where the family norms them, then RoPE) and value of ``attn``'s own
    projections, each [B, H, S, D]: what the source model's attention computes."""
    query = to_heads(attn.q_proj(hidden_states), attn.head_dim, getattr(attn, "q_norm", None))
    key = to_heads(attn.k_proj(hidden_states), attn.head_dim, getattr(attn, "k_norm", None))
    value = to_heads(attn.v_proj(hidden_states), attn.head_dim)
    cos, sin = position_embeddings
    return apply_rope(query, cos, sin), apply_rope(key, cos, sin), value


def attend(attn, query, key, value, attention_mask, out_shape, **kwargs):
    """The configured attention function and ``o_proj``: (output [..., hidden], weights)."""
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    output, weights = interface(attn, query, key, value, attention_mask,
                                dropout=0.0 if not attn.training else attn.attention_dropout, scaling=attn.scaling,
                                **kwargs)
    return attn.o_proj(output.reshape(*out_shape, -1).contiguous()), weights


def source_attention_forward(attn, hidden_states, position_embeddings, attention_mask, cache, **kwargs):
    """The source model's attention on ``attn``: LlamaAttention.forward (Llama; Qwen2, whose biases sit in the
    projections), or the same with Qwen3's q/k norms."""
    if not has_qk_norm(attn.config):
        return LlamaAttention.forward(attn, hidden_states, position_embeddings, attention_mask, **cache_kwarg(cache),
                                      **kwargs)
    query, key, value = source_query_key_value(attn, hidden_states, position_embeddings)
    if cache is not None:
        key, value = cache.update(key, value, attn.layer_idx)
    return attend(attn, query, key, value, attention_mask, hidden_states.shape[:-1], **kwargs)


def embed_inputs(model, input_ids, inputs_embeds) -> torch.Tensor:
    """The decoder's input embeddings: exactly one of ``input_ids`` / ``inputs_embeds`` (transformers' rule)."""
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    return model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds


def decoder_output(model, hidden_states, all_hidden: list | None, cache) -> BaseModelOutputWithPast:
    """The final norm and the decoder's output; ``all_hidden`` (per-layer inputs, when requested) ends with the
    normed last state, transformers' convention."""
    hidden_states = model.norm(hidden_states)
    if all_hidden is not None:
        all_hidden[-1] = hidden_states
    return BaseModelOutputWithPast(
        last_hidden_state=hidden_states,
        hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        **cache_kwarg(cache),
    )


def causal_lm_output(lm, outputs, logits_to_keep, labels, **kwargs) -> CausalLMOutputWithPast:
    """The LM head over the kept positions (``logits_to_keep``: the last n, or an index tensor) and the loss."""
    hidden_states = outputs.last_hidden_state
    if isinstance(logits_to_keep, int):
        hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
    else:
        hidden_states = hidden_states[:, logits_to_keep]
    logits = lm.lm_head(hidden_states)
    loss = None
    if labels is not None:
        loss = lm.loss_function(logits=logits, labels=labels, vocab_size=lm.config.vocab_size, **kwargs)
    return CausalLMOutputWithPast(
        loss=loss, logits=logits, hidden_states=outputs.hidden_states, **cache_kwarg(output_cache(outputs))
    )


__all__ = ["CACHE_ARG", "QK_NORM_FAMILIES", "QKV_BIAS_FAMILIES", "accepts_legacy_cache_name", "add_family_modules",
           "apply_rope", "attend", "build_causal_lm", "build_decoder", "build_decoder_layer", "cache_kwarg",
           "causal_lm_output", "decoder_output", "embed_inputs", "has_qk_norm", "head_norm", "output_cache",
           "source_attention_forward", "source_family", "source_query_key_value", "to_heads"]
