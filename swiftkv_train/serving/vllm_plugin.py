"""vLLM plugin (entry point ``vllm.general_plugins`` -> ``swiftkv_train.serving.vllm_plugin:register``).

vLLM calls ``register()`` in every process it starts (front end, engine core, workers). For every registered method
that declares ``vllm_architecture = (architecture name, "module:Class")``, it registers the model class with
``vllm.ModelRegistry`` (lazily, by name: nothing heavy is imported until vLLM builds the model), the method's
config class with transformers' ``AutoConfig`` (so ``config.json`` loads without ``trust_remote_code``), and, where
the model class defines ``verify_and_update_config(vllm_config)``, a hook vLLM runs while it builds its config, in
the front-end process, before the engine starts: that is where an export the class cannot serve is refused.

Tested with vLLM 0.32 (``TESTED_VLLM``); another version gets one warning, not an error.
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger(__name__)

TESTED_VLLM = (">=0.32", "<0.33")
_done = False


def served_architectures() -> dict[str, str]:
    """architecture name -> "module:Class" for every method that declares a vLLM model."""
    from ..methods import METHODS

    served = {}
    for method in METHODS.values():
        declared = getattr(method, "vllm_architecture", None)
        if declared:
            architecture, target = declared
            served[architecture] = target
    return served


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _config_hook(target: str):
    """vLLM's per-architecture config hook, forwarding to the model class's ``verify_and_update_model_config`` /
    ``verify_and_update_config`` where it defines them (imported only when vLLM calls)."""

    def forward(hook_name: str):
        def call(config) -> None:
            hook = getattr(_load(target), hook_name, None)
            if hook is not None:
                hook(config)

        return staticmethod(call)

    return type("SwiftKVTrainConfigHook", (), {name: forward(name) for name in
                                                ("verify_and_update_model_config", "verify_and_update_config")})


def _check_version() -> None:
    import vllm

    version = getattr(vllm, "__version__", "0")
    try:
        from packaging.version import Version

        low, high = (Version(spec.lstrip("<>=")) for spec in TESTED_VLLM)
        ok = low <= Version(version) < high
    except Exception:  # an unparsable dev version: say nothing
        return
    if not ok:
        log.warning("swiftkv_train's vLLM plugin is tested with vllm%s,%s; this is vllm %s",
                    *TESTED_VLLM, version)


def register() -> None:
    """Idempotent."""
    global _done
    if _done:
        return
    from vllm import ModelRegistry

    from ..models.register import register_models

    _check_version()
    register_models()  # the methods' config classes with AutoConfig: config.json loads without trust_remote_code
    hooks = None
    try:  # vLLM's per-architecture config hooks (run while the engine config is built)
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP as hooks
    except ImportError:
        log.warning("this vLLM has no per-architecture config hooks: exports are checked when the model is built")
    for architecture, target in served_architectures().items():
        ModelRegistry.register_model(architecture, target)
        if hooks is not None:
            hooks[architecture] = _config_hook(target)
    _done = True
