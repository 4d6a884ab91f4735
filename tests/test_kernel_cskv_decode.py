"""CSKV decode kernel (issue 7 part 3): attention straight from the compressed cache, no materialised K/V.

- CPU (always): the torch reference against an independent per-token computation that decodes the cache's raw bytes
  itself, and against the model's own (materialising) decode path during generation; the mask split, input checks
  and the CPU dispatch; a Triton-interpreter subprocess (the kernel against the reference on small ragged shapes, fp32
  and bf16, NaN-poisoned partial buffers, and a tiny model generating with ``use_kernels`` on and off); an
  ahead-of-time sm_90 compile of the kernel.
- GPU (``-m gpu``): the Triton path against the reference and an fp64 truth over Llama-3.1-8B / SmolLM2 shapes up to
  32K compressed tokens, 2/4-bit and unquantized, bf16 and fp32; a tiny model generating with ``use_kernels`` on/off.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from helpers import alias_kernels_package, compile_sm90, run_interpreter_script

alias_kernels_package()

from swiftkv_kernels import cskv_decode  # noqa: E402
from swiftkv_kernels.cskv_decode import cskv_decode_attention, cskv_decode_reference  # noqa: E402
from swiftkv_train.methods.cskv.remote_code import LlamaCSKVConfig, LlamaCSKVForCausalLM  # noqa: E402
from swiftkv_train.methods.cskv.remote_code import modeling_llama_cskv as modeling  # noqa: E402
from swiftkv_train.methods.cskv.remote_code.cache_llama_cskv import CSKVCacheLayer  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None


# ---------------------------------------------------------------------------------------------------- helpers


def _filled_layer(batch, kv_heads, head_dim, rank_k, rank_v, window, compressed, bits, group, dtype, device="cpu",
                  last_step=1, seed=0):
    """A CSKVCacheLayer holding ``compressed`` compressed tokens and a full window, filled as generation fills it
    (a prefill, then a step of ``last_step`` tokens); rows start at different positions. Also returns every token's
    original features (the compressed ones first)."""
    gen = torch.Generator().manual_seed(seed)
    layer = CSKVCacheLayer(window, bits, group)
    total = compressed + window
    kf = torch.randn(batch, total, rank_k, generator=gen)
    vf = torch.randn(batch, total, rank_v, generator=gen)
    offsets = torch.arange(batch)[:, None] * 7 + 3
    start = 0
    for n in (total - last_step, last_step):
        if n == 0:
            continue
        k = torch.randn(batch, kv_heads, n, head_dim, generator=gen)
        v = torch.randn(batch, kv_heads, n, head_dim, generator=gen)
        cast = dict(device=device, dtype=dtype)
        new = slice(start, start + n)
        layer.append(k.to(**cast), v.to(**cast), kf[:, new].to(**cast), vf[:, new].to(**cast),
                     (torch.arange(start, start + n)[None] + offsets).to(device))
        start += n
    assert layer.num_compressed == compressed and layer.keys.shape[-2] == window
    return layer, kf.to(dtype), vf.to(dtype)


def _factors(kv_heads, head_dim, rank_k, rank_v, dtype, device="cpu", bias=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    kv_dim = kv_heads * head_dim
    key_up = torch.randn(kv_dim, rank_k, generator=gen) / rank_k**0.5
    value_up = torch.randn(kv_dim, rank_v, generator=gen) / rank_v**0.5
    key_bias = torch.randn(kv_dim, generator=gen) * 0.3 if bias else None
    value_bias = torch.randn(kv_dim, generator=gen) * 0.3 if bias else None
    cast = lambda t: t.to(device=device, dtype=dtype) if t is not None else None  # noqa: E731
    return cast(key_up), cast(value_up), cast(key_bias), cast(value_bias)


def _inv_freq(head_dim, device="cpu", theta=10000.0):
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)


def _cache_kwargs(layer):
    """The compressed branch of ``layer`` as keyword arguments of `cskv_decode_attention`."""
    names = ("key_features", "value_features", "key_packed", "key_scale", "key_min", "value_packed", "value_scale",
             "value_min")
    return dict({n: getattr(layer, n) for n in names}, quant_bits=layer.quant_bits, group_size=layer.group_size)


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _features_from_bytes(layer, rank_k, rank_v):
    """Compressed key/value features [B, T, r] (fp64) read from the cache's tensors element by element, following
    the layout as documented (not the cache's own unpacking code)."""
    if layer.quant_bits is None:
        return layer.key_features.double(), layer.value_features.double()
    bits, group = layer.quant_bits, layer.group_size
    per_byte, levels = 8 // bits, (1 << bits) - 1
    batch, tokens = layer.value_packed.shape[:2]
    blocks = layer.key_packed.shape[1]
    keys = torch.empty(batch, tokens, rank_k, dtype=torch.float64)
    key_packed = layer.key_packed.long()
    for t in range(blocks * group):
        block, slot = divmod(t, group)
        code = (key_packed[:, block, :, slot // per_byte] >> (slot % per_byte) * bits) & levels  # [B, r_k]
        keys[:, t] = code * layer.key_scale[:, block].double() + layer.key_min[:, block].double()
    keys[:, blocks * group :] = layer.key_features.double()
    values = torch.empty(batch, tokens, rank_v, dtype=torch.float64)
    value_packed = layer.value_packed.long()
    for i in range(rank_v):
        code = (value_packed[:, :, i // per_byte] >> (i % per_byte) * bits) & levels  # [B, T]
        scale, minimum = layer.value_scale[:, :, i // group], layer.value_min[:, :, i // group]
        values[:, :, i] = code * scale.double() + minimum.double()
    return keys, values


def _independent_attention(query, layer, key_up, value_up, key_bias, value_bias, inv_freq, attention_scaling, scaling,
                           compressed_mask=None):
    """Plain fp64 loops: every (row, query head, query) attends to RoPE(B_k c + b_k) of the compressed tokens at their
    positions, then to the causal window; ``compressed_mask`` [B, S, T] (True = attend). Returns [B, S, H_q, D]."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, window = layer.keys.shape[1], layer.keys.shape[2]
    groups, half, tokens = q_heads // kv_heads, head_dim // 2, layer.num_compressed
    key_c, value_c = _features_from_bytes(layer, key_up.shape[1], value_up.shape[1])
    out = torch.zeros(batch, q_len, q_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        positions = layer.first_position[b] + torch.arange(tokens)
        angle = positions.float()[:, None] * inv_freq.float()[None, :]  # fp32 angles, as the rotary embedding
        cos, sin = angle.double().cos() * attention_scaling, angle.double().sin() * attention_scaling
        for h in range(kv_heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            k = key_c[b] @ key_up[rows].double().T
            v = value_c[b] @ value_up[rows].double().T
            if key_bias is not None:
                k, v = k + key_bias[rows].double(), v + value_bias[rows].double()
            k1, k2 = k[:, :half], k[:, half:]
            k = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
            keys = torch.cat([k, layer.keys[b, h].double()])
            values = torch.cat([v, layer.values[b, h].double()])
            for g in range(groups):
                for s in range(q_len):
                    seen_c = compressed_mask[b, s] if compressed_mask is not None else torch.ones(tokens, dtype=bool)
                    seen_w = torch.arange(window) <= window - q_len + s
                    scores = keys @ query[b, h * groups + g, s].double() * scaling
                    scores[~torch.cat([seen_c, seen_w])] = -math.inf
                    out[b, s, h * groups + g] = scores.softmax(-1) @ values
    return out


def _tiny_cskv_model(bits, bias=True, window=5, seed=0):
    """A random 2-layer CSKV Llama: GQA 6:2, head_dim 16, ranks 10 and 13 (not powers of two), biases optional;
    weights large enough that attention is far from uniform."""
    config = LlamaCSKVConfig(vocab_size=320, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=6, num_key_value_heads=2, attention_bias=bias, cskv=True,
                             cskv_key_density=0.3, cskv_value_density=0.4, cskv_window=window, cskv_quant_bits=bits,
                             cskv_quant_group_size=4, pad_token_id=256)
    torch.manual_seed(seed)
    model = LlamaCSKVForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
    model.generation_config.eos_token_id = None
    return model


def _left_padded_prompts(batch=2, width=12, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, width), generator=gen)
    mask = torch.ones(batch, width, dtype=torch.long)
    mask[0, :4] = 0  # row 0: 4 padding tokens on the left
    ids[mask == 0] = 256
    return ids, mask


# ------------------------------------------------------------------------------- CPU: reference and dispatch

# batch, q heads, kv heads, head_dim, r_k, r_v, window, compressed T, new tokens S, mask form, bias
REFERENCE_CASES = [
    (2, 6, 2, 16, 10, 13, 5, 23, 1, None, True),  # GQA 3, T = 5 blocks of 4 + a residual of 3, bias
    (2, 4, 4, 12, 7, 9, 6, 30, 3, "bst", False),  # MHA, head_dim 12 (half 6), 3 queries, per-query mask
    (1, 8, 2, 16, 5, 5, 4, 3, 2, "bt", True),  # T < G: only the residual partial block; [B, T] mask
]


@pytest.mark.parametrize("bits", [None, 2, 4])
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: "x".join(map(str, c)))
def test_reference_matches_independent_attention(case, bits):
    batch, q_heads, kv_heads, head_dim, rank_k, rank_v, window, tokens, q_len, mask_form, bias = case
    layer, key_feats, value_feats = _filled_layer(batch, kv_heads, head_dim, rank_k, rank_v, window, tokens, bits, 4,
                                                  torch.float32, last_step=q_len)
    if bits is not None:  # the layout read byte by byte really is the cache's: dequantized ~ the original features
        key_c, value_c = _features_from_bytes(layer, rank_k, rank_v)
        levels = (1 << bits) - 1
        key_err = (key_c - key_feats[:, :tokens].double()).abs().amax()
        value_err = (value_c - value_feats[:, :tokens].double()).abs().amax()
        spread = max(key_feats.abs().max(), value_feats.abs().max()).item() * 2
        assert key_err <= spread / levels / 2 + 1e-5 and value_err <= spread / levels / 2 + 1e-5
    key_up, value_up, key_bias, value_bias = _factors(kv_heads, head_dim, rank_k, rank_v, torch.float32, bias=bias)
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(batch, q_heads, q_len, head_dim, generator=gen) * 1.5
    full_mask = torch.rand(batch, q_len, tokens, generator=gen) > 0.3
    compressed_mask = {None: None, "bst": full_mask, "bt": full_mask[:, 0]}[mask_form]
    inv_freq, scaling = _inv_freq(head_dim), head_dim**-0.5
    args = (query, layer.keys, layer.values, key_up, value_up, inv_freq, layer.first_position, scaling)
    kwargs = dict(_cache_kwargs(layer), key_bias=key_bias, value_bias=value_bias, compressed_mask=compressed_mask,
                  attention_scaling=1.1)

    ref = cskv_decode_reference(*args, **kwargs)
    mask_rows = {None: None, "bst": full_mask, "bt": full_mask[:, :1].expand_as(full_mask)}[mask_form]
    expected = _independent_attention(query, layer, key_up, value_up, key_bias, value_bias, inv_freq, 1.1, scaling,
                                       mask_rows)
    assert ref.shape == (batch, q_len, q_heads, head_dim) and ref.dtype == torch.float32
    torch.testing.assert_close(ref.double(), expected, rtol=1e-5, atol=2e-6)
    # the CPU dispatch (no interpreter) is the reference itself
    assert torch.equal(cskv_decode_attention(*args, **kwargs), ref)
    # not vacuous: the compressed tokens change the result
    hidden = dict(kwargs, compressed_mask=torch.zeros(batch, tokens, dtype=torch.bool))
    assert (cskv_decode_reference(*args, **hidden) - ref).abs().max() > 1e-2


def test_reference_without_compressed_tokens_and_with_empty_rows():
    """T = 0 is plain window attention; a query allowed no key at all gets 0, not NaN."""
    layer, _, _ = _filled_layer(1, 2, 8, 4, 4, 4, 0, None, 4, torch.float32, last_step=2)
    key_up, value_up, _, _ = _factors(2, 8, 4, 4, torch.float32)
    query = torch.randn(1, 4, 2, 8)
    args = (query, layer.keys, layer.values, key_up, value_up, _inv_freq(8), layer.first_position, 0.3)
    out = cskv_decode_reference(*args, **_cache_kwargs(layer))
    keys, values = layer.keys.repeat_interleave(2, 1), layer.values.repeat_interleave(2, 1)
    causal = torch.tensor([[True, True, True, False], [True, True, True, True]])
    want = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=causal, scale=0.3)
    torch.testing.assert_close(out, want.transpose(1, 2))
    window_mask = torch.tensor([[[False] * 4, [True, False, True, True]]])
    out = cskv_decode_reference(*args, **_cache_kwargs(layer), window_mask=window_mask)
    assert (out[0, 0] == 0).all() and out[0, 1].abs().sum() > 0


def test_inputs_are_checked():
    layer, _, _ = _filled_layer(1, 2, 8, 4, 6, 4, 9, 4, 4, torch.float32)
    key_up, value_up, _, _ = _factors(2, 8, 4, 6, torch.float32)
    query = torch.randn(1, 4, 1, 8)
    args = (query, layer.keys, layer.values, key_up, value_up, _inv_freq(8), layer.first_position, 0.3)
    kwargs = _cache_kwargs(layer)
    cskv_decode_attention(*args, **kwargs)  # valid
    with pytest.raises(ValueError, match="last tokens of the 4-token window"):
        cskv_decode_attention(torch.randn(1, 4, 5, 8), *args[1:], **kwargs)
    with pytest.raises(ValueError, match="value_scale"):
        cskv_decode_attention(*args, **dict(kwargs, value_scale=layer.value_scale[..., :0]))
    with pytest.raises(ValueError, match="key_features"):  # the residual must be the part after the key blocks
        cskv_decode_attention(*args, **dict(kwargs, key_features=torch.zeros(1, 3, 4)))
    with pytest.raises(ValueError, match="share one dtype"):
        cskv_decode_attention(*args[:3], key_up.double(), *args[4:], **kwargs)
    with pytest.raises(ValueError, match="quant_bits"):
        cskv_decode_attention(*args, **dict(kwargs, quant_bits=3))


def test_decode_key_masks_split_the_models_mask():
    gen = torch.Generator().manual_seed(0)
    allowed = torch.rand(2, 1, 3, 9, generator=gen) > 0.4  # sdpa: bool, True = attend
    compressed, window = modeling.decode_key_masks(allowed, 3, 5, 4)
    assert torch.equal(compressed, allowed[:, 0, :, :5]) and torch.equal(window, allowed[:, 0, :, 5:])
    additive = torch.zeros(2, 1, 3, 9).masked_fill(~allowed, torch.finfo(torch.float32).min)  # eager: 0 = attend
    compressed2, window2 = modeling.decode_key_masks(additive, 3, 5, 4)
    assert torch.equal(compressed2, compressed) and torch.equal(window2, window)
    keep = torch.ones(2, 9, dtype=torch.long)
    keep[0, :2] = 0  # 2-D padding mask: the window's causality is added
    compressed3, window3 = modeling.decode_key_masks(keep, 3, 5, 4)
    assert torch.equal(compressed3, keep[:, :5].bool())
    causal = torch.tensor([[True, True, False, False], [True, True, True, False], [True, True, True, True]])
    assert torch.equal(window3, causal.expand(2, 3, 4))
    assert modeling.decode_key_masks(None, 1, 5, 4) == (None, None)
    assert modeling.decode_key_masks(allowed.expand(2, 2, 3, 9), 3, 5, 4) is None  # per-head masks: torch path
    assert modeling.decode_key_masks(allowed[..., :8], 3, 5, 4) is None


@pytest.mark.parametrize("bits", [None, 4, 2])
def test_reference_in_the_model_equals_the_materialising_path(bits, monkeypatch):
    """Generation (left padding, GQA, bias) with the reference plugged in where the kernel goes gives the logits of
    the model's materialising path; a 3-token step goes through it too, a step longer than the window does not."""
    model = _tiny_cskv_model(bits)
    calls = []

    def reference(*args, **kwargs):
        calls.append(args[0].shape[-2])
        return cskv_decode_reference(*args, **kwargs)

    monkeypatch.setattr(modeling, "cskv_decode_attention", reference)
    monkeypatch.setattr(modeling, "kernel_available", lambda x: True)
    ids, mask = _left_padded_prompts()
    outs = {}
    for use_kernels in (False, True):
        model.config.use_kernels = use_kernels
        outs[use_kernels] = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False,
                                           output_logits=True, return_dict_in_generate=True)
    assert calls == [1] * 8 * 2  # 8 decode steps x 2 layers, all through the plugged-in function
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    torch.testing.assert_close(torch.stack(outs[True].logits), torch.stack(outs[False].logits), rtol=1e-5, atol=1e-5)

    seq, full_mask = outs[False].sequences, torch.cat([mask, torch.ones(2, 9, dtype=torch.long)], dim=1)
    for step, through_kernel in ((3, True), (7, False)):  # window = 5
        logits = {}
        for use_kernels in (False, True):
            model.config.use_kernels = use_kernels
            calls.clear()
            with torch.no_grad():
                cache = model(seq[:, :12], attention_mask=full_mask[:, :12]).past_key_values
                logits[use_kernels] = model(seq[:, 12 : 12 + step], attention_mask=full_mask[:, : 12 + step],
                                            past_key_values=cache).logits
        assert calls == ([step] * 2 if through_kernel else [])
        torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_prompt_shorter_than_the_window_generates():
    """Decode steps before any token is compressed attend to the window alone (they used to fail on the empty
    compressed branch): while everything fits in the window, the student is the original model."""
    model = _tiny_cskv_model(None)
    ids = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(5))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        teacher = model.cskv(False)(out.sequences).logits[0]
    model.cskv(True)
    cached = torch.stack(out.logits, 1)[0]  # logits at positions 2 .. 7
    torch.testing.assert_close(cached[:3], teacher[2:5], rtol=1e-5, atol=1e-5)  # <= 5 tokens: all in the window
    assert (cached[4:] - teacher[6:8]).abs().max() > 1e-3  # later, compressed tokens differ from the original


def test_model_keeps_the_torch_path_without_kernels_or_with_gradients(monkeypatch):
    model = _tiny_cskv_model(4)
    calls = []
    monkeypatch.setattr(modeling, "cskv_decode_attention",
                        lambda *a, **k: calls.append(1) or cskv_decode_reference(*a, **k))
    ids, mask = _left_padded_prompts()
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)  # CPU without the interpreter
    assert calls == []
    monkeypatch.setattr(modeling, "kernel_available", lambda x: True)
    model.config.use_kernels = False
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert calls == []
    model.config.use_kernels = True
    cache = model(ids, attention_mask=mask).past_key_values  # grad enabled and trainable factors: torch path
    model(ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1), past_key_values=cache).logits.sum().backward()
    assert calls == [] and model.model.layers[0].self_attn.k_proj_b.weight.grad is not None


# ------------------------------------------------------------------------------------ CPU: Triton interpreter

_INTERPRETER_SCRIPT = r"""
import math
sys.path.insert(0, "tests")
from swiftkv_kernels import cskv_decode as cd
from test_kernel_cskv_decode import (_cache_kwargs, _factors, _filled_layer, _inv_freq, _left_padded_prompts,
                                     _tiny_cskv_model)
from swiftkv_train.methods.cskv.remote_code import modeling_llama_cskv as modeling
assert cd.kernel_available(torch.zeros(1)) and cd.kernel_available(torch.zeros(1, dtype=torch.bfloat16))

def as64(kwargs):
    return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}

# batch, q heads, kv heads, head_dim, r_k, r_v, window, T, S, bits, G, mask, bias, tokens per split (None: default)
CASES = [
    (2, 6, 2, 12, 13, 21, 5, 150, 1, 4, 8, "bt", True, 64),  # 3 splits (ragged last), [B, T] mask, D/2 = 6
    (1, 4, 4, 16, 20, 9, 6, 70, 3, 2, 32, "bst", False, 64),  # MHA, 3 queries, 2-bit, 2 blocks + residual of 6
    (2, 9, 3, 8, 6, 5, 4, 37, 4, None, 4, None, True, 64),  # SmolLM2-like GQA 3, unquantized, 12 query rows
    (1, 2, 1, 16, 17, 40, 4, 5, 1, 8, 8, "empty", True, 64),  # T < G (residual only), r_v 40; row sees no T
    (2, 4, 2, 16, 9, 9, 4, 0, 2, 4, 4, None, False, None),  # no compressed token yet: the window alone
]
for dtype in (torch.float32, torch.bfloat16):
    for B, HQ, HKV, D, RK, RV, W, T, S, bits, G, mask_form, bias, tps in CASES:
        layer, _, _ = _filled_layer(B, HKV, D, RK, RV, W, T, bits, G, dtype, last_step=S)
        key_up, value_up, key_bias, value_bias = _factors(HKV, D, RK, RV, dtype, bias=bias)
        query = (torch.randn(B, HQ, S, D) * 1.5).to(dtype)
        mask = torch.rand(B, S, T) > 0.3
        mask = {None: None, "bt": mask[:, 0], "bst": mask, "empty": torch.zeros(B, T, dtype=torch.bool)}[mask_form]
        args = (query, layer.keys, layer.values, key_up, value_up, _inv_freq(D), layer.first_position, D ** -0.5)
        kwargs = dict(_cache_kwargs(layer), key_bias=key_bias, value_bias=value_bias, compressed_mask=mask,
                      attention_scaling=1.1)
        ref = cd.cskv_decode_reference(*args, **kwargs)
        truth = cd.cskv_decode_reference(*(a.double() if a.is_floating_point() else a for a in args[:-1]), args[-1],
                                         **as64(kwargs))
        if tps is None:
            got = cd.cskv_decode_attention(*args, **kwargs)
        else:  # the partial buffers poisoned: every element must be written
            comp = cd._compressed_layout(B, RK, RV, bits, G, *(kwargs[k] for k in (
                "key_features", "value_features", "key_packed", "key_scale", "key_min", "value_packed",
                "value_scale", "value_min")))
            splits, rows = -(-T // tps), HQ // HKV * S
            work = (torch.full((B, HKV, splits, rows), math.nan), torch.full((B, HKV, splits, rows), math.nan),
                    torch.full((B, HKV, splits, rows, RV), math.nan))
            got = cd._cskv_decode_triton(*args, comp, key_bias, value_bias, cd._mask_rows(mask, B, S, T, "m"), None,
                                         1.1, workspace=work, tokens_per_split=tps)
            assert not any(torch.isnan(w).any() for w in work), "unwritten partial results"
            if mask_form == "empty":
                assert torch.isinf(work[0]).all() and (work[1] == 0).all()
        assert got.shape == ref.shape and got.dtype == dtype and torch.isfinite(got).all()
        # fp32: the same maths; bf16: the kernel rounds less than the reference (and this interpreter truncates
        # to bf16 where the GPU rounds), so both are held to the fp64 truth.
        tol = 2e-5 if dtype == torch.float32 else 4e-2
        torch.testing.assert_close(got.double(), truth, rtol=tol, atol=tol)
        torch.testing.assert_close(ref.double(), truth, rtol=tol, atol=tol)
        print("case ok", dtype, B, HQ, HKV, D, RK, RV, W, T, S, bits, mask_form)

# The model: generation with use_kernels on and off (left padding, GQA 6:2, bias, 4-bit), and a 3-token step.
calls = []
kernel = modeling.cskv_decode_attention
modeling.cskv_decode_attention = lambda *a, **k: calls.append(1) or kernel(*a, **k)
model = _tiny_cskv_model(4)
ids, mask = _left_padded_prompts()
outs = {}
for flag in (True, False):
    model.config.use_kernels = flag
    outs[flag] = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
assert len(calls) == 7 * 2, calls
assert torch.equal(outs[True].sequences, outs[False].sequences)
torch.testing.assert_close(torch.stack(outs[True].logits), torch.stack(outs[False].logits), rtol=1e-4, atol=1e-4)
seq = outs[False].sequences
full_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], dim=1)
logits = {}
for flag in (True, False):
    model.config.use_kernels = flag
    with torch.no_grad():
        cache = model(seq[:, :14], attention_mask=full_mask[:, :14]).past_key_values
        logits[flag] = model(seq[:, 14:17], attention_mask=full_mask[:, :17], past_key_values=cache).logits
torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)
print("INTERPRETER_OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.timeout(120)
def test_triton_kernel_under_interpreter():
    run_interpreter_script(_INTERPRETER_SCRIPT, "INTERPRETER_OK")


# Pointer arguments of the kernel (by name) and their element types; every other argument is an i32 except the two
# float scales.
_POINTERS = {"q_ptr": "{dt}", "wk_ptr": "{dt}", "kbias_ptr": "{dt}", "inv_freq_ptr": "fp32", "pos0_ptr": "i64",
             "kf_ptr": "{dt}", "kp_ptr": "u8", "ks_ptr": "{dt}", "km_ptr": "{dt}", "vf_ptr": "{dt}", "vp_ptr": "u8",
             "vs_ptr": "{dt}", "vm_ptr": "{dt}", "mask_ptr": "u8", "m_ptr": "fp32", "l_ptr": "fp32", "acc_ptr": "fp32"}


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_triton_kernel_compiles_for_sm90(dtype):
    """Ahead-of-time compile of the decode kernel down to an sm_90 cubin (ptxas ships with triton): no GPU needed."""
    fn = cskv_decode._cskv_partials_kernel
    # (heads per KV head, query rows, head_dim, r_k, r_v, bits, bias, mask): Llama-3.1-8B at 80% reduction
    # (4-bit, 2-bit) and SmolLM2 (unquantized, 4 queries)
    for groups, rows, head_dim, rank_k, rank_v, bits, bias, mask in ((4, 4, 128, 204, 204, 4, False, True),
                                                                      (4, 4, 128, 204, 204, 2, True, False),
                                                                      (3, 12, 64, 38, 38, 0, True, True)):
        constexprs = dict(H_KV=8, N_GROUPS=groups, HALF=head_dim // 2, BITS=bits, GROUP=32, HAS_KEY_BIAS=bias,
                          HAS_MASK=mask, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST_DOT=False,
                          **cskv_decode._block_sizes(rank_k, rank_v, head_dim, rows))
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in _POINTERS:
                signature[name] = "*" + _POINTERS[name].format(dt=dtype)
            else:
                signature[name] = "fp32" if name in ("qk_scale", "rope_scale") else "i32"
        compiled = compile_sm90(fn, signature, constexprs, 4, label=(bits, head_dim))
        if dtype == "bf16":  # the three products run on tensor cores
            assert "mma.sync" in compiled.asm["ptx"] or "wgmma" in compiled.asm["ptx"]


# ------------------------------------------------------------------------------------------------- GPU tests

DEV = "cuda"  # GPU tests build their tensors here


# batch, q heads, kv heads, head_dim, r_k, r_v, compressed T, new tokens S, window, left padding, bias
GPU_SHAPES = [
    (1, 32, 8, 128, 204, 204, 32768 + 13, 1, 32, False, False),  # Llama-3.1-8B, 80% reduction, 32K ragged
    (4, 32, 8, 128, 204, 204, 4096 + 29, 4, 32, True, False),  # Llama-3.1-8B, batch 4, 4 queries, padding
    (2, 9, 3, 64, 38, 38, 1000 + 7, 1, 32, True, False),  # SmolLM2-135M at 80% reduction
    (3, 9, 3, 64, 38, 38, 8191, 4, 32, False, True),  # SmolLM2, 4 queries, bias
    (2, 6, 2, 96, 50, 70, 77, 3, 8, True, True),  # head_dim 96 (half not a power of two), r_k != r_v
    (1, 4, 4, 64, 16, 16, 5, 1, 4, False, False),  # MHA, T < G: only the residual partial block
]


def _gpu_case(shape, bits, dtype):
    batch, q_heads, kv_heads, head_dim, rank_k, rank_v, tokens, q_len, window, padding, bias = shape
    layer = CSKVCacheLayer(window, bits, 32)
    gen = torch.Generator().manual_seed(0)
    total = tokens + window
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEV, dtype)  # noqa: E731
    layer.append(rnd(batch, kv_heads, total, head_dim), rnd(batch, kv_heads, total, head_dim),
                 rnd(batch, total, rank_k), rnd(batch, total, rank_v),
                 (torch.arange(total)[None] + torch.arange(batch)[:, None] * 5).to(DEV))
    key_up, value_up, key_bias, value_bias = _factors(kv_heads, head_dim, rank_k, rank_v, dtype, DEV, bias)
    query = rnd(batch, q_heads, q_len, head_dim) * 1.5
    mask = None
    if padding:  # left padding: row b's first 3*b compressed tokens are padding
        mask = (torch.arange(tokens, device=DEV)[None, :] >= 3 * torch.arange(batch, device=DEV)[:, None])
    args = (query, layer.keys, layer.values, key_up, value_up, _inv_freq(head_dim, DEV, 500000.0),
            layer.first_position, head_dim**-0.5)
    kwargs = dict(_cache_kwargs(layer), key_bias=key_bias, value_bias=value_bias, compressed_mask=mask)
    return args, kwargs, layer


def _truth(args, kwargs):
    """The reference in fp64 on the same stored numbers (codes, scales, features, weights)."""
    up = lambda t: t.double() if torch.is_tensor(t) and t.is_floating_point() else t  # noqa: E731
    return cskv_decode_reference(*map(up, args), **{k: up(v) for k, v in kwargs.items()})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [None, 2, 4])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_decode_matches_reference(shape, bits, dtype):
    args, kwargs, _ = _gpu_case(shape, bits, dtype)
    got = cskv_decode_attention(*args, **kwargs)
    torch.cuda.synchronize()
    ref = cskv_decode_reference(*args, **kwargs)
    truth = _truth(args, kwargs)
    batch, q_heads, _, head_dim = args[0].shape
    assert got.shape == (batch, args[0].shape[2], q_heads, head_dim) and got.dtype == dtype
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.double(), truth, rtol=1e-4, atol=1e-5)
    else:  # bf16: the kernel rounds K once (the reference after B, bias and each RoPE op): no less accurate
        torch.testing.assert_close(got, ref, rtol=3e-2, atol=3e-2)
        assert _rel_err(got, truth) <= 1.5 * _rel_err(ref, truth) + 2e-3, (_rel_err(got, truth), _rel_err(ref, truth))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [None, 4])
def test_gpu_partials_poisoned_and_forced_splits(bits, dtype):
    """Every partial result is written (NaN-poisoned buffers), whatever the split of the tokens."""
    shape = (2, 32, 8, 128, 204, 204, 3000 + 5, 4, 32, True, True)
    args, kwargs, _ = _gpu_case(shape, bits, dtype)
    truth = _truth(args, kwargs)
    batch, q_heads, q_len, _ = args[0].shape
    rows, rank_v, tokens = q_heads // 8 * q_len, 204, 3005
    comp = cskv_decode._compressed_layout(batch, 204, rank_v, bits, 32, *(kwargs[k] for k in (
        "key_features", "value_features", "key_packed", "key_scale", "key_min", "value_packed", "value_scale",
        "value_min")))
    mask = cskv_decode._mask_rows(kwargs["compressed_mask"], batch, q_len, tokens, "mask")
    for tokens_per_split in (32, 96, 1024, 4096):
        splits = -(-tokens // tokens_per_split)
        work = tuple(torch.full(s, float("nan"), device=DEV) for s in ((batch, 8, splits, rows),
                                                                        (batch, 8, splits, rows),
                                                                        (batch, 8, splits, rows, rank_v)))
        got = cskv_decode._cskv_decode_triton(*args, comp, kwargs["key_bias"], kwargs["value_bias"], mask, None, 1.0,
                                              workspace=work, tokens_per_split=tokens_per_split)
        torch.cuda.synchronize()
        assert not any(torch.isnan(w).any() for w in work), tokens_per_split
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.double(), truth, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [None, 4, 2])
def test_gpu_model_generation_with_and_without_kernels(bits, dtype, monkeypatch):
    """The tiny CSKV model generates the same tokens with use_kernels on (the kernel really runs) and off."""
    calls = []
    kernel = modeling.cskv_decode_attention
    monkeypatch.setattr(modeling, "cskv_decode_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    model = _tiny_cskv_model(bits).to(DEV, dtype)
    ids, mask = _left_padded_prompts()
    outs = {}
    for use_kernels in (True, False):
        model.config.use_kernels = use_kernels
        outs[use_kernels] = model.generate(ids.to(DEV), attention_mask=mask.to(DEV), max_new_tokens=16,
                                           do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert len(calls) == 15 * 2
    on, off = outs[True], outs[False]
    logits_on, logits_off = torch.stack(on.logits).float(), torch.stack(off.logits).float()
    if dtype == torch.float32:
        assert torch.equal(on.sequences, off.sequences)
        torch.testing.assert_close(logits_on, logits_off, rtol=1e-4, atol=1e-4)
    else:  # bf16 may flip a near-tie: compare the logits up to (and including) the first differing token
        same = (on.sequences == off.sequences).all(0)[ids.shape[1] :]
        steps = int(same.long().cumprod(0).sum().item()) + 1
        assert steps >= 4, "bf16 generations diverged almost at once"
        diff = (logits_on[:steps] - logits_off[:steps]).abs().max()
        assert diff <= 0.05 * logits_off[:steps].abs().max(), diff
