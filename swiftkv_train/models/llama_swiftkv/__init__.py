"""The SwiftKV Llama model; these two files are also what an export ships for trust_remote_code."""

from .configuration_llama_swiftkv import LlamaSwiftKVConfig
from .modeling_llama_swiftkv import LlamaSwiftKVForCausalLM, LlamaSwiftKVModel

__all__ = ["LlamaSwiftKVConfig", "LlamaSwiftKVForCausalLM", "LlamaSwiftKVModel"]
