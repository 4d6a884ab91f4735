#!/usr/bin/env python
"""Benchmark the Locret eviction kernel against the torch paths (prints a table, writes JSON).

GPU (Llama-3.1-8B per-layer shapes: H_kv 8, D 128, bf16; not yet run on a GPU, expected well under a minute):
    PYTHONPATH=$PWD python scripts/bench_kernel_locret_evict.py --out $OUT/locret_evict.json
CPU smoke test (torch paths only, small shapes):
    PYTHONPATH=$PWD python scripts/bench_kernel_locret_evict.py --device cpu --small --out /tmp/locret_evict.json

One eviction = what every layer runs after each prefill chunk: N = budget + chunk entries in, ``keep`` out, the
newest ``stabilizers`` protected. Cases: N = 16384 + 1024 keeping 16384 - 100 (the paper's budget minus its local
tokens) and N = 4096 + 1024 keeping 4096, at batch 1 and 4. Methods:

- ``torch_topk``: what ``LocretLayer.evict`` ran before the kernel (clone, +inf fill, topk, sort, four gathers).
- ``reference``: `locret_evict_reference` (the same with a stable sort: ties go to the earlier entry).
- ``kernel``: `locret_evict` (one Triton launch), with the automatic split and with ``num_splits=1`` (one program
  per (batch row, KV head)), plus any ``--splits`` given.

Every method's selection is checked against the reference before timing (the kernel must match it exactly).
Bandwidth = the bytes an eviction must move (read the kept K/V rows, all scores and positions; write the kept
rows, scores, positions) / time, also as % of the measured 3.0 TB/s H100 copy ceiling.

``--fused-scoring``: the retaining head's last stage with the eviction, at the 8B shape (B 1, H_kv 8, N 16384 +
1024 of which the chunk's q = 1024 are new, fc1 width F = 1024, bf16; ``--small``: a tiny shape). Methods, all from
the step's hidden activations act(fc1(qkv)) [B, q, F] and the older entries' scores:

- ``torch_fc2_topk``: fc2 (F.linear in the model dtype) + transpose + fp32 + cat, then the ``torch_topk`` eviction
  (the model's path before the kernel).
- ``torch_fc2_reference``: the same scores, then `locret_evict_reference`.
- ``fc2_then_kernel``: the same scores, then the unfused kernel (the model's path before fusing fc2).
- ``fused_kernel``: `locret_evict` with ``new_hidden``/``head_weight``/``head_bias`` (one launch).

The inputs are multiples of 1/8, so every fp32 sum is exact and the fused kernel must match the unfused paths'
selection exactly (checked before timing).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "scripts"):  # the repo (swiftkv_train) and this folder (bench_utils), from any cwd
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_utils import bench_parser, device_name, fmt, import_kernels, median_ms, peak_extra_mib  # noqa: E402

PEAK_COPY_TBPS = 3.0  # measured H100 copy ceiling (../shared/device/README.md)
STABILIZERS = 2500  # the paper's Llama-3.1-8B setting: the newest entries every intermediate eviction keeps


# --------------------------------------------------------------------------------------------------- the cases


def cases(small):
    """(batch, kv_heads, head_dim, entries N, keep, protect_newest)."""
    if small:
        return [(b, 2, 16, n, keep, min(40, keep)) for b in (1, 2)
                for n, keep in ((300 + 64, 300 - 10), (128 + 64, 128))]
    return [(b, 8, 128, n, keep, STABILIZERS) for b in (1, 4)
            for n, keep in ((16384 + 1024, 16384 - 100), (4096 + 1024, 4096))]


def make_inputs(batch, heads, dim, n, dtype, device, seed=0):
    """A cache layer as the model leaves it: contiguous K/V, fp32 scores rounded to bf16 (the retaining head runs
    in the model dtype, so ties are common), int32 positions."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, n, dim, generator=gen).to(device, dtype)
    values = torch.randn(batch, heads, n, dim, generator=gen).to(device, dtype)
    scores = torch.randn(batch, heads, n, generator=gen).to(torch.bfloat16).float().to(device)
    positions = torch.arange(n, dtype=torch.int32).expand(batch, heads, n).contiguous().to(device)
    return keys, values, scores, positions


def torch_topk_evict(keys, values, scores, positions, keep, protect_newest):
    """``LocretLayer.evict`` before the kernel (ties broken however topk breaks them)."""
    n = scores.shape[-1]
    ranking = scores.clone()
    ranking[..., n - protect_newest :] = float("inf")
    index = ranking.topk(keep, dim=-1).indices.sort(dim=-1).values
    index_kv = index.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
    return keys.gather(2, index_kv), values.gather(2, index_kv), scores.gather(2, index), positions.gather(2, index)


def min_bytes(keys, values, n, keep):
    """Bytes one eviction must move: kept K/V rows in and out, all scores and positions in, kept ones out."""
    batch, heads, _, dim = keys.shape
    rows = batch * heads
    kv = keep * dim * (keys.element_size() + values.element_size())
    return rows * (2 * kv + n * 8 + keep * 8)


def same_selection(got, ref):
    """(identical outputs, identical kept positions)."""
    identical = all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    return identical, torch.equal(got[3], ref[3])


def methods(evict, split_options):
    out = {
        "torch_topk": torch_topk_evict,
        "reference": evict.locret_evict_reference,
    }
    for splits in split_options:
        label = "kernel" if splits is None else f"kernel(splits={splits})"
        out[label] = lambda *a, splits=splits: evict.locret_evict(*a, num_splits=splits)
    return out


def measure(methods, inputs, keep, protect, ref, moved, case, device, repeats, exact) -> dict:
    """Per method: median ms, achieved TB/s (and % of the copy peak), peak extra MiB and whether it keeps the
    reference's entries ``ref``; a method for which ``exact(name)`` holds must keep exactly those."""
    results = {}
    for name, fn in methods.items():
        call = lambda fn=fn: fn(*inputs, keep, protect)  # noqa: E731
        identical, same_kept = same_selection(call(), ref)
        if exact(name) and not identical:
            raise AssertionError(f"{name} differs from the reference on {case}")
        ms = median_ms(call, device, repeats=repeats)
        results[name] = dict(ms=ms, tbps=moved / ms / 1e9, pct_copy_peak=100 * moved / ms / 1e9 / PEAK_COPY_TBPS,
                             peak_mib=peak_extra_mib(call, device), identical_to_reference=identical,
                             same_kept_entries=same_kept)
    return results


def bench_case(evict, case, dtype, device, repeats, split_options):
    batch, heads, dim, n, keep, protect = case
    inputs = make_inputs(batch, heads, dim, n, dtype, device)
    ref = evict.locret_evict_reference(*inputs, keep, protect)
    moved = min_bytes(inputs[0], inputs[1], n, keep)
    row = dict(batch=batch, kv_heads=heads, head_dim=dim, entries=n, keep=keep, protect_newest=protect,
               dtype=str(dtype).replace("torch.", ""), min_bytes=moved,
               ideal_ms=moved / (PEAK_COPY_TBPS * 1e12) * 1e3,
               results=measure(methods(evict, split_options), inputs, keep, protect, ref, moved, case, device, repeats,
                               exact=lambda name: name.startswith("kernel")))
    kernel_ms = row["results"]["kernel"]["ms"]
    row["speedup_kernel_vs_torch_topk"] = row["results"]["torch_topk"]["ms"] / kernel_ms
    row["speedup_kernel_vs_reference"] = row["results"]["reference"]["ms"] / kernel_ms
    return row


# ------------------------------------------------------------------------------------------ fused scoring


def fused_cases(small):
    """(batch, kv_heads, head_dim, entries N, new q, features F, keep, protect_newest)."""
    if small:
        return [(1, 2, 16, 300 + 64, 64, 40, 300 - 10, 40)]
    return [(1, 8, 128, 16384 + 1024, 1024, 1024, 16384 - 100, STABILIZERS)]


def make_fused_inputs(batch, heads, dim, n, q, features, dtype, device, seed=0):
    """K/V, the older entries' scores [B, H, N - q], positions, hidden [B, q, F] and fc2 (weight, bias), all values
    multiples of 1/8 (exact fp32 sums: the fused and unfused scores are bit-identical)."""
    gen = torch.Generator().manual_seed(seed)

    def exact(*shape):
        return (torch.randint(-16, 17, shape, generator=gen).float() / 8).to(device, dtype)

    keys = torch.randn(batch, heads, n, dim, generator=gen).to(device, dtype)
    values = torch.randn(batch, heads, n, dim, generator=gen).to(device, dtype)
    old = exact(batch, heads, n - q).float()
    positions = torch.arange(n, dtype=torch.int32).expand(batch, heads, n).contiguous().to(device)
    return keys, values, old, positions, exact(batch, q, features), exact(heads, features), exact(heads)


def fused_methods(evict):
    def torch_scores(old, hidden, weight, bias):
        return torch.cat([old, torch.nn.functional.linear(hidden, weight, bias).transpose(1, 2).float()], dim=-1)

    def unfused(evict_fn):
        def run(keys, values, old, positions, hidden, weight, bias, keep, protect):
            return evict_fn(keys, values, torch_scores(old, hidden, weight, bias), positions, keep, protect)
        return run

    def fused(keys, values, old, positions, hidden, weight, bias, keep, protect):
        return evict.locret_evict(keys, values, old, positions, keep, protect, new_hidden=hidden, head_weight=weight,
                                  head_bias=bias, score_dtype=hidden.dtype)

    return {"torch_fc2_topk": unfused(torch_topk_evict), "torch_fc2_reference": unfused(evict.locret_evict_reference),
            "fc2_then_kernel": unfused(evict.locret_evict), "fused_kernel": fused}


def bench_fused_case(evict, case, dtype, device, repeats):
    batch, heads, dim, n, q, features, keep, protect = case
    inputs = make_fused_inputs(batch, heads, dim, n, q, features, dtype, device)
    all_methods = fused_methods(evict)
    ref = all_methods["torch_fc2_reference"](*inputs, keep, protect)
    moved = min_bytes(inputs[0], inputs[1], n, keep)
    row = dict(batch=batch, kv_heads=heads, head_dim=dim, entries=n, new=q, features=features, keep=keep,
               protect_newest=protect, dtype=str(dtype).replace("torch.", ""), min_bytes=moved,
               ideal_ms=moved / (PEAK_COPY_TBPS * 1e12) * 1e3,
               results=measure(all_methods, inputs, keep, protect, ref, moved, case, device, repeats,
                               exact=lambda name: name in ("fc2_then_kernel", "fused_kernel")))
    fused_ms = row["results"]["fused_kernel"]["ms"]
    row["speedup_fused_vs_torch_fc2_topk"] = row["results"]["torch_fc2_topk"]["ms"] / fused_ms
    row["speedup_fused_vs_fc2_then_kernel"] = row["results"]["fc2_then_kernel"]["ms"] / fused_ms
    return row


def method_lines(results) -> list[str]:
    """One line per method: median ms | TB/s (% of the copy peak) | peak extra MiB, '*' when it kept other entries."""
    return [f"  {name:<20} {m['ms']:9.3f} ms | {m['tbps']:6.2f} TB/s ({m['pct_copy_peak']:5.1f}%) | "
            f"{fmt(m['peak_mib'], '8.1f')} MiB{'' if m['same_kept_entries'] else ' *'}" for name, m in results.items()]


def render(meta, rows):
    """The report: a header naming the platform, then per case its shape, its speedups and one line per method."""
    fused = meta.get("fused_scoring", False)
    title = "Locret eviction with fused retaining-head scoring (fc2)" if fused else "Locret eviction"
    lines = [f"# {title} on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}, "
             f"triton path: {meta['triton_path']})",
             f"per method: median ms | achieved TB/s (% of {PEAK_COPY_TBPS} TB/s copy) | peak extra MiB; "
             f"'*' = keeps other entries than the reference (ties)"]
    for r in rows:
        new_tokens = f"q={r['new']} F={r['features']} " if fused else ""
        if fused:
            summary = (f"fused {r['speedup_fused_vs_torch_fc2_topk']:.2f}x vs torch_fc2_topk, "
                       f"{r['speedup_fused_vs_fc2_then_kernel']:.2f}x vs fc2_then_kernel")
        else:
            summary = (f"must move {r['min_bytes'] / 2**20:.1f} MiB, ideal {r['ideal_ms']:.3f} ms; "
                       f"kernel {r['speedup_kernel_vs_torch_topk']:.2f}x vs torch_topk, "
                       f"{r['speedup_kernel_vs_reference']:.2f}x vs reference")
        lines.append("")
        lines.append(f"B={r['batch']} H={r['kv_heads']} D={r['head_dim']} N={r['entries']} {new_tokens}"
                     f"keep={r['keep']} protect={r['protect_newest']} {r['dtype']}: {summary}")
        lines += method_lines(r["results"])
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main


def parse_splits(text):
    return [None if s == "auto" else int(s) for s in text.split(",") if s]


def main(argv=None):
    parser = bench_parser(__doc__, 20)
    parser.add_argument("--splits", default="auto,1", help="kernel variants: comma-separated num_splits, 'auto'")
    parser.add_argument("--fused-scoring", action="store_true",
                        help="bench the eviction with the retaining head's fc2 fused in (see above) instead")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.time()
    evict = import_kernels("locret_evict")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    split_options = parse_splits(args.splits)
    if None not in split_options:
        split_options.insert(0, None)  # the automatic split is the headline "kernel" row
    triton_path = evict.kernel_available(torch.empty(0, device=device, dtype=dtype))
    if not triton_path:
        print(f"note: no Triton path on {device}: the 'kernel' rows run the torch reference", file=sys.stderr)
    meta = dict(device=device_name(device), torch=torch.__version__, triton=getattr(evict.triton, "__version__", None),
                python=platform.python_version(), triton_path=triton_path, small=args.small,
                peak_copy_tbps=PEAK_COPY_TBPS, repeats=args.repeats)
    if args.fused_scoring:
        meta["fused_scoring"] = True
        rows = [bench_fused_case(evict, case, dtype, device, args.repeats) for case in fused_cases(args.small)]
        table = render(meta, rows)
    else:
        rows = []
        for case in cases(args.small):
            rows.append(bench_case(evict, case, dtype, device, args.repeats, split_options))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the case's inputs are gone: start the next one from a clean pool
        table = render(meta, rows)
    table += f"\n\ntotal wall time {time.time() - start:.1f} s"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(meta=meta, cases=rows, table=table), indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
