"""The CSKV student: a ``llama_cskv`` model sharing the source's frozen weights, with per-layer K/V factors A, B
initialised by a truncated SVD of the weights (ASVD when given per-channel input scales: see calibrate.py)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...models.loading import check_llama_family, source_family
from ..build import build_sharing_weights, derived_config, finish_student
from .config import CSKVConfig
from .remote_code import CSKV_FACTOR_NAMES, REMOTE_CODE, LlamaCSKVConfig, LlamaCSKVForCausalLM


# ---- building the student -----------------------------------------------------------------------------------------
def cskv_model_config(source_config, cfg: CSKVConfig) -> LlamaCSKVConfig:
    """The CSKV config of the source's family (LlamaCSKVConfig, Qwen2CSKVConfig, Qwen3CSKVConfig) with the source's
    architecture and ``cfg``'s CSKV settings (student mode on)."""
    config_class = REMOTE_CODE.classes_for(source_family(source_config))[0]
    if getattr(source_config, "model_type", None) != config_class.model_type:
        check_llama_family(source_config, getattr(source_config, "name_or_path", "") or "model")
    layers = source_config.num_hidden_layers
    return derived_config(
        source_config, config_class,
        cskv=True,
        cskv_key_density=cfg.densities("key", layers),
        cskv_value_density=cfg.densities("value", layers),
        cskv_window=cfg.window,
        cskv_quant_bits=cfg.quant_bits,
        cskv_quant_group_size=cfg.quant_group_size,
    )


def svd_factors(weight: torch.Tensor, rank: int, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of ``weight [out, in]``: ``A [rank, in]``, ``B [out, rank]`` with ``B @ A ≈ weight``.

    With ``scale [in]`` (ASVD), the SVD is of ``weight · diag(scale)`` and A is multiplied by ``diag(1/scale)``, so the
    error is minimised where the inputs are large. Computed in float64; returned in ``weight``'s dtype.
    """
    w = weight.detach().to(torch.float64)
    if scale is not None:
        s = scale.detach().to(device=w.device, dtype=torch.float64)
        s = s.clamp_min(s.max().clamp_min(1e-30) * 1e-6)  # dead input channels must not divide by 0
        w = w * s
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    root = sigma[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root
    if scale is not None:
        a = a / s
    return a.to(weight.dtype), b.to(weight.dtype)


@torch.no_grad()
def init_factors(model: LlamaCSKVForCausalLM, input_scales: list[torch.Tensor] | None = None) -> None:
    """Set every layer's A, B from the SVD of its k/v_proj weight (ASVD when per-layer ``input_scales`` are given)."""
    for idx, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        scale = input_scales[idx] if input_scales is not None else None
        for kind in ("k", "v"):
            down, up = getattr(attn, f"{kind}_proj_a"), getattr(attn, f"{kind}_proj_b")
            a, b = svd_factors(getattr(attn, f"{kind}_proj").weight, down.out_features, scale)
            down.weight.copy_(a)
            up.weight.copy_(b)


@torch.no_grad()
def to_cskv(model: nn.Module, cfg: CSKVConfig) -> LlamaCSKVForCausalLM:
    """A new CSKV student built from a Llama-family ``model`` (which stays usable and unchanged).

    The student shares ``model``'s frozen tensors and adds trainable factors, SVD-initialised from the weights.
    """
    config = cskv_model_config(model.config, cfg)
    reference = model.model.layers[0].self_attn.k_proj.weight
    # a CSKV source's own factors are not taken: they are re-initialised from the weights
    new = build_sharing_weights(model, config, REMOTE_CODE.classes_for(source_family(config))[2],
                                skip=lambda key: key.rsplit(".", 2)[-2] in CSKV_FACTOR_NAMES)
    for layer in new.model.layers:
        attn = layer.self_attn
        for name in CSKV_FACTOR_NAMES:
            module = getattr(attn, name)
            module.weight = nn.Parameter(
                torch.empty(module.weight.shape, dtype=reference.dtype, device=reference.device), requires_grad=True
            )
    init_factors(new)
    return finish_student(new, model, "to_cskv")


@contextlib.contextmanager
def cskv_mode(model: LlamaCSKVForCausalLM, enabled: bool):
    """Temporarily run ``model`` as the student (True) or the teacher (False)."""
    previous = model.config.cskv
    model.cskv(enabled)
    try:
        yield model
    finally:
        model.cskv(previous)


def cskv_parameters(model: LlamaCSKVForCausalLM) -> list[tuple[str, nn.Parameter]]:
    """The factors CSKV adds and trains."""
    return [(n, p) for n, p in model.cskv_parameters() if p.requires_grad]
