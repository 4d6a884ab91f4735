"""The one place that knows which transformers version is installed (5.17 .. 5.24 are tested).

transformers 5.24 renamed the cache argument of models, decoder layers, attention layers, mask builders and
model outputs from ``past_key_values`` to ``cache`` (the old name is still accepted there, with a warning, until
5.40). The model files call transformers with whichever name the installed version declares, and accept both
names from their own callers. Shipped beside the model files in every export, so it imports only transformers.
"""

import functools
import inspect

from transformers.models.llama.modeling_llama import LlamaAttention

# Feature test, not a version compare: the name the installed attention layer declares.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaAttention.forward).parameters else "past_key_values"
_LEGACY_CACHE_ARG = "past_key_values"


def cache_kwarg(cache) -> dict:
    """``{name: cache}`` for a call into transformers (``create_causal_mask``, layers, outputs, generate)."""
    return {CACHE_ARG: cache}


def output_cache(outputs):
    """The cache a model output carries, read under the installed name (no deprecation warning)."""
    return getattr(outputs, CACHE_ARG)


def accepts_legacy_cache_name(forward):
    """Decorator for our ``forward(..., cache=None, ...)``: callers on transformers < 5.24 (``generate``, the
    Llama decoder layer) pass ``past_key_values=``; both names reach the ``cache`` parameter."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if _LEGACY_CACHE_ARG in kwargs:
            legacy = kwargs.pop(_LEGACY_CACHE_ARG)
            if kwargs.get("cache") is not None and legacy is not None:
                raise TypeError("pass the cache once: `cache=` or `past_key_values=`, not both")
            if legacy is not None or "cache" not in kwargs:
                kwargs["cache"] = legacy
        return forward(*args, **kwargs)

    return wrapper


__all__ = ["CACHE_ARG", "accepts_legacy_cache_name", "cache_kwarg", "output_cache"]
