"""The CSKV Llama model (``llama_cskv``); the sibling files are also what an export ships for trust_remote_code.
"""

from pathlib import Path

from ....remote_code import RemoteCode
from .cache_llama_cskv import CSKVCache, CSKVCacheLayer
from .configuration_llama_cskv import LlamaCSKVConfig
from .modeling_llama_cskv import CSKV_FACTOR_NAMES, LlamaCSKVForCausalLM, LlamaCSKVModel

# What an export of this model ships (see swiftkv_train/remote_code): this package's files, the shared ones and
# the kernels they import.
REMOTE_CODE = RemoteCode(
    package_dir=Path(__file__).resolve().parent,
    own=("cache_llama_cskv.py", "configuration_llama_cskv.py", "modeling_llama_cskv.py"),
    config_class="configuration_llama_cskv.LlamaCSKVConfig",
    model_class="modeling_llama_cskv.LlamaCSKVForCausalLM",
    common=("quant_llama_cskv.py", "transformers_compat.py"),
    kernels=("cskv_decode.py",),
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
