"""Registers the toolkit's model types with the transformers Auto classes (local use, no trust_remote_code)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from . import llama_cskv, llama_locret  # noqa: F401  (each registers its model type on import)
from .llama_swiftkv import LlamaSwiftKVConfig, LlamaSwiftKVForCausalLM, LlamaSwiftKVModel


def _register():
    try:
        AutoConfig.register(LlamaSwiftKVConfig.model_type, LlamaSwiftKVConfig)
        AutoModel.register(LlamaSwiftKVConfig, LlamaSwiftKVModel)
        AutoModelForCausalLM.register(LlamaSwiftKVConfig, LlamaSwiftKVForCausalLM)
    except ValueError:  # already registered (module re-imported)
        pass


_register()
