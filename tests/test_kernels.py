"""Fused kernels (issue 7): SwiftKV prefill K/V (+ the layers' RMSNorm and SiLU*up) and the fused distillation loss.

- CPU (always): the torch references against independent computations (the model's own unfused path, the loss's
  definition written here), the public functions' CPU fallback, one tiny Triton-interpreter run of each kernel
  (subprocess with ``TRITON_INTERPRET=1``), an ahead-of-time sm_90 compile of every kernel (catches GPU compile
  errors here), and that the kernel files are pure ops (no import of swiftkv_train).
- GPU (``-m gpu``): each Triton path against its reference over ragged shapes, GQA ratios, g > 1, bf16 and fp32,
  with NaN-poisoned outputs; the loss's gradients too.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import alias_kernels_package, compile_sm90, run_interpreter_script

alias_kernels_package()

from swiftkv_kernels import kd_loss, swiftkv_prefill_kv  # noqa: E402
from swiftkv_kernels.kd_loss import fused_kl_loss, kl_loss_reference  # noqa: E402
from swiftkv_kernels.swiftkv_prefill_kv import fused_swiftkv_kv, swiftkv_kv_reference  # noqa: E402
from swiftkv_train.losses import KL  # noqa: E402
from swiftkv_train.methods.swiftkv.remote_code.modeling_llama_swiftkv import concat_swiftkv_kv_weights  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None


# ---------------------------------------------------------------------------------------------------- helpers


def _rope_tables(batch, seq, head_dim, offset=0, dtype=torch.float32, device="cpu", theta=10000.0):
    """Llama RoPE tables [batch, seq, D] for positions offset + b + s (distinct per sequence)."""
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    pos = torch.arange(seq, device=device)[None, :] + offset + torch.arange(batch, device=device)[:, None]
    ang = pos[..., None].float() * inv
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _kv_inputs(batch, seq, hidden, groups, kv_heads, head_dim, dtype, device, cos_batch=1, bias=False, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    h = rnd(batch, seq, hidden, scale=3.0)
    norm_w = (1.0 + 0.3 * torch.randn(hidden, generator=gen)).to(device=device, dtype=dtype)
    rows = groups * 2 * kv_heads * head_dim
    w = rnd(rows, hidden, scale=hidden**-0.5)
    b = rnd(rows, scale=0.5) if bias else None
    cos, sin = _rope_tables(cos_batch, seq, head_dim, offset=5, dtype=dtype, device=device)
    return h, norm_w, w, cos, sin, b


def _tiny_swiftkv(m=2, g=1):
    from swiftkv_train.models import load_pretrained
    from swiftkv_train.methods.swiftkv import to_swiftkv

    torch.manual_seed(0)
    base = load_pretrained("random:tiny-7l")[0]
    student = to_swiftkv(base, m, g).eval()
    with torch.no_grad():  # make the groups' K/V weights differ from the teacher's mean init
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return student


def _model_kv(student, h, position_ids):
    pe = student.model.rotary_emb(h, position_ids=position_ids)
    with torch.no_grad():
        shared = student.model.swiftkv_key_values(h, pe)
    return pe, shared


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def naive_kl(student_hidden, teacher_hidden, lm_head_weight, mask=None, temperature=2.0, reduction="mean"):
    """T² · KL(p_teacher ‖ p_student) from its definition: full fp64 logits, F.kl_div, plain autograd (the teacher
    side is a constant); "mean" over masked positions, "batchmean_all" over all, or "sum"."""
    h = student_hidden.shape[-1]
    s = student_hidden.reshape(-1, h).double()
    t = teacher_hidden.detach().reshape(-1, h).double()
    w = lm_head_weight.double()
    log_s = torch.log_softmax(s @ w.T / temperature, -1)
    log_t = torch.log_softmax(t @ w.detach().T / temperature, -1)
    per_position = torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    keep = torch.ones_like(per_position, dtype=torch.bool) if mask is None else mask.reshape(-1)
    total = (per_position * keep).sum() * temperature**2
    return total / {"mean": max(int(keep.sum()), 1), "batchmean_all": keep.numel(), "sum": 1}[reduction]


# ------------------------------------------------------------------------------- CPU: references and dispatch


@pytest.mark.parametrize("g", [1, 2, 3])
def test_swiftkv_reference_matches_model(g):
    """The fused op's reference (and its CPU dispatch) equals the model's own per-group path, incl. ragged groups."""
    student = _tiny_swiftkv(m=2, g=g)
    cfg = student.config
    torch.manual_seed(1)
    h = torch.randn(2, 11, cfg.hidden_size)
    position_ids = torch.arange(11)[None].repeat(2, 1) + torch.tensor([[0], [7]])  # per-sequence positions
    (cos, sin), shared = _model_kv(student, h, position_ids)
    w, b = concat_swiftkv_kv_weights(student)
    leaders = list(range(cfg.num_key_value_layers, cfg.num_hidden_layers, g))
    assert w.shape == (len(leaders) * 2 * cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size)
    norm = student.model.norm_swiftkv
    args = (h, norm.weight, norm.variance_epsilon, w, cos, sin, len(leaders), cfg.num_key_value_heads, cfg.head_dim, b)
    with torch.no_grad():
        ref = swiftkv_kv_reference(*args)
        dispatched = fused_swiftkv_kv(*args)  # CPU without the interpreter: the reference
    for leader, (k, v), (dk, dv) in zip(leaders, ref, dispatched):
        mk, mv = shared[leader]
        assert k.shape == mk.shape == (2, cfg.num_key_value_heads, 11, cfg.head_dim)
        torch.testing.assert_close(k, mk, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, mv, rtol=1e-5, atol=1e-6)
        assert k.is_contiguous() and v.is_contiguous()
        torch.testing.assert_close(dk, k, rtol=0, atol=0)
        torch.testing.assert_close(dv, v, rtol=0, atol=0)


def test_swiftkv_reference_independent_math():
    """The reference against a from-scratch RMSNorm + per-head RoPE written here (not transformers' helpers)."""
    batch, seq, hidden, groups, kv_heads, head_dim = 2, 5, 24, 2, 3, 8
    h, nw, w, cos, sin, bias = _kv_inputs(batch, seq, hidden, groups, kv_heads, head_dim, torch.float64, "cpu",
                                          cos_batch=batch, bias=True)
    out = swiftkv_kv_reference(h, nw, 1e-6, w, cos, sin, groups, kv_heads, head_dim, bias)
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * nw
    kv_dim = kv_heads * head_dim
    for g in range(groups):
        for which in (0, 1):
            rows = slice((2 * g + which) * kv_dim, (2 * g + which + 1) * kv_dim)
            proj = x @ w[rows].T + bias[rows]
            for b in range(batch):
                for hh in range(kv_heads):
                    for s in range(seq):
                        vec = proj[b, s, hh * head_dim : (hh + 1) * head_dim]
                        if which == 0:  # rotate pairs (i, i + D/2)
                            x1, x2 = vec[: head_dim // 2], vec[head_dim // 2 :]
                            c, sn = cos[b, s, : head_dim // 2], sin[b, s, : head_dim // 2]
                            vec = torch.cat([x1 * c - x2 * sn, x2 * c + x1 * sn])
                        torch.testing.assert_close(out[g][which][b, hh, s], vec)


def test_concat_weights_cache_invalidates():
    student = _tiny_swiftkv(m=2, g=2)
    w1, _ = concat_swiftkv_kv_weights(student)
    w2, _ = concat_swiftkv_kv_weights(student.model)  # same cache through the inner model
    assert w2 is w1
    leader = student.model.layers[2].self_attn
    with torch.no_grad():
        leader.v_proj_swiftkv.weight.mul_(2.0)  # in-place update (as an optimizer step): version bump
    w3, _ = concat_swiftkv_kv_weights(student)
    assert w3 is not w1
    kv_dim = leader.v_proj_swiftkv.weight.shape[0]
    torch.testing.assert_close(w3[kv_dim : 2 * kv_dim], leader.v_proj_swiftkv.weight)
    torch.testing.assert_close(w3[:kv_dim], leader.k_proj_swiftkv.weight)
    student.model.layers[4].self_attn.k_proj_swiftkv.weight = torch.nn.Parameter(torch.zeros_like(w3[:kv_dim]))
    w4, _ = concat_swiftkv_kv_weights(student)  # replaced parameter: new storage
    # leaders 2, 4, 6 (g = 2): layer 4 is group 1, whose K rows are [2·kv_dim, 3·kv_dim)
    assert (w4[2 * kv_dim : 3 * kv_dim] == 0).all() and (w4[3 * kv_dim : 4 * kv_dim] != 0).any()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "batchmean_all", "sum"])
def test_fused_kl_cpu_fallback_matches_naive(temperature, reduction):
    torch.manual_seed(0)
    s = torch.randn(2, 13, 16, requires_grad=True)
    t = s.detach() + 0.3 * torch.randn(2, 13, 16)
    w = torch.randn(70, 16)
    mask = torch.rand(2, 13) > 0.3
    loss = fused_kl_loss(s, t, w, mask, temperature, chunk_size=4, reduction=reduction)
    (grad,) = torch.autograd.grad(loss * 0.7, s)
    s2 = s.detach().double().requires_grad_()
    ref = naive_kl(s2, t, w, mask, temperature, reduction)
    (ref_grad,) = torch.autograd.grad(ref * 0.7, s2)
    assert ref.item() > 1e-3
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5 * ref_grad.abs().max().item())
    assert (grad[~mask] == 0).all()  # masked-out positions get no gradient


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
@pytest.mark.parametrize("reduction", ["mean", "batchmean_all", "sum"])
def test_kl_loss_reference_matches_definition(chunk_size, reduction):
    """The kernel file's own torch reference: values and gradients (student and LM head) against the definition."""
    torch.manual_seed(1)
    s = torch.randn(3, 7, 16, requires_grad=True)
    t = s.detach() + 0.4 * torch.randn(3, 7, 16)
    w = (torch.randn(50, 16) / 2).requires_grad_()
    mask = torch.rand(3, 7) > 0.4
    loss = kl_loss_reference(s, t, w, mask, 1.5, chunk_size, reduction)
    gs, gw = torch.autograd.grad(loss, (s, w))
    s64, w64 = s.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = naive_kl(s64, t, w64, mask, 1.5, reduction)
    rgs, rgw = torch.autograd.grad(ref, (s64, w64))
    assert loss.dtype == torch.float32 and gs.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gs.double(), rgs, rtol=1e-4, atol=1e-5 * rgs.abs().max().item())
    torch.testing.assert_close(gw.double(), rgw, rtol=1e-4, atol=1e-5 * rgw.abs().max().item())
    # the KL component of swiftkv_train.losses (its own chunked engine) gives the same numbers
    torch.testing.assert_close(KL()(s, t, w, mask, temperature=1.5, chunk_size=chunk_size, reduction=reduction),
                               loss, rtol=1e-5, atol=1e-7)


def test_kl_loss_reference_edge_cases():
    torch.manual_seed(2)
    s = torch.randn(2, 5, 8, requires_grad=True)
    t, w = torch.randn(2, 5, 8), torch.randn(20, 8)
    nothing = torch.zeros(2, 5, dtype=torch.bool)
    loss = kl_loss_reference(s, t, w, nothing, 2.0, 3, "mean")
    loss.backward()  # no masked row: 0, and still a zero gradient (not an error)
    assert loss.item() == 0.0 and (s.grad == 0).all()
    torch.testing.assert_close(kl_loss_reference(s, t, w, None, 2.0, 3, "sum").double(), naive_kl(s, t, w, None, 2.0, "sum"))
    for bad, match in (({"reduction": "batchmean"}, "reduction"), ({"chunk_size": 0}, "chunk_size"),
                       ({"temperature": 0.0}, "temperature")):
        kwargs = {"temperature": 2.0, "chunk_size": 3, "reduction": "mean", **bad}
        with pytest.raises(ValueError, match=match):
            fused_kl_loss(s, t, w, None, **kwargs)


def test_kernel_files_do_not_import_the_package():
    """Kernels are pure ops: no file in kernels/ imports swiftkv_train (the package depends on them, not back)."""
    import ast
    from pathlib import Path

    offenders = []
    for path in sorted((Path(__file__).resolve().parents[1] / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "swiftkv_train"]
    assert offenders == []


# ------------------------------------------------------------------------------------ CPU: Triton interpreter

_INTERPRETER_SCRIPT = r"""
from swiftkv_kernels import kd_loss, swiftkv_prefill_kv as skv
torch.manual_seed(0)
assert skv.kernel_available(torch.zeros(1)) and kd_loss.kernel_available(torch.zeros(1))

# Kernel 1: ragged tokens (B*S not a multiple of the block), GQA, D = 12 (half not a power of two), bias.
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):  # bf16: the reference rounds 3x in RoPE
    B, S, H, G, HKV, D = 2, 37, 40, 3, 2, 12
    h = (torch.randn(B, S, H) * 2).to(dtype)
    nw = (1 + 0.3 * torch.randn(H)).to(dtype)
    w = (torch.randn(G * 2 * HKV * D, H) / H**0.5).to(dtype)
    bias = torch.randn(G * 2 * HKV * D).to(dtype)
    ang = torch.randn(B, S, D // 2)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    out = torch.full((G, 2, B, HKV, S, D), float("nan"), dtype=dtype)  # poisoned
    got = skv.fused_swiftkv_kv(h, nw, 1e-6, w, cos, sin, G, HKV, D, bias, out=out)
    ref = skv.swiftkv_kv_reference(h, nw, 1e-6, w, cos, sin, G, HKV, D, bias)
    assert not torch.isnan(out).any(), "unwritten output elements"
    for (k, v), (rk, rv) in zip(got, ref):
        torch.testing.assert_close(k.float(), rk.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(v.float(), rv.float(), rtol=tol, atol=tol)

# Kernel 2, fp32 (in-place gradient) and bf16 with fp32 logits (bf16 gradient packed into the fp32 rows).
for dtype, fp32_logits in ((torch.float32, False), (torch.bfloat16, True)):
    if fp32_logits:  # CPU has no aten::mm.dtype: emulate the CUDA fp32-output GEMM exactly
        kd_loss._project = lambda x, w: torch.mm(x.float(), w.float().t())
    s = (torch.randn(2, 9, 32) * 2).to(dtype).requires_grad_()
    t = (s.detach().float() + 0.5 * torch.randn(2, 9, 32)).to(dtype)
    w = (torch.randn(300, 32) / 32**0.5 * 3).to(dtype)  # V = 300 with BLOCK_V = 256: a ragged last block
    mask = torch.rand(2, 9) > 0.4
    loss = kd_loss.fused_kl_loss(s, t, w, mask, 2.0, 5, "mean")
    (g,) = torch.autograd.grad(loss, s)
    s32 = s.detach().float().requires_grad_()
    ref = kd_loss.kl_loss_reference(s32, t.float(), w.float(), mask, 2.0, 5, "mean")
    (rg,) = torch.autograd.grad(ref, s32)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    gtol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(g.float(), rg, rtol=gtol, atol=gtol * rg.abs().max().item())
# Layer ops: RMSNorm (hidden not a power of two) and silu(gate) * up (n not a multiple of the block).
# bf16 tolerance: the interpreter truncates fp32 -> bf16 where the GPU rounds (2 roundings: up to 2 ulps).
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
    x = (torch.randn(3, 7, 200) * 3).to(dtype)
    w = (1 + 0.3 * torch.randn(200)).to(dtype)
    torch.testing.assert_close(skv.rms_norm(x, w, 1e-6).float(), skv._rms_norm_reference(x, w, 1e-6).float(),
                               rtol=tol, atol=tol)
    g, u = (torch.randn(5, 2100) * 4).to(dtype), torch.randn(5, 2100).to(dtype)
    torch.testing.assert_close(skv.silu_mul(g, u).float(), (torch.nn.functional.silu(g) * u).float(),
                               rtol=tol, atol=tol)
print("INTERPRETER_OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.timeout(120)
def test_triton_kernels_under_interpreter():
    run_interpreter_script(_INTERPRETER_SCRIPT, "INTERPRETER_OK")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_triton_kernels_compile_for_sm90(dtype):
    """Ahead-of-time compile every kernel down to an sm_90 cubin (ptxas ships with triton): no GPU needed."""
    i32 = "i32"
    compile_sm90(swiftkv_prefill_kv._rmsnorm_kernel,
                 {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "x_row_stride": i32,
                  "y_row_stride": i32, "H": i32, "eps": "fp32"}, {"BLOCK_H": 4096}, 8)
    rope_sig = {"kv_ptr": f"*{dtype}", "cos_ptr": f"*{dtype}", "sin_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
    rope_sig.update({k: i32 for k in ("row0", "n_rows", "S", "B", "kv_row_stride", "cos_b_stride", "cos_s_stride",
                                      "sin_b_stride", "sin_s_stride")})
    for d, block_n in ((128, 32), (64, 64)):
        compile_sm90(swiftkv_prefill_kv._rope_scatter_kernel, rope_sig,
                     {"HKV": 8, "D": d, "HALF": d // 2, "HALF_BLOCK": d // 2, "BLOCK_N": block_n}, 4)
    compile_sm90(swiftkv_prefill_kv._silu_mul_kernel,
                 {"g_ptr": f"*{dtype}", "u_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "n": "i64"}, {"BLOCK": 2048}, 8)
    kl_sig = {"s_ptr": "*fp32", "t_ptr": "*fp32", "g_ptr": f"*{dtype}", "loss_ptr": "*fp32", "V": i32,
              "s_row_stride": i32, "t_row_stride": i32, "g_row_stride": i32, "inv_t": "fp32", "loss_scale": "fp32",
              "grad_scale": "fp32"}
    compile_sm90(kd_loss._kl_rows_kernel, kl_sig, {"BLOCK_V": 4096}, 8)


# ------------------------------------------------------------------------------------------------- GPU tests

DEV = "cuda"  # GPU tests build their tensors here (a debugging harness may point it at the Triton interpreter)


def _sync():
    if torch.device(DEV).type == "cuda":
        torch.cuda.synchronize()


# (batch, seq, hidden, groups, kv_heads, head_dim, cos_batch, bias)
KV_SHAPES = [
    (1, 2048 + 17, 512, 4, 8, 128, 1, False),  # ragged S, Llama-like heads, g>1-style (4 groups)
    (2, 100, 256, 3, 2, 64, 2, False),  # batch 2, per-sequence RoPE tables, D = 64
    (3, 1, 128, 2, 4, 128, 1, False),  # decode step (S = 1)
    (1, 333, 4096, 16, 8, 128, 1, False),  # Llama-3.1-8B hidden/heads, 16 groups (g = 1)
    (2, 257, 320, 5, 1, 64, 1, True),  # MQA, hidden not a power of two, bias
    (1, 77, 192, 2, 3, 96, 1, False),  # head_dim 96 (half not a power of two)
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", KV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_fused_swiftkv_kv_matches_reference(shape, dtype):
    batch, seq, hidden, groups, kv_heads, head_dim, cos_batch, bias = shape
    h, nw, w, cos, sin, b = _kv_inputs(batch, seq, hidden, groups, kv_heads, head_dim, dtype, DEV,
                                       cos_batch=cos_batch, bias=bias)
    out = torch.full((groups, 2, batch, kv_heads, seq, head_dim), float("nan"), dtype=dtype, device=DEV)
    got = fused_swiftkv_kv(h, nw, 1e-5, w, cos, sin, groups, kv_heads, head_dim, b, out=out)
    _sync()
    assert not torch.isnan(out).any(), "the kernel left output elements unwritten"
    ref = swiftkv_kv_reference(h, nw, 1e-5, w, cos, sin, groups, kv_heads, head_dim, b)
    # fp64 ground truth: the fused path must be about as close to it as the bf16 torch path is.
    truth = swiftkv_kv_reference(h.double(), nw.double(), 1e-5, w.double(), cos.double(), sin.double(), groups,
                                 kv_heads, head_dim, b.double() if b is not None else None)
    # bf16: values reach ~5 (ulp 0.03) and the torch reference rounds three times in RoPE; the tighter check is
    # the error against the fp64 truth below.
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=7e-2)
    for (k, v), (rk, rv), (tk, tv) in zip(got, ref, truth):
        assert k.shape == (batch, kv_heads, seq, head_dim) and k.is_contiguous() and v.is_contiguous()
        torch.testing.assert_close(k, rk, **tol)
        torch.testing.assert_close(v, rv, **tol)
        if torch.device(DEV).type != "cuda":
            continue  # the Triton interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even)
        for ours, theirs, exact in ((k, rk, tk), (v, rv, tv)):
            assert _rel_err(ours, exact) <= 1.5 * _rel_err(theirs, exact) + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("g", [1, 2, 3])
def test_gpu_fused_swiftkv_kv_matches_model(g):
    """On the tiny model in bf16: fused K/V == the model's own unfused swiftkv_key_values."""
    student = _tiny_swiftkv(m=2, g=g).to(DEV, torch.bfloat16)
    cfg = student.config
    h = torch.randn(2, 45, cfg.hidden_size, device=DEV, dtype=torch.bfloat16)
    position_ids = torch.arange(45, device=DEV)[None].repeat(2, 1) + 3
    (cos, sin), shared = _model_kv(student, h, position_ids)
    w, b = concat_swiftkv_kv_weights(student)
    leaders = list(range(cfg.num_key_value_layers, cfg.num_hidden_layers, g))
    norm = student.model.norm_swiftkv
    got = fused_swiftkv_kv(h, norm.weight, norm.variance_epsilon, w, cos, sin, len(leaders),
                           cfg.num_key_value_heads, cfg.head_dim, b)
    for leader, (k, v) in zip(leaders, got):
        torch.testing.assert_close(k, shared[leader][0], rtol=2e-2, atol=4e-2)
        torch.testing.assert_close(v, shared[leader][1], rtol=2e-2, atol=4e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (8192 + 3, 4096), (77, 576), (5, 200)])
def test_gpu_layer_ops_match_torch(dtype, rows, hidden):
    """rms_norm == LlamaRMSNorm's maths; silu_mul == F.silu(gate) * up (bf16: within one rounding step)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    x = (torch.randn(rows, hidden, device=DEV) * 3).to(dtype)
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(DEV, dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(hidden, device=DEV))
        got, want = swiftkv_prefill_kv.rms_norm(x, norm.weight, 1e-5), norm(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    gate, up = (torch.randn(rows, 3 * hidden + 1, device=DEV) * 4).to(dtype), torch.randn(
        rows, 3 * hidden + 1, device=DEV).to(dtype)
    got = swiftkv_prefill_kv.silu_mul(gate, up)
    assert not got.isnan().any()
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_gpu_swiftkv_model_with_fused_layer_ops_matches_torch_path(monkeypatch):
    """The whole SwiftKV model in bf16 with use_kernels on (fused K/V, RMSNorm, SiLU*up) vs off: same logits
    within bf16 noise, and the fused ops really ran."""
    student = _tiny_swiftkv(m=2, g=1).to(DEV, torch.bfloat16).eval()
    ids = torch.randint(0, student.config.vocab_size, (2, 57), device=DEV)
    calls = {"rms_norm": 0, "silu_mul": 0}
    from swiftkv_train.methods.swiftkv.remote_code import modeling_llama_swiftkv as modeling

    for name in calls:
        original = getattr(modeling, name)

        def counted(*args, _original=original, _name=name):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(modeling, name, counted)
    with torch.no_grad():
        student.config.use_kernels = False
        want = student(ids).logits.float()
        assert calls == {"rms_norm": 0, "silu_mul": 0}
        student.config.use_kernels = True
        got = student(ids).logits.float()
    assert calls["rms_norm"] > 0 and calls["silu_mul"] > 0
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


# (batch, seq, hidden, vocab, chunk_size)
KL_SHAPES = [
    (2, 67, 256, 1003, 16),  # V below one block, several chunks, ragged last chunk
    (1, 300, 512, 32003, 128),  # V not a multiple of BLOCK_V (4096)
    (4, 33, 128, 4096 * 3, 1024),  # V an exact multiple of BLOCK_V, one chunk
]


def _kl_inputs(batch, seq, hidden, vocab, dtype, seed=0, spread=0.5):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    s = torch.randn(batch, seq, hidden, generator=gen)
    t = s + spread * torch.randn(batch, seq, hidden, generator=gen)  # a student close to its teacher
    w = torch.randn(vocab, hidden, generator=gen) * (4.0 / hidden**0.5)  # logits of magnitude ~4-15
    mask = torch.rand(batch, seq, generator=gen) > 0.3
    return (s.to(DEV, dtype), t.to(DEV, dtype), w.to(DEV, dtype), mask.to(DEV))


@pytest.mark.gpu
def test_gpu_fp32_logits_gemm_available():
    """The accurate path (bf16 inputs, fp32-output cuBLAS GEMM) is the one used on this torch."""
    x = torch.randn(4, 8, device=DEV, dtype=torch.bfloat16)
    assert kd_loss._mm_supports_fp32_out(x, x), "torch.mm(..., out_dtype=float32) unavailable: bf16-logits fallback"
    assert kd_loss._project(x, x).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "batchmean_all", "sum"])
@pytest.mark.parametrize("shape", KL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_fused_kl_matches_naive(shape, reduction, temperature, dtype):
    batch, seq, hidden, vocab, chunk = shape
    s, t, w, mask = _kl_inputs(batch, seq, hidden, vocab, dtype)
    s.requires_grad_()
    loss = fused_kl_loss(s, t, w, mask, temperature, chunk, reduction)
    (grad,) = torch.autograd.grad(loss * 1.3, s)
    s64 = s.detach().double().requires_grad_()
    ref = naive_kl(s64, t, w, mask, temperature, reduction)  # fp64
    (ref_grad,) = torch.autograd.grad(ref * 1.3, s64)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert ref.item() > 1e-2
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5 if dtype == torch.float32 else 1e-4, atol=1e-6)
    limit = 1e-4 if dtype == torch.float32 else 1.5e-2  # relative L2 error of the whole gradient
    assert _rel_err(grad, ref_grad) < limit
    assert (grad[~mask] == 0).all()
    # the kernel file's torch reference and the KL component's torch path agree; the component with fused=True
    # is the kernel
    ref2 = kl_loss_reference(s.detach(), t, w, mask, temperature, chunk, reduction)
    torch.testing.assert_close(loss, ref2, rtol=1e-4, atol=1e-6)
    ref3 = KL()(s.detach(), t, w, mask, temperature=temperature, chunk_size=chunk, reduction=reduction)
    torch.testing.assert_close(loss, ref3, rtol=1e-4, atol=1e-6)
    fused = KL()(s.detach(), t, w, mask, temperature=temperature, chunk_size=chunk, reduction=reduction, fused=True)
    assert torch.equal(fused, loss)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_fused_kl_edge_cases(dtype):
    s, t, w, _ = _kl_inputs(2, 40, 128, 5000, dtype)
    # no mask: every position counts
    loss = fused_kl_loss(s, t, w, None, 2.0, 32, "mean")
    ref = naive_kl(s, t, w, None, 2.0, "mean")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)
    # all masked out: 0 loss, 0 gradient (not NaN)
    s2 = s.detach().clone().requires_grad_()
    none = torch.zeros(2, 40, dtype=torch.bool, device=DEV)
    loss0 = fused_kl_loss(s2, t, w, none, 2.0, 32, "mean")
    loss0.backward()
    assert loss0.item() == 0.0 and (s2.grad == 0).all()
    # identical student and teacher: KL and gradient ~ 0
    same = fused_kl_loss(t.clone().requires_grad_(), t, w, None, 2.0, 32, "mean")
    assert abs(same.item()) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_fused_kl_lm_head_grad(dtype):
    s, t, w, mask = _kl_inputs(2, 50, 128, 3001, dtype)
    s.requires_grad_()
    w.requires_grad_()
    loss = fused_kl_loss(s, t, w, mask, 2.0, 24, "mean")
    gs, gw = torch.autograd.grad(loss, (s, w))
    s64 = s.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = naive_kl(s64, t, w64, mask, 2.0, "mean")
    rgs, rgw = torch.autograd.grad(ref, (s64, w64))
    limit = 1e-4 if dtype == torch.float32 else 1.5e-2
    assert _rel_err(gs, rgs) < limit and _rel_err(gw, rgw) < limit


@pytest.mark.gpu
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [1000, 4096, 10007])
def test_gpu_kl_rows_kernel_poisoned(vocab, grad_dtype):
    """The row kernel alone: poisoned loss buffer, every gradient element written (checked against torch)."""
    rows, temperature, scale = 37, 2.0, 0.25
    gen = torch.Generator(device="cpu").manual_seed(3)
    logits = (torch.randn(2 * rows, vocab, generator=gen) * 5).to(DEV)
    logits[rows:] = logits[:rows] + torch.randn(rows, vocab, generator=gen).to(DEV)
    z = logits.double() / temperature
    log_ps, log_pt = z[:rows].log_softmax(-1), z[rows:].log_softmax(-1)
    want_loss = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * temperature**2 * scale
    want_grad = (log_ps.exp() - log_pt.exp()) * temperature * scale
    loss_out = torch.full((rows,), float("nan"), device=DEV)
    loss_rows, grad = kd_loss._kl_rows(logits, rows, grad_dtype, temperature, scale, loss_out=loss_out)
    _sync()
    assert loss_rows.data_ptr() == loss_out.data_ptr() and not torch.isnan(loss_out).any()
    torch.testing.assert_close(loss_rows.double(), want_loss, rtol=1e-4, atol=1e-6)
    assert grad.shape == (rows, vocab) and grad.dtype == grad_dtype
    # an unwritten gradient element would still hold (bits of) a logit of magnitude ~5: far outside tolerance
    tol = 1e-6 if grad_dtype == torch.float32 else 8e-3 * want_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=tol)
