#!/usr/bin/env python
"""Prefill and decode speed of SwiftKV against three baselines, Llama-3.1-8B shapes, random bf16 weights, one GPU.

    PYTHONPATH=$PWD python scripts/bench_swiftkv_8b.py --diagnose --out bench_8b.json
    python scripts/bench_swiftkv_8b.py --small        # CPU smoke test: tiny model, same code paths

Models (same random weights; SwiftKV M=16):
  hf           (a) transformers' LlamaForCausalLM, SDPA, eager, ``DynamicCache``
  fused        (b) the SwiftKV model class with SwiftKV OFF: the original model's function with our fused layer
                   ops (Triton RMSNorm, SiLU-times-up); isolates what SingleInputKV itself buys
  hf_graph     (c) transformers' model on a preallocated cache (``StaticLayer``s), the whole call captured in a
                   CUDA graph and replayed (bench_static_graph.py)
  fused_graph  (c') (b) on that same preallocated-cache, graph-captured path
  swiftkv_gG   SwiftKV with AcrossKV group size G, eager ``DynamicCache`` (as (a)/(b)), and ``..._graph`` (as (c))
Prefill: one forward over the prompt with a cache and ``logits_to_keep=1`` (what ``generate`` does); the eager
paths get a fresh ``DynamicCache``, the graph paths reset their preallocated one inside the graph.
Decode: one new token per sequence from a cache filled to ``--decode-context`` random positions; TPOT = time of
one step. Eager decode runs SDPA without its cuDNN backend: cuDNN builds a plan per new cache length, ~2 ms of
host time per layer and step, and whichever model ran a length first paid for it (``--diagnose`` measures it). Largest batch: from the cache bytes per token and the GPU memory free after the weights, then run.
Timing: CUDA events, each call started on an idle GPU, warm-up, ``--rounds`` rounds of ``--repeats`` calls with
the models interleaved; every case reports min/median/max; a ratio whose two sides' spreads sum to more than 10%
is printed with a warning. Before timing, the graph paths are checked against the eager ``DynamicCache`` path.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_static_graph import (CUDNN_FIRST, NO_CUDNN, PACKED_DECODE, Graphed, attention_implementation,  # noqa: E402
                                fill, sdpa_backends, static_cache)
from bench_utils import fmt_ratio, ratio, samples_s, spread_stats, sync  # noqa: E402

from swiftkv_train.methods.swiftkv import to_swiftkv  # noqa: E402
from swiftkv_train.models import load_pretrained  # noqa: E402


def forward_flops_per_token(config, context: int) -> float:
    """2 x matmul parameters (layers + lm_head) + attention (QK^T and AV) at the average causal context."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads  # Qwen2: none
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    params = layers * (h * (2 * q + 2 * kv) + 3 * h * config.intermediate_size)
    return 2 * params + layers * 4 * q * context / 2  # + lm_head at one position only (logits_to_keep=1)


class Bench:
    """The models under test and the way each one runs (eager DynamicCache or graph-captured static cache)."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.model, _ = load_pretrained(f"random:{args.preset}", dtype=args.dtype, device=self.device)
        cfg = self.model.config
        self.cfg = cfg
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        m = args.num_key_value_layers
        self.groups = [int(g) for g in args.group_sizes.split(",")]
        fused = to_swiftkv(self.model, m, 1).eval().swiftkv(False)
        self.nets = {"hf": (self.model, cfg.num_hidden_layers), "fused": (fused, cfg.num_hidden_layers)}
        for g in self.groups:
            student = to_swiftkv(self.model, m, g).eval()
            self.nets[f"swiftkv_g{g}"] = (student, student.config.num_swiftkv_cache_slots)
        self.gen = torch.Generator(device=self.device).manual_seed(0)

    def ids(self, batch: int, length: int) -> torch.Tensor:
        return torch.randint(0, self.cfg.vocab_size, (batch, length), device=self.device, generator=self.gen)

    def static(self, slots: int, batch: int, max_len: int):
        return static_cache(slots, batch, max_len, self.cfg.num_key_value_heads, self.head_dim, self.args.dtype,
                            self.device)

    def dynamic_filled(self, slots: int, batch: int, context: int) -> DynamicCache:
        cache = DynamicCache()
        for slot in range(slots):
            k = torch.randn(batch, self.cfg.num_key_value_heads, context, self.head_dim, dtype=self.args.dtype,
                            device=self.device, generator=self.gen)
            cache.update(k, torch.randn_like(k), slot)
        return cache

    # ---- prefill -------------------------------------------------------------------------------------------

    def prefill_runner(self, name: str, ids: torch.Tensor):
        """fn() -> last-position logits for model ``name`` (``..._graph`` = the graph-captured static path)."""
        graph = name.endswith("_graph")
        net, slots = self.nets[name.removesuffix("_graph")]
        batch, length = ids.shape
        if not graph:
            return lambda: net(ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1).logits
        cache = self.static(slots, batch, length)
        pos = torch.arange(length, device=self.device).unsqueeze(0)

        def run():
            cache.reset()  # a fresh prompt each call: positions 0..length-1 again
            with attention_implementation(net, PACKED_DECODE), sdpa_backends(CUDNN_FIRST):
                return net(ids, past_key_values=cache, position_ids=pos, use_cache=True, logits_to_keep=1).logits

        return Graphed(run, self.device)

    # ---- decode --------------------------------------------------------------------------------------------

    def decode_runner(self, name: str, batch: int, context: int, extra_steps: int, eager_sdpa="no-cudnn"):
        """(fn() -> logits of one decode step, its cache, its input ids). Eager: a DynamicCache filled to
        ``context`` that grows by concatenation; graph: a static cache of ``context + extra_steps`` positions,
        written in place. ``eager_sdpa``: "no-cudnn" (the benchmark's eager decode) or "default" (torch's
        choice, cuDNN on Hopper: as shipped)."""
        graph = name.endswith("_graph")
        net, slots = self.nets[name.removesuffix("_graph")]
        ids = self.ids(batch, 1)
        if not graph:
            cache = self.dynamic_filled(slots, batch, context)

            backends = NO_CUDNN if eager_sdpa == "no-cudnn" else None

            def step():
                pos = torch.full((batch, 1), cache.get_seq_length(), device=self.device)
                with sdpa_backends(backends):
                    return net(ids, past_key_values=cache, use_cache=True, position_ids=pos, logits_to_keep=1).logits

            return step, cache, ids
        cache = fill(self.static(slots, batch, context + extra_steps), context, self.gen)

        def run():
            # the next position, read on the device (a StaticLayer counts its positions in a tensor)
            pos = torch.as_tensor(cache.get_seq_length(), device=self.device).clone().reshape(1, 1).expand(batch, 1)
            with attention_implementation(net, PACKED_DECODE):
                return net(ids, past_key_values=cache, use_cache=True, position_ids=pos, logits_to_keep=1).logits

        return Graphed(run, self.device), cache, ids


# ------------------------------------------------------------------------------------------------ checks


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def check_paths(bench: Bench, names: list[str], tol: float) -> dict:
    """Graph paths vs the eager DynamicCache path: prefill logits, and one decode step from the same cache.

    Two more numbers say where a prefill difference comes from: the static-cache function called eagerly (same
    code, no graph) and the eager path's own floor (the same prompt inside a batch of two: other GEMM kernels)."""
    results = {}
    batch, length = 2, 48
    ids = bench.ids(batch, length)
    for name in names:
        net, _ = bench.nets[name]
        ref = net(ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1).logits
        twice = net(torch.cat([ids, ids]), past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1).logits
        floor = rel_err(twice[:batch], ref)
        graphed = bench.prefill_runner(f"{name}_graph", ids)
        prefill = rel_err(graphed(), ref)
        static_eager = rel_err(graphed.fn(), ref)
        del graphed
        step, cache, step_ids = bench.decode_runner(f"{name}_graph", batch, length, 8)  # capture warm-up ran
        sync(bench.device)
        snapshot = DynamicCache()  # the same history, in the eager path's cache
        for slot, layer in enumerate(cache.layers):
            n = int(layer.get_seq_length())
            snapshot.update(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone(), slot)
        pos = torch.full((batch, 1), snapshot.get_seq_length(), device=bench.device)
        decode_ref = net(step_ids, past_key_values=snapshot, use_cache=True, position_ids=pos,
                         logits_to_keep=1).logits
        decode = rel_err(step(), decode_ref)
        ok = prefill < max(tol, 2 * floor) and decode < max(tol, 2 * floor)
        results[name] = {"prefill_rel_err": prefill, "prefill_static_eager_rel_err": static_eager,
                         "eager_floor_rel_err": floor, "decode_rel_err": decode, "ok": ok}
        print(f"check {name:12s}: graph vs eager rel. error prefill {prefill:.2e} (static path run eagerly "
              f"{static_eager:.2e}; eager vs eager in a batch of two {floor:.2e}), decode {decode:.2e}"
              f"{'' if ok else '  <-- CHECK FAILED'}", flush=True)
        del step, cache, snapshot
    return results


# ------------------------------------------------------------------------------------------------ prefill


def run_prefill(bench: Bench, variants: list[str], cases, args) -> list[dict]:
    """Every variant on every case, interleaved over ``args.rounds`` rounds; min/median/max of all calls."""
    rows = []
    for batch, length in cases:
        ids = bench.ids(batch, length)
        runners, errors = {}, {}
        for name in variants:
            try:
                runners[name] = bench.prefill_runner(name, ids)
            except Exception as exc:  # noqa: BLE001 - a path that cannot be captured is reported, not fatal
                errors[name] = repr(exc)[:300]
                print(f"prefill {batch}x{length} {name}: FAILED {errors[name]}", flush=True)
        times = {name: [] for name in runners}
        for r in range(args.rounds):
            for name in runners:
                times[name] += samples_s(runners[name], bench.device, args.warmup if r == 0 else 1, args.repeats)
        row = {"batch": batch, "length": length, "variants": {}, "errors": errors}
        flops = forward_flops_per_token(bench.cfg, length) * batch * length
        for name in runners:
            st = spread_stats(times[name])
            st["tokens_per_s"] = batch * length / st["median"]
            st["normalised_tflops"] = flops / st["median"] / 1e12
            row["variants"][name] = st
        row["ratios"] = ratios(row["variants"])
        rows.append(row)
        print_prefill_row(row)
        del runners
        free_memory(bench.device)
    return rows


def ratios(stats: dict) -> dict:
    """Every SwiftKV variant against every baseline variant (keys 'swiftkv_g1/hf' ...)."""
    out = {}
    for new in stats:
        if new.startswith("swiftkv"):
            for base in stats:
                if not base.startswith("swiftkv"):
                    out[f"{new}/{base}"] = ratio(stats[base], stats[new])
    return out


def print_prefill_row(row: dict):
    print(f"prefill {row['batch']}x{row['length']}:", flush=True)
    for name, st in row["variants"].items():
        print(f"  {name:18s} {st['tokens_per_s']:9.0f} tok/s  median {st['median'] * 1e3:8.2f} ms "
              f"[{st['min'] * 1e3:.2f} .. {st['max'] * 1e3:.2f}] spread {st['spread']:5.1%}  "
              f"({st['normalised_tflops']:.0f} normalised TFLOP/s)", flush=True)
    for key, r in row["ratios"].items():
        print(f"  {key:30s} {fmt_ratio(r)}", flush=True)


# ------------------------------------------------------------------------------------------------ decode


def max_batch(bench: Bench, slots: int, positions: int, headroom: float) -> int:
    """Sequences whose cache (``positions`` each, ``slots`` K/V pairs) fits in ``headroom`` of the free memory."""
    per_seq = slots * 2 * bench.cfg.num_key_value_heads * bench.head_dim * positions * bench.args.dtype.itemsize
    free, _ = torch.cuda.mem_get_info(bench.device)
    return max(1, int(headroom * free // per_seq))


def run_decode(bench: Bench, variants: list[str], args, rows: list, save=lambda: None) -> list[dict]:
    """Every variant at every batch of ``--decode-batches``; rows are appended to ``rows`` (and saved) as measured."""
    ctx = args.decode_context
    extra = 2 + args.warmup + args.repeats + 1  # capture warm-up + timed steps: the static cache never overflows
    for spec in args.decode_batches.split(","):
        for name in variants:
            net, slots = bench.nets[name.removesuffix("_graph")]
            graph = name.endswith("_graph")
            if spec == "max":
                if bench.device.type != "cuda":
                    continue
                free_memory(bench.device)
                # the eager path briefly holds a slot twice or more (torch.cat, filling): more headroom
                batch = max_batch(bench, slots, ctx + extra, 0.92 if graph else 0.8)
            else:
                batch = int(spec)
            row = {"variant": name, "batch": batch, "batch_spec": spec, "context": ctx}
            for attempt in range(3):
                try:
                    step, cache, _ = bench.decode_runner(name, batch, ctx, extra)
                    row["kv_bytes_per_token"] = kv_nbytes(cache) / (batch * (ctx + (extra if graph else 0)))
                    st = spread_stats(samples_s(step, bench.device, args.warmup, args.repeats))
                    row.update(st, batch=batch, tpot_ms=st["median"] * 1e3, tokens_per_s=batch / st["median"])
                    break
                except torch.OutOfMemoryError:
                    step = cache = None
                    free_memory(bench.device)
                    row["oom_at"] = row.get("oom_at", []) + [batch]
                    batch = int(batch * 0.9)
                except Exception as exc:  # noqa: BLE001 - reported in the row, the other cases still run
                    step = cache = None
                    row["error"] = repr(exc)[:300]
                    break
            del step, cache
            free_memory(bench.device)
            rows.append(row)
            save()
            if "tpot_ms" not in row:
                print(f"decode {name:18s} b={spec}: FAILED {row.get('error') or 'out of memory'}", flush=True)
                continue
            print(f"decode {name:18s} b={row['batch']:4d} ctx={ctx}: TPOT {row['tpot_ms']:8.2f} ms "
                  f"[{row['min'] * 1e3:.2f} .. {row['max'] * 1e3:.2f}] spread {row['spread']:5.1%}, "
                  f"{row['tokens_per_s']:8.0f} tok/s, KV {row['kv_bytes_per_token'] / 1024:.0f} KiB/token",
                  flush=True)
    return rows


def kv_nbytes(cache) -> int:
    """Bytes of the cached keys and values (a static layer's position counter left out)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def free_memory(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ diagnosis


def host_and_device_ms(fn, device, repeats: int = 5) -> dict:
    """Median host time to return from fn() (no sync: the launch work) and to finish it (sync), from an idle GPU.
    Launch time close to the total means the host, not the GPU, sets the pace."""
    fn()
    sync(device)
    launch, total = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync(device)
        t2 = time.perf_counter()
        launch.append((t1 - t0) * 1e3)
        total.append((t2 - t0) * 1e3)
    return {"host_launch_ms": statistics.median(launch), "total_ms": statistics.median(total)}


def sync_points(fn, device) -> list[str]:
    """file:line of every host-device synchronisation one fn() call makes (torch's sync debug mode)."""
    if device.type != "cuda":
        return []
    fn()
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})


def profile_table(fn, device, steps: int) -> dict:
    """torch.profiler over ``steps`` calls: the top ops by device (CPU off CUDA) time, and per-call totals."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    averages = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = averages.table(sort_by=key, row_limit=15, max_name_column_width=60)
    # kernels only (an op's row repeats its kernels' time)
    device_us = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA) / steps
    cpu_us = sum(e.self_cpu_time_total for e in averages) / steps
    return {"device_ms_per_call": device_us / 1e3, "cpu_op_ms_per_call": cpu_us / 1e3, "table": table}


def diagnose(bench: Bench, args) -> dict:
    """Where eager decode and prefill time goes: host launch vs GPU kernels, host syncs, the profiler's top ops."""
    out = {}
    batch, ctx = args.diagnose_batch, args.diagnose_context
    extra = 2 + 3 + 5 + 12
    g = bench.groups[0]
    # transformers' decode as shipped (torch's SDPA choice) first, on lengths no call has seen yet
    for name, sdpa in [("hf", "default"), ("hf", "no-cudnn"), ("fused", "no-cudnn"), (f"swiftkv_g{g}", "no-cudnn"),
                       ("hf_graph", "-"), (f"swiftkv_g{g}_graph", "-")]:
        step, cache, _ = bench.decode_runner(name, batch, ctx, extra, eager_sdpa=sdpa)
        info = host_and_device_ms(step, bench.device)
        info["sync_points"] = sync_points(step, bench.device)
        label = f"{name}/{sdpa}" if sdpa != "-" else name
        prof = profile_table(step, bench.device, 3)
        info.update(prof)
        out[f"decode/{label}"] = info
        print(f"diagnose decode {label:18s} b={batch} ctx={ctx}: total {info['total_ms']:.2f} ms, host launch "
              f"{info['host_launch_ms']:.2f} ms, GPU kernels {info['device_ms_per_call']:.2f} ms, "
              f"syncs at {info['sync_points'] or 'none'}", flush=True)
        if name == "hf" and sdpa == "default":
            print(prof["table"], flush=True)
        del step, cache
        free_memory(bench.device)
    ids = bench.ids(1, args.diagnose_prefill)
    for name in ["hf", "fused", "fused_graph", f"swiftkv_g{g}", f"swiftkv_g{g}_graph"]:
        run = bench.prefill_runner(name, ids)
        info = host_and_device_ms(run, bench.device)
        info["sync_points"] = sync_points(run, bench.device)
        prof = profile_table(run, bench.device, 2)
        info.update(prof)
        out[f"prefill/{name}"] = info
        print(f"diagnose prefill {name:18s} 1x{args.diagnose_prefill}: total {info['total_ms']:.2f} ms, host launch "
              f"{info['host_launch_ms']:.2f} ms, GPU kernels {info['device_ms_per_call']:.2f} ms, "
              f"syncs at {info['sync_points'] or 'none'}", flush=True)
        del run
        free_memory(bench.device)
    return out


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3.1-8b-shape")
    parser.add_argument("--num-key-value-layers", type=int, default=16)
    parser.add_argument("--group-sizes", default="1,4")
    parser.add_argument("--prefill", default="1x2048,1x8192,4x2048", help="BxS prefill cases ('' for none)")
    parser.add_argument("--prefill-variants", default="hf,fused,hf_graph,fused_graph,swiftkv_g1,swiftkv_g1_graph")
    parser.add_argument("--decode-context", type=int, default=8192)
    parser.add_argument("--decode-batches", default="1,16,max", help="batch sizes; 'max' = the largest that fits")
    parser.add_argument("--decode-variants", default="hf,fused,hf_graph,fused_graph,"
                        "swiftkv_g1,swiftkv_g4,swiftkv_g1_graph,swiftkv_g4_graph")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="prefill: rounds of --repeats, models interleaved")
    parser.add_argument("--diagnose", action="store_true", help="profile eager decode and prefill first")
    parser.add_argument("--diagnose-batch", type=int, default=4)
    parser.add_argument("--diagnose-context", type=int, default=2048)
    parser.add_argument("--diagnose-prefill", type=int, default=2048)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--small", action="store_true", help="tiny model on the CPU: a smoke test of every path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.dtype = torch.bfloat16
    if args.small:  # tiny shapes, where the command line did not choose
        small = dict(preset="tiny", num_key_value_layers=2, group_sizes="1,2", prefill="1x32,2x16",
                     decode_context=24, decode_batches="1,2",
                     decode_variants=args.decode_variants.replace("swiftkv_g4", "swiftkv_g2"), warmup=1, repeats=2,
                     rounds=2, diagnose_batch=2, diagnose_context=16, diagnose_prefill=16)
        for key, value in small.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
        args.dtype = torch.float32
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    bench = Bench(args)
    dev = bench.device
    results = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "transformers": __import__("transformers").__version__,
               "preset": args.preset, "M": args.num_key_value_layers, "date": time.strftime("%Y-%m-%d"),
               "command": " ".join(sys.argv), "warmup": args.warmup, "repeats": args.repeats, "rounds": args.rounds}

    def save():  # after every stage, so that a run cut short still leaves its numbers
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2, default=str))

    if not args.skip_check:
        tol = 1e-4 if args.dtype == torch.float32 else 3e-2
        results["check"] = check_paths(bench, [n for n in bench.nets], tol)
        save()
    if args.diagnose:
        results["diagnose"] = diagnose(bench, args)
        save()
    cases = [tuple(int(x) for x in c.split("x")) for c in args.prefill.split(",") if c]
    results["prefill"] = run_prefill(bench, args.prefill_variants.split(","), cases, args)
    save()
    results["decode"] = []
    run_decode(bench, args.decode_variants.split(","), args, results["decode"], save)
    if dev.type == "cuda":
        stats = torch.cuda.memory_stats(dev)
        results["allocator"] = {k: stats.get(k) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}
    save()
    return results


if __name__ == "__main__":
    main()
