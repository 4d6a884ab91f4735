"""Model zoo: the loader and the transformed model classes."""

from . import register  # noqa: F401
from .llama_swiftkv import LlamaSwiftKVConfig, LlamaSwiftKVForCausalLM, LlamaSwiftKVModel
from .loading import load_pretrained

__all__ = ["LlamaSwiftKVConfig", "LlamaSwiftKVForCausalLM", "LlamaSwiftKVModel", "load_pretrained"]
