"""Efficiency: TTFT (prefill), TPOT (per decoded token), tokens/s, KV bytes per token, peak memory.

Each (batch, prompt length) point runs ``warmup`` untimed and ``repeats`` timed generations of ``output_length``
tokens on random prompt ids and reports medians. TTFT = the prefill forward that yields the first token;
TPOT = mean time of the following decode steps within a repeat (median over repeats). CUDA events on GPU,
perf_counter on CPU. KV bytes per token = `cache_nbytes` of the cache right after the prefill divided by
batch x prompt tokens (after any eviction by the policy).
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from ..cache_stats import cache_nbytes
from ..errors import SwiftKVInputError
from ..policies import decode_step, new_cache, policy_attention, prefill
from .memory import PeakMemory
from .subjects import Subject, max_positions

__all__ = ["check_config", "run_efficiency"]


class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self._begin = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Seconds since start()."""
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            return self._begin.elapsed_time(self._end) / 1000
        return time.perf_counter() - self._t0


@torch.no_grad()
def _one_run(model, ids, output_length, policy, timer):
    cache = new_cache(policy, ids.shape[1], output_length, model)
    with policy_attention(model, cache):
        timer.start()
        logits = prefill(model, ids, cache)
        token = logits.argmax(-1, keepdim=True)
        ttft = timer.stop()
        kv_bytes = cache_nbytes(cache)
        steps = []
        for step in range(1, output_length):
            timer.start()
            logits = decode_step(model, token, ids.shape[1] + step - 1, cache, step)
            token = logits.argmax(-1, keepdim=True)
            steps.append(timer.stop())
    return ttft, (sum(steps) / len(steps) if steps else None), kv_bytes


def check_config(subject: Subject, cfg) -> None:
    if not cfg.prompt_lengths or not cfg.batch_sizes or min(cfg.prompt_lengths) < 1 or min(cfg.batch_sizes) < 1:
        raise SwiftKVInputError("efficiency.prompt_lengths and efficiency.batch_sizes need positive entries.")
    if cfg.repeats < 1 or cfg.warmup < 0 or cfg.output_length < 1:
        raise SwiftKVInputError("efficiency.repeats must be >= 1, warmup >= 0 and output_length >= 1.")
    limit = max_positions(subject.model)
    too_long = [n for n in cfg.prompt_lengths if limit and n + cfg.output_length > limit]
    if too_long:
        raise SwiftKVInputError(
            f"efficiency.prompt_lengths {too_long} (+ output_length {cfg.output_length}) exceed what model "
            f"{subject.name!r} supports ({limit} positions)."
        )


def run_efficiency(subject: Subject, cfg, policy=None, policy_name: str = "full", progress: bool = True) -> dict:
    """``cfg``: EfficiencyConfig (prompt_lengths, output_length, batch_sizes, warmup, repeats, seed)."""
    check_config(subject, cfg)
    rows = []
    points = [(b, n) for b in cfg.batch_sizes for n in cfg.prompt_lengths]
    with subject.active() as model:
        device = model.device
        timer = _Timer(device)
        vocab = model.config.vocab_size
        for batch, length in tqdm(points, desc=f"efficiency {subject.name}/{policy_name}", disable=not progress,
                                  leave=False):
            generator = torch.Generator().manual_seed(cfg.seed)
            ids = torch.randint(0, vocab, (batch, length), generator=generator).to(device)
            for _ in range(cfg.warmup):
                _one_run(model, ids, cfg.output_length, policy, timer)
            ttfts, tpots = [], []
            with PeakMemory(device) as peak:
                for _ in range(cfg.repeats):
                    ttft, tpot, kv_bytes = _one_run(model, ids, cfg.output_length, policy, timer)
                    ttfts.append(ttft)
                    if tpot is not None:
                        tpots.append(tpot)
            ttft = statistics.median(ttfts)
            tpot = statistics.median(tpots) if tpots else None
            rows.append({
                "batch_size": batch, "prompt_length": length, "output_length": cfg.output_length,
                "ttft_ms": ttft * 1000, "tpot_ms": None if tpot is None else tpot * 1000,
                "prefill_tokens_per_s": batch * length / ttft,
                "decode_tokens_per_s": None if tpot is None else batch / tpot,
                "kv_bytes_per_token": kv_bytes / (batch * length), "kv_bytes_after_prefill": kv_bytes,
                "peak_memory_bytes": peak.bytes,
            })
    return {
        "model": subject.name, "policy": policy_name, "rows": rows,
        "settings": {"device": str(device), "dtype": str(next(subject.model.parameters()).dtype),
                     "warmup": cfg.warmup, "repeats": cfg.repeats, "statistic": "median", "seed": cfg.seed,
                     "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
                     "memory_method": peak.method if rows else None, "threads": torch.get_num_threads(),
                     "policy": policy.settings() if policy is not None else {"name": "full"}},
    }
