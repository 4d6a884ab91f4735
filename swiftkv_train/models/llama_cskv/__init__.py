"""The CSKV Llama model (``llama_cskv``); the sibling files are also what an export ships for trust_remote_code.

Importing this package registers ``llama_cskv`` with the transformers Auto classes (local use, no trust_remote_code).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_llama_cskv import CSKVCache, CSKVCacheLayer
from .configuration_llama_cskv import LlamaCSKVConfig
from .modeling_llama_cskv import CSKV_FACTOR_NAMES, LlamaCSKVForCausalLM, LlamaCSKVModel


def _register() -> None:
    try:
        AutoConfig.register(LlamaCSKVConfig.model_type, LlamaCSKVConfig)
        AutoModel.register(LlamaCSKVConfig, LlamaCSKVModel)
        AutoModelForCausalLM.register(LlamaCSKVConfig, LlamaCSKVForCausalLM)
    except ValueError:  # already registered (module re-imported)
        pass


_register()

__all__ = [
    "CSKV_FACTOR_NAMES",
    "CSKVCache",
    "CSKVCacheLayer",
    "LlamaCSKVConfig",
    "LlamaCSKVForCausalLM",
    "LlamaCSKVModel",
]
