"""The one way a method builds its student from a loaded Llama-family model, sharing the source's tensors.

Every method's ``convert.py`` does the same five things around its own initialisation: derive its config from the
source's, build the new model on the meta device, take the source tensors by reference (no second copy of the
frozen weights), rebuild what the state dict does not hold (RoPE buffers, the tied lm_head), and after its own
initialisation check that nothing was left on the meta device. ``derived_config`` / ``build_sharing_weights`` /
``finish_student`` are those steps, once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..errors import SwiftKVInputError

# Fields of the source config that must not be carried over to the new model type.
# (Qwen's sliding-window fields too: the models here are full attention, sliding-window sources are refused.)
DROP_FIELDS = ("model_type", "architectures", "auto_map", "transformers_version", "sliding_window", "dtype",
               "use_sliding_window", "max_window_layers", "layer_types")


def derived_config(source_config, config_class: type, keep_all: bool = False, **fields):
    """``config_class`` with the source's architecture and ``fields`` set. ``keep_all`` keeps every source field
    first (a model of the same type being rebuilt); the type-specific ones are dropped either way."""
    values = source_config.to_dict()
    if not keep_all:
        values = {k: v for k, v in values.items() if k not in DROP_FIELDS}
    values.update(fields)
    for key in DROP_FIELDS:
        values.pop(key, None)
    config = config_class(**values)
    config._attn_implementation = source_config._attn_implementation
    return config


@torch.no_grad()
def build_sharing_weights(
    source: nn.Module,
    config,
    model_class: type,
    skip: Callable[[str], bool] = lambda key: False,
    tolerate: Callable[[str], bool] = lambda key: False,
) -> nn.Module:
    """A frozen ``model_class(config)`` holding ``source``'s tensors (by reference); the method's own new weights
    stay on the meta device for the method to create. ``skip``: source keys not to take; ``tolerate``: source keys
    the new layout may lack (anything else it lacks is an error: the source is not the Llama layout)."""
    reference = next(source.parameters())
    with torch.device("meta"):
        new = model_class(config)
    state = {k: v for k, v in source.state_dict().items() if not skip(k)}
    result = new.load_state_dict(state, strict=False, assign=True)
    unexpected = [k for k in result.unexpected_keys if not tolerate(k)]
    if unexpected:
        raise SwiftKVInputError(f"the source model has weights the {type(new).__name__} layout does not: "
                                f"{unexpected[:5]}")
    # Non-persistent buffers (RoPE frequencies) are not in the state dict: rebuild them for real.
    new.model.rotary_emb = type(new.model.rotary_emb)(config=config).to(reference.device)
    if config.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
    new.requires_grad_(False)
    return new


def finish_student(new: nn.Module, source: nn.Module, what: str) -> nn.Module:
    """Check that every tensor is real, carry over the generation config and name, match the train/eval mode."""
    leftover = [name for name, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"{what} left tensors uninitialised: {leftover[:5]}")
    new.generation_config = copy.deepcopy(source.generation_config)
    new.config.name_or_path = getattr(source.config, "name_or_path", "")
    return new.train(source.training)


def trainable_copy(tensor: torch.Tensor) -> nn.Parameter:
    """A new trainable parameter initialised from ``tensor`` (never shares its storage)."""
    return nn.Parameter(tensor.detach().clone(), requires_grad=True)
