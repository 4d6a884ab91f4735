"""Locret eviction kernel (issue 7, part 4): selection rule, compaction, integration in the cache, export.

- CPU (always): the torch reference against a brute-force selection written here (Python sort over
  (-score, index)), the cache's eviction paths against it, a Triton-interpreter run of the kernel (subprocess with
  ``TRITON_INTERPRET=1``: poisoned outputs, splits, ties across segment boundaries, a model-level prefill), an
  ahead-of-time sm_90 compile, and the export shipping the kernel file.
- GPU (``-m gpu``): the kernel against the reference at Llama-3.1-8B scale and on ragged shapes, and a tiny Locret
  model's chunked prefill with ``use_kernels`` on and off.
- Fused scoring (the retaining head's fc2 + bias + local override inside the kernel): the extended reference
  against scores computed here with plain torch, the cache's fused path against its unfused one, the interpreter
  on ragged shapes, an sm_90 compile of the fused variant and GPU runs at the Llama-8B shape. Exactness tests use
  inputs that are multiples of 1/8 (every fp32 sum of their products is exact in any order), so the kernel's and
  torch's differently ordered fp32 sums agree bit for bit.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import ROOT, alias_kernels_package, compile_sm90, run_interpreter_script

alias_kernels_package()

from swiftkv_kernels import locret_evict as evict_module  # noqa: E402
from swiftkv_kernels.locret_evict import kept_indices_reference, locret_evict, locret_evict_reference  # noqa: E402
from swiftkv_train.methods.locret.remote_code import cache_llama_locret  # noqa: E402
from swiftkv_train.methods.locret.remote_code.cache_llama_locret import LocretLayer, evict_entries_torch  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
SMALL_LOCRET = dict(head_hidden_size=32, budget=64, chunk_size=16, stabilizers=4, n_local=8)


# ---------------------------------------------------------------------------------------------------- helpers


def brute_force_kept(scores_row: list[float], keep: int, protect_newest: int) -> list[int]:
    """Indices kept from one row, from the rule alone: the newest ``protect_newest`` rank +inf, higher score first,
    the earlier entry first among equals, the first ``keep`` in sequence order."""
    n = len(scores_row)
    ranking = [float("inf") if i >= n - protect_newest else s for i, s in enumerate(scores_row)]
    order = sorted(range(n), key=lambda i: (-ranking[i], i))
    return sorted(order[:keep])


def make_scores(kind: str, batch: int, heads: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, n, generator=gen)
    if kind == "ties":  # three values only: most comparisons are ties
        scores = torch.randint(-1, 2, (batch, heads, n), generator=gen).float()
    elif kind == "inf":  # +-inf and signed zeros among a few values
        scores = torch.randint(-2, 3, (batch, heads, n), generator=gen).float()
        scores[scores == 2] = float("inf")
        scores[scores == -2] = float("-inf")
        scores[(scores == 0) & (torch.rand(scores.shape, generator=gen) < 0.5)] = -0.0
    return scores


def make_entries(batch, heads, n, dim, seed, dtype=torch.float32, strided=False):
    """keys, values [B, H, N, D] and positions [B, H, N] (distinct per row); ``strided``: non-contiguous views."""
    gen = torch.Generator().manual_seed(seed + 1)
    if strided:  # stored as [B, N, H, D] and viewed as [B, H, N, D], as a transposed projection would be
        keys = torch.randn(batch, n, heads, dim, generator=gen).to(dtype).transpose(1, 2)
        values = torch.randn(batch, n, heads, 2 * dim, generator=gen).to(dtype)[..., ::2].transpose(1, 2)
    else:
        keys = torch.randn(batch, heads, n, dim, generator=gen).to(dtype)
        values = torch.randn(batch, heads, n, dim, generator=gen).to(dtype)
    positions = (1000 * torch.arange(batch * heads).view(batch, heads, 1) + 3 * torch.arange(n)).to(torch.int32)
    return keys, values, positions


def assert_matches_brute_force(result, keys, values, scores, positions, keep, protect_newest):
    out_k, out_v, out_s, out_p = result
    batch, heads, _, dim = keys.shape
    assert out_k.shape == out_v.shape == (batch, heads, keep, dim)
    assert out_s.shape == out_p.shape == (batch, heads, keep)
    assert out_s.dtype == torch.float32 and out_p.dtype == torch.int32
    for b in range(batch):
        for h in range(heads):
            kept = brute_force_kept(scores[b, h].tolist(), keep, protect_newest)
            index = torch.tensor(kept, dtype=torch.long)
            assert out_p[b, h].tolist() == positions[b, h, index].tolist(), (b, h)
            assert torch.equal(out_k[b, h], keys[b, h, index])
            assert torch.equal(out_v[b, h], values[b, h, index])
            # stored scores come back unchanged (protected entries are not +inf), signed zeros included
            assert torch.equal(out_s[b, h].view(torch.int32), scores[b, h, index].view(torch.int32))


def _cases():
    for n in (1, 2, 7, 37, 130):
        for keep in sorted({1, max(n - 1, 1), n}):
            for protect in sorted({0, 3, keep, n + 2}):
                yield n, keep, protect


CASES = list(_cases())


# ----------------------------------------------------------------------------------- CPU: reference vs brute force


@pytest.mark.parametrize("kind", ["distinct", "ties", "inf"])
@pytest.mark.parametrize("n, keep, protect", CASES, ids=str)
def test_reference_matches_brute_force(n, keep, protect, kind):
    scores = make_scores(kind, 2, 3, n, seed=n * 31 + keep)
    keys, values, positions = make_entries(2, 3, n, 4, seed=n, strided=(n % 2 == 1))
    result = locret_evict_reference(keys, values, scores, positions, keep, protect)
    assert_matches_brute_force(result, keys, values, scores, positions, keep, protect)
    index = kept_indices_reference(scores, keep, protect)
    assert (index.diff(dim=-1) > 0).all()  # strictly increasing: sequence order, no duplicates


def test_ties_go_to_the_earlier_entry():
    scores = torch.tensor([[[1.0, 5.0, 1.0, 1.0, 5.0, 1.0, 0.0]]])
    keys, values, positions = make_entries(1, 1, 7, 2, seed=0)
    _, _, _, kept = locret_evict_reference(keys, values, scores, positions, 4, 0)
    assert kept.tolist() == [[[0, 3, 6, 12]]]  # both 5.0s (indices 1, 4), then the earliest 1.0s (0, 2)
    _, _, out_s, kept = locret_evict_reference(keys, values, scores, positions, 4, 2)  # indices 5, 6 protected
    assert kept.tolist() == [[[3, 12, 15, 18]]] and out_s.tolist() == [[[5.0, 5.0, 1.0, 0.0]]]


@pytest.mark.parametrize("kind", ["ties", "inf"])
def test_cpu_paths_agree(kind):
    """Dispatch on CPU (reference), the cache's kernel-less torch path and LocretLayer.evict all keep the same."""
    scores = make_scores(kind, 2, 3, 50, seed=3)
    keys, values, positions = make_entries(2, 3, 50, 8, seed=3, dtype=torch.bfloat16)
    ref = locret_evict_reference(keys, values, scores, positions, 20, 6)
    for got in (locret_evict(keys, values, scores, positions, 20, 6),
                evict_entries_torch(keys, values, scores, positions, 20, 6)):
        for a, r in zip(got, ref, strict=True):
            assert a.dtype == r.dtype and torch.equal(a, r)
    for use_kernels in (True, False):
        layer = LocretLayer(use_kernels=use_kernels)
        layer.update(keys, values, scores, positions)
        layer.evict(20, 6)
        assert torch.equal(layer.positions, ref[3]) and torch.equal(layer.keys, ref[0])
        assert torch.equal(layer.scores, ref[2]) and torch.equal(layer.values, ref[1])


def test_layer_without_kernel_module_uses_same_rule(monkeypatch):
    monkeypatch.setattr(cache_llama_locret, "locret_evict", None)
    scores = make_scores("ties", 1, 2, 40, seed=5)
    keys, values, positions = make_entries(1, 2, 40, 4, seed=5)
    layer = LocretLayer()
    assert layer._evict_fn() is evict_entries_torch
    layer.update(keys, values, scores, positions)
    layer.evict(15, 4)
    assert_matches_brute_force((layer.keys, layer.values, layer.scores, layer.positions), keys, values, scores,
                               positions, 15, 4)


def test_bad_arguments_raise():
    keys, values, positions = make_entries(1, 2, 10, 4, seed=0)
    scores = torch.zeros(1, 2, 10)
    with pytest.raises(ValueError, match="keep=11"):
        locret_evict(keys, values, scores, positions, 11, 0)
    with pytest.raises(ValueError, match="protect_newest=-1"):
        locret_evict(keys, values, scores, positions, 5, -1)
    with pytest.raises(ValueError, match="scores and positions"):
        locret_evict(keys, values, scores[..., :9], positions, 5, 0)
    empty = locret_evict(keys, values, scores, positions, 0, 0)
    assert [tuple(t.shape) for t in empty] == [(1, 2, 0, 4), (1, 2, 0, 4), (1, 2, 0), (1, 2, 0)]


# ------------------------------------------------------------------------- CPU: fused scoring, reference


def exact_values(shape, seed, dtype=torch.float32):
    """Multiples of 1/8 in [-2, 2]: products are multiples of 1/64, so every fp32 sum of a few thousand is exact."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-16, 17, shape, generator=gen).float() / 8).to(dtype)


def fused_inputs(batch, heads, n, dim, q, features, seed, bias=True, dtype=torch.float32):
    """keys, values, positions, old scores [B, H, N - q], hidden [B, q, F], weight [H, F], bias [H] or None."""
    keys, values, positions = make_entries(batch, heads, n, dim, seed, dtype=dtype)
    old = exact_values((batch, heads, n - q), seed + 2)
    hidden = exact_values((batch, q, features), seed + 3, dtype)
    weight = exact_values((heads, features), seed + 4, dtype)
    head_bias = exact_values((heads,), seed + 5, dtype) if bias else None
    return keys, values, positions, old, hidden, weight, head_bias


def brute_force_all_scores(old, hidden, weight, head_bias, new_local, score_dtype=None):
    """The full [B, H, N] scores, from the definition with plain torch: products summed in float64 (exact here)."""
    new = (hidden.double()[:, None, :, :] * weight.double()[None, :, None, :]).sum(-1)  # [B, H, q]
    if head_bias is not None:
        new = new + head_bias.double()[None, :, None]
    new = new.float()
    if score_dtype is not None:
        new = new.to(score_dtype).float()
    new[..., :new_local] = float("inf")
    return torch.cat([old.float(), new], dim=-1)


FUSED_CPU_CASES = [  # (B, H, N, q, F, keep, protect, new_local, bias, score dtype)
    (2, 3, 50, 13, 40, 30, 5, 0, True, None),
    (1, 2, 37, 37, 17, 20, 0, 3, False, None),  # every entry is new
    (2, 2, 90, 45, 100, 89, 4, 7, True, torch.bfloat16),
    (1, 3, 64, 1, 8, 10, 0, 0, False, torch.float16),
    (2, 1, 20, 5, 3, 20, 0, 5, True, None),  # keep == N, all new entries local
]


@pytest.mark.parametrize("case", FUSED_CPU_CASES, ids=str)
def test_fused_reference_matches_brute_force(case):
    batch, heads, n, q, features, keep, protect, new_local, bias, score_dtype = case
    keys, values, positions, old, hidden, weight, head_bias = fused_inputs(batch, heads, n, 4, q, features,
                                                                            seed=n + q, bias=bias)
    result = evict_module.locret_evict_reference(keys, values, old, positions, keep, protect, new_hidden=hidden,
                                                 head_weight=weight, head_bias=head_bias, new_local=new_local,
                                                 score_dtype=score_dtype)
    full = brute_force_all_scores(old, hidden, weight, head_bias, new_local, score_dtype)
    assert_matches_brute_force(result, keys, values, full, positions, keep, protect)
    # the torch-side new scores alone, and the CPU dispatch (no kernel here) of the fused call form
    new = evict_module.new_scores_reference(hidden, weight, head_bias, new_local, score_dtype)
    assert torch.equal(new, full[..., n - q:])
    dispatched = locret_evict(keys, values, old, positions, keep, protect, new_hidden=hidden, head_weight=weight,
                              head_bias=head_bias, new_local=new_local, score_dtype=score_dtype)
    for got, ref in zip(dispatched, result, strict=True):
        assert torch.equal(got, ref)


def test_fused_bad_arguments_raise():
    keys, values, positions, old, hidden, weight, head_bias = fused_inputs(1, 2, 10, 4, 3, 6, seed=0)
    kw = dict(new_hidden=hidden, head_weight=weight, head_bias=head_bias)
    with pytest.raises(ValueError, match="scores and positions"):  # scores for all N with new_hidden
        locret_evict(keys, values, torch.zeros(1, 2, 10), positions, 5, 0, **kw)
    with pytest.raises(ValueError, match="head_weight must be"):
        locret_evict(keys, values, old, positions, 5, 0, **dict(kw, head_weight=weight[:, :5]))
    with pytest.raises(ValueError, match="head_bias must be"):
        locret_evict(keys, values, old, positions, 5, 0, **dict(kw, head_bias=head_bias[:1]))
    with pytest.raises(ValueError, match="needs head_weight"):
        locret_evict(keys, values, old, positions, 5, 0, new_hidden=hidden)
    with pytest.raises(ValueError, match="only used with new_hidden"):
        locret_evict(keys, values, torch.zeros(1, 2, 10), positions, 5, 0, head_weight=weight)
    with pytest.raises(ValueError, match="new_local=-1"):
        locret_evict(keys, values, old, positions, 5, 0, new_local=-1, **kw)


# --------------------------------------------------------------------------------- CPU: model-level tie rule


@pytest.fixture(scope="module")
def tiny_locret():
    from swiftkv_train.models import load_pretrained
    from swiftkv_train.methods.locret import LocretConfig, to_locret

    base, _ = load_pretrained("random:smollm2-tiny")
    model = to_locret(base, LocretConfig(**SMALL_LOCRET)).eval()
    with torch.no_grad():  # varied scores per head
        for _, p in model.retaining_head_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
    return model


def test_prefill_with_tied_scores_keeps_the_earliest(tiny_locret, monkeypatch):
    """All scores equal: after each chunk the earliest entries survive (plus the protected newest ones)."""
    model = tiny_locret
    length, budget, chunk, stabilizers, n_local = 90, 30, 16, 5, 6

    def tied_scores(query_flat, key_flat, value_flat):
        return torch.zeros(query_flat.shape[0], model.config.num_key_value_heads, query_flat.shape[1])

    for layer in model.model.layers:
        monkeypatch.setattr(layer.self_attn, "retaining_scores", tied_scores)
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(2))
    cache = model.chunked_prefill(ids, locret_budget=budget, locret_chunk_size=chunk, locret_stabilizers=stabilizers,
                                  locret_n_local=n_local)
    keep, evictable = budget - n_local, length - n_local
    kept: list[int] = []
    for start in range(0, evictable, chunk):  # the rule, chunk by chunk, with the brute-force selection
        end = min(start + chunk, evictable)
        kept += list(range(start, end))
        if len(kept) > keep:
            protect = 0 if end == evictable else min(stabilizers, keep)
            kept = [kept[i] for i in brute_force_kept([0.0] * len(kept), keep, protect)]
    expected = kept + list(range(evictable, length))
    assert expected[: keep - stabilizers] == list(range(keep - stabilizers))  # the earliest survived
    for layer in cache.layers:
        for head in range(model.config.num_key_value_heads):
            assert layer.positions[0, head].tolist() == expected


# ------------------------------------------------------------------------------------------------ CPU: export


def test_export_ships_the_kernel(tiny_locret, tmp_path):
    from swiftkv_train.export.hf import _copy_model_code

    _copy_model_code(tiny_locret, tmp_path)
    shipped = tmp_path / "locret_evict.py"
    assert shipped.is_file()
    assert shipped.read_text() == (ROOT / "kernels" / "locret_evict.py").read_text()
    assert "from .locret_evict import" in (tmp_path / "cache_llama_locret.py").read_text()


def test_use_kernels_config_flag_round_trips():
    from swiftkv_train.methods.locret.remote_code import LlamaLocretConfig

    assert LlamaLocretConfig().use_kernels is True
    config = LlamaLocretConfig(use_kernels=False)
    assert config.to_dict()["use_kernels"] is False
    assert LlamaLocretConfig.from_dict(config.to_dict()).use_kernels is False


# ------------------------------------------------------------------------------------ CPU: Triton interpreter

_INTERPRETER_SCRIPT = r"""
from swiftkv_kernels import locret_evict as le

assert le.kernel_available(torch.zeros(1)) and le.kernel_available(torch.zeros(1, dtype=torch.bfloat16))

def poisoned(keys, values, keep):
    b, h, _, d = keys.shape
    return (torch.full((b, h, keep, d), float("nan"), dtype=keys.dtype),
            torch.full((b, h, keep, d), float("nan"), dtype=values.dtype),
            torch.full((b, h, keep), float("nan")),
            torch.full((b, h, keep), -2**31, dtype=torch.int32))

def scores_for(kind, shape, gen):
    if kind == "ties":
        return torch.randint(-1, 2, shape, generator=gen).float()
    if kind == "inf":
        s = torch.randint(-2, 3, shape, generator=gen).float()
        s[s == 2], s[s == -2] = float("inf"), float("-inf")
        s[(s == 0) & (torch.rand(shape, generator=gen) < 0.5)] = -0.0
        return s
    return torch.randn(shape, generator=gen)

# (B, H, N, D, keep, protect, splits, kind, K dtype, V dtype, strided)
CASES = [
    (2, 3, 37, 12, 20, 5, 1, "ties", torch.float32, torch.float32, False),   # D not a power of two
    (1, 2, 300, 16, 299, 0, 3, "ties", torch.bfloat16, torch.bfloat16, True),  # ties across segment borders
    (2, 2, 1100, 8, 700, 100, 4, "inf", torch.bfloat16, torch.float32, False),  # mixed K/V dtypes, +-inf
    (1, 3, 700, 32, 450, 0, 2, "distinct", torch.float32, torch.bfloat16, True),
    (2, 1, 100, 8, 100, 0, 1, "ties", torch.float32, torch.float32, False),   # keep == N
    (1, 2, 50, 8, 1, 60, 2, "inf", torch.bfloat16, torch.bfloat16, False),    # keep 1, everything protected
    (1, 2, 130, 4, 129, 200, 3, "distinct", torch.float32, torch.float32, False),
]
gen = torch.Generator().manual_seed(0)
for B, H, N, D, keep, protect, splits, kind, kd, vd, strided in CASES:
    scores = scores_for(kind, (B, H, N), gen)
    if strided:
        keys = torch.randn(B, N, H, D, generator=gen).to(kd).transpose(1, 2)
        values = torch.randn(B, N, H, 2 * D, generator=gen).to(vd)[..., ::2].transpose(1, 2)
        scores = scores.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        keys = torch.randn(B, H, N, D, generator=gen).to(kd)
        values = torch.randn(B, H, N, D, generator=gen).to(vd)
    positions = torch.arange(N, dtype=torch.int32).expand(B, H, N)  # stride-0 rows, as the cache's first chunk
    out = poisoned(keys, values, keep)
    got = le.locret_evict(keys, values, scores, positions, keep, protect, num_splits=splits, out=out)
    ref = le.locret_evict_reference(keys, values, scores, positions, keep, protect)
    for name, g, o, r in zip("kvsp", got, out, ref):
        assert g.data_ptr() == o.data_ptr(), name
        assert g.dtype == r.dtype and g.shape == r.shape, (name, g.dtype, r.dtype, g.shape, r.shape)
        if name == "p":
            assert not (g == -2**31).any(), "unwritten positions"
        else:
            assert not torch.isnan(g).any(), f"unwritten {name}"
        assert torch.equal(g.view(torch.int32) if name == "s" else g, r.view(torch.int32) if name == "s" else r), (
            name, B, H, N, keep, protect, splits)
print("KERNEL_OK")

# Fused scoring: ragged q (not a tile multiple) and F (not a power of two, several F tiles), splits 1-3,
# new_local 0 / some, bias or not, rounding. Exact inputs (multiples of 1/8): bit-identical to the reference.
def exact(shape, dtype):
    return (torch.randint(-16, 17, shape, generator=gen).float() / 8).to(dtype)

# (B, H, N, D, q, F, keep, protect, new_local, splits, bias, dtype, score dtype)
FUSED = [
    (2, 3, 70, 12, 37, 40, 30, 5, 0, 1, True, torch.float32, None),
    (1, 2, 300, 16, 45, 200, 200, 0, 7, 3, False, torch.bfloat16, torch.bfloat16),
    (2, 2, 90, 8, 90, 33, 50, 3, 4, 2, True, torch.bfloat16, None),  # every entry new
    (1, 1, 20, 8, 5, 3, 20, 0, 0, 2, False, torch.float32, None),  # keep == N
    (1, 2, 150, 8, 33, 130, 1, 40, 33, 3, True, torch.float16, torch.float16),  # all new local, keep 1
    (2, 1, 64, 4, 1, 7, 10, 0, 0, 1, True, torch.float32, None),  # one new entry
]
for B, H, N, D, q, F, keep, protect, local, splits, bias, dt, sdt in FUSED:
    keys, values = torch.randn(B, H, N, D, generator=gen).to(dt), torch.randn(B, H, N, D, generator=gen).to(dt)
    positions = torch.arange(N, dtype=torch.int32).expand(B, H, N)
    old = exact((B, H, N - q), torch.float32)
    kw = dict(new_hidden=exact((B, q, F), dt), head_weight=exact((H, F), dt),
              head_bias=exact((H,), dt) if bias else None, new_local=local, score_dtype=sdt)
    out = poisoned(keys, values, keep)
    got = le.locret_evict(keys, values, old, positions, keep, protect, num_splits=splits, out=out, **kw)
    ref = le.locret_evict_reference(keys, values, old, positions, keep, protect, **kw)
    assert all(g.data_ptr() == o.data_ptr() for g, o in zip(got, out)), "not the Triton path"
    for name, g, r in zip("kvsp", got, ref):
        assert torch.equal(g, r), (name, B, H, N, q, F, keep, protect, local, splits)
# random (inexact) inputs: fp32 sums in another order may differ in the last bit, the entries kept do not
keys, values = torch.randn(2, 2, 200, 8, generator=gen), torch.randn(2, 2, 200, 8, generator=gen)
positions = torch.arange(200, dtype=torch.int32).expand(2, 2, 200)
kw = dict(new_hidden=torch.randn(2, 50, 72, generator=gen), head_weight=torch.randn(2, 72, generator=gen),
          head_bias=torch.randn(2, generator=gen), new_local=3)
old = torch.randn(2, 2, 150, generator=gen)
got = le.locret_evict(keys, values, old, positions, 120, 10, num_splits=2, **kw)
ref = le.locret_evict_reference(keys, values, old, positions, 120, 10, **kw)
assert torch.equal(got[3], ref[3]) and torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)
print("FUSED_OK")

# Model level: the cache evicts with the kernel (use_kernels=True) and keeps exactly what the reference keeps.
from swiftkv_train.models import load_pretrained
from swiftkv_train.methods.locret.remote_code import cache_llama_locret
from swiftkv_train.methods.locret import LocretConfig, to_locret
base, _ = load_pretrained("random:smollm2-tiny")
model = to_locret(base, LocretConfig(head_hidden_size=32, budget=40, chunk_size=16, stabilizers=4, n_local=4)).eval()
with torch.no_grad():
    for _, p in model.retaining_head_parameters():
        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
calls = []
real = cache_llama_locret.locret_evict
def counting(*a, **k):
    calls.append(1)
    return real(*a, **k)
cache_llama_locret.locret_evict = counting
ids = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(1))
caches = {}
for flag in (True, False):
    model.config.use_kernels = flag
    caches[flag] = model.chunked_prefill(ids)
# keep 36: chunks 3-6 of 16 overflow it (chunks 1-2 fit, no eviction); the kernel runs only with use_kernels
assert len(calls) == model.config.num_hidden_layers * 4, len(calls)
for a, b in zip(caches[True].layers, caches[False].layers):
    assert torch.equal(a.positions, b.positions) and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert torch.equal(a.scores, b.scores)
print("MODEL_OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.timeout(120)
def test_kernel_under_interpreter():
    run_interpreter_script(_INTERPRETER_SCRIPT, "KERNEL_OK", "FUSED_OK", "MODEL_OK")


# (K dtype, V dtype, head_dim, unit d-stride): the launcher specialises a stride of 1 (the cache's layout), as the
# JIT does; one strided variant covers non-contiguous views.
# fused: None (plain kernel) or (hidden/fc2 dtype, bias, SCORE_ROUND) for the fused-scoring variant.
SM90_CASES = [("bf16", "bf16", 128, True, None), ("fp32", "fp32", 128, True, None), ("bf16", "fp16", 64, True, None),
              ("fp32", "bf16", 96, True, None), ("bf16", "bf16", 128, False, None),
              ("bf16", "bf16", 128, True, ("bf16", True, 2)), ("fp32", "fp32", 64, True, ("fp32", False, 0)),
              ("fp16", "fp16", 128, False, ("fp16", True, 1))]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("k_dtype, v_dtype, head_dim, unit_stride, fused", SM90_CASES, ids=lambda v: str(v))
def test_kernel_compiles_for_sm90(k_dtype, v_dtype, head_dim, unit_stride, fused):
    """Ahead-of-time compile down to an sm_90 cubin (ptxas ships with triton): no GPU needed."""
    triton = pytest.importorskip("triton")
    x_dtype = fused[0] if fused else "fp32"
    signature = {"k_ptr": f"*{k_dtype}", "v_ptr": f"*{v_dtype}", "s_ptr": "*fp32", "p_ptr": "*i32",
                 "ko_ptr": f"*{k_dtype}", "vo_ptr": f"*{v_dtype}", "so_ptr": "*fp32", "po_ptr": "*i32",
                 "x_ptr": f"*{x_dtype}", "w_ptr": f"*{x_dtype}", "bias_ptr": f"*{x_dtype}", "new_ptr": "*fp32"}
    ints = ("H", "N", "keep", "protect_from", "seg_len", "Q", "F", "new_local", "k_sb", "k_sh", "k_sn", "k_sd",
            "v_sb", "v_sh", "v_sn", "v_sd", "s_sb", "s_sh", "s_sn", "p_sb", "p_sh", "p_sn", "x_sb", "x_sq", "x_sf",
            "w_sh", "w_sf")
    signature.update({name: "i32" for name in ints})
    block_d = triton.next_power_of_2(head_dim)
    element_size = max(4 if "32" in k_dtype else 2, 4 if "32" in v_dtype else 2)
    constexprs = dict(D=head_dim, BLOCK_D=block_d, BLOCK_N=evict_module._copy_tile_rows(block_d, element_size),
                      BLOCK_S=evict_module._SCORE_BLOCK, NUM_PIVOTS=evict_module._NUM_PIVOTS,
                      SEARCH_PASSES=evict_module._SEARCH_PASSES)
    constexprs.update(FUSED=bool(fused), HAS_BIAS=bool(fused and fused[1]), SCORE_ROUND=fused[2] if fused else 0,
                      BLOCK_Q=evict_module._SCORE_Q_BLOCK, BLOCK_F=evict_module._SCORE_F_BLOCK)
    kernel = evict_module._locret_evict_kernel
    attrs = {}
    if unit_stride:  # what the JIT sees for a contiguous cache: d-stride 1, 16-byte aligned pointers and rows
        constexprs.update(k_sd=1, v_sd=1)
        if fused:  # contiguous hidden and fc2 weight
            constexprs.update(x_sf=1, w_sf=1)
        aligned = [name for name in signature if name.endswith("_ptr")] + ["k_sb", "k_sh", "k_sn", "v_sb", "v_sh",
                                                                          "v_sn"]
        attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    signature.update({name: "constexpr" for name in constexprs})
    compiled = compile_sm90(kernel, signature, constexprs, evict_module._NUM_WARPS, attrs=attrs)
    if unit_stride:  # K/V rows copied with vector loads, without a round trip through shared memory
        ptx = compiled.asm["ptx"]
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx
        assert compiled.metadata.shared <= 16384, compiled.metadata.shared


# ------------------------------------------------------------------------------------------------- GPU tests

DEV = "cuda"  # GPU tests build their tensors here (a debugging harness may point it at the Triton interpreter)


def _sync():
    if torch.device(DEV).type == "cuda":
        torch.cuda.synchronize()


# (batch, heads, entries, head_dim, keep, protect_newest, score kind, dtype)
GPU_SHAPES = [
    (1, 8, 17408, 128, 15360, 2500, "distinct", torch.bfloat16),  # Llama-3.1-8B: budget 16384 + chunk 1024
    (1, 8, 17408, 128, 2048, 1000, "distinct", torch.bfloat16),
    (4, 8, 5120, 128, 4096, 0, "ties", torch.bfloat16),  # 4096 + 1024, batch 4, heavy ties
    (2, 3, 1000, 64, 999, 7, "inf", torch.float32),
    (3, 2, 77, 96, 40, 50, "ties", torch.float32),  # head_dim 96, more protected than kept
    (1, 1, 4097, 128, 1, 0, "inf", torch.bfloat16),
    (2, 2, 300, 64, 300, 0, "distinct", torch.bfloat16),  # keep == N
]


def _gpu_inputs(batch, heads, n, dim, kind, dtype, seed=0):
    scores = make_scores(kind, batch, heads, n, seed)
    keys, values, positions = make_entries(batch, heads, n, dim, seed, dtype=dtype, strided=(seed % 2 == 1))
    return tuple(t.to(DEV) for t in (keys, values, scores, positions))


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 5])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + f"-{s[6]}-{s[7]}")
def test_gpu_kernel_matches_reference(shape, num_splits):
    batch, heads, n, dim, keep, protect, kind, dtype = shape
    for seed in (0, 1):  # contiguous, then strided views
        keys, values, scores, positions = _gpu_inputs(batch, heads, n, dim, kind, dtype, seed)
        out = (torch.full((batch, heads, keep, dim), float("nan"), dtype=dtype, device=DEV),
               torch.full((batch, heads, keep, dim), float("nan"), dtype=dtype, device=DEV),
               torch.full((batch, heads, keep), float("nan"), device=DEV),
               torch.full((batch, heads, keep), -(2**31), dtype=torch.int32, device=DEV))
        got = locret_evict(keys, values, scores, positions, keep, protect, num_splits=num_splits, out=out)
        _sync()
        assert all(g.data_ptr() == o.data_ptr() for g, o in zip(got, out, strict=True)), "not the Triton path"
        ref = locret_evict_reference(keys, values, scores, positions, keep, protect)
        assert not torch.isnan(got[0]).any() and not torch.isnan(got[1]).any() and not torch.isnan(got[2]).any()
        assert not (got[3] == -(2**31)).any()
        assert torch.equal(got[3], ref[3]), "different entries kept"
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        assert torch.equal(got[2].view(torch.int32), ref[2].view(torch.int32))
        if n <= 1000 and seed == 0:  # the reference itself against the brute-force rule
            assert_matches_brute_force(tuple(t.cpu() for t in got), keys.cpu(), values.cpu(), scores.cpu(),
                                       positions.cpu(), keep, protect)


@pytest.mark.gpu
def test_gpu_model_prefill_same_cache_with_and_without_kernel(tiny_locret, monkeypatch):
    model = tiny_locret.to(DEV)
    calls = []
    real = cache_llama_locret.locret_evict

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_llama_locret, "locret_evict", counting)
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(1)).to(DEV)
    settings = dict(locret_budget=48, locret_chunk_size=32, locret_stabilizers=8, locret_n_local=8)
    caches = {}
    try:
        for flag in (True, False):
            model.config.use_kernels = flag
            caches[flag] = model.chunked_prefill(ids, **settings)
    finally:
        model.config.use_kernels = True
        tiny_locret.to("cpu")
    overflowing_chunks = -(-(300 - 8) // 32) - 1  # keep 40: every chunk but the first overflows it
    assert len(calls) == model.config.num_hidden_layers * overflowing_chunks  # the kernel ran, only when enabled
    for with_kernel, without in zip(caches[True].layers, caches[False].layers, strict=True):
        assert with_kernel.num_entries == without.num_entries == 48
        assert torch.equal(with_kernel.positions, without.positions)
        torch.testing.assert_close(with_kernel.keys, without.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(with_kernel.values, without.values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(with_kernel.scores, without.scores, rtol=1e-5, atol=1e-6)


# (B, H, N, D, q, F, keep, protect, new_local, bias, K/V dtype, hidden/fc2 dtype, score dtype)
FUSED_GPU_SHAPES = [
    # Llama-3.1-8B: budget 16384 + chunk 1024 entries, the chunk's 1024 new, fc1 width 1024, bf16 model
    (1, 8, 17408, 128, 1024, 1024, 16384 - 100, 2500, 0, True, torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (1, 8, 17408, 128, 1024, 1024, 2048, 1000, 100, True, torch.bfloat16, torch.bfloat16, None),
    (2, 3, 1000, 64, 77, 200, 900, 7, 5, False, torch.float32, torch.float32, None),
    (3, 2, 300, 96, 300, 33, 40, 50, 0, True, torch.float32, torch.float16, torch.float16),  # all new
]


def _fused_gpu_inputs(shape, seed=0):
    batch, heads, n, dim, q, features, _, _, _, bias, kv_dtype, x_dtype, _ = shape
    keys, values, positions, old, hidden, weight, head_bias = fused_inputs(batch, heads, n, dim, q, features, seed,
                                                                            bias=bias, dtype=x_dtype)
    keys, values = keys.to(kv_dtype), values.to(kv_dtype)
    tensors = [t if t is None else t.to(DEV) for t in (keys, values, positions, old, hidden, weight, head_bias)]
    return tensors


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("shape", FUSED_GPU_SHAPES, ids=lambda s: "x".join(map(str, s[:9])))
def test_gpu_fused_scoring_matches_reference(shape, num_splits):
    """Exact inputs (multiples of 1/8): the kernel's fp32 sums equal torch's bit for bit, so every output does."""
    _, _, _, _, _, _, keep, protect, new_local, _, _, _, score_dtype = shape
    keys, values, positions, old, hidden, weight, head_bias = _fused_gpu_inputs(shape)
    fused = dict(new_hidden=hidden, head_weight=weight, head_bias=head_bias, new_local=new_local,
                 score_dtype=score_dtype)
    out = tuple(t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**31))
                for t in evict_module._empty_outputs(keys, values, keep))
    got = locret_evict(keys, values, old, positions, keep, protect, num_splits=num_splits, out=out, **fused)
    _sync()
    assert all(g.data_ptr() == o.data_ptr() for g, o in zip(got, out, strict=True)), "not the Triton path"
    ref = locret_evict_reference(keys, values, old, positions, keep, protect, **fused)
    assert torch.equal(got[3], ref[3]), "different entries kept"
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert torch.equal(got[2].view(torch.int32), ref[2].view(torch.int32))


@pytest.mark.gpu
def test_gpu_fused_scoring_random_inputs_llama8b():
    """Random bf16 hidden/fc2 at the 8B shape: scores equal up to fp32 summation order, (almost) the same entries."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, n, dim, q, features, keep, protect = 1, 8, 17408, 128, 1024, 1024, 16384 - 100, 2500
    keys, values, positions = make_entries(batch, heads, n, dim, seed=3, dtype=torch.bfloat16)
    old = torch.randn(batch, heads, n - q, generator=gen).to(torch.bfloat16).float()
    hidden = (torch.randn(batch, q, features, generator=gen) * 0.5).to(torch.bfloat16)
    fc2 = torch.nn.Linear(features, heads).to(torch.bfloat16)
    tensors = [t.to(DEV) for t in (keys, values, positions, old, hidden)]
    keys, values, positions, old, hidden = tensors
    fc2 = fc2.to(DEV)
    fused = dict(new_hidden=hidden, head_weight=fc2.weight.detach(), head_bias=fc2.bias.detach(), new_local=0,
                 score_dtype=torch.bfloat16)
    got = locret_evict(keys, values, old, positions, keep, protect, **fused)
    ref = locret_evict_reference(keys, values, old, positions, keep, protect, **fused)
    # the model's torch path: fc2 in bf16 (cuBLAS), then fp32, then the unfused eviction
    torch_scores = torch.cat([old, fc2(hidden).transpose(1, 2).float().detach()], dim=-1)
    unfused = locret_evict_reference(keys, values, torch_scores, positions, keep, protect)
    _sync()
    for other in (ref, unfused):
        for row_got, row_other in zip(got[3].view(-1, keep).tolist(), other[3].view(-1, keep).tolist(), strict=True):
            assert len(set(row_got) ^ set(row_other)) <= 8  # a rounding flip at the threshold moves one entry
    same = got[3] == ref[3]  # where both kept the same entry, the kernel's score is the reference's (to an ulp)
    assert same.float().mean() > 0.99
    torch.testing.assert_close(got[2][same], ref[2][same], rtol=1e-2, atol=0)  # bf16 scores: one bf16 ulp at most

