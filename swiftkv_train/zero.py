"""DeepSpeed ZeRO-3 helpers shared by the trainer, the methods and the export (one copy)."""

import contextlib


def gathered(*params):
    """Materialise ZeRO-3 partitioned parameters for reading (a no-op for ordinary tensors).

    Collective under ZeRO-3: every rank must enter it for the same parameters.
    """
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


__all__ = ["gathered"]
