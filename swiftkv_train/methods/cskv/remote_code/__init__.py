"""The CSKV Llama model (``llama_cskv``); the sibling files are also what an export ships for trust_remote_code.
"""

from ....remote_code import RemoteCode
from .cache_llama_cskv import CSKVCache, CSKVCacheLayer
from .configuration_llama_cskv import LlamaCSKVConfig, Qwen2CSKVConfig, Qwen3CSKVConfig
from .modeling_llama_cskv import (CSKV_FACTOR_NAMES, LlamaCSKVForCausalLM, LlamaCSKVModel, Qwen2CSKVForCausalLM,
                                  Qwen2CSKVModel, Qwen3CSKVForCausalLM, Qwen3CSKVModel)

# This model's classes and what its exports ship (see swiftkv_train/remote_code): this package's files, the shared
# ones and the kernels they import.
REMOTE_CODE = RemoteCode(
    classes=(LlamaCSKVConfig, LlamaCSKVModel, LlamaCSKVForCausalLM),
    own=("cache_llama_cskv.py", "configuration_llama_cskv.py", "modeling_llama_cskv.py"),
    common=("quant_llama_cskv.py", "transformers_compat.py"),
    kernels=("cskv_decode.py",),
    variants=((Qwen2CSKVConfig, Qwen2CSKVModel, Qwen2CSKVForCausalLM),
              (Qwen3CSKVConfig, Qwen3CSKVModel, Qwen3CSKVForCausalLM)),
)

__all__ = [
    "REMOTE_CODE",
    "CSKV_FACTOR_NAMES",
    "CSKVCache",
    "CSKVCacheLayer",
    "LlamaCSKVConfig",
    "LlamaCSKVForCausalLM",
    "LlamaCSKVModel",
]
