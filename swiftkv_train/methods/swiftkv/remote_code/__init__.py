"""The SwiftKV Llama model; these two files are also what an export ships for trust_remote_code."""

from ....remote_code import RemoteCode
from .configuration_llama_swiftkv import LlamaSwiftKVConfig
from .modeling_llama_swiftkv import LlamaSwiftKVForCausalLM, LlamaSwiftKVModel

# This model's classes and what its exports ship (see swiftkv_train/remote_code): this package's files, the shared
# ones and the kernels they import.
REMOTE_CODE = RemoteCode(
    classes=(LlamaSwiftKVConfig, LlamaSwiftKVModel, LlamaSwiftKVForCausalLM),
    own=("configuration_llama_swiftkv.py", "modeling_llama_swiftkv.py"),
    common=("transformers_compat.py",),
    kernels=("swiftkv_prefill_kv.py",),
)

__all__ = ["REMOTE_CODE", "LlamaSwiftKVConfig", "LlamaSwiftKVForCausalLM", "LlamaSwiftKVModel"]
