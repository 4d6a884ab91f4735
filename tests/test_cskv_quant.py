"""CSKV quantization: packing, round-trip bounds, and the bytes the bi-branch cache really holds."""

import math

import pytest
import torch

from swiftkv_train.cache_stats import cache_nbytes
from swiftkv_train.methods.cskv.remote_code.cache_llama_cskv import CSKVCacheLayer
from swiftkv_train.models.tiny import random_model
from swiftkv_train.remote_code.quant_llama_cskv import (
    dequantize_key_blocks,
    dequantize_values,
    fake_quant_keys,
    pack_codes,
    packed_size,
    quantize_key_blocks,
    quantize_values,
    unpack_codes,
)
from swiftkv_train.methods.cskv import CSKV


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 16, 33])
def test_pack_unpack_is_exact_and_dense(bits, n):
    gen = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 2**bits, (3, 5, n), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, math.ceil(n * bits / 8)) and packed_size(n, bits) == packed.shape[-1]
    assert torch.equal(unpack_codes(packed, bits, n), codes)
    if bits == 4 and n == 16:  # the layout itself: low nibble first
        manual = (codes[..., 0::2].int() | (codes[..., 1::2].int() << 4)).to(torch.uint8)
        assert torch.equal(packed, manual)


def _group_bound(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Per-element bound scale/2 with scale = (max - min) / (2**bits - 1) of the element's group (last dim)."""
    n = x.shape[-1]
    bound = torch.empty_like(x)
    for start in range(0, n, group):
        chunk = x[..., start : start + group]
        scale = (chunk.amax(-1, keepdim=True) - chunk.amin(-1, keepdim=True)) / (2**bits - 1)
        bound[..., start : start + group] = scale / 2
    return bound


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_value_round_trip_within_half_a_step(bits):
    gen = torch.Generator().manual_seed(bits)
    rank, group = 21, 8  # ragged last group (21 = 8 + 8 + 5)
    x = torch.randn(2, 9, rank, generator=gen) * torch.linspace(0.1, 5.0, rank)
    x[0, 0] = 1.25  # a constant token: scale 0 must give back the value exactly
    packed, scale, minimum = quantize_values(x, bits, group)
    assert packed.shape == (2, 9, math.ceil(rank * bits / 8)) and scale.shape == (2, 9, 3)
    back = dequantize_values(packed, scale, minimum, bits, group, rank)
    err = (back - x).abs()
    assert torch.all(err <= _group_bound(x, bits, group) * (1 + 1e-5) + 1e-6)
    assert torch.equal(back[0, 0], x[0, 0])
    # Round-to-nearest uses the whole range: the error is not trivially small.
    assert err.max() > 0.2 * _group_bound(x, bits, group).max()


@pytest.mark.parametrize("bits", [2, 4])
def test_key_blocks_round_trip_per_channel(bits):
    gen = torch.Generator().manual_seed(10 + bits)
    block, rank = 8, 6
    x = torch.randn(2, 3 * block, rank, generator=gen) * torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 0.5])
    packed, scale, minimum = quantize_key_blocks(x, bits, block)
    assert packed.shape == (2, 3, rank, block * bits // 8) and scale.shape == (2, 3, rank)
    back = dequantize_key_blocks(packed, scale, minimum, bits, block)
    # The bound per channel over each block of tokens (channel-major view).
    blocks = x.view(2, 3, block, rank).transpose(-1, -2)
    bound = _group_bound(blocks, bits, block).transpose(-1, -2).reshape_as(x)
    assert torch.all((back - x).abs() <= bound * (1 + 1e-5) + 1e-7)
    # Per channel means a small channel keeps a small error (per-token groups would mix it with the 10x channel).
    assert (back - x)[..., 0].abs().max() < 0.01
    # fake_quant_keys quantizes whole blocks only; the partial tail is untouched.
    tail = torch.randn(2, 3 * block + 5, rank, generator=gen)
    fq = fake_quant_keys(tail, bits, block)
    assert torch.equal(fq[:, 3 * block :], tail[:, 3 * block :])
    assert not torch.equal(fq[:, : 3 * block], tail[:, : 3 * block])


# ---- bytes held by the bi-branch cache ----------------------------------------------------------------------------
def expected_layer_bytes(tokens, window, rank_k, rank_v, kv_dim, bits, group, elem, batch):
    """Bytes of one CSKVCacheLayer after ``tokens`` tokens (everything counted, see the cache module docstring).

    - window: min(tokens, W) tokens of K and V (kv_dim each) + their compressed features (r_k + r_v), dtype bytes;
    - compressed tokens T = tokens - W: unquantized r_k + r_v features each; or, quantized: values per token
      ceil(r_v*bits/8) code bytes + scale and minimum per group of G channels; keys per block of G tokens
      r_k*ceil(G*bits/8) code bytes + scale and minimum per channel, the partial block as unquantized features;
    - first_position: one int64 per row.
    """
    in_window = min(tokens, window)
    compressed = tokens - in_window
    total = in_window * (2 * kv_dim + rank_k + rank_v) * elem
    if bits is None:
        total += compressed * (rank_k + rank_v) * elem
    else:
        blocks, residual = divmod(compressed, group)
        total += compressed * (math.ceil(rank_v * bits / 8) + 2 * math.ceil(rank_v / group) * elem)
        total += blocks * (rank_k * math.ceil(group * bits / 8) + 2 * rank_k * elem)
        total += residual * rank_k * elem
    return batch * (total + 8)


@pytest.fixture(scope="module")
def wide_model():
    # kv_dim = 2 KV heads x head_dim 80 = 160, so density 0.2 is exactly rank 32 = one group of 32.
    model = random_model("tiny", head_dim=80, dtype=torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    return model


@pytest.mark.parametrize(
    "bits, claimed_codes_ratio, expected_total_ratio",
    [(None, 0.2, 0.2), (4, 0.05, 0.0625)],  # "80%" and "95%" settings
)
def test_cache_bytes_per_token_match_the_claim(wide_model, bits, claimed_codes_ratio, expected_total_ratio):
    window, group, batch = 32, 32, 2
    t = CSKV(dict(key_density=0.2, value_density=0.2, window=window, quant_bits=bits,
                                quant_group_size=group, init="svd"))
    student = t.build_student(wide_model)
    config = student.config
    layers, kv_dim, elem = config.num_hidden_layers, config.cskv_kv_dim, 2  # bf16
    rank_k, rank_v = config.cskv_rank("key", 0), config.cskv_rank("value", 0)
    assert (kv_dim, rank_k, rank_v) == (160, 32, 32)

    def measured(tokens):
        ids = torch.randint(0, 256, (batch, tokens), generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            cache = student(ids, use_cache=True).past_key_values
        assert cache.get_seq_length() == tokens
        return cache_nbytes(cache)

    short, long = window + 2 * group + 5, window + 5 * group + 5  # same partial key block in both
    n_short, n_long = measured(short), measured(long)
    for tokens, n in ((short, n_short), (long, n_long)):
        assert n == layers * expected_layer_bytes(tokens, window, rank_k, rank_v, kv_dim, bits, group, elem, batch)

    full_fp16_per_token = layers * 2 * kv_dim * 2  # K and V, fp16
    per_token = (n_long - n_short) / (batch * (long - short))  # marginal bytes of one more compressed token
    assert per_token / full_fp16_per_token == pytest.approx(expected_total_ratio, rel=1e-12)
    codes_only = layers * ((rank_k + rank_v) * (bits or 16) / 8)
    assert codes_only / full_fp16_per_token == pytest.approx(claimed_codes_ratio, rel=1e-12)


def test_decoding_moves_tokens_out_of_the_window_and_frees_them():
    layer = CSKVCacheLayer(window=4, quant_bits=4, group_size=4)
    gen = torch.Generator().manual_seed(0)

    def step(n, start):
        k = torch.randn(1, 2, n, 8, generator=gen)
        layer.append(k, torch.randn(1, 2, n, 8, generator=gen), torch.randn(1, n, 3, generator=gen),
                     torch.randn(1, n, 5, generator=gen), torch.arange(start, start + n)[None])

    step(6, 10)  # prefill of 6 at positions 10..15: 2 compressed, both in the unquantized key residual
    assert layer.keys.shape[-2] == 4 and layer.num_compressed == 2 and layer.key_packed.shape[1] == 0
    for i in range(3):
        step(1, 16 + i)
    assert layer.num_compressed == 5 and layer.key_packed.shape[1] == 1 and layer.key_features.shape[1] == 1
    keys, values = layer.compressed_features()
    assert keys.shape == (1, 5, 3) and values.shape == (1, 5, 5)
    assert torch.equal(layer.compressed_positions(), torch.arange(10, 15)[None])
    for name in ("keys", "values", "window_key_features", "key_features"):  # no hidden storage of dropped tokens
        t = getattr(layer, name)
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.parametrize("bits", [2, 4])
def test_unpack_of_an_empty_block_list(bits):
    """No complete key block yet (fewer compressed tokens than the group): zero rows, not a reshape error."""
    packed = torch.zeros(2, 0, 5, packed_size(32, bits), dtype=torch.uint8)
    assert unpack_codes(packed, bits, 32).shape == (2, 0, 5, 32)
