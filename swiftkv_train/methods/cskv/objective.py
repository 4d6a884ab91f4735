"""CSKV's training objective: layer-wise K/V reconstruction from one frozen teacher forward.

Hooks on every layer's k/v_proj reconstruct K/V from that layer's input through A, B (optionally with fake
quantization, straight-through) and add ``MSE(RoPE(K), RoPE(K̂)) + MSE(V, V̂)``; the loss is the mean over layers.
Optionally ``kl_weight`` times the KL from the teacher to the student decoding every position from the compressed
cache (``cskv_decode_from=0``).
"""


from __future__ import annotations

import functools

import torch

from ...losses import KL
from ...remote_code.quant_llama_cskv import fake_quant_keys, fake_quant_values, straight_through
from .calibrate import model_inputs
from .config import CSKVConfig
from .convert import cskv_mode
from .remote_code.modeling_llama_cskv import apply_rope, to_heads


def reconstruction_loss(model, cfg: CSKVConfig, batch: dict[str, torch.Tensor], chunk: int,
                        fused: bool = False) -> dict[str, torch.Tensor]:
    """Mean over layers of MSE(RoPE(K), RoPE(K̂)) + MSE(V, V̂) (+ kl_weight x the KL of the student decoding every
    position from the compressed cache: the ``kl`` loss component, in chunks of ``chunk`` tokens, its fused kernel
    when ``fused``), from one frozen teacher forward."""
    inputs = model_inputs(batch)
    input_ids = inputs["input_ids"]
    position_ids = inputs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
    attention_mask = inputs.get("attention_mask")
    keep = attention_mask.bool() if attention_mask is not None else None
    bits, group = model.config.cskv_quant_bits, model.config.cskv_quant_group_size
    fake_quant = cfg.fake_quant and bits is not None
    errors_k: list[torch.Tensor] = []
    errors_v: list[torch.Tensor] = []
    dummy = torch.empty(0, dtype=model.lm_head.weight.dtype, device=input_ids.device)
    cos, sin = model.model.rotary_emb(dummy, position_ids)

    def masked_mse(target, estimate):
        sq = (estimate.float() - target.float()).pow(2)  # [B, S, kv_dim]
        if keep is None:
            return sq.mean()
        return (sq * keep[..., None]).sum() / (keep.sum().clamp_min(1) * sq.shape[-1])

    def reconstruction_hook(project_a, quantize, reconstruct, target, errors):
        """A forward hook on one layer's k_proj or v_proj: the masked MSE between ``target`` of the projection's
        output (the teacher's K or V, [B, S, kv_dim]) and ``reconstruct`` ([B, H, S, D]) of the same input through
        A (fake-quantized by ``quantize``, straight-through) and B, appended to ``errors``."""
        def hook(module, args, output):
            with torch.enable_grad():
                features = project_a(args[0].detach())
                if fake_quant:
                    features = straight_through(features, quantize(features.detach(), bits, group))
                estimate = reconstruct(features)
                errors.append(masked_mse(target(output.detach()), estimate.transpose(1, 2).flatten(2)))
        return hook

    def rotated_keys(output, attn):
        """k_proj's output [B, S, kv_dim] per-head normed where the layer norms keys (Qwen3) and rotated at its
        positions, as the reconstruction is, in the same layout."""
        keys = to_heads(output, attn.head_dim, getattr(attn, "k_norm", None))
        return apply_rope(keys, cos, sin).transpose(1, 2).flatten(2)

    handles = []
    for layer in model.model.layers:
        attn = layer.self_attn
        reconstruct_key = functools.partial(attn.reconstruct_key, positions=position_ids,
                                            rotary=lambda x, p: (cos, sin))
        key_target = functools.partial(rotated_keys, attn=attn)
        handles.append(attn.k_proj.register_forward_hook(
            reconstruction_hook(attn.k_proj_a, fake_quant_keys, reconstruct_key, key_target, errors_k)))
        handles.append(attn.v_proj.register_forward_hook(
            reconstruction_hook(attn.v_proj_a, fake_quant_values, attn.reconstruct_value, lambda v: v, errors_v)))
    try:
        with torch.no_grad(), cskv_mode(model, False):
            teacher = model.model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    recon_k = torch.stack(errors_k).mean()
    recon_v = torch.stack(errors_v).mean()
    total = recon_k + recon_v
    out = {"recon_k": recon_k.detach(), "recon_v": recon_v.detach()}
    if cfg.kl_weight > 0:
        with cskv_mode(model, True):
            student_hidden = model.model(**inputs, use_cache=False, cskv_decode_from=0).last_hidden_state
        kl = KL()(
            student_hidden, teacher.last_hidden_state, model.lm_head.weight, keep,
            temperature=cfg.kl_temperature, chunk_size=chunk, fused=fused,
        )
        total = total + cfg.kl_weight * kl
        out["kl"] = kl.detach()
    out["loss"] = total
    return out


@torch.no_grad()
def teacher_and_compressed_hidden(model, batch):
    """Final normed hidden states of the teacher and of the student decoding every position from its compressed
    cache (``cskv_decode_from=0``: keys/values older than the window reconstructed, quantized as in the cache)."""
    inputs = model_inputs(batch)
    with cskv_mode(model, False):
        teacher = model.model(**inputs, use_cache=False).last_hidden_state
    with cskv_mode(model, True):
        compressed = model.model(**inputs, use_cache=False, cskv_decode_from=0).last_hidden_state
    return teacher, compressed
