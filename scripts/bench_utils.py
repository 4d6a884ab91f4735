"""Helpers shared by the kernel benchmarks in this folder (bench_kernels.py, bench_kernel_cskv_decode.py,
bench_kernel_locret_evict.py): importing ``kernels/`` as ``swiftkv_kernels``, the Triton-interpreter patch, the
options they all take, timing, table formatting.

The scripts run as ``python scripts/<name>.py``, which puts this folder on ``sys.path``: they ``import bench_utils``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def import_kernels(*names):
    """The submodules ``names`` of ``swiftkv_kernels`` (one module for one name, else a tuple, in order).

    ``swiftkv_kernels`` is ``kernels/`` installed under another name: map it when the repo is not installed."""
    if importlib.util.find_spec("swiftkv_kernels") is None:
        spec = importlib.util.spec_from_file_location(
            "swiftkv_kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["swiftkv_kernels"] = module
        spec.loader.exec_module(module)
    modules = tuple(importlib.import_module(f"swiftkv_kernels.{name}") for name in names)
    return modules[0] if len(modules) == 1 else modules


def patch_interpreter():
    """numpy >= 2.4 refuses int() of a 1-element array, which the triton 3.6 interpreter does for ``range`` bounds
    given as kernel arguments (as in tests/test_kernels.py): read the element explicitly. Interpreter only."""
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patch


def bench_parser(description: str, repeats: int | None, repeats_help: str | None = None) -> argparse.ArgumentParser:
    """An argument parser with the options every kernel benchmark takes (--device, --small, --out, --repeats with
    this default); the script adds its own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="small shapes (CPU smoke test)")
    parser.add_argument("--out", default=None, help="write the full results as JSON here")
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    return parser


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


# ------------------------------------------------------------------------------------------------ timing helpers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, warmup=3, repeats=10) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU, perf_counter on CPU), after warm-up."""
    return statistics.median(samples_s(fn, device, warmup, repeats)) * 1e3


def samples_s(fn, device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` calls (CUDA events on GPU, each call
    started on an idle device so host time before the first launch is included; perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def spread_stats(seconds: list[float]) -> dict:
    """min / median / max of a list of timings and their spread, (max - min) / median."""
    median = statistics.median(seconds)
    return {"min": min(seconds), "median": median, "max": max(seconds), "n": len(seconds),
            "spread": (max(seconds) - min(seconds)) / median}


# A ratio of two medians is only reported plainly when the two sides' spreads together stay under this.
RATIO_SPREAD_LIMIT = 0.10


def ratio(base: dict, new: dict) -> dict:
    """Speed-up of ``new`` over ``base`` (two ``spread_stats``): the ratio of medians, its range from the extremes,
    and a warning when the summed spreads exceed RATIO_SPREAD_LIMIT."""
    value = base["median"] / new["median"]
    spread = base["spread"] + new["spread"]
    return {"speedup": value, "low": base["min"] / new["max"], "high": base["max"] / new["min"], "spread": spread,
            "unstable": spread > RATIO_SPREAD_LIMIT}


def fmt_ratio(r: dict) -> str:
    """``x2.03`` or ``x2.03 (!spread 14%)`` for an unstable ratio."""
    text = f"x{r['speedup']:.2f}"
    return text + f" (!spread {r['spread']:.0%})" if r["unstable"] else text


def peak_extra_mib(fn, device, call_off_cuda=True) -> float | None:
    """Peak memory allocated during one ``fn()`` call beyond what was allocated before it (MiB; outputs included);
    None off CUDA, where ``fn()`` still runs once unless ``call_off_cuda`` is false."""
    if device.type != "cuda":
        if call_off_cuda:
            fn()
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak / 2**20


def fmt(x, spec: str) -> str:
    """``format(x, spec)``, or "-" for a value that was not measured (None)."""
    return "-" if x is None else format(x, spec)
