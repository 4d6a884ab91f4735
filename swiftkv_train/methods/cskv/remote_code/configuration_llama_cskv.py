"""Configuration of the CSKV Llama model (model_type ``llama_cskv``).

Self-contained: imports only transformers, so the same file serves the package and ``trust_remote_code`` exports.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

CSKV_QUANT_BITS = (2, 4, 8)


@strict
class LlamaCSKVConfig(LlamaConfig):
    """LlamaConfig plus the CSKV fields.

    - ``cskv``: run the student (compressed KV cache) when True, the original model (teacher) when False.
    - ``cskv_key_density`` / ``cskv_value_density``: share of the ``kv_dim = num_key_value_heads * head_dim``
      channels kept by the low-rank factors (rank ``r = round(density * kv_dim)``, at least 1). A float for every
      layer or one float per layer.
    - ``cskv_window`` (W): the most recent W tokens keep full-precision K/V from the original projections.
    - ``cskv_quant_bits``: None (compressed features kept in the model dtype) or 2/4/8-bit asymmetric quantization
      (keys per channel over blocks of ``cskv_quant_group_size`` tokens, values per token over groups of
      ``cskv_quant_group_size`` channels), stored packed in uint8.
    - ``use_kernels``: decode steps attend straight from the compressed cache with the Triton kernel
      (``cskv_decode``: no full-precision K/V is materialised) when it can run (CUDA and Triton, inference, the
      step's new tokens fit in the window); False always runs the plain PyTorch path.
    """

    model_type = "llama_cskv"

    cskv: bool = False
    cskv_key_density: float | list[float] = 0.5
    cskv_value_density: float | list[float] = 0.5
    cskv_window: int = 32
    cskv_quant_bits: int | None = None
    cskv_quant_group_size: int = 32
    use_kernels: bool = True

    def validate_architecture(self):
        super().validate_architecture()
        for field in ("cskv_key_density", "cskv_value_density"):
            value = getattr(self, field)
            values = value if isinstance(value, list) else [value]
            if isinstance(value, list) and len(value) != self.num_hidden_layers:
                raise ValueError(
                    f"{field} has {len(value)} entries; a per-layer list needs one per layer "
                    f"(num_hidden_layers={self.num_hidden_layers})."
                )
            if not all(0.0 < v <= 1.0 for v in values):
                raise ValueError(f"{field}={value} is out of range: each density must be in (0, 1].")
        if self.cskv_window < 1:
            raise ValueError(f"cskv_window={self.cskv_window} is out of range: use at least 1 token.")
        if self.cskv_quant_bits is not None and self.cskv_quant_bits not in CSKV_QUANT_BITS:
            raise ValueError(f"cskv_quant_bits={self.cskv_quant_bits} is not supported: use None, 2, 4 or 8.")
        if self.cskv_quant_group_size < 1:
            raise ValueError(f"cskv_quant_group_size={self.cskv_quant_group_size} must be at least 1.")

    @property
    def cskv_kv_dim(self) -> int:
        head_dim = getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads
        return self.num_key_value_heads * head_dim

    def cskv_rank(self, kind: str, layer_idx: int) -> int:
        """Rank of the key (``kind="key"``) or value factors of one layer."""
        density = self.cskv_key_density if kind == "key" else self.cskv_value_density
        if isinstance(density, list):
            density = density[layer_idx]
        kv_dim = self.cskv_kv_dim
        return max(1, min(kv_dim, round(density * kv_dim)))


@strict
class Qwen2CSKVConfig(LlamaCSKVConfig):
    """The CSKV model of a Qwen2 / Qwen2.5 source (q/k/v with bias: rebuilt keys and values add it back)."""

    model_type = "qwen2_cskv"
    source_family = "qwen2"


@strict
class Qwen3CSKVConfig(LlamaCSKVConfig):
    """The CSKV model of a Qwen3 source (rebuilt keys go through the layer's per-head ``k_norm`` before RoPE)."""

    model_type = "qwen3_cskv"
    source_family = "qwen3"


__all__ = ["LlamaCSKVConfig", "Qwen2CSKVConfig", "Qwen3CSKVConfig", "CSKV_QUANT_BITS"]
