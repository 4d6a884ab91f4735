#!/usr/bin/env python
"""Benchmark the CSKV decode kernel (issue 7 part 3) against its torch reference (prints a table, writes JSON).

One decode step's attention for one layer of Llama-3.1-8B (H_q 32, H_kv 8, D 128) under CSKV at rank 204 for keys and
values (80% channel reduction), window 32: contexts 8K and 32K tokens, batch 1 and 8, compressed features 4-bit,
2-bit and unquantized (bf16):

- ``reference``: `cskv_decode_reference`, the model's path without the kernel: dequantize every compressed token,
  up-project with B, RoPE, concatenate with the window, SDPA (the whole context's K/V materialised every step);
- ``kernel``: `cskv_decode_attention` on the Triton path (flash-decoding over the compressed features; B_v applied
  after the reduction).

Each case first checks the two agree (relative L2 error and max |err| of the outputs; a disagreement is recorded and
makes the script exit non-zero after writing the JSON), then times each: median of ``--repeats`` calls after warm-up
(CUDA events; perf_counter on CPU) and the peak extra memory of one call (CUDA only).

GPU (a few minutes on an H100):
    PYTHONPATH=$PWD python scripts/bench_kernel_cskv_decode.py --out $OUT/cskv_decode.json
CPU smoke test (small shapes; the reference only, or the kernel in the Triton interpreter with TRITON_INTERPRET=1):
    PYTHONPATH=$PWD python scripts/bench_kernel_cskv_decode.py --device cpu --small --out /tmp/cskv_decode.json
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts"):  # the repo (swiftkv_train) and this folder (bench_utils), from any cwd
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_utils import (  # noqa: E402
    bench_parser, device_name, fmt, import_kernels, median_ms, patch_interpreter, peak_extra_mib, sync,
)

# Llama-3.1-8B attention at CSKV density 0.2 (rank 204 of kv_dim 1024), and a small stand-in for CPU smoke runs.
LLAMA_8B = dict(q_heads=32, kv_heads=8, head_dim=128, rank=204, window=32, theta=500000.0, contexts=(8192, 32768),
                batches=(1, 8))
SMALL = dict(q_heads=8, kv_heads=2, head_dim=64, rank=51, window=32, theta=10000.0, contexts=(256, 1024),
             batches=(1, 2))
GROUP_SIZE = 32


# ------------------------------------------------------------------------------------------------- the cases


def build_case(shape: dict, context: int, batch: int, bits: int | None, dtype, device, seed=0):
    """A CSKV cache layer holding ``context`` tokens (``window`` exact, the rest compressed) and the decode step's
    arguments (one new query per row, already in the window)."""
    from swiftkv_train.methods.cskv.remote_code.cache_llama_cskv import CSKVCacheLayer

    gen = torch.Generator(device="cpu").manual_seed(seed)
    h_q, h_kv, d, r, w = shape["q_heads"], shape["kv_heads"], shape["head_dim"], shape["rank"], shape["window"]

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    layer = CSKVCacheLayer(w, bits, GROUP_SIZE)
    positions = torch.arange(context, device=device)[None].expand(batch, -1)
    layer.append(rnd(batch, h_kv, context, d), rnd(batch, h_kv, context, d), rnd(batch, context, r),
                 rnd(batch, context, r), positions)
    inv_freq = 1.0 / shape["theta"] ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    args = (rnd(batch, h_q, 1, d), layer.keys, layer.values, rnd(h_kv * d, r, scale=r**-0.5),
            rnd(h_kv * d, r, scale=r**-0.5), inv_freq, layer.first_position, d**-0.5)
    names = ("key_features", "value_features", "key_packed", "key_scale", "key_min", "value_packed", "value_scale",
             "value_min")
    kwargs = dict({n: getattr(layer, n) for n in names}, quant_bits=bits, group_size=GROUP_SIZE)
    return layer, args, kwargs


def cache_bytes(layer) -> int:
    names = ("keys", "values", "key_features", "value_features", "key_packed", "key_scale", "key_min",
             "value_packed", "value_scale", "value_min")
    return sum(t.numel() * t.element_size() for t in (getattr(layer, n) for n in names) if t is not None)


def step_flops(shape: dict, batch: int, tokens: int) -> float:
    """Work of the kernel per step: rebuild K (r x D per token and KV head), scores and p @ c_v for every query head."""
    h_q, h_kv, d, r = shape["q_heads"], shape["kv_heads"], shape["head_dim"], shape["rank"]
    return 2.0 * batch * tokens * (h_kv * r * d + h_q * d + h_q * r)


def bench_case(cd, shape, context, batch, bits, dtype, device, repeats, with_kernel) -> dict:
    layer, args, kwargs = build_case(shape, context, batch, bits, dtype, device)
    tokens = layer.num_compressed
    row = dict(context=context, batch=batch, bits=bits, compressed_tokens=tokens, dtype=str(dtype).split(".")[-1],
               cache_mib=cache_bytes(layer) / 2**20)
    reference = lambda: cd.cskv_decode_reference(*args, **kwargs)  # noqa: E731
    kernel = lambda: cd.cskv_decode_attention(*args, **kwargs)  # noqa: E731
    warmup = 3 if device.type == "cuda" else 1
    ref_out = reference()
    row["reference"] = dict(ms=median_ms(reference, device, warmup, repeats),
                            peak_mib=peak_extra_mib(reference, device, call_off_cuda=False))
    if not with_kernel:
        return row
    t0 = time.perf_counter()
    out = kernel()  # the first call compiles
    sync(device)
    first_call_s = time.perf_counter() - t0
    diff = (out.double() - ref_out.double())
    row["rel_err"] = (diff.norm() / ref_out.double().norm()).item()
    row["max_abs_err"] = diff.abs().max().item()
    row["agree"] = bool(torch.isfinite(out).all()) and row["rel_err"] < (1e-4 if dtype == torch.float32 else 2e-2)
    ms = median_ms(kernel, device, warmup, repeats)
    row["kernel"] = dict(ms=ms, peak_mib=peak_extra_mib(kernel, device, call_off_cuda=False), first_call_s=first_call_s,
                         tflops=step_flops(shape, batch, tokens) / ms / 1e9,
                         cache_read_gbps=cache_bytes(layer) / ms / 1e6)
    row["speedup"] = row["reference"]["ms"] / ms
    if row["reference"]["peak_mib"] and row["kernel"]["peak_mib"]:
        row["mem_reduction"] = row["reference"]["peak_mib"] / row["kernel"]["peak_mib"]
    return row


# ------------------------------------------------------------------------------------------------------ output



def table(rows, meta) -> str:
    lines = [f"# CSKV decode attention, one layer, one step: {meta['device']} (torch {meta['torch']}, "
             f"triton {meta['triton']}, kernel path: {meta['kernel_path']})",
             f"# H_q {meta['shape']['q_heads']}, H_kv {meta['shape']['kv_heads']}, D {meta['shape']['head_dim']}, "
             f"rank {meta['shape']['rank']} (K and V), window {meta['shape']['window']}, group {GROUP_SIZE}, "
             f"{rows[0]['dtype'] if rows else ''}; median ms, peak extra MiB",
             f"{'context':>7} {'B':>2} {'bits':>4} {'cache MiB':>9} | {'reference':>17} | {'kernel':>17} | "
             f"{'speedup':>7} {'mem':>7} | {'TFLOP/s':>7} {'GB/s':>6} | rel err"]
    for r in rows:
        ref, ker = r["reference"], r.get("kernel")
        kernel_cells = (f"{ker['ms']:8.3f} {fmt(ker['peak_mib'], '7.1f'):>7}M | {r['speedup']:6.2f}x "
                        f"{fmt(r.get('mem_reduction'), '6.1f'):>6}x | {ker['tflops']:7.1f} "
                        f"{ker['cache_read_gbps']:6.0f} | {r['rel_err']:.2e}{'' if r['agree'] else ' DISAGREE'}"
                        if ker else "(no kernel path on this device)")
        lines.append(f"{r['context']:>7} {r['batch']:>2} {str(r['bits']):>4} {r['cache_mib']:9.1f} | "
                     f"{ref['ms']:8.3f} {fmt(ref['peak_mib'], '7.1f'):>7}M | {kernel_cells}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = bench_parser(__doc__, None, "timed calls per case (default 20 GPU, 3 CPU)")
    parser.add_argument("--bits", default="4,2,none", help="comma-separated: 2, 4, 8, none")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if os.environ.get("TRITON_INTERPRET") == "1":
        patch_interpreter()
    cd = import_kernels("cskv_decode")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    bits_list = [None if b.strip().lower() == "none" else int(b) for b in args.bits.split(",")]
    shape = SMALL if args.small else LLAMA_8B
    with_kernel = cd.kernel_available(torch.empty(0, device=device, dtype=dtype))
    if not with_kernel:
        print(f"note: no Triton path on {device}: timing the reference only", file=sys.stderr)

    rows = []
    for context in shape["contexts"]:
        for batch in shape["batches"]:
            for bits in bits_list:
                rows.append(bench_case(cd, shape, context, batch, bits, dtype, device, repeats, with_kernel))
                print(f"done: context {context}, batch {batch}, bits {bits}", file=sys.stderr)
    meta = dict(device=device_name(device), torch=torch.__version__, triton=getattr(cd.triton, "__version__", None),
                python=platform.python_version(), kernel_path=with_kernel, small=args.small, repeats=repeats,
                shape={k: v for k, v in shape.items() if k not in ("contexts", "batches")}, group_size=GROUP_SIZE)
    print(table(rows, meta))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    disagreements = [r for r in rows if r.get("agree") is False]
    if disagreements:
        print(f"ERROR: kernel and reference disagree in {len(disagreements)} case(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
