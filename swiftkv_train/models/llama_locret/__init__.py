"""The Locret Llama model (trained retaining heads + budgeted chunked prefill); the sibling files are also what
an export ships for trust_remote_code."""

from transformers import AutoConfig, AutoModelForCausalLM

from ...errors import SwiftKVInputError
from . import configuration_llama_locret
from .cache_llama_locret import LocretCache, LocretLayer
from .configuration_llama_locret import LlamaLocretConfig, LocretSettings, validate_locret_settings
from .modeling_llama_locret import LlamaLocretForCausalLM, LlamaLocretModel

# Inside the toolkit a bad Locret setting raises the toolkit's one input-error type (a ValueError, as in exports,
# which cannot import swiftkv_train and keep their own LocretSettingsError).
configuration_llama_locret.LocretSettingsError = SwiftKVInputError


def _register():
    try:
        AutoConfig.register(LlamaLocretConfig.model_type, LlamaLocretConfig)
        AutoModelForCausalLM.register(LlamaLocretConfig, LlamaLocretForCausalLM)
    except ValueError:  # already registered (module re-imported)
        pass


_register()

__all__ = [
    "LlamaLocretConfig",
    "LlamaLocretForCausalLM",
    "LlamaLocretModel",
    "LocretCache",
    "LocretLayer",
    "LocretSettings",
    "validate_locret_settings",
]
