"""Measure what a KV cache object really holds (bytes of its tensors), for tests, benchmarks and evaluation."""

import torch


def _tensor_bytes(obj, seen: set) -> int:
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.device.type)
        if key in seen or obj.device.type == "meta":
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(item, seen) for item in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(item, seen) for item in obj.values())
    return 0


def cache_nbytes(cache) -> int:
    """Bytes held by the tensors of a transformers Cache (each storage counted once).

    Walks every cache layer's attributes, so compressed or quantized layer types are measured the same way.
    """
    seen: set = set()
    layers = getattr(cache, "layers", None)
    if layers is None:
        return _tensor_bytes(vars(cache), seen)
    return sum(_layer_bytes(layer, seen) for layer in layers)


def _layer_bytes(layer, seen: set) -> int:
    # A layer stored with padding entries (per-head budgets: policies/cache.py) counts only its real ones, as a
    # ragged layout would store them.
    nbytes = _tensor_bytes(vars(layer), seen)
    share = layer.held_share() if callable(getattr(layer, "held_share", None)) else None
    return nbytes if share is None else round(nbytes * share)
