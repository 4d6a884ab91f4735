"""`attn_implementation="varlen"`: packed documents attend only inside themselves, as transformers' own SDPA does.

CPU runs the masked fallback (the semantics); the GPU test compares the flash varlen path with it, forward and
backward.
"""

import pytest
import torch

from swiftkv_train.models import load_pretrained
from swiftkv_train.models.varlen_attention import (
    document_boundaries,
    document_mask,
    generation_mask,
    register_varlen_attention,
    varlen_attention_forward,
)


def _packed_positions(lengths, device="cpu"):
    return torch.cat([torch.arange(n, device=device) for n in lengths])[None]


def test_document_boundaries_and_mask():
    pos = _packed_positions([3, 2, 4])
    assert document_boundaries(pos).tolist() == [[True, False, False, True, False, True, False, False, False]]
    mask = document_mask(pos)[0, 0]
    # token 4 (second doc, index 1) sees tokens 3 and 4 only
    assert mask[4].nonzero().squeeze(-1).tolist() == [3, 4]
    assert mask[8].nonzero().squeeze(-1).tolist() == [5, 6, 7, 8]
    assert not mask[2, 3] and mask.tril().equal(mask)


def _per_document_reference(q, k, v, lengths, scale):
    """Each document on its own with causal SDPA, then concatenated: the independent reference."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True, scale=scale))
        start += n
    return torch.cat(outs, 2).transpose(1, 2)


class _Module(torch.nn.Module):
    pass


@pytest.mark.parametrize("lengths", [[5, 1, 7], [13], [2, 2, 2, 2]])
def test_masked_path_equals_per_document_attention(lengths):
    torch.manual_seed(0)
    s = sum(lengths)
    q, k, v = torch.randn(1, 4, s, 8), torch.randn(1, 2, s, 8), torch.randn(1, 2, s, 8)
    out, _ = varlen_attention_forward(_Module().eval(), q, k, v, None, scaling=0.3,
                                      position_ids=_packed_positions(lengths))
    torch.testing.assert_close(out, _per_document_reference(q, k, v, lengths, 0.3), rtol=1e-5, atol=1e-6)


def test_model_with_varlen_matches_transformers_sdpa_on_packed_rows():
    """transformers' SDPA detects packed position ids (without a cache) and builds the block-diagonal mask."""
    torch.manual_seed(0)
    model, _ = load_pretrained("random:tiny", dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 18))
    pos = _packed_positions([7, 5, 6]).expand(2, -1)
    ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    model.set_attn_implementation(register_varlen_attention())
    got = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # and it differs from attending across documents (the test can fail)
    plain = model(input_ids=ids, use_cache=False).logits
    assert (plain[:, 7:] - got[:, 7:]).abs().max() > 1e-3


def test_load_pretrained_accepts_varlen():
    model, _ = load_pretrained("random:tiny", dtype=torch.float32, attn_implementation="varlen")
    assert model.config._attn_implementation == "varlen"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths,heads,kv_heads,dim", [([300, 1, 1747], 8, 2, 128), ([64] * 8, 9, 3, 64),
                                                        ([8192], 32, 8, 128)])
def test_gpu_flash_varlen_matches_masked(dtype, lengths, heads, kv_heads, dim):
    from swiftkv_train.models.varlen_attention import _varlen_kernel

    if _varlen_kernel() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    torch.manual_seed(0)
    s = sum(lengths)
    pos = _packed_positions(lengths, "cuda").expand(2, -1)
    q = torch.randn(2, heads, s, dim, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, kv_heads, s, dim, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, kv_heads, s, dim, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(2, s, heads, dim, device="cuda", dtype=dtype)
    module = _Module().eval()
    out, _ = varlen_attention_forward(module, q, k, v, None, scaling=dim**-0.5, position_ids=pos)
    got = torch.autograd.grad(out, (q, k, v), grad)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = _per_document_reference(qr[:1], kr[:1], vr[:1], lengths, dim**-0.5)
    ref = torch.cat([ref, _per_document_reference(qr[1:], kr[1:], vr[1:], lengths, dim**-0.5)])
    want = torch.autograd.grad(ref, (qr, kr, vr), grad.float())
    tol = 2e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, rtol=tol, atol=tol * max(1.0, w.abs().max().item()))


def test_generation_with_varlen_equals_sdpa_including_left_padding():
    """A model trained with varlen generates as with SDPA (a KV cache in front: causal + padding, no documents)."""
    torch.manual_seed(0)
    model, _ = load_pretrained("random:tiny", dtype=torch.float32)
    ids = torch.randint(1, model.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on the second row
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kwargs)
    model.set_attn_implementation(register_varlen_attention())
    got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        logits_sdpa = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("varlen")
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[0], logits_sdpa[0], rtol=1e-5, atol=1e-5)


def test_generation_mask():
    assert generation_mask(1, 9, None, "cpu") is None
    mask = generation_mask(3, 5, None, "cpu")[0, 0]
    assert mask.tolist() == [[True, True, True, False, False], [True, True, True, True, False], [True] * 5]
    padded = generation_mask(1, 4, torch.tensor([[0, 1, 1, 1]]), "cpu")[0, 0]
    assert padded.tolist() == [[False, True, True, True]]
