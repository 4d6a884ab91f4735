"""Locret's settings (``transform.locret`` in a recipe): one dataclass, its own checks."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import SwiftKVInputError
from .remote_code import LocretSettings, validate_locret_settings

INFERENCE_FIELDS = (
    "budget", "chunk_size", "stabilizers", "n_local", "position_mode", "decode_eviction", "quant_bits",
    "quant_group_size",
)


@dataclass
class LocretConfig:
    """The Locret transformation's settings (``transform.locret`` in the run config); the paper's defaults.

    Training: ``head_hidden_size`` (retaining head width, 1024), ``smoothness_weight`` (lambda, 0.0025),
    ``label_chunk_size`` (tile of the answer x prefix logits, 1024), ``head_init_seed``, ``top_fraction`` (the
    logged overlap of the predicted and true top-10% prefix tokens).
    Inference, written into the exported model's config: ``budget`` (entries kept per layer and KV head, local
    tokens included; the paper's Llama-3.1-8B setting is 16384 + 100 local), ``chunk_size`` 1024,
    ``stabilizers`` 2500, ``n_local`` 100, ``position_mode`` "compacted" (the paper's: keys cached before RoPE and
    re-rotated at positions 0..len(cache)-1, so positions never exceed budget + chunk + generated tokens and
    prompts longer than the model's trained context stay in its position range; "original" keeps true positions,
    exact relative distances but positions up to the prompt length), ``decode_eviction`` False (the paper's),
    ``quant_bits`` None (the paper's; 2, 4 or 8: evict, then store the surviving entries quantized with CSKV's
    group-wise quantizer, per token in groups of ``quant_group_size`` (32) channels along head_dim).
    """

    head_hidden_size: int = 1024
    smoothness_weight: float = 0.0025
    label_chunk_size: int = 1024
    head_init_seed: int = 0
    top_fraction: float = 0.1
    budget: int = 16484
    chunk_size: int = 1024
    stabilizers: int = 2500
    n_local: int = 100
    position_mode: str = "compacted"
    decode_eviction: bool = False
    quant_bits: int | None = None
    quant_group_size: int = 32

    def settings(self) -> LocretSettings:
        return LocretSettings(**{name: getattr(self, name) for name in INFERENCE_FIELDS})

    def validate(self) -> None:
        for name in ("head_hidden_size", "label_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SwiftKVInputError(f"locret.{name}={value!r} is invalid: use an integer >= 1.")
        if isinstance(self.smoothness_weight, bool) or not isinstance(self.smoothness_weight, (int, float)) or (
            self.smoothness_weight < 0
        ):
            raise SwiftKVInputError(
                f"locret.smoothness_weight={self.smoothness_weight!r} is invalid: use a number >= 0."
            )
        if not isinstance(self.top_fraction, (int, float)) or not 0 < self.top_fraction <= 1:
            raise SwiftKVInputError(f"locret.top_fraction={self.top_fraction!r} is invalid: use a number in (0, 1].")
        try:
            validate_locret_settings(self.settings(), prefix="locret.")
        except ValueError as err:  # re-raised as the toolkit's input error whatever class the model file used
            raise SwiftKVInputError(str(err)) from None
