"""Build a SwiftKV model from a Llama-family model (no training: the initialisation the distillation starts from)."""

import torch
from torch import nn
from transformers import PreTrainedModel

from ...errors import SwiftKVInputError
from ...models.loading import check_llama_family, source_family
from ..build import build_sharing_weights, derived_config, finish_student, trainable_copy
from .remote_code import REMOTE_CODE, LlamaSwiftKVConfig, LlamaSwiftKVForCausalLM


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
    """The SwiftKV config of the source's family (LlamaSwiftKVConfig, Qwen2SwiftKVConfig, Qwen3SwiftKVConfig) with the
    source's architecture, validated with messages that name the fields (``training`` and ``prefix``: see
    :func:`check_layer_split`)."""
    check_llama_family(source_config, getattr(source_config, "name_or_path", "") or "model")
    layers = source_config.num_hidden_layers
    m, g = num_key_value_layers, key_value_group_size
    check_layer_split(layers, m, g, training=training, prefix=prefix)
    config_class = REMOTE_CODE.classes_for(source_family(source_config))[0]
    return derived_config(
        source_config, config_class, keep_all=getattr(source_config, "model_type", None) == config_class.model_type,
        num_key_value_layers=m, key_value_group_size=g, swiftkv=True, swiftkv_lean=False,
    )


@torch.no_grad()
def to_swiftkv(
    model: PreTrainedModel, num_key_value_layers: int, key_value_group_size: int = 1
) -> LlamaSwiftKVForCausalLM:
    """Return a new SwiftKV model built from a Llama-family ``model``; ``model`` stays usable and unchanged.

    The new model shares ``model``'s (frozen) weight tensors and adds trainable SwiftKV weights initialised as the
    reference does: ``norm_swiftkv`` from layer M's input norm, each later layer's ``q_proj_swiftkv`` from its
    ``q_proj``, each AcrossKV group's ``k/v_proj_swiftkv`` as the mean of the group's ``k/v_proj`` (biases
    likewise). Qwen3: each later layer's ``q_norm_swiftkv`` from its ``q_norm``, each group's ``k_norm_swiftkv`` as the
    mean of the group's ``k_norm`` weights (for g = 1 the layer's own).
    SwiftKV is switched on; ``.swiftkv(False)`` gives back the original model's function.
    """
    config = swiftkv_config(model.config, num_key_value_layers, key_value_group_size)
    m, g, layers = config.num_key_value_layers, config.key_value_group_size, config.num_hidden_layers
    source_layers = model.model.layers
    if any(not hasattr(layer.self_attn, "q_proj") for layer in source_layers):
        raise SwiftKVInputError("the source model is a lean SwiftKV export without the original projections.")
    reference = source_layers[0].self_attn.q_proj.weight

    model_class = REMOTE_CODE.classes_for(source_family(config))[2]
    new = build_sharing_weights(model, config, model_class, tolerate=lambda key: "swiftkv" in key)
    if m < layers:
        new.model.norm_swiftkv.weight = trainable_copy(new.model.layers[m].input_layernorm.weight)
    else:  # no later layer: the norm is never used, keep it as an identity and frozen
        new.model.norm_swiftkv.weight = nn.Parameter(torch.ones_like(reference[0]), requires_grad=False)
    for leader in range(m, layers, g):
        group = range(leader, min(leader + g, layers))
        for idx in group:
            attn = new.model.layers[idx].self_attn
            attn.q_proj_swiftkv.weight = trainable_copy(attn.q_proj.weight)
            if attn.q_proj.bias is not None:
                attn.q_proj_swiftkv.bias = trainable_copy(attn.q_proj.bias)
            if hasattr(attn, "q_norm_swiftkv"):
                attn.q_norm_swiftkv.weight = trainable_copy(attn.q_norm.weight)
        leader_attn = new.model.layers[leader].self_attn
        for name in ("k_proj", "v_proj"):
            target = getattr(leader_attn, f"{name}_swiftkv")
            sources = [getattr(new.model.layers[idx].self_attn, name) for idx in group]
            # Mean in fp32 so that bf16 groups do not lose precision in the sum.
            target.weight = trainable_copy(torch.stack([s.weight.float() for s in sources]).mean(0).to(reference.dtype))
            if sources[0].bias is not None:
                target.bias = trainable_copy(torch.stack([s.bias.float() for s in sources]).mean(0).to(reference.dtype))
        if hasattr(leader_attn, "k_norm_swiftkv"):
            norms = [new.model.layers[idx].self_attn.k_norm.weight.float() for idx in group]
            leader_attn.k_norm_swiftkv.weight = trainable_copy(torch.stack(norms).mean(0).to(reference.dtype))
    return finish_student(new, model, "to_swiftkv")


def swiftkv_parameters(model: LlamaSwiftKVForCausalLM) -> list[tuple[str, nn.Parameter]]:
    """The weights SwiftKV adds and trains."""
    return [(name, p) for name, p in model.named_parameters() if "swiftkv" in name and p.requires_grad]
