"""The Locret student: a ``llama_locret`` model sharing the source's frozen backbone, with new retaining heads."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import SwiftKVInputError
from ...models.loading import check_llama_family, source_family
from ..base import config_from_node
from ..build import build_sharing_weights, derived_config, finish_student
from .config import INFERENCE_FIELDS, LocretConfig
from .remote_code import REMOTE_CODE, LlamaLocretConfig, LlamaLocretForCausalLM
from .remote_code.modeling_llama_locret import LocretRetainingHead

# Source model types a Locret student can be built from (besides the Locret models' own: continued training).
SOURCE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LOCRET_TYPES = tuple(classes[0].model_type for classes in REMOTE_CODE.all_classes)


def locret_model_config(source_config, cfg: LocretConfig) -> LlamaLocretConfig:
    """The Locret config of the source's family (LlamaLocretConfig, Qwen2LocretConfig, Qwen3LocretConfig)."""
    model_type = getattr(source_config, "model_type", None)
    if model_type not in SOURCE_TYPES + LOCRET_TYPES:
        raise SwiftKVInputError(
            f"Locret is built from a Llama-family model ({', '.join(SOURCE_TYPES)}); got model_type {model_type!r}."
        )
    check_llama_family(source_config, getattr(source_config, "name_or_path", "") or "model")  # sliding windows
    return derived_config(
        source_config, REMOTE_CODE.classes_for(source_family(source_config))[0], **{f"locret_{name}": getattr(cfg, name) for name in INFERENCE_FIELDS},
        locret_head_hidden_size=cfg.head_hidden_size, locret_enabled=True,
    )


@torch.no_grad()
def to_locret(model: nn.Module, cfg: LocretConfig | None = None) -> LlamaLocretForCausalLM:
    """A Locret model sharing ``model``'s weight tensors (frozen), with new retaining heads (trainable).

    ``model`` stays usable and unchanged. From a Locret model, its heads are kept (continued training)."""
    cfg = config_from_node(LocretConfig, cfg, prefix="locret.")
    config = locret_model_config(model.config, cfg)
    reference = model.model.embed_tokens.weight
    keep_heads = getattr(model.config, "model_type", None) in LOCRET_TYPES and (
        model.config.locret_head_hidden_size == cfg.head_hidden_size
    )
    new = build_sharing_weights(model, config, REMOTE_CODE.classes_for(source_family(config))[2],
                                skip=lambda key: not keep_heads and ".retaining_head." in key)
    if not keep_heads:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.head_init_seed)
            for layer in new.model.layers:  # nn.Linear's default init, on CPU for a device-independent seed
                layer.self_attn.retaining_head = LocretRetainingHead(config).to(reference.device, reference.dtype)
    for _, param in new.retaining_head_parameters():
        param.requires_grad_(True)
    return finish_student(new, model, "to_locret")
