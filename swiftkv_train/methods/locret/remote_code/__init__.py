"""The Locret Llama model (trained retaining heads + budgeted chunked prefill); the sibling files are also what
an export ships for trust_remote_code."""

from ....remote_code import RemoteCode
from ....errors import SwiftKVInputError
from . import configuration_llama_locret
from .cache_llama_locret import LocretCache, LocretLayer
from .configuration_llama_locret import (LlamaLocretConfig, LocretSettings, Qwen2LocretConfig, Qwen3LocretConfig,
                                         validate_locret_settings)
from .modeling_llama_locret import (LlamaLocretForCausalLM, LlamaLocretModel, Qwen2LocretForCausalLM,
                                    Qwen2LocretModel, Qwen3LocretForCausalLM, Qwen3LocretModel)

# Inside the toolkit a bad Locret setting raises the toolkit's one input-error type (a ValueError, as in exports,
# which cannot import swiftkv_train and keep their own LocretSettingsError).
configuration_llama_locret.LocretSettingsError = SwiftKVInputError

# This model's classes and what its exports ship (see swiftkv_train/remote_code): this package's files, the shared
# ones and the kernels they import.
REMOTE_CODE = RemoteCode(
    classes=(LlamaLocretConfig, LlamaLocretModel, LlamaLocretForCausalLM),
    own=("cache_llama_locret.py", "configuration_llama_locret.py", "modeling_llama_locret.py"),
    common=("quant_llama_cskv.py", "transformers_compat.py"),
    kernels=("locret_evict.py",),
    variants=((Qwen2LocretConfig, Qwen2LocretModel, Qwen2LocretForCausalLM),
              (Qwen3LocretConfig, Qwen3LocretModel, Qwen3LocretForCausalLM)),
)

__all__ = [
    "REMOTE_CODE",
    "LlamaLocretConfig",
    "LlamaLocretForCausalLM",
    "LlamaLocretModel",
    "LocretCache",
    "LocretLayer",
    "LocretSettings",
    "validate_locret_settings",
]
