"""Registers every method's model classes with the transformers Auto classes (local use, no trust_remote_code).

Called explicitly by the loader before it reads a model directory; importing a model package registers nothing.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM


def register_models() -> None:
    """Idempotent: each registered method's (config, base model, causal LM) classes, by model_type."""
    from ..methods import METHODS  # late: the methods import the loader

    for method in METHODS.values():
        if method.remote_code is None:  # a method whose student is a stock transformers model
            continue
        for config_class, model_class, causal_class in method.remote_code.all_classes:  # every source family's
            if config_class.model_type in _registered:
                continue
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            AutoModel.register(config_class, model_class, exist_ok=True)
            AutoModelForCausalLM.register(config_class, causal_class, exist_ok=True)
            _registered.add(config_class.model_type)


_registered: set[str] = set()
