"""The SwiftKV Llama model; these two files are also what an export ships for trust_remote_code."""

from ....remote_code import RemoteCode
from .configuration_llama_swiftkv import LlamaSwiftKVConfig, Qwen2SwiftKVConfig, Qwen3SwiftKVConfig
from .modeling_llama_swiftkv import (LlamaSwiftKVForCausalLM, LlamaSwiftKVModel, Qwen2SwiftKVForCausalLM,
                                     Qwen2SwiftKVModel, Qwen3SwiftKVForCausalLM, Qwen3SwiftKVModel)

# This model's classes and what its exports ship (see swiftkv_train/remote_code): this package's files, the shared
# ones and the kernels they import.
REMOTE_CODE = RemoteCode(
    classes=(LlamaSwiftKVConfig, LlamaSwiftKVModel, LlamaSwiftKVForCausalLM),
    own=("configuration_llama_swiftkv.py", "modeling_llama_swiftkv.py"),
    common=("transformers_compat.py",),
    kernels=("swiftkv_prefill_kv.py",),
    variants=((Qwen2SwiftKVConfig, Qwen2SwiftKVModel, Qwen2SwiftKVForCausalLM),
              (Qwen3SwiftKVConfig, Qwen3SwiftKVModel, Qwen3SwiftKVForCausalLM)),
)

__all__ = ["REMOTE_CODE", "LlamaSwiftKVConfig", "LlamaSwiftKVForCausalLM", "LlamaSwiftKVModel", "Qwen2SwiftKVConfig",
           "Qwen2SwiftKVForCausalLM", "Qwen3SwiftKVConfig", "Qwen3SwiftKVForCausalLM"]
