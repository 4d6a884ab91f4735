"""ASVD-style activation-aware initialisation of the CSKV factors, with a safetensors cache.

The mean |x| of every layer's k/v_proj input is collected on calibration batches; the factors come from the SVD of
``W·diag(s)``, ``s = mean|x|^alpha``. Statistics and factors are cached in ``calibration_cache_dir``, keyed by a
fingerprint of the model weights, of the calibration data and of the settings.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from itertools import islice
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...errors import SwiftKVInputError
from .config import CSKVConfig
from .convert import cskv_mode, init_factors
from .remote_code import CSKV_FACTOR_NAMES, LlamaCSKVForCausalLM

log = logging.getLogger(__name__)


# ---- calibration --------------------------------------------------------------------------------------------------
def _digest_tensor(h, tensor: torch.Tensor, max_elements: int = 65536) -> None:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // max_elements)
    h.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    h.update(flat[::step].to("cpu", torch.float64).numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """Identity of the weights the calibration statistics depend on (a strided sample of every tensor, + shapes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.rsplit(".", 2)[-2] in CSKV_FACTOR_NAMES:
            continue  # the factors are the result, not an input
        h.update(name.encode())
        _digest_tensor(h, tensor)
    return h.hexdigest()[:16]


def data_fingerprint(batches: list[dict]) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "attention_mask", "position_ids"):
            if batch.get(key) is not None:
                tensor = batch[key]
                h.update(f"{key}{tuple(tensor.shape)}".encode())
                h.update(tensor.detach().to("cpu", torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def collect_input_scales(model: LlamaCSKVForCausalLM, batches: list[dict]) -> list[torch.Tensor]:
    """Mean |x| per input channel of every layer's k/v_proj (one shared input), over the non-padding tokens."""
    sums = [None] * len(model.model.layers)
    counts = [0] * len(model.model.layers)

    def hook_for(idx):
        def hook(module, args):
            x = args[0].detach()
            keep = current_mask
            x = x[keep] if keep is not None else x.reshape(-1, x.shape[-1])
            total = x.abs().to(torch.float64).sum(0)
            sums[idx] = total if sums[idx] is None else sums[idx] + total
            counts[idx] += x.shape[0]
        return hook

    handles = [layer.self_attn.k_proj.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(model.model.layers)]
    try:
        with cskv_mode(model, False):
            for batch in batches:
                current_mask = batch.get("attention_mask")
                current_mask = current_mask.bool() if current_mask is not None else None
                model.model(**model_inputs(batch), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if any(c == 0 for c in counts):
        raise SwiftKVInputError("the calibration batches hold no (non-padding) tokens.")
    return [(s / c).float().cpu() for s, c in zip(sums, counts)]


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if batch.get(k) is not None}


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def asvd_calibrate(model: LlamaCSKVForCausalLM, cfg: CSKVConfig, batches) -> dict:
    """ASVD initialisation from ``calibration_batches`` batches (``init="svd"``: the weight SVD of
    ``build_student`` stays). Results are cached when ``calibration_cache_dir`` is set. Returns what was done
    (init, cache paths, whether the factors or statistics came from the cache, the number of batches)."""
    if cfg.init == "svd":
        return {"init": "svd"}
    batches = list(islice(iter(batches), cfg.calibration_batches))
    if not batches:
        raise SwiftKVInputError("ASVD calibration got no batches: give calibration data or use init='svd'.")
    base_key = f"{model_fingerprint(model)}-{data_fingerprint(batches)}"
    ranks = [(layer.self_attn.k_proj_a.out_features, layer.self_attn.v_proj_a.out_features)
             for layer in model.model.layers]
    settings = hashlib.sha256(f"asvd|{cfg.asvd_alpha}|{ranks}".encode()).hexdigest()[:12]
    cache_dir = Path(cfg.calibration_cache_dir).expanduser() if cfg.calibration_cache_dir else None
    factors_path = cache_dir / f"cskv-factors-{base_key}-{settings}.safetensors" if cache_dir else None
    stats_path = cache_dir / f"cskv-asvd-stats-{base_key}.safetensors" if cache_dir else None
    info = {"init": "asvd", "factors_path": factors_path, "stats_path": stats_path, "factors_cached": False,
            "stats_cached": False, "batches": len(batches)}

    if factors_path is not None and factors_path.is_file():
        _load_factors(model, load_file(str(factors_path)))
        info["factors_cached"] = True
        log.info("CSKV: loaded cached ASVD factors from %s", factors_path)
        return info
    if stats_path is not None and stats_path.is_file():
        stats = load_file(str(stats_path))
        scales = [stats[f"layer{i}"] for i in range(len(model.model.layers))]
        info["stats_cached"] = True
    else:
        scales = collect_input_scales(model, batches)
        if stats_path is not None:
            _atomic_save({f"layer{i}": s for i, s in enumerate(scales)}, stats_path, {"key": base_key})
    init_factors(model, [s.pow(cfg.asvd_alpha) for s in scales])
    if factors_path is not None:
        _atomic_save({n: p for n, p in model.cskv_parameters()}, factors_path, {"key": base_key})
    return info


@torch.no_grad()
def _load_factors(model: LlamaCSKVForCausalLM, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.cskv_parameters())
    if set(tensors) != set(params):
        raise SwiftKVInputError("the cached CSKV factors do not match this model's layout; delete the cache file.")
    for name, param in params.items():
        param.copy_(tensors[name])
