"""Peak memory of a block of work: CUDA allocator peak on GPU; RSS high-water mark growth on CPU."""

from __future__ import annotations

import contextlib
import resource
import sys
import threading

import torch

__all__ = ["PeakMemory"]


def _rss_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


class PeakMemory(contextlib.AbstractContextManager):
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes`` (extra bytes at the peak) and ``peak.method``.

    CPU: with psutil, a thread samples RSS every 2 ms (peak minus RSS at entry); without it, the growth of the
    process's ru_maxrss high-water mark, which is 0 when the block stays below an earlier peak (so it is reported
    as a lower bound, and ``method`` says so).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.bytes: int | None = None
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated minus allocated at start"
            return self
        start = _rss_bytes()
        if start is not None:
            self._start, self._peak, self._stop = start, start, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
            self.method = "psutil RSS sampled every 2 ms, peak minus RSS at start"
        else:
            self._start = self._maxrss()
            self.method = "growth of ru_maxrss (lower bound: 0 if below an earlier peak; install psutil for more)"
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes())

    @staticmethod
    def _maxrss() -> int:
        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return value if sys.platform == "darwin" else value * 1024  # Linux reports KiB

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.bytes = self._peak - self._start
        else:
            self.bytes = self._maxrss() - self._start
        return False
