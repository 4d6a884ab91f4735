"""Configuration of the Locret Llama model (model_type ``llama_locret``) and its eviction settings.

Self-contained: imports only transformers (and the standard library), so the same file serves the package and
``trust_remote_code`` exports.
"""

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

POSITION_MODES = ("compacted", "original")
QUANT_BITS = (2, 4, 8)  # locret_quant_bits: None (entries kept in the model dtype) or one of these
# Settings whose None is a real value (no quantization), so an explicit per-call None overrides the config.
_NULLABLE_SETTINGS = ("quant_bits",)
_SETTING_NAMES = (
    "budget", "chunk_size", "stabilizers", "n_local", "position_mode", "decode_eviction", "quant_bits",
    "quant_group_size",
)


class LocretSettingsError(ValueError):
    """A bad eviction setting. Inside swiftkv_train the package rebinds this name to its SwiftKVInputError, so the
    toolkit raises its one input-error type; an export (no swiftkv_train) raises this ValueError."""


def settings_error(message: str) -> ValueError:
    """The error to raise for a bad setting (looked up at call time, so the package's rebinding applies)."""
    return LocretSettingsError(message)


@dataclass(frozen=True)
class LocretSettings:
    """What the budgeted cache needs; the ``locret_*`` config fields, overridable per ``generate``/prefill call.

    - ``budget``: cache entries kept per layer and KV head once the prompt is processed, the ``n_local`` protected
      tokens included (so ``prompt_len / budget`` is the compression ratio). The paper's budget b excludes its
      local tokens: the paper's setting (b, n_loc) is ``budget = b + n_loc`` here.
    - ``chunk_size``: prompt tokens per prefill step; the cache peaks at ``budget + chunk_size`` entries.
    - ``stabilizers``: the newest entries kept at each intermediate eviction regardless of score.
    - ``n_local``: the last prompt tokens (the question), appended after the last eviction and never evicted.
    - ``position_mode``: ``compacted`` (paper: keys cached before RoPE, rotated at positions 0..len(cache)-1 at
      every step) or ``original`` (keys cached after RoPE at their true positions).
    - ``decode_eviction``: evict during decoding too (back to ``budget`` each time decoding has added
      ``chunk_size`` entries); the paper never evicts while decoding.
    - ``quant_bits``: None (entries kept in the model dtype, the paper's) or 2, 4 or 8: evict, then store
      quantized, with CSKV's group-wise asymmetric quantizer (``quant_llama_cskv``). Each entry's key and value
      are quantized per token in groups of ``quant_group_size`` channels along head_dim (one scale and one
      minimum per group, in the model dtype; codes packed in uint8). The entries of the step being processed are
      attended at full precision and quantized after that layer's eviction, so only the current chunk is ever
      held unquantized; later steps attend to the dequantized entries. Eviction (scores, ties) is unchanged.
    - ``quant_group_size``: channels per quantization group (the last group of a head may be shorter).
    """

    budget: int
    chunk_size: int
    stabilizers: int
    n_local: int
    position_mode: str = "compacted"
    decode_eviction: bool = False
    quant_bits: int | None = None
    quant_group_size: int = 32

    @property
    def evictable_budget(self) -> int:
        """Entries left for the evicted part of the prompt (the budget minus the protected local tokens)."""
        return self.budget - self.n_local


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_locret_settings(settings: LocretSettings, prefix: str = "locret_") -> LocretSettings:
    """Raise ``LocretSettingsError`` naming the field (``prefix`` + name) and the fix; return the settings."""
    s = settings
    for name in ("budget", "chunk_size", "stabilizers", "n_local"):
        value = getattr(s, name)
        minimum = 1 if name in ("budget", "chunk_size") else 0
        if not _is_int(value) or value < minimum:
            raise settings_error(f"{prefix}{name}={value!r} is invalid: use an integer >= {minimum}.")
    if s.stabilizers + s.n_local > s.budget:
        raise settings_error(
            f"{prefix}budget={s.budget} is smaller than {prefix}stabilizers + {prefix}n_local = "
            f"{s.stabilizers} + {s.n_local}: the protected entries would not fit. Raise {prefix}budget or lower "
            f"{prefix}stabilizers / {prefix}n_local."
        )
    if s.position_mode not in POSITION_MODES:
        raise settings_error(
            f"{prefix}position_mode={s.position_mode!r} is invalid: use one of {', '.join(POSITION_MODES)}."
        )
    if not isinstance(s.decode_eviction, bool):
        raise settings_error(f"{prefix}decode_eviction={s.decode_eviction!r} is invalid: use True or False.")
    if s.quant_bits is not None and (not _is_int(s.quant_bits) or s.quant_bits not in QUANT_BITS):
        raise settings_error(
            f"{prefix}quant_bits={s.quant_bits!r} is invalid: use None (no quantization), 2, 4 or 8."
        )
    if not _is_int(s.quant_group_size) or s.quant_group_size < 1:
        raise settings_error(
            f"{prefix}quant_group_size={s.quant_group_size!r} is invalid: use an integer >= 1 (channels per "
            "quantization group along head_dim)."
        )
    return s


@strict
class LlamaLocretConfig(LlamaConfig):
    """LlamaConfig plus a retaining head per layer and the budgeted-cache settings (see ``LocretSettings``).

    - ``locret_head_hidden_size``: hidden width of each retaining head (paper: 1024).
    - ``locret_enabled``: ``generate()`` runs the chunked, budgeted prefill when True; plain generation otherwise.
    - ``use_kernels``: evict with the Triton kernel (``locret_evict``) where it can run (CUDA, Triton installed);
      False always runs the PyTorch reference. Both keep exactly the same entries. (A quantized cache evicts
      with the reference's selection and gathers its packed codes, scales and minimums with it.)
    - ``locret_quant_bits`` / ``locret_quant_group_size``: the optional quantized store (None, 2, 4 or 8 bits;
      groups of channels along head_dim), combining Locret with CSKV's quantizer: evict, then store quantized.
    Defaults are the paper's Llama-3.1-8B setting (budget 16384 + 100 local, chunk 1024, stabilizers 2500), no
    quantization.
    """

    model_type = "llama_locret"

    locret_head_hidden_size: int = 1024
    locret_enabled: bool = True
    locret_budget: int = 16484
    locret_chunk_size: int = 1024
    locret_stabilizers: int = 2500
    locret_n_local: int = 100
    locret_position_mode: str = "compacted"
    locret_decode_eviction: bool = False
    locret_quant_bits: int | None = None
    locret_quant_group_size: int = 32
    use_kernels: bool = True

    def validate_locret(self):
        if not _is_int(self.locret_head_hidden_size) or self.locret_head_hidden_size < 1:
            raise settings_error(
                f"locret_head_hidden_size={self.locret_head_hidden_size!r} is invalid: use an integer >= 1."
            )
        validate_locret_settings(self.locret_settings())

    def locret_settings(self, **overrides) -> LocretSettings:
        """The config's settings with per-call overrides (keys without the ``locret_`` prefix), unvalidated.

        An override of None keeps the config's value, except for ``quant_bits``, where None is a value (no
        quantization): ``quant_bits=None`` turns a configured quantization off for this call."""
        fields = {name: getattr(self, f"locret_{name}") for name in _SETTING_NAMES}
        unknown = set(overrides) - set(fields)
        if unknown:
            raise settings_error(
                f"unknown Locret setting(s) {sorted('locret_' + k for k in unknown)}: use "
                f"{', '.join('locret_' + k for k in fields)}."
            )
        fields.update({k: v for k, v in overrides.items() if v is not None or k in _NULLABLE_SETTINGS})
        return LocretSettings(**fields)


@strict
class Qwen2LocretConfig(LlamaLocretConfig):
    """The Locret model of a Qwen2 / Qwen2.5 source (q/k/v with bias)."""

    model_type = "qwen2_locret"
    source_family = "qwen2"


@strict
class Qwen3LocretConfig(LlamaLocretConfig):
    """The Locret model of a Qwen3 source (per-head q/k norms before RoPE)."""

    model_type = "qwen3_locret"
    source_family = "qwen3"


__all__ = [
    "QUANT_BITS",
    "LlamaLocretConfig",
    "Qwen2LocretConfig",
    "Qwen3LocretConfig",
    "LocretSettings",
    "LocretSettingsError",
    "settings_error",
    "validate_locret_settings",
]
