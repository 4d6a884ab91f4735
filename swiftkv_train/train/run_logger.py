"""Metrics logging for one training run: progress display, a JSONL record, optional wandb.

Only rank 0 logs; on every other rank `RunLogger` is inert, so the trainer can call it
unconditionally. Everything logged also lands in ``run_dir/metrics.jsonl`` (one JSON object per
`log` call, flushed at once, so a crashed run keeps its history). wandb is strictly optional:
any failure inside it is reported as a warning and logging goes on without it.

Also here: `model_flops_per_token` and `mfu`, the usual model-FLOPs-utilisation estimate.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from ..errors import SwiftKVInputError

__all__ = ["RunLogger", "redact_secrets", "model_flops_per_token", "mfu", "METRICS_FILE"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WANDB_MODES = ("disabled", "offline", "online")

# Config keys whose values must never leave the machine. Matching is a case-insensitive
# substring test; "tokens"/"tokenizer" are taken out first so that e.g. max_tokens or
# tokenizer_path stay readable, and numbers/bools are never secrets (pad_token_id stays).
_SECRET_WORDS = ("token", "secret", "password", "passwd", "api_key", "apikey")
_NOT_SECRET = re.compile(r"tokeni[sz]er|tokens")
REDACTED = "***"


def _is_secret_key(key: Any) -> bool:
    name = _NOT_SECRET.sub("", str(key).lower())
    return any(word in name for word in _SECRET_WORDS)


def redact_secrets(obj: Any) -> Any:
    """A copy of a nested dict/list config with credential-like values replaced by ``"***"``."""
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if isinstance(value, (Mapping, list, tuple)):
                out[key] = redact_secrets(value)
            elif _is_secret_key(key) and value is not None and not isinstance(value, (bool, int, float)):
                out[key] = REDACTED
            else:
                out[key] = value
        return out
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v) for v in obj]
    return obj


def _plain_container(cfg: Any) -> Any:
    """Hydra/OmegaConf configs to plain dicts (wandb and redaction want ordinary containers)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # omegaconf is a dependency, but the logger should not need it
        pass
    return cfg


def _scalar(value: Any) -> Any:
    """Tensors / numpy scalars to Python numbers; non-finite floats to None (strict JSON)."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


def _terminal_columns(stream) -> int | None:
    """Width of the terminal behind ``stream``; None when it is no terminal or does not say."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # no fileno (StringIO raises UnsupportedOperation, an OSError)
        return None


def _has_console_handler(logger: logging.Logger) -> bool:
    return any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr) for h in logger.handlers)


class RunLogger:
    """Progress + metrics sink for a training run (rank 0 only).

    Args:
        run_dir: directory for ``metrics.jsonl`` (and wandb's files); created if missing.
        rank: global rank; anything but 0 makes every method a no-op.
        total_steps: optimizer steps in the run, for the progress bar and the ETA.
        use_tqdm: progress bar (True) or plain lines (False); ``None`` = bar iff ``stream`` is a TTY. A terminal
            that reports 0 columns gets lines either way (tqdm would draw nothing there).
        wandb_cfg: mapping with ``mode`` ("disabled" default, "offline", "online") and optional
            ``project``, ``entity``, ``name``, ``group``, ``tags``, ``config`` (the run config to
            record, secrets redacted before it is handed to wandb).
        print_every: in line mode, print every this many steps (default: ~50 lines per run);
            the first and the last step are always printed. JSONL gets every `log` call.
        start_step: step the run (re)starts from, so a resumed run's ETA is right.
        stream: where lines and the bar go (default ``sys.stdout``).
        clock: seconds source for throughput and ETA (injectable for tests).

    Metric conventions for `log`: ``loss`` and ``lr`` are shown; ``tokens`` is the number of
    tokens processed since the previous `log` call, from which ``tokens_per_s`` is derived
    unless the caller passes ``tokens_per_s`` itself. A record with none of these (e.g. eval
    metrics) goes to JSONL and wandb only.

    While the bar is up, console logging (the root logger's and DeepSpeed's) goes through
    ``tqdm.write``, so log lines land above the bar instead of on it; the bar is closed at the
    last step, so what the run prints afterwards starts on a line of its own.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        rank: int,
        total_steps: int,
        use_tqdm: bool | None = None,
        wandb_cfg: Mapping | None = None,
        *,
        print_every: int | None = None,
        start_step: int = 0,
        stream: TextIO | None = None,
        clock=time.monotonic,
    ):
        wandb_cfg = dict(_plain_container(wandb_cfg) or {})
        mode = wandb_cfg.get("mode", "disabled") or "disabled"
        if mode not in WANDB_MODES:
            raise SwiftKVInputError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")

        self.active = rank == 0
        self.total_steps = total_steps
        self._closed = False
        self._file = self._bar = self._wandb_run = self._redirect = None
        if not self.active:
            return

        self.stream = stream if stream is not None else sys.stdout
        if use_tqdm is None:
            use_tqdm = bool(getattr(self.stream, "isatty", lambda: False)())
        if use_tqdm and _terminal_columns(self.stream) == 0:
            use_tqdm = False  # a 0-column terminal (some CI pseudo-terminals) would show nothing at all
        self.print_every = print_every or max(1, total_steps // 50)
        self.run_dir = os.fspath(run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.metrics_path = os.path.join(self.run_dir, METRICS_FILE)
        self._file = open(self.metrics_path, "a", encoding="utf-8")

        self._clock = clock
        self._start_step = start_step
        self._t_start = self._t_last = clock()
        self._printed_first = False
        self._use_bar = use_tqdm
        if use_tqdm:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # mininterval=0, miniters=1: a step takes seconds, so draw every one (tqdm would skip fast updates).
            self._bar = tqdm(total=total_steps, initial=start_step, file=self.stream, dynamic_ncols=True, unit="step",
                             mininterval=0, miniters=1)
            consoles = [lg for lg in (logging.getLogger(), logging.getLogger("DeepSpeed")) if _has_console_handler(lg)]
            self._redirect = logging_redirect_tqdm(loggers=consoles)
            self._redirect.__enter__()
        if mode != "disabled":
            self._wandb_run = self._start_wandb(mode, wandb_cfg)

    # -- wandb -----------------------------------------------------------------------------

    def _start_wandb(self, mode: str, cfg: dict):
        try:
            import wandb

            return wandb.init(
                mode=mode,
                dir=self.run_dir,
                project=cfg.get("project"),
                entity=cfg.get("entity"),
                name=cfg.get("name"),
                group=cfg.get("group"),
                tags=cfg.get("tags"),
                config=redact_secrets(_plain_container(cfg.get("config") or {})),
            )
        except Exception as exc:  # wandb must never take the run down
            log.warning("wandb could not start (%s: %s); continuing without it", type(exc).__name__, exc)
            return None

    def _wandb_call(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            log.warning("wandb %s failed (%s: %s); disabling wandb for this run", what, type(exc).__name__, exc)
            self._wandb_run = None

    # -- logging ---------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` for optimizer step ``step``: JSONL always, display, wandb."""
        if not self.active or self._closed:
            return
        now = self._clock()
        record = {k: _scalar(v) for k, v in metrics.items()}
        if "tokens_per_s" not in record and isinstance(record.get("tokens"), (int, float)):
            record["tokens_per_s"] = record["tokens"] / max(now - self._t_last, 1e-9)
        self._t_last = now
        elapsed = now - self._t_start
        done = step - self._start_step
        eta = elapsed / done * max(self.total_steps - step, 0) if done > 0 else None

        line = {"step": step, "elapsed_s": round(elapsed, 3)}
        line.update((k, v) for k, v in record.items() if k not in line)  # our step/elapsed win
        self._file.write(json.dumps(line, allow_nan=False, default=str) + "\n")
        self._file.flush()

        postfix = self._postfix(record)
        if self._bar is not None:
            # The postfix first: update() draws, and it must draw this step's numbers, not the previous step's.
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            else:
                self._bar.unpause()  # an eval just ran: its minutes are not step time (rate, ETA)
            if step != self._bar.n:
                self._bar.update(step - self._bar.n)
            elif postfix:
                self._bar.refresh()
            if step >= self.total_steps:
                self._close_bar()
        # No line once the bar is done (end-of-run records), nor for records without step numbers (evals: the
        # trainer logs those itself).
        elif not self._use_bar and postfix and (
                not self._printed_first or step % self.print_every == 0 or step >= self.total_steps):
            self._printed_first = True
            print(self.format_line(step, record, eta), file=self.stream, flush=True)

        if self._wandb_run is not None:
            self._wandb_call("log", self._wandb_run.log, record, step=step)

    @staticmethod
    def _postfix(record: Mapping[str, Any]) -> dict[str, str]:
        postfix = {}
        if isinstance(record.get("loss"), (int, float)):
            postfix["loss"] = f"{record['loss']:.4g}"
        if isinstance(record.get("lr"), (int, float)):
            postfix["lr"] = f"{record['lr']:.1e}"
        if isinstance(record.get("tokens_per_s"), (int, float)):
            postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
        return postfix

    def format_line(self, step: int, record: Mapping[str, Any], eta_s: float | None) -> str:
        """``step 10/100 | loss 1.234 | lr 2.0e-04 | tok/s 1234 | eta 0:01:23`` (absent fields left out)."""
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {v}" for k, v in self._postfix(record).items()]
        if eta_s is not None:
            parts.append(f"eta {_format_eta(eta_s)}")
        return " | ".join(parts)

    def close(self) -> None:
        """Flush and close everything; safe to call twice."""
        if not self.active or self._closed:
            return
        self._closed = True
        self._close_bar()
        if self._file is not None:
            self._file.close()
        if self._wandb_run is not None:
            self._wandb_call("finish", self._wandb_run.finish)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- model FLOPs utilisation -------------------------------------------------------------------


def _llama_matmul_params(config) -> int:
    """Parameters that take part in a matmul per token: all layers' projections plus the LM head.

    The input embedding is a lookup, not a matmul, so it is left out (Kaplan et al. convention);
    norms are negligible.
    """
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o + k, v
    mlp = 3 * hidden * config.intermediate_size  # gate, up, down
    return config.num_hidden_layers * (attention + mlp) + config.vocab_size * hidden


def model_flops_per_token(
    num_params_or_config: Any,
    seq_len: int = 0,
    *,
    training: bool = True,
    num_layers: int | None = None,
    attention_dim: int | None = None,
) -> float:
    """Estimated model FLOPs per token: ``6N + 12·L·d·S`` (training) or ``2N + 4·L·d·S`` (forward).

    N is the matmul parameter count (2 FLOPs per parameter per token forward, twice that again
    backward). The attention term counts QKᵀ and AV, 2·S·d FLOPs each per token per layer forward,
    for L layers of attention width d at sequence length S, without halving for the causal mask
    (the PaLM MFU convention, so numbers compare with published MFUs).

    ``num_params_or_config`` is either N (then pass ``num_layers`` and ``attention_dim`` to get
    the attention term) or a Llama-style config, from which N, L and d are read. Note that "6N"
    assumes every weight gets a gradient; with a frozen backbone the hardware does less work,
    so this is the conventional, not the literal, count.
    """
    if isinstance(num_params_or_config, (int, float)):
        n_params = float(num_params_or_config)
        layers, width = num_layers or 0, attention_dim or 0
    else:
        config = num_params_or_config
        n_params = float(_llama_matmul_params(config))
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers = num_layers if num_layers is not None else config.num_hidden_layers
        width = attention_dim if attention_dim is not None else heads * head_dim
    if training:
        return 6 * n_params + 12 * layers * width * seq_len
    return 2 * n_params + 4 * layers * width * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s as a fraction of the hardware peak.

    ``peak_flops`` is for all devices doing the work (e.g. 8 × 989e12 for 8 H100 bf16 dense),
    matching a ``tokens_per_s`` that counts tokens across those devices.
    """
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops
