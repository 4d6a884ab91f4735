#!/usr/bin/env python
"""Locret's memory at Llama-3.1-8B shapes: peak KV cache and peak GPU memory of a long prefill, budgeted vs full.

    PYTHONPATH=$PWD python scripts/bench_locret_8b.py --tokens 32768 131072 --out locret_8b.json

Random bf16 weights in Llama-3.1-8B shapes with (untrained) retaining heads: memory and time do not depend on
the weights. Full cache = one forward over the prompt with a DynamicCache and ``logits_to_keep=1`` (SDPA).
Locret = ``chunked_prefill`` with the paper's 8B setting (budget 16384, chunk 1024, stabilizers 2500, n_local 100).
Per run: the largest KV cache held (measured from the cache object after every layer's attention, before its
eviction), ``torch.cuda.max_memory_allocated`` (weights + cache + activations), and the prefill wall time.
Prints a table; writes every number to --out.
"""

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

from swiftkv_train.cache_stats import cache_nbytes
from swiftkv_train.models import load_pretrained
from swiftkv_train.methods.locret import LocretConfig, prefill_peak, to_locret

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import sync  # noqa: E402

GIB = 2**30


def _reset(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)


def _peak(device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")


def run_full(model, ids, device) -> dict:
    _reset(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
    sync(device)
    seconds = time.perf_counter() - start
    result = {"kv_peak_gib": cache_nbytes(out.past_key_values) / GIB, "gpu_peak_gib": _peak(device),
              "prefill_s": seconds}
    del out
    return result


def run_locret(model, ids, device, settings: dict) -> dict:
    _reset(device)
    start = time.perf_counter()
    peak_bytes, peak_entries, cache = prefill_peak(model, ids, **settings)
    sync(device)
    seconds = time.perf_counter() - start
    result = {"kv_peak_gib": peak_bytes / GIB, "kv_peak_entries_per_layer": peak_entries,
              "kv_after_prefill_gib": cache_nbytes(cache) / GIB, "gpu_peak_gib": _peak(device), "prefill_s": seconds}
    del cache
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:llama3.1-8b-shape")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--budget", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--stabilizers", type=int, default=2500)
    parser.add_argument("--n-local", type=int, default=100)
    parser.add_argument("--skip-full-above", type=int, default=None,
                        help="skip the full-cache run for prompts longer than this (it may not fit)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    base, _ = load_pretrained(args.model, dtype=dtype, device=device)
    model = to_locret(base, LocretConfig(budget=args.budget, chunk_size=args.chunk, stabilizers=args.stabilizers,
                                         n_local=args.n_local)).to(device).eval()
    settings = dict(locret_budget=args.budget, locret_chunk_size=args.chunk, locret_stabilizers=args.stabilizers,
                    locret_n_local=args.n_local)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    rows = []
    for tokens in args.tokens:
        ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device,
                            generator=torch.Generator(device=device).manual_seed(0))
        row = {"tokens": tokens, "locret": run_locret(model, ids, device, settings)}
        if args.skip_full_above is None or tokens <= args.skip_full_above:
            try:
                row["full"] = run_full(model, ids, device)
            except torch.OutOfMemoryError as exc:
                row["full"] = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nweights {weights_gib:.1f} GiB; budget {args.budget}, chunk {args.chunk}, stabilizers {args.stabilizers}, "
          f"n_local {args.n_local}")
    print(f"{'tokens':>8} | {'method':>7} | {'peak KV GiB':>11} | {'peak GPU GiB':>12} | {'prefill s':>9}")
    for row in rows:
        for method in ("full", "locret"):
            r = row.get(method)
            if r is None or "error" in r:
                print(f"{row['tokens']:>8} | {method:>7} | {'-' if r is None else r['error'][:40]}")
                continue
            print(f"{row['tokens']:>8} | {method:>7} | {r['kv_peak_gib']:>11.2f} | {r['gpu_peak_gib']:>12.2f} | "
                  f"{r['prefill_s']:>9.2f}")
    if args.out:
        meta = {"model": args.model, "dtype": args.dtype, "device": torch.cuda.get_device_name(device)
                if device.type == "cuda" else platform.processor(), "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"), "weights_gib": weights_gib, "settings": settings}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
