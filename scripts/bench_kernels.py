#!/usr/bin/env python
"""Benchmark the fused kernels of issue 7 against their torch references (prints a table, writes JSON).

GPU (Llama-3.1-8B shapes, random bf16 weights; < 3 minutes on an H100):
    PYTHONPATH=$PWD python scripts/bench_kernels.py --out $OUT/kernels.json
Covers all four kernels: the SwiftKV K/V pass and the KD loss here, the CSKV decode attention and the Locret
eviction through their own scripts (``--only cskv_decode`` / ``--only locret_evict``, JSON beside ``--out``).

CPU smoke test (references / CPU fallbacks only, small shapes):
    PYTHONPATH=$PWD python scripts/bench_kernels.py --device cpu --small --out /tmp/kernels.json

1. SwiftKV prefill K/V: fused (RMSNorm kernel + one GEMM + RoPE/scatter kernel) vs the unfused torch path the model
   runs (norm, 2·G GEMMs, G RoPEs, the cache's contiguous copy), at 2K/8K/32K tokens, g = 1 (16 groups) and g = 4
   (4 groups); plus the single GEMM alone (the floor) and fused + a DynamicCache-style ``torch.cat`` per group.
2. Distillation loss, forward + backward at 8K tokens (vocab 128256): `chunked_kl_loss` (torch reference) vs
   `fused_kl_loss`, and liger-kernel's fused linear JSD losses at beta = 0 (= KL(teacher‖student)) when
   ``liger_kernel`` is importable; each checked against the reference (loss and student gradient) before timing.

Needs only torch (+ triton for the fused paths, + liger_kernel optionally) and the repo on PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts"):  # the repo (swiftkv_train) and this folder (bench_utils), from any cwd
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_utils import bench_parser, device_name, fmt, import_kernels, median_ms, peak_extra_mib, sync  # noqa: E402

# Measured H100 ceilings (../shared/device/README.md).
PEAK_BF16_TFLOPS = 692.0
PEAK_COPY_TBPS = 3.0


# --------------------------------------------------------------------------------------------- kernel 1: SwiftKV


def bench_swiftkv(skv, device, small, repeats):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if small:
        hidden, kv_heads, head_dim, later_layers = 256, 2, 64, 8
        token_counts, group_sizes = [128, 300], [1, 4]
    else:
        hidden, kv_heads, head_dim, later_layers = 4096, 8, 128, 16  # Llama-3.1-8B, M = 16 of 32 layers
        token_counts, group_sizes = [2048, 8192, 32768], [1, 4]
    kv_dim = kv_heads * head_dim
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for g in group_sizes:
        groups = math.ceil(later_layers / g)
        w = (torch.randn(groups * 2 * kv_dim, hidden, generator=gen) * hidden**-0.5).to(device, dtype)
        norm_w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
        for tokens in token_counts:
            h = (torch.randn(1, tokens, hidden, generator=gen) * 2).to(device, dtype)
            pos = torch.arange(tokens, device=device, dtype=torch.float32)
            inv = 500000.0 ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
            ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)[None]
            cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
            args = (h, norm_w, 1e-5, w, cos, sin, groups, kv_heads, head_dim)

            def unfused():
                return skv.swiftkv_kv_reference(*args)

            def fused():
                return skv.fused_swiftkv_kv(*args)

            def fused_cat():  # what DynamicCache.update would add: torch.cat([empty, k], -2) per K and V
                empty = torch.empty(1, kv_heads, 0, head_dim, device=device, dtype=dtype)
                return [(torch.cat([empty, k], -2), torch.cat([empty, v], -2)) for k, v in fused()]

            normed = skv._rms_norm_reference(h, norm_w, 1e-5).reshape(tokens, hidden)

            def gemm_only():
                return torch.nn.functional.linear(normed, w)

            # correctness first
            got, ref = fused(), unfused()
            max_err = max(max((a.float() - b.float()).abs().max().item() for a, b in zip(x, y))
                          for x, y in zip(got, ref))
            ref_scale = max(max(t.float().abs().max().item() for t in y) for y in ref)
            del got, ref
            flops = 2 * tokens * hidden * groups * 2 * kv_dim
            out_bytes = tokens * groups * 2 * kv_dim * h.element_size()
            min_bytes = h.numel() * h.element_size() + w.numel() * w.element_size() + out_bytes
            ideal_ms = max(flops / (PEAK_BF16_TFLOPS * 1e12), min_bytes / (PEAK_COPY_TBPS * 1e12)) * 1e3
            case = dict(kernel="swiftkv_kv", dtype=str(dtype).replace("torch.", ""), tokens=tokens, g=g, groups=groups,
                        hidden=hidden, kv_heads=kv_heads, head_dim=head_dim, max_abs_err=max_err,
                        ref_max_abs=ref_scale, ideal_ms=ideal_ms, gflop=flops / 1e9, out_mib=out_bytes / 2**20)
            results = {}
            for name, fn in (("unfused_torch", unfused), ("fused", fused), ("fused+cache_cat", fused_cat),
                             ("gemm_only", gemm_only)):
                if name == "fused+cache_cat" and small:
                    continue
                ms = median_ms(fn, device, repeats=repeats)
                mem = peak_extra_mib(fn, device)
                results[name] = dict(ms=ms, tflops=flops / ms / 1e9, peak_mib=mem)
            case["results"] = results
            case["speedup_fused_vs_unfused"] = results["unfused_torch"]["ms"] / results["fused"]["ms"]
            rows.append(case)
            del h, cos, sin, normed
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ kernel 2: KD loss


def _liger_methods(temperature, chunk):
    """liger-kernel's fused linear JSD at beta = 0, i.e. KL(teacher ‖ student), scaled by T² to match ours."""
    methods, errors = {}, {}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        for compiled in (True, False):
            loss_mod = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                               temperature=temperature, compiled=compiled, chunk_size=chunk)

            def run(s, t, w, mask, loss_mod=loss_mod):
                labels = torch.where(mask.reshape(-1), 0, -100)  # masked-out rows: ignore_index
                return loss_mod(s, w, t, w, labels) * temperature**2

            methods[f"liger_chunked_jsd{'_compiled' if compiled else '_eager'}"] = run
    except Exception as exc:  # noqa: BLE001
        errors["liger_chunked_jsd"] = repr(exc)[:300]
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=temperature)

        def run_jsd(s, t, w, mask):
            labels = torch.where(mask.reshape(-1), 0, -100)
            return jsd(s, w, t, w, labels) * temperature**2

        methods["liger_fused_linear_jsd"] = run_jsd
    except Exception as exc:  # noqa: BLE001
        errors["liger_fused_linear_jsd"] = repr(exc)[:300]
    return methods, errors


def bench_kd(kd, device, small, repeats, with_liger, deadline):
    from swiftkv_kernels.kd_loss import kl_loss_reference
    from swiftkv_train.losses import KL

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if small:
        tokens, hidden, vocab = 256, 128, 1003
    else:
        tokens, hidden, vocab = 8192, 4096, 128256
    temperature, chunk = 2.0, 1024
    gen = torch.Generator(device="cpu").manual_seed(1)
    s0 = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    t0 = (s0.float() + 0.5 * torch.randn(tokens, hidden, generator=gen).to(device)).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * (4.0 / hidden**0.5)).to(device, dtype)
    mask = (torch.rand(tokens, generator=gen) < 0.8).to(device)  # ~80% assistant tokens
    masked = int(mask.sum())

    methods = {
        "chunked_kl_loss(ref)": lambda s, t, w, m: KL()(s, t, w, m, temperature=temperature, chunk_size=chunk),
        "fused_kl_loss": lambda s, t, w, m: kd.fused_kl_loss(s, t, w, m, temperature, chunk, "mean"),
        "fused_kl_loss(chunk=4096)": lambda s, t, w, m: kd.fused_kl_loss(s, t, w, m, temperature, 4096, "mean"),
    }
    if small:
        methods["naive_kl_loss"] = lambda s, t, w, m: kl_loss_reference(s, t, w, m, temperature, s.shape[0] * s.shape[1], "mean")
    liger_errors = {}
    if with_liger:
        liger, liger_errors = _liger_methods(temperature, chunk)
        methods.update(liger)

    def step(fn):
        s = s0.detach().clone().requires_grad_()
        loss = fn(s, t0, w, mask)
        loss.backward()
        return loss.detach(), s.grad

    ref_loss, ref_grad = step(methods["chunked_kl_loss(ref)"])
    flops = 3 * 2 * masked * hidden * vocab  # student + teacher logits, grad_hidden
    rows = []
    for name, fn in methods.items():
        row = dict(kernel="kd_loss", method=name, tokens=tokens, masked=masked, vocab=vocab, hidden=hidden,
                   temperature=temperature)
        if name.startswith("liger") and time.time() > deadline:
            row["skipped"] = "time budget"
            rows.append(row)
            continue
        try:
            t_first = time.perf_counter()
            loss, grad = step(fn)  # includes torch.compile for liger's compiled variant
            sync(device)
            row["first_call_s"] = time.perf_counter() - t_first
            row["loss"] = loss.item()
            row["loss_rel_err_vs_ref"] = abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())
            row["grad_rel_err_vs_ref"] = ((grad.float() - ref_grad.float()).norm() / ref_grad.float().norm()).item()
            del loss, grad
            slow = name.startswith("chunked") or name.startswith("naive") or name.endswith("_eager")
            reps = max(2, repeats // 3) if slow else repeats
            row["ms"] = median_ms(lambda: step(fn), device, warmup=1, repeats=reps)
            row["tflops"] = flops / row["ms"] / 1e9
            row["peak_mib"] = peak_extra_mib(lambda: step(fn), device)
        except Exception as exc:  # noqa: BLE001 - one failing optional method must not sink the benchmark
            row["error"] = repr(exc)[:300]
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, liger_errors


# -------------------------------------------------------------------------------------------------------- main



def main(argv=None):
    parser = bench_parser(__doc__, 10)
    parser.add_argument("--no-liger", action="store_true", help="skip liger_kernel even if importable")
    parser.add_argument("--only", choices=["swiftkv", "kd", "cskv_decode", "locret_evict"], default=None,
                        help="one kernel; default: all four (cskv_decode and locret_evict run their own scripts)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="skip optional (liger) runs past this")
    args = parser.parse_args(argv)
    if args.only in _DELEGATED:
        return _run_delegated(args.only, args)
    device = torch.device(args.device)
    start = time.time()
    skv, kd = import_kernels("swiftkv_prefill_kv", "kd_loss")
    uses_triton = skv.kernel_available(torch.empty(0, device=device, dtype=torch.bfloat16))
    fp32_logits = None
    if device.type == "cuda":  # whether the KD loss gets fp32 logits from bf16 GEMMs (torch.mm out_dtype)
        fp32_logits = kd._mm_supports_fp32_out(torch.empty(1, device=device, dtype=torch.bfloat16), None)
    meta = dict(device=device_name(device), torch=torch.__version__, triton=getattr(skv.triton, "__version__", None),
                python=platform.python_version(), triton_path=uses_triton, small=args.small,
                peak_bf16_tflops=PEAK_BF16_TFLOPS, peak_copy_tbps=PEAK_COPY_TBPS, kd_fp32_logits_gemm=fp32_logits)
    if not uses_triton:
        print(f"note: no Triton path on {device}: the 'fused' rows run the torch fallbacks", file=sys.stderr)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the references' fp32 GEMMs as they run in training

    swiftkv_rows, kd_rows, liger_errors = [], [], {}
    if args.only in (None, "swiftkv"):
        swiftkv_rows = bench_swiftkv(skv, device, args.small, args.repeats)
    if args.only in (None, "kd"):
        with_liger = not args.no_liger and importlib.util.find_spec("liger_kernel") is not None
        if not with_liger and not args.no_liger:
            liger_errors["liger_kernel"] = "not importable"
        kd_rows, more = bench_kd(kd, device, args.small, args.repeats, with_liger, start + args.budget_s)
        liger_errors.update(more)

    lines = [f"# kernels benchmark on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}, "
             f"triton path: {uses_triton})"]
    if swiftkv_rows:
        lines.append("")
        lines.append(f"SwiftKV prefill K/V (batch 1, {swiftkv_rows[0]['dtype']}): median ms, peak extra MiB; "
                     f"fused TFLOP/s as % of {PEAK_BF16_TFLOPS:.0f}")
        lines.append(f"{'tokens':>6} {'g':>2} {'G':>3} | {'unfused':>18} | {'fused':>18} | {'fused+cat':>10} | "
                     f"{'gemm only':>9} | {'ideal':>6} | speedup | max|err|")
        for c in swiftkv_rows:
            r = c["results"]
            u, f = r["unfused_torch"], r["fused"]
            fc = r.get("fused+cache_cat", {}).get("ms")
            lines.append(
                f"{c['tokens']:>6} {c['g']:>2} {c['groups']:>3} | {u['ms']:7.3f} {fmt(u['peak_mib'], '8.0f'):>8}M | "
                f"{f['ms']:7.3f} {fmt(f['peak_mib'], '8.0f'):>8}M | {fmt(fc, '10.3f')} | "
                f"{r['gemm_only']['ms']:9.3f} | "
                f"{c['ideal_ms']:6.3f} | {c['speedup_fused_vs_unfused']:6.2f}x | {c['max_abs_err']:.3g} "
                f"({100 * f['tflops'] / PEAK_BF16_TFLOPS:.0f}% peak)"
            )
    if kd_rows:
        first = kd_rows[0]
        lines.append("")
        lines.append(f"KD loss fwd+bwd: {first['tokens']} tokens ({first['masked']} masked in), H={first['hidden']}, "
                     f"V={first['vocab']}, T={first['temperature']}")
        lines.append(f"{'method':<30} {'ms':>9} {'TFLOP/s':>8} {'peak MiB':>9} {'loss rel err':>12} "
                     f"{'grad rel err':>12} {'1st call s':>10}")
        ref_ms = next((r.get("ms") for r in kd_rows if r["method"].startswith("chunked")), None)
        ref_mem = next((r.get("peak_mib") for r in kd_rows if r["method"].startswith("chunked")), None)
        for r in kd_rows:
            if "error" in r or "skipped" in r:
                lines.append(f"{r['method']:<30} {r.get('error') or r.get('skipped')}")
                continue
            lines.append(f"{r['method']:<30} {r['ms']:9.2f} {r['tflops']:8.1f} {fmt(r['peak_mib'], '9.0f')} "
                         f"{r['loss_rel_err_vs_ref']:12.2e} {r['grad_rel_err_vs_ref']:12.2e} {r['first_call_s']:10.2f}")
            if ref_ms and not r["method"].startswith("chunked"):
                r["speedup_vs_ref"] = ref_ms / r["ms"]
                if ref_mem and r.get("peak_mib"):
                    r["mem_reduction_vs_ref"] = ref_mem / r["peak_mib"]
        for r in kd_rows:
            if "speedup_vs_ref" in r:
                red = r.get("mem_reduction_vs_ref")
                lines.append(f"  {r['method']}: {r['speedup_vs_ref']:.2f}x faster, "
                             f"{fmt(red, '.2f')}x less peak memory than chunked_kl_loss")
        for k, v in liger_errors.items():
            lines.append(f"  ({k}: {v})")
    lines.append("")
    lines.append(f"total wall time {time.time() - start:.1f} s")
    table = "\n".join(lines)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(meta=meta, swiftkv=swiftkv_rows, kd=kd_rows,
                                                  liger_errors=liger_errors, table=table), indent=2) + "\n")
    print(table)
    if args.only is None:
        for name in _DELEGATED:
            _run_delegated(name, args)


# The CSKV decode and Locret eviction kernels have their own scripts (their own shapes and options).
_DELEGATED = {"cskv_decode": "bench_kernel_cskv_decode", "locret_evict": "bench_kernel_locret_evict"}


def _run_delegated(name: str, args) -> None:
    """Run ``scripts/<_DELEGATED[name]>.py`` with the shared options; its JSON goes beside ``--out``."""
    module = importlib.import_module(_DELEGATED[name])
    forwarded = ["--device", args.device] + (["--small"] if args.small else [])
    if args.out:
        out = Path(args.out)
        forwarded += ["--out", str(out.with_name(f"{out.stem}_{name}{out.suffix}"))]
    print()
    module.main(forwarded)


if __name__ == "__main__":
    main()
