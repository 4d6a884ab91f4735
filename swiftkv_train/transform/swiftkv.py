"""Build a SwiftKV model from a Llama-family model (no training: the initialisation the distillation starts from)."""

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import SwiftKVInputError
from ..models.llama_swiftkv import LlamaSwiftKVConfig, LlamaSwiftKVForCausalLM
from ..models.loading import check_llama_family

# Fields of the source config that must not be carried over to the new model type.
_DROP_FIELDS = ("model_type", "architectures", "auto_map", "transformers_version", "sliding_window", "dtype")


def check_layer_split(layers: int, m, g, training: bool = False, prefix: str = "") -> None:
    """The one rule for M (num_key_value_layers) and g (key_value_group_size) on a model with ``layers`` layers.

    A model may have M = L (no later layer: SwiftKV changes nothing), but training needs M < L: the layers from M
    on are the ones SwiftKV retrains. ``prefix`` names where the values come from (e.g. "transform.swiftkv.").
    """
    top = layers - 1 if training else layers
    if training and top < 1:
        raise SwiftKVInputError(f"SwiftKV training needs a model with at least 2 layers; this one has {layers}.")
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= top:
        if m == layers:
            why = (f"must be < num_hidden_layers={layers} for training (the layers from M on are the ones SwiftKV "
                   f"retrains; M={m} leaves none)")
        else:
            why = f"is impossible for a model with {layers} layers"
        raise SwiftKVInputError(
            f"{prefix}num_key_value_layers={m!r} {why}: use an integer from 1 to {top} "
            f"(e.g. {max(layers // 2, 1)} for 50% of the prefill skipped)."
        )
    later = layers - m
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or (later > 0 and g > later):
        raise SwiftKVInputError(
            f"{prefix}key_value_group_size={g!r} is impossible with num_key_value_layers={m} on {layers} layers: "
            f"use an integer from 1 to {max(later, 1)} (the number of later layers)."
        )


def swiftkv_config(source_config, num_key_value_layers: int, key_value_group_size: int = 1, *,
                   training: bool = False, prefix: str = "") -> LlamaSwiftKVConfig:
    """A LlamaSwiftKVConfig with the source's architecture, validated with messages that name the fields
    (``training`` and ``prefix``: see :func:`check_layer_split`)."""
    check_llama_family(source_config, getattr(source_config, "name_or_path", "") or "model")
    layers = source_config.num_hidden_layers
    m, g = num_key_value_layers, key_value_group_size
    check_layer_split(layers, m, g, training=training, prefix=prefix)
    if getattr(source_config, "model_type", None) == "llama_swiftkv":
        fields = source_config.to_dict()
    else:
        fields = {k: v for k, v in source_config.to_dict().items() if k not in _DROP_FIELDS}
    fields.update(num_key_value_layers=m, key_value_group_size=g, swiftkv=True, swiftkv_lean=False)
    for key in _DROP_FIELDS:
        fields.pop(key, None)
    config = LlamaSwiftKVConfig(**fields)
    config._attn_implementation = source_config._attn_implementation
    return config


def _clone_param(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone(), requires_grad=True)


@torch.no_grad()
def to_swiftkv(
    model: PreTrainedModel, num_key_value_layers: int, key_value_group_size: int = 1
) -> LlamaSwiftKVForCausalLM:
    """Return a new SwiftKV model built from a Llama-family ``model``; ``model`` stays usable and unchanged.

    The new model shares ``model``'s (frozen) weight tensors and adds trainable SwiftKV weights initialised as the
    reference does: ``norm_swiftkv`` from layer M's input norm, each later layer's ``q_proj_swiftkv`` from its
    ``q_proj``, each AcrossKV group's ``k/v_proj_swiftkv`` as the mean of the group's ``k/v_proj``.
    SwiftKV is switched on; ``.swiftkv(False)`` gives back the original model's function.
    """
    config = swiftkv_config(model.config, num_key_value_layers, key_value_group_size)
    m, g, layers = config.num_key_value_layers, config.key_value_group_size, config.num_hidden_layers
    source_layers = model.model.layers
    if any(not hasattr(layer.self_attn, "q_proj") for layer in source_layers):
        raise SwiftKVInputError("the source model is a lean SwiftKV export without the original projections.")
    if getattr(source_layers[0].self_attn.q_proj, "bias", None) is not None and not config.attention_bias:
        raise SwiftKVInputError("q/k/v bias without o_proj bias (Qwen2 style) is not supported yet.")
    reference = source_layers[0].self_attn.q_proj.weight

    # Build on the meta device and take the source tensors by reference: no second copy of the frozen weights.
    with torch.device("meta"):
        new = LlamaSwiftKVForCausalLM(config)
    result = new.load_state_dict(model.state_dict(), strict=False, assign=True)
    unexpected = [k for k in result.unexpected_keys if "swiftkv" not in k]
    if unexpected:
        raise SwiftKVInputError(f"the source model has weights the Llama layout does not: {unexpected[:5]}")
    # Non-persistent buffers (RoPE frequencies) are not in the state dict: rebuild them for real.
    new.model.rotary_emb = type(new.model.rotary_emb)(config=config).to(reference.device)
    if config.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight

    new.requires_grad_(False)
    if m < layers:
        new.model.norm_swiftkv.weight = _clone_param(new.model.layers[m].input_layernorm.weight)
    else:  # no later layer: the norm is never used, keep it as an identity and frozen
        new.model.norm_swiftkv.weight = nn.Parameter(torch.ones_like(reference[0]), requires_grad=False)
    for leader in range(m, layers, g):
        group = range(leader, min(leader + g, layers))
        for idx in group:
            attn = new.model.layers[idx].self_attn
            attn.q_proj_swiftkv.weight = _clone_param(attn.q_proj.weight)
            if attn.q_proj.bias is not None:
                attn.q_proj_swiftkv.bias = _clone_param(attn.q_proj.bias)
        leader_attn = new.model.layers[leader].self_attn
        for name in ("k_proj", "v_proj"):
            target = getattr(leader_attn, f"{name}_swiftkv")
            sources = [getattr(new.model.layers[idx].self_attn, name) for idx in group]
            # Mean in fp32 so that bf16 groups do not lose precision in the sum.
            target.weight = _clone_param(torch.stack([s.weight.float() for s in sources]).mean(0).to(reference.dtype))
            if sources[0].bias is not None:
                target.bias = _clone_param(torch.stack([s.bias.float() for s in sources]).mean(0).to(reference.dtype))

    leftover = [name for name, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"to_swiftkv left tensors uninitialised: {leftover[:5]}")
    new.generation_config = copy.deepcopy(model.generation_config)
    new.config.name_or_path = getattr(model.config, "name_or_path", "")
    return new.train(model.training)


def swiftkv_parameters(model: LlamaSwiftKVForCausalLM) -> list[tuple[str, nn.Parameter]]:
    """The weights SwiftKV adds and trains."""
    return [(name, p) for name, p in model.named_parameters() if "swiftkv" in name and p.requires_grad]
