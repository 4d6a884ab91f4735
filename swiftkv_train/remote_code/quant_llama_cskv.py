"""Asymmetric group-wise quantization of CSKV's compressed features, packed into uint8.

Self-contained (torch only): shipped with ``trust_remote_code`` exports.

Layout (KIVI-style, as the CSKV method prescribes):
- values, per token: each token's ``r`` features are split into groups of ``group_size`` channels (the last group may
  be shorter); each group has one scale and one minimum.
- keys, per channel: tokens are quantized in blocks of ``group_size`` tokens; inside a block each channel has one
  scale and one minimum. A partial block stays unquantized (the cache keeps it as a full-precision residual).

Codes are ``round((x - min) / scale)`` clamped to ``[0, 2**bits - 1]``, with ``scale = (max - min) / (2**bits - 1)``
and dequantization ``code * scale + min``; the round-trip error per element is at most ``scale / 2``. Scales and
minimums are stored in the dtype of the input (so 2 bytes each for fp16/bf16 features), and the codes are computed
from the stored (rounded) scale and minimum so that dequantization reproduces exactly what was coded.
"""

import torch


def codes_per_byte(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"quantization bits must be 2, 4 or 8, got {bits!r}.")
    return 8 // bits


def packed_size(num_codes: int, bits: int) -> int:
    """Bytes that hold ``num_codes`` codes of ``bits`` bits (the last byte may be partly used)."""
    per_byte = codes_per_byte(bits)
    return -(-num_codes // per_byte)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., n]`` (each < 2**bits) -> packed uint8 ``[..., ceil(n * bits / 8)]``, low bits first."""
    per_byte = codes_per_byte(bits)
    if per_byte == 1:
        return codes.to(torch.uint8).contiguous()
    n = codes.shape[-1]
    pad = (-n) % per_byte
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    grouped = codes.to(torch.int32).view(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., bytes]`` -> uint8 codes ``[..., num_codes]``."""
    per_byte = codes_per_byte(bits)
    if per_byte == 1:
        return packed[..., :num_codes]
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    # the explicit size (not -1) also works when there are no rows yet (an empty cache)
    return codes.view(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :num_codes].to(torch.uint8)


def quantize_groups(x: torch.Tensor, bits: int, group_size: int):
    """Quantize ``x [..., n]`` in groups of ``group_size`` along the last dim.

    Returns ``(codes uint8 [..., n], scale [..., g], minimum [..., g])`` with ``g = ceil(n / group_size)``; scale and
    minimum have ``x``'s dtype.
    """
    codes_per_byte(bits)
    n = x.shape[-1]
    groups = -(-n // group_size)
    xf = x.float()
    pad = groups * group_size - n
    if pad:  # repeat the last element: it leaves the last group's min and max unchanged
        xf = torch.cat([xf, xf[..., -1:].expand(*xf.shape[:-1], pad)], dim=-1)
    xg = xf.view(*xf.shape[:-1], groups, group_size)
    levels = (1 << bits) - 1
    minimum = xg.amin(-1).to(x.dtype)
    scale = ((xg.amax(-1) - minimum.float()) / levels).to(x.dtype)
    safe_scale = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = ((xg - minimum.float().unsqueeze(-1)) / safe_scale.unsqueeze(-1)).round_().clamp_(0, levels)
    codes = codes.view(*xf.shape[:-1], groups * group_size)[..., :n].to(torch.uint8)
    return codes, scale, minimum


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`quantize_groups` (up to the rounding): ``[..., n]`` in the dtype of ``scale``."""
    n = codes.shape[-1]
    groups = scale.shape[-1]
    pad = groups * group_size - n
    cf = codes.float()
    if pad:
        cf = torch.nn.functional.pad(cf, (0, pad))
    cf = cf.view(*cf.shape[:-1], groups, group_size)
    x = cf * scale.float().unsqueeze(-1) + minimum.float().unsqueeze(-1)
    return x.view(*x.shape[:-2], groups * group_size)[..., :n].to(scale.dtype)


# ---- the two cache layouts ----------------------------------------------------------------------------------------
def quantize_values(features: torch.Tensor, bits: int, group_size: int):
    """Per-token value features ``[B, T, r]`` -> ``(packed [B, T, ceil(r*bits/8)], scale [B, T, g], min [B, T, g])``."""
    codes, scale, minimum = quantize_groups(features, bits, group_size)
    return pack_codes(codes, bits), scale, minimum


def dequantize_values(packed, scale, minimum, bits: int, group_size: int, rank: int) -> torch.Tensor:
    return dequantize_groups(unpack_codes(packed, bits, rank), scale, minimum, group_size)


def quantize_key_blocks(features: torch.Tensor, bits: int, block: int):
    """Key features ``[B, n*block, r]`` -> per-channel quantized blocks.

    Returns ``(packed [B, n, r, ceil(block*bits/8)], scale [B, n, r], min [B, n, r])``: inside each block of
    ``block`` consecutive tokens every channel has its own scale and minimum.
    """
    b, t, r = features.shape
    if t % block:
        raise ValueError(f"key features hold {t} tokens, not a multiple of the block size {block}.")
    channel_major = features.view(b, t // block, block, r).transpose(-1, -2)  # [B, n, r, block]
    codes, scale, minimum = quantize_groups(channel_major, bits, block)
    return pack_codes(codes, bits), scale.squeeze(-1), minimum.squeeze(-1)


def dequantize_key_blocks(packed, scale, minimum, bits: int, block: int) -> torch.Tensor:
    """Inverse of :func:`quantize_key_blocks`: ``[B, n*block, r]``."""
    codes = unpack_codes(packed, bits, block)  # [B, n, r, block]
    x = dequantize_groups(codes, scale.unsqueeze(-1), minimum.unsqueeze(-1), block)
    b, n, r, _ = x.shape
    return x.transpose(-1, -2).reshape(b, n * block, r)


# ---- fake quantization (training with a straight-through estimator, and the no-cache simulation) ------------------
def fake_quant_values(features: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """What the cache returns for value features ``[..., T, r]`` after a quantize/dequantize round trip."""
    codes, scale, minimum = quantize_groups(features, bits, group_size)
    return dequantize_groups(codes, scale, minimum, group_size)


def fake_quant_keys(features: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Key features ``[B, T, r]`` with every complete block of ``block`` tokens (from index 0) round-tripped; the
    trailing partial block is returned unchanged (the cache keeps it unquantized)."""
    t = features.shape[1]
    full = (t // block) * block
    if full == 0:
        return features
    packed, scale, minimum = quantize_key_blocks(features[:, :full].contiguous(), bits, block)
    done = dequantize_key_blocks(packed, scale, minimum, bits, block)
    return torch.cat([done, features[:, full:]], dim=1)


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward ``quantized``, backward identity (STE): the rounding is treated as having unit gradient."""
    return x + (quantized - x).detach()


__all__ = [
    "codes_per_byte",
    "packed_size",
    "pack_codes",
    "unpack_codes",
    "quantize_groups",
    "dequantize_groups",
    "quantize_values",
    "dequantize_values",
    "quantize_key_blocks",
    "dequantize_key_blocks",
    "fake_quant_values",
    "fake_quant_keys",
    "straight_through",
]
