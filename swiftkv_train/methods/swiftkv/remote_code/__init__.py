"""The SwiftKV Llama model; these two files are also what an export ships for trust_remote_code."""

from pathlib import Path

from ....remote_code import RemoteCode
from .configuration_llama_swiftkv import LlamaSwiftKVConfig
from .modeling_llama_swiftkv import LlamaSwiftKVForCausalLM, LlamaSwiftKVModel

# What an export of this model ships (see swiftkv_train/remote_code): this package's files, the shared ones and
# the kernels they import.
REMOTE_CODE = RemoteCode(
    package_dir=Path(__file__).resolve().parent,
    own=("configuration_llama_swiftkv.py", "modeling_llama_swiftkv.py"),
    config_class="configuration_llama_swiftkv.LlamaSwiftKVConfig",
    model_class="modeling_llama_swiftkv.LlamaSwiftKVForCausalLM",
    common=("transformers_compat.py",),
    kernels=("swiftkv_prefill_kv.py",),
)

__all__ = ["REMOTE_CODE", "LlamaSwiftKVConfig", "LlamaSwiftKVForCausalLM", "LlamaSwiftKVModel"]
