#!/usr/bin/env python
"""Prefill and decode speed of SwiftKV vs the original model, Llama-3.1-8B shapes, random bf16 weights, one GPU.

    PYTHONPATH=$PWD python scripts/bench_swiftkv_8b.py --out results/bench_8b.json

Prefill: the time of one forward over the prompt with a cache and ``logits_to_keep=1`` (what ``generate`` does),
baseline = transformers' LlamaForCausalLM (SDPA), SwiftKV = the same weights with M=16 (layers >= 16 run on the
last token only). "Normalised" TFLOP/s = the full model's FLOPs / time (the paper's convention).
Decode: time per output token at a given context and batch, from a cache filled to that context; the largest
batch that fits is computed from the measured cache bytes per token and the memory left after the weights.
CUDA events, warm-up, median of repeats. Prints a table; writes every number to --out.
"""

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import DynamicCache

from swiftkv_train.cache_stats import cache_nbytes
from swiftkv_train.models import load_pretrained
from swiftkv_train.methods.swiftkv import to_swiftkv


def timed(fn, warmup: int, repeats: int) -> float:
    """Median seconds of fn() over repeats, after warm-up (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_flops_per_token(config, context: int) -> float:
    """2 x matmul parameters (layers + lm_head) + attention (QK^T and AV) at the average causal context."""
    h, layers = config.hidden_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    params = layers * (h * (2 * q + 2 * kv) + 3 * h * config.intermediate_size)
    return 2 * params + layers * 4 * q * context / 2  # + lm_head at one position only (logits_to_keep=1)


def prefill(model, batch: int, length: int, args, vocab: int) -> dict:
    gen = torch.Generator(device=args.device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), device=args.device, generator=gen)

    def run():
        with torch.no_grad():
            model(ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)

    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    seconds = timed(run, args.warmup, args.repeats)
    tokens = batch * length
    result = {"batch": batch, "length": length, "seconds": seconds, "tokens_per_s": tokens / seconds,
              "normalised_tflops": forward_flops_per_token(model.config, length) * tokens / seconds / 1e12}
    if torch.cuda.is_available():
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def filled_cache(model, batch: int, context: int, slots: int, dtype, device) -> DynamicCache:
    """A cache holding `context` random positions per slot: decode cost does not depend on the values."""
    cfg = model.config
    cache = DynamicCache()
    for slot in range(slots):
        k = torch.randn(batch, cfg.num_key_value_heads, context, cfg.head_dim, dtype=dtype, device=device)
        cache.update(k, torch.randn_like(k), slot)
    return cache


def decode(model, slots: int, batch: int, context: int, steps: int, args) -> dict:
    cache = filled_cache(model, batch, context, slots, torch.bfloat16, args.device)
    kv_bytes_per_token = cache_nbytes(cache) / (batch * context)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=args.device)

    def step():
        with torch.no_grad():
            pos = torch.full((batch, 1), cache.get_seq_length(), device=args.device)
            model(ids, past_key_values=cache, use_cache=True, position_ids=pos, logits_to_keep=1)

    seconds = timed(step, 2, steps)
    return {"batch": batch, "context": context, "tpot_ms": seconds * 1e3, "tokens_per_s": batch / seconds,
            "kv_bytes_per_token": kv_bytes_per_token}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3.1-8b-shape")
    parser.add_argument("--num-key-value-layers", type=int, default=16)
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--batched", default="4x2048,4x8192", help="extra BxS prefill cases")
    parser.add_argument("--decode-context", type=int, default=8192)
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--group-sizes", default="1,4")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    model, _ = load_pretrained(f"random:{args.preset}", dtype=torch.bfloat16, device=args.device)
    cfg = model.config
    m = args.num_key_value_layers
    cases = [(1, int(n)) for n in args.lengths.split(",") if n] + [
        tuple(int(x) for x in c.split("x")) for c in args.batched.split(",") if c]
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
               "torch": torch.__version__, "preset": args.preset, "M": m, "date": time.strftime("%Y-%m-%d"),
               "prefill": [], "decode": []}
    groups = [int(g) for g in args.group_sizes.split(",")]
    students = {g: to_swiftkv(model, m, g).eval() for g in groups}
    for batch, length in cases:
        base = prefill(model, batch, length, args, cfg.vocab_size)
        swift = prefill(students[1], batch, length, args, cfg.vocab_size)
        results["prefill"].append({"baseline": base, "swiftkv_g1": swift, "speedup": base["seconds"] / swift["seconds"]})
        print(f"prefill {batch}x{length:>6}: baseline {base['tokens_per_s']:9.0f} tok/s "
              f"({base['normalised_tflops']:5.0f} TFLOP/s) | SwiftKV {swift['tokens_per_s']:9.0f} tok/s "
              f"(normalised {swift['normalised_tflops']:5.0f} TFLOP/s) | x{base['seconds'] / swift['seconds']:.2f}",
              flush=True)

    weights = sum(p.numel() * p.element_size() for p in students[groups[-1]].parameters())
    total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    layers = cfg.num_hidden_layers
    variants = [("baseline", model, layers)] + [
        (f"swiftkv_g{g}", students[g].eval(), m + -(-(layers - m) // g)) for g in groups]
    for name, net, slots in variants:
        row = decode(net, slots, args.decode_batch, args.decode_context, args.repeats, args)
        rows = [row]
        if total:
            # memory left after the weights (every variant shares the same base weights here), 15% headroom
            max_batch = int(0.85 * (total - weights) // (row["kv_bytes_per_token"] * args.decode_context))
            row["max_batch_at_context"] = max_batch
            torch.cuda.empty_cache()
            try:  # check that the computed batch really runs, and measure it
                rows.append(decode(net, slots, max_batch, args.decode_context, args.repeats, args))
            except torch.OutOfMemoryError:
                rows.append({"batch": max_batch, "oom": True})
        for r in rows:
            r["variant"] = name
            results["decode"].append(r)
            if r.get("oom"):
                print(f"decode {name:12s} b={r['batch']}: out of memory", flush=True)
                continue
            print(f"decode {name:12s} b={r['batch']:4d} ctx={r['context']}: TPOT {r['tpot_ms']:7.2f} ms, "
                  f"{r['tokens_per_s']:8.0f} tok/s, KV {r['kv_bytes_per_token'] / 1024:.0f} KiB/token", flush=True)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
