"""The 8B speed benchmark's own inference path (scripts/bench_static_graph.py) computes what transformers' eager
path computes: the packed single-token attention against plain PyTorch attention, and the preallocated-cache path
of every benchmarked model (transformers' Llama, the SwiftKV class with SwiftKV off, SwiftKV g=1 and g=2) against
the eager DynamicCache path, through the script's CPU smoke run. Its ratio warning is checked on made-up timings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_static_graph import packed_decode_attention  # noqa: E402
from bench_utils import ratio, spread_stats  # noqa: E402


class _Attn(torch.nn.Module):
    num_key_value_groups = 4


def _reference_attention(q, k, v, keep, scale):
    """Softmax attention in float64 with K/V repeated to every query head; ``keep`` [B, L] marks visible keys."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [B, 1, H, D], as transformers' attention returns


@pytest.mark.parametrize("masked", [True, False])
def test_packed_decode_attention_matches_plain_attention(masked):
    gen = torch.Generator().manual_seed(0)
    b, h_kv, rep, length, d = 3, 2, 4, 11, 8
    q = torch.randn(b, h_kv * rep, 1, d, generator=gen)
    k, v = torch.randn(b, h_kv, length, d, generator=gen), torch.randn(b, h_kv, length, d, generator=gen)
    visible = torch.tensor([5, 11, 8]) if masked else torch.full((b,), length)
    keep = torch.arange(length)[None, :] < visible[:, None]  # a static cache's unused tail, per sequence
    mask = keep[:, None, None, :] if masked else None
    out, _ = packed_decode_attention(_Attn(), q, k, v, mask, scaling=0.3)
    ref = _reference_attention(q, k, v, keep, 0.3)
    assert out.shape == (b, 1, h_kv * rep, d)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # the hidden tail really is ignored: changing it changes nothing
    if masked:
        k2 = k.clone()
        k2[0, :, 5:] = 100.0
        torch.testing.assert_close(packed_decode_attention(_Attn(), q, k2, v, mask, scaling=0.3)[0], out)


def test_ratio_warns_when_spreads_are_wide():
    steady = spread_stats([1.0, 1.01, 0.99, 1.0])
    noisy = spread_stats([0.5, 0.5, 0.8, 0.5])
    assert steady["median"] == 1.0 and abs(steady["spread"] - 0.02) < 1e-12
    assert not ratio(steady, spread_stats([0.5, 0.505, 0.5]))["unstable"]
    r = ratio(steady, noisy)
    assert r["unstable"] and r["speedup"] == 2.0 and abs(r["low"] - 0.99 / 0.8) < 1e-12 and r["high"] == 1.01 / 0.5


def test_small_run_checks_every_path_and_reports_spreads(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_swiftkv_8b.py"), "--small", "--diagnose",
                           "--prefill", "2x16", "--decode-batches", "2", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert set(result["check"]) == {"hf", "fused", "swiftkv_g1", "swiftkv_g2"}
    for name, check in result["check"].items():  # fp32 tiny model: the static path is the eager path's function
        assert check["prefill_rel_err"] < 1e-5 and check["decode_rel_err"] < 1e-5 and check["ok"], name
    assert [(row["batch"], row["length"]) for row in result["prefill"]] == [(2, 16)]
    for row in result["prefill"]:
        assert len(row["variants"]) == 6 and len(row["ratios"]) == 8
        for st in row["variants"].values():
            assert st["min"] <= st["median"] <= st["max"] and st["n"] == 4
    assert {(r["variant"], r["batch"]) for r in result["decode"]} == {
        (v, b) for v in ("hf", "fused", "hf_graph", "fused_graph", "swiftkv_g1", "swiftkv_g2", "swiftkv_g1_graph",
                         "swiftkv_g2_graph") for b in (2,)}
    # bytes per cached token: 4 layers' K and V (2 KV heads x 16 dims, fp32); SwiftKV g=2 keeps 2 + 1 slots
    kv = {r["variant"]: r["kv_bytes_per_token"] for r in result["decode"]}
    assert kv["hf"] == kv["hf_graph"] == 4 * 2 * 2 * 16 * 4 and kv["swiftkv_g2_graph"] == 3 * 2 * 2 * 16 * 4
    assert {"decode/hf/default", "decode/hf/no-cudnn", "prefill/swiftkv_g1_graph"} <= set(result["diagnose"])
