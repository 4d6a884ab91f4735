"""RunLogger: JSONL record, line/bar display, rank gating, wandb isolation; FLOPs helpers."""

import io
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.train import run_logger as rl
from swiftkv_train.train.run_logger import RunLogger, mfu, model_flops_per_token, redact_secrets


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_jsonl_records_every_log_call(tmp_path):
    clock = FakeClock()
    logger = RunLogger(tmp_path / "run", rank=0, total_steps=3, use_tqdm=False, stream=io.StringIO(), clock=clock)
    for step in (1, 2, 3):
        clock.now += 2.0
        logger.log(step, {"loss": torch.tensor(1.5 / step), "lr": 1e-4, "tokens": 1000, "kl": float("nan")})
        # Flushed at once: readable before close.
        assert len(_read_jsonl(tmp_path / "run" / "metrics.jsonl")) == step
    logger.close()
    rows = _read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["loss"] == pytest.approx(0.75)
    assert rows[2]["lr"] == 1e-4
    assert rows[0]["tokens_per_s"] == pytest.approx(500.0)  # 1000 tokens in 2 s
    assert rows[2]["elapsed_s"] == pytest.approx(6.0)
    assert rows[0]["kl"] is None  # NaN becomes null, so strict JSON readers cope


def test_appends_to_existing_file_on_resume(tmp_path):
    for start in (0, 5):
        with RunLogger(tmp_path, rank=0, total_steps=10, use_tqdm=False, start_step=start, stream=io.StringIO()) as lg:
            lg.log(start + 1, {"loss": 1.0})
    assert [r["step"] for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [1, 6]


def test_nonzero_rank_writes_nothing(tmp_path, monkeypatch):
    def boom(**kwargs):
        raise AssertionError("wandb must not start on rank 1")

    monkeypatch.setattr("wandb.init", boom)
    out = io.StringIO()
    logger = RunLogger(tmp_path / "run", rank=1, total_steps=5, use_tqdm=False, wandb_cfg={"mode": "offline"}, stream=out)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()
    assert out.getvalue() == ""


def test_non_tty_line_format(tmp_path):
    clock, out = FakeClock(), io.StringIO()
    logger = RunLogger(tmp_path, rank=0, total_steps=100, stream=out, clock=clock, print_every=10)  # StringIO is no TTY
    clock.now = 10.0
    logger.log(10, {"loss": 1.2341, "lr": 2e-4, "tokens": 12340})
    logger.close()
    # 10 steps in 10 s -> 90 remaining steps take 90 s.
    assert out.getvalue() == "step 10/100 | loss 1.234 | lr 2.0e-04 | tok/s 1234 | eta 0:01:30\n"


def test_line_cadence_first_every_nth_and_last(tmp_path):
    out = io.StringIO()
    logger = RunLogger(tmp_path, rank=0, total_steps=12, use_tqdm=False, print_every=5, stream=out)
    for step in range(1, 13):
        logger.log(step, {"loss": 1.0})
    logger.close()
    printed = [int(line.split()[1].split("/")[0]) for line in out.getvalue().splitlines()]
    assert printed == [1, 5, 10, 12]
    assert len(_read_jsonl(tmp_path / "metrics.jsonl")) == 12


def test_tqdm_bar_shows_postfix(tmp_path):
    out = io.StringIO()
    logger = RunLogger(tmp_path, rank=0, total_steps=4, use_tqdm=True, stream=out)
    for step in range(1, 5):
        logger.log(step, {"loss": 0.5, "lr": 3e-4, "tokens": 100})
    logger.close()
    text = out.getvalue()
    assert "4/4" in text and "loss=0.5" in text and "lr=3.0e-04" in text
    assert "step 4/4 |" not in text  # bar mode prints no plain lines


def test_tqdm_bar_leaves_eval_time_out_of_the_step_rate(tmp_path):
    import time

    out = io.StringIO()
    logger = RunLogger(tmp_path, rank=0, total_steps=4, use_tqdm=True, stream=out)
    time.sleep(1.2)  # the eval at start
    logger.log(0, {"eval/kl": 0.9})
    logger.log(1, {"loss": 0.5, "tokens": 100})
    frame = out.getvalue().split("\r")[-1]
    logger.close()
    assert " 1/4 [00:00<00:00," in frame, frame  # without the pause: [00:01<00:03, 1.2s/step]


def test_wandb_init_failure_is_not_fatal(tmp_path, monkeypatch, caplog):
    def broken_init(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr("wandb.init", broken_init)
    with caplog.at_level(logging.WARNING, logger=rl.__name__):
        logger = RunLogger(tmp_path, rank=0, total_steps=2, use_tqdm=False, wandb_cfg={"mode": "online"}, stream=io.StringIO())
    assert "wandb could not start" in caplog.text and "no network" in caplog.text
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert _read_jsonl(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0


class FakeRun:
    def __init__(self, fail_log=False):
        self.fail_log, self.logged, self.finished = fail_log, [], False

    def log(self, data, step):
        if self.fail_log:
            raise OSError("disk full")
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished = True


def test_wandb_receives_metrics_and_redacted_config(tmp_path, monkeypatch):
    calls, run = [], FakeRun()

    def fake_init(**kwargs):
        calls.append(kwargs)
        return run

    monkeypatch.setattr("wandb.init", fake_init)
    cfg = {
        "mode": "offline",
        "project": "swiftkv",
        "config": {"lr": 1e-4, "hf_token": "hf_abc", "data": {"wandb_api_key": "k", "max_tokens": 512}},
    }
    logger = RunLogger(tmp_path, rank=0, total_steps=2, use_tqdm=False, wandb_cfg=cfg, stream=io.StringIO())
    logger.log(1, {"loss": torch.tensor(2.0)})
    logger.close()
    (kwargs,) = calls
    assert kwargs["mode"] == "offline" and kwargs["project"] == "swiftkv" and kwargs["dir"] == str(tmp_path)
    assert kwargs["config"] == {"lr": 1e-4, "hf_token": "***", "data": {"wandb_api_key": "***", "max_tokens": 512}}
    assert run.logged == [(1, {"loss": 2.0})] and run.finished
    assert cfg["config"]["hf_token"] == "hf_abc"  # the caller's config is not modified


def test_wandb_log_failure_disables_wandb_but_not_logging(tmp_path, monkeypatch, caplog):
    run = FakeRun(fail_log=True)
    monkeypatch.setattr("wandb.init", lambda **kwargs: run)
    logger = RunLogger(tmp_path, rank=0, total_steps=3, use_tqdm=False, wandb_cfg={"mode": "offline"}, stream=io.StringIO())
    with caplog.at_level(logging.WARNING, logger=rl.__name__):
        logger.log(1, {"loss": 1.0})
        logger.log(2, {"loss": 0.5})
    logger.close()
    assert caplog.text.count("disk full") == 1  # warned once, then left alone
    assert not run.finished
    assert [r["loss"] for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [1.0, 0.5]


def test_disabled_wandb_is_never_started(tmp_path, monkeypatch):
    monkeypatch.setattr("wandb.init", lambda **kwargs: pytest.fail("wandb.init called in disabled mode"))
    for cfg in (None, {}, {"mode": "disabled", "project": "x"}):
        RunLogger(tmp_path, rank=0, total_steps=1, use_tqdm=False, wandb_cfg=cfg, stream=io.StringIO()).close()


def test_bad_wandb_mode_is_rejected_on_every_rank(tmp_path):
    for rank in (0, 1):
        with pytest.raises(SwiftKVInputError, match="wandb mode"):
            RunLogger(tmp_path, rank=rank, total_steps=1, wandb_cfg={"mode": "onlin"})


def test_redact_secrets():
    cfg = {
        "HF_TOKEN": "hf_x",
        "access_token": "y",
        "Password": "p",
        "client_secret": "s",
        "api_key": "a",
        "pad_token_id": 0,  # a number is never a credential
        "tokenizer": "meta-llama/Llama-3.1-8B",
        "max_new_tokens": 64,
        "nested": [{"github_token": "g"}, "plain"],
        "optional_token": None,
    }
    assert redact_secrets(cfg) == {
        "HF_TOKEN": "***",
        "access_token": "***",
        "Password": "***",
        "client_secret": "***",
        "api_key": "***",
        "pad_token_id": 0,
        "tokenizer": "meta-llama/Llama-3.1-8B",
        "max_new_tokens": 64,
        "nested": [{"github_token": "***"}, "plain"],
        "optional_token": None,
    }


def test_flops_per_token_from_param_count():
    assert model_flops_per_token(1e9) == 6e9
    assert model_flops_per_token(1e9, training=False) == 2e9
    # Attention term: 12 * L * d * S training, 4 * L * d * S forward.
    assert model_flops_per_token(1e9, 2048, num_layers=16, attention_dim=2048) == 6e9 + 12 * 16 * 2048 * 2048
    assert model_flops_per_token(1e9, 2048, training=False, num_layers=16, attention_dim=2048) == 2e9 + 4 * 16 * 2048 * 2048


def test_flops_per_token_from_config_counts_matmul_weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Independent N: every Linear weight of the real model (layer projections + LM head).
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert n_matmul == 2 * (16 * 16 * 2 + 16 * 8 * 2 + 3 * 16 * 40) + 50 * 16  # by hand: q,o + k,v + mlp; head
    seq = 32
    assert model_flops_per_token(config, seq) == 6 * n_matmul + 12 * 2 * 16 * seq
    assert model_flops_per_token(config, seq, training=False) == 2 * n_matmul + 4 * 2 * 16 * seq
    # Duck-typed configs work too (no head_dim / kv heads given -> MHA with hidden / heads).
    plain = SimpleNamespace(hidden_size=8, num_attention_heads=2, intermediate_size=16, num_hidden_layers=1, vocab_size=10)
    assert model_flops_per_token(plain) == 6 * (4 * 8 * 8 + 3 * 8 * 16 + 10 * 8)


def test_mfu():
    assert mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


# -- the display in a real pseudo-terminal -------------------------------------------------------------------------

PTY_SCRIPT = """
import logging, sys
from swiftkv_train.train.run_logger import RunLogger
logging.basicConfig(level=logging.INFO, format="%(message)s")  # stderr, as the trainer's logging
lg = RunLogger(sys.argv[1], rank=0, total_steps=3)  # stream: sys.stdout, the terminal
for step, loss in ((1, 3.0), (2, 2.0), (3, 1.0)):
    lg.log(step, {"loss": loss, "lr": 1e-3, "tokens": 100})
    if step == 2:
        logging.getLogger("t").info("EVAL-MID")
logging.getLogger("t").info("EVAL-END")  # the trainer's end-of-run eval comes after the last step
lg.log(3, {"eval/kl": 0.1})
lg.close()
"""


def _run_in_pty(tmp_path, columns: int) -> str:
    """Run PTY_SCRIPT with stdout and stderr on one pseudo-terminal of the given width; return all it wrote."""
    import fcntl
    import os
    import struct
    import subprocess
    import sys
    import termios
    import tty
    import pty

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    tty.setraw(slave)  # no "\n" -> "\r\n" translation: the test sees exactly the bytes written
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, "-c", PTY_SCRIPT, str(tmp_path)], stdin=slave, stdout=slave,
                            stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child is gone and the terminal drained
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0, b"".join(chunks).decode(errors="replace")[-2000:]
    return b"".join(chunks).decode()


def test_tty_bar_shows_current_step_and_logs_land_on_their_own_line(tmp_path):
    out = _run_in_pty(tmp_path, columns=100)
    frames = [f for f in out.replace("\n", "\r").split("\r") if "it/s" in f or "step/s" in f or "s/step" in f]
    by_step = {}
    for frame in frames:
        for step in (1, 2, 3):
            if f" {step}/3 " in frame:
                by_step.setdefault(step, []).append(frame)
    assert set(by_step) == {1, 2, 3}, out
    for step, loss in ((1, "3"), (2, "2"), (3, "1")):  # every frame of a step shows that step's loss, no lag
        assert all(f"loss={loss}," in f for f in by_step[step]), (step, by_step[step])
    # Log lines start a line: the bar is cleared before (tqdm.write) or closed with a newline at the last step.
    for message in ("EVAL-MID", "EVAL-END"):
        i = out.index(message)
        assert out[i - 1] in "\r\n" and out[i + len(message)] == "\n", repr(out[max(0, i - 80):i + 20])
    assert out.index("EVAL-END") > out.rindex(" 3/3 ")  # after the bar's last frame, not under it
    assert "eval" not in out.replace("EVAL", "")  # eval records are not shown (the trainer logs them)


def test_zero_column_terminal_falls_back_to_lines(tmp_path):
    out = _run_in_pty(tmp_path, columns=0)
    lines = [line for line in out.replace("\r", "").split("\n") if line]
    assert [line.split(" | ")[:2] for line in lines if line.startswith("step ")] == [
        ["step 1/3", "loss 3"], ["step 2/3", "loss 2"], ["step 3/3", "loss 1"]]
    assert "%|" not in out and "EVAL-MID" in lines and "EVAL-END" in lines
