"""Configuration of the SwiftKV Llama model (model_type ``llama_swiftkv``) and of its Qwen2 / Qwen3 variants.

Self-contained: imports only transformers, so the same file serves the package and
``trust_remote_code`` exports. Field names follow the public SwiftKV checkpoints.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class LlamaSwiftKVConfig(LlamaConfig):
    """LlamaConfig plus the SwiftKV fields.

    - ``swiftkv``: run the transformed model (student) when True, the original model (teacher) when False.
    - ``num_key_value_layers`` (M): layers ``< M`` are unchanged; layers ``>= M`` take K/V from
      ``norm_swiftkv(h_M)``, where ``h_M`` is the residual stream entering layer M.
    - ``key_value_group_size`` (g, AcrossKV): consecutive later layers in groups of g share one K/V projection
      and one cache entry. If g does not divide ``L - M`` the last group is smaller.
    - ``swiftkv_lean``: the checkpoint holds only what the student needs (no original q/k/v in layers >= M),
      so the teacher mode is unavailable.
    - ``use_kernels``: use the fused Triton prefill kernels (CUDA, Triton installed, no gradient needed);
      False always runs the plain PyTorch path.
    """

    model_type = "llama_swiftkv"

    swiftkv: bool = False
    num_key_value_layers: int | None = None
    key_value_group_size: int = 1
    swiftkv_lean: bool = False
    use_kernels: bool = True

    def __post_init__(self, **kwargs):
        if self.num_key_value_layers is None:
            self.num_key_value_layers = self.num_hidden_layers
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        super().validate_architecture()
        layers, m, g = self.num_hidden_layers, self.num_key_value_layers, self.key_value_group_size
        if not 1 <= m <= layers:
            raise ValueError(
                f"num_key_value_layers={m} is out of range: it must be between 1 and num_hidden_layers={layers}."
            )
        if g < 1 or (m < layers and g > layers - m):
            raise ValueError(
                f"key_value_group_size={g} is out of range: it must be between 1 and the number of later "
                f"layers num_hidden_layers - num_key_value_layers = {layers - m}."
            )

    # Layout helpers shared by the model, the cache accounting and the export.
    def swiftkv_group_leader(self, layer_idx: int) -> int:
        """Index of the layer that owns the K/V projection used by ``layer_idx`` (a later layer)."""
        m, g = self.num_key_value_layers, self.key_value_group_size
        return m + ((layer_idx - m) // g) * g

    def swiftkv_cache_slot(self, layer_idx: int) -> int:
        """Cache entry used by ``layer_idx`` in SwiftKV mode: one per early layer, one per AcrossKV group."""
        m, g = self.num_key_value_layers, self.key_value_group_size
        return layer_idx if layer_idx < m else m + (layer_idx - m) // g

    @property
    def num_swiftkv_cache_slots(self) -> int:
        m, g = self.num_key_value_layers, self.key_value_group_size
        return m + -(-(self.num_hidden_layers - m) // g)


@strict
class Qwen2SwiftKVConfig(LlamaSwiftKVConfig):
    """The SwiftKV model of a Qwen2 / Qwen2.5 source: q/k/v projections (and SwiftKV's) with bias."""

    model_type = "qwen2_swiftkv"
    source_family = "qwen2"


@strict
class Qwen3SwiftKVConfig(LlamaSwiftKVConfig):
    """The SwiftKV model of a Qwen3 source: per-head q/k RMSNorms (``q_norm_swiftkv`` on every later layer,
    ``k_norm_swiftkv`` on each AcrossKV group's first layer, as ArcticTraining's Qwen3 SwiftKV names them)."""

    model_type = "qwen3_swiftkv"
    source_family = "qwen3"


__all__ = ["LlamaSwiftKVConfig", "Qwen2SwiftKVConfig", "Qwen3SwiftKVConfig"]
