"""Checkpoint safety: manifests and fallback from corrupt checkpoints, no non-finite state ever saved as good,
no pickle payload ever run on resume, and kill -9 + resume=auto reproducing the uninterrupted run bitwise."""

import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from swiftkv_train import SwiftKVInputError
from swiftkv_train.train import checkpointing
from swiftkv_train.train import trainer as trainer_mod
from swiftkv_train.train.schedule import lr_lambda
from swiftkv_train.train.trainer import Trainer, TrainingDivergedError, run_training

from helpers import cli_env

from test_trainer import _run_cli, losses, make_cfg

MODEL_FILE = "state/mp_rank_00_model_states.pt"


def step_dir(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:07d}"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished 2-step run with checkpoints step_1 and step_2; tests tamper with copies of it."""
    run_dir = tmp_path_factory.mktemp("saved")
    run_training(make_cfg(run_dir, "trainer.max_steps=2", "trainer.save_every=1", "trainer.keep_checkpoints=3",
                          "trainer.export=none", "trainer.eval_at_start=false"))
    return run_dir


@pytest.fixture
def run_copy(saved_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    return run_dir


# ---------------------------------------------------------------- config: non-finite settings


@pytest.mark.parametrize("override,field", [("trainer.lr=nan", "trainer.lr=nan"), ("trainer.lr=inf", "trainer.lr=inf"),
                                            ("trainer.weight_decay=nan", "trainer.weight_decay=nan"),
                                            ("trainer.grad_clip=inf", "trainer.grad_clip=inf"),
                                            ("trainer.betas=[0.9,nan]", r"trainer.betas\[1\]=nan")])
def test_non_finite_settings_fail_by_name_before_the_model_loads(tmp_path, monkeypatch, override, field):
    monkeypatch.setattr(trainer_mod, "load_pretrained", lambda *a, **k: pytest.fail("model loaded for a bad config"))
    with pytest.raises(SwiftKVInputError, match=f"{field} is not a finite number: set trainer"):
        Trainer(make_cfg(tmp_path, override)).setup()


# ---------------------------------------------------------------- manifest and fallback


def test_every_checkpoint_has_a_manifest_of_its_files(saved_run):
    path = step_dir(saved_run, 2)
    manifest = json.loads((path / checkpointing.MANIFEST).read_text())["files"]
    # DeepSpeed's files (its own `latest` pointer included) and ours; the COMPLETE marker comes after the manifest
    assert set(manifest) == {MODEL_FILE, "latest", checkpointing.TRAINER_STATE, "rng_rank0.json"}
    model = path / MODEL_FILE
    assert manifest[MODEL_FILE]["size"] == model.stat().st_size > 0
    assert manifest[MODEL_FILE]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert checkpointing.checkpoint_problem(path) is None
    assert json.loads((path / checkpointing.TRAINER_STATE).read_text())["step"] == 2


def test_verification_names_the_bad_file(run_copy):
    path = step_dir(run_copy, 2)
    (path / "extra.bin").write_bytes(b"x")
    assert checkpointing.checkpoint_problem(path) == "extra.bin is not in the manifest"
    (path / "extra.bin").unlink()
    data = bytearray((path / checkpointing.TRAINER_STATE).read_bytes())
    data[0:1] = b" "  # same size, other bytes
    (path / checkpointing.TRAINER_STATE).write_bytes(bytes(data))
    assert "trainer_state.json does not match its sha256" in checkpointing.checkpoint_problem(path)
    (path / checkpointing.MANIFEST).unlink()
    assert "no MANIFEST.json" in checkpointing.checkpoint_problem(path)
    assert checkpointing.checkpoint_problem(run_copy / "nowhere") == "no such directory"


def test_resume_auto_skips_a_truncated_newest_checkpoint_with_a_warning(run_copy, caplog):
    model = step_dir(run_copy, 2) / MODEL_FILE
    size = model.stat().st_size
    with open(model, "r+b") as f:
        f.truncate(size // 2)
    trainer = Trainer(make_cfg(run_copy, "trainer.max_steps=2", "trainer.export=none"))
    with caplog.at_level(logging.WARNING, logger="swiftkv_train.train.checkpointing"):
        trainer.setup()
    assert trainer.step == 1  # fell back to step_0000001
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step_0000002" in m and f"{MODEL_FILE} has {size // 2} bytes, the manifest says {size}" in m
               for m in warning), warning
    explicit = make_cfg(run_copy, "trainer.max_steps=2", f"trainer.resume={step_dir(run_copy, 2)}")
    with pytest.raises(SwiftKVInputError, match=f"trainer.resume=.*step_0000002.*{MODEL_FILE} has {size // 2} bytes"):
        Trainer(explicit).setup()


def test_resume_auto_refuses_to_start_over_silently_when_no_checkpoint_is_intact(run_copy):
    for step in (1, 2):
        (step_dir(run_copy, step) / MODEL_FILE).write_bytes(b"garbage")
    with pytest.raises(SwiftKVInputError, match="none of the 2 checkpoint.*trainer.resume=none"):
        Trainer(make_cfg(run_copy, "trainer.max_steps=2")).setup()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoints_resume_bitwise_through_the_restricted_loader(tmp_path, stage):
    """ZeRO's optimizer files hold a few DeepSpeed types (loss scaler, stage enum, fragment addresses): allow-listed."""
    args = (f"deepspeed=zero{stage}", "trainer.max_steps=3", "trainer.save_every=1", "trainer.export=none")
    run_training(make_cfg(tmp_path / "straight", *args))
    assert run_training(make_cfg(tmp_path / "resumed", *args, "trainer.stop_after_steps=2"))["step"] == 2
    assert checkpointing.checkpoint_problem(step_dir(tmp_path / "resumed", 2)) is None
    resumed = Trainer(make_cfg(tmp_path / "resumed", *args))
    resumed.setup()
    assert resumed.step == 2
    resumed.train()
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


# ---------------------------------------------------------------- no pickle payload is ever run


class Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def plant_payload(checkpoint, marker):
    """Add the payload to DeepSpeed's model file and re-write the manifest, so that the hashes still match."""
    file = checkpoint / MODEL_FILE
    state = torch.load(file, weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, file)
    checkpointing.write_manifest(checkpoint)
    assert "builtins.exec" in torch.serialization.get_unsafe_globals_in_checkpoint(file)


def test_a_planted_pickle_payload_is_refused_and_never_run(run_copy, tmp_path, caplog):
    marker = tmp_path / "pwned"
    planted = step_dir(run_copy, 2)
    plant_payload(planted, marker)
    with pytest.raises(SwiftKVInputError, match=f"step_0000002: {MODEL_FILE} would import builtins.exec"):
        Trainer(make_cfg(run_copy, "trainer.max_steps=2", f"trainer.resume={planted}")).setup()
    with caplog.at_level(logging.WARNING, logger="swiftkv_train.train.checkpointing"):
        trainer = Trainer(make_cfg(run_copy, "trainer.max_steps=2"))
        trainer.setup()
    assert trainer.step == 1 and any("builtins.exec" in r.getMessage() for r in caplog.records)
    # behind the verification, the load itself is restricted: handed the file directly, it still refuses it
    with pytest.raises(SwiftKVInputError, match="refusing to unpickle"):
        checkpointing.load_checkpoint(trainer.engine, planted)
    with checkpointing.weights_only_loading(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(planted / MODEL_FILE, weights_only=False)  # DeepSpeed's call, forced to weights_only
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the switch is scoped to our loads


# ---------------------------------------------------------------- non-finite state is never saved as good


class NaNGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite); NaN gradients backward, as an overflowing step would give."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_gradients_at_call(monkeypatch, call):
    from swiftkv_train.methods.swiftkv import SwiftKV

    real_loss, calls = SwiftKV.loss, {"n": 0}

    def poisoned(self, student, batch):
        out = real_loss(self, student, batch)
        calls["n"] += 1
        if calls["n"] == call:
            out["loss"] = NaNGradient.apply(out["loss"])
        return out

    monkeypatch.setattr(SwiftKV, "loss", poisoned)


def all_finite_tensors(obj):
    if torch.is_tensor(obj):
        return [bool(torch.isfinite(obj).all())] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [f for v in obj.values() for f in all_finite_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [f for v in obj for f in all_finite_tensors(v)]
    return []


def test_non_finite_state_is_never_saved_and_resuming_with_a_lower_lr_trains_on(tmp_path, monkeypatch):
    args = ("trainer.save_every=1", "trainer.max_steps=5", "trainer.keep_checkpoints=5", "trainer.export=none",
            "trainer.eval_at_start=false")
    poison_gradients_at_call(monkeypatch, 3)
    with pytest.raises(TrainingDivergedError) as diverged:
        run_training(make_cfg(tmp_path, *args))
    # every weight and both Adam moments of the 7 SwiftKV tensors (their step counters stay finite)
    assert str(diverged.value).startswith("21 of 28 trainable-weight/optimizer-state tensors hold NaN/inf after step 3")
    assert re.search(r"step_0000003 was not saved.*The last good checkpoint is \S*step_0000002: lower trainer.lr "
                     r"\(e.g. trainer.lr=0.0003\).*trainer.resume=auto", str(diverged.value))
    assert not step_dir(tmp_path, 3).exists()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    saved = torch.load(step_dir(tmp_path, 2) / MODEL_FILE, weights_only=True)
    flags = all_finite_tensors(saved["module"]) + all_finite_tensors(saved["optimizer"])
    assert len(flags) > 20 and all(flags)  # weights and Adam moments of the last good checkpoint are finite

    monkeypatch.undo()
    summary = run_training(make_cfg(tmp_path, *args, "trainer.lr=3e-4"))  # the advice: lower lr, resume=auto
    assert summary["step"] == 5
    curve = losses(tmp_path)
    assert set(curve) == {1, 2, 3, 4, 5} and all(math.isfinite(v) for v in curve.values())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lr_at = {r["step"]: r["lr"] for r in records if "lr" in r}
    factor = lr_lambda("linear", 5, 0.1)
    assert lr_at[3] == pytest.approx(3e-4 * factor(3))  # the lowered lr took effect (not the checkpoint's 3e-3)
    assert lr_at[2] == pytest.approx(3e-3 * factor(2))


def test_a_checkpoint_whose_weights_give_a_nan_loss_is_not_named_good(tmp_path):
    """lr=1e30 is finite, yet one Adam step blows the weights up: step_1 saves finite weights whose loss is NaN."""
    args = ("trainer.save_every=1", "trainer.max_steps=4", "trainer.export=none", "trainer.eval_at_start=false")
    with pytest.raises(TrainingDivergedError, match="loss is (nan|inf) at step 2.*step_0000001 holds the weights "
                                                    "that gave it: marked DIVERGED.*No good checkpoint yet.*"
                                                    "trainer.resume=none"):
        run_training(make_cfg(tmp_path, *args, "trainer.lr=1e30"))
    assert "DIVERGED" in checkpointing.checkpoint_problem(step_dir(tmp_path, 1))
    with pytest.raises(SwiftKVInputError, match="none of the 1 checkpoint"):
        run_training(make_cfg(tmp_path, *args))  # resume=auto never continues from the diverged weights
    summary = run_training(make_cfg(tmp_path, *args, "trainer.resume=none"))  # the advice works
    assert summary["step"] == 4 and all(math.isfinite(v) for v in losses(tmp_path).values())
    assert checkpointing.checkpoint_problem(step_dir(tmp_path, 4)) is None


# ---------------------------------------------------------------- kill -9, then resume=auto


def test_kill_9_mid_run_then_resume_auto_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    args = ["trainer.max_steps=6", "trainer.save_every=1", "trainer.export=none", "trainer.keep_checkpoints=2"]
    run_training(make_cfg(tmp_path / "straight", *args))
    killed = tmp_path / "killed"
    env = cli_env(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "swiftkv_train", "recipe=tiny_cpu_test", f"run_dir={killed}", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer, deadline = killed / "checkpoints" / "latest", time.time() + 300
    try:
        while not (pointer.is_file() and pointer.read_text().strip() >= "step_0000003"):
            assert proc.poll() is None and time.time() < deadline, "the run ended before its third checkpoint"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "summary.json").exists()  # killed mid-run
    resumed = Trainer(make_cfg(killed, *args))
    resumed.setup()
    assert 3 <= resumed.step < 6  # continues from a checkpoint, not from scratch
    resumed.train()
    assert losses(tmp_path / "straight") == losses(killed)  # exact float equality, step by step


@pytest.mark.slow
def test_two_ranks_fall_back_from_a_corrupt_newest_checkpoint_together(tmp_path):
    """Rank 0 verifies and picks the checkpoint, every rank resumes from it (with its own RNG file)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    args = ["recipe=tiny_cpu_test", "launcher=torchrun", "trainer.max_steps=4", "trainer.save_every=1",
            "trainer.export=none"]
    for run_dir, extra in ((tmp_path / "straight", []), (tmp_path / "resumed", ["trainer.stop_after_steps=2"])):
        proc = _run_cli([*args, f"run_dir={run_dir}", *extra], launcher=launcher)
        assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = tmp_path / "resumed"
    assert {p.name for p in step_dir(resumed, 2).glob("rng_rank*.json")} == {"rng_rank0.json", "rng_rank1.json"}
    (step_dir(resumed, 2) / MODEL_FILE).write_bytes(b"truncated")
    proc = _run_cli([*args, f"run_dir={resumed}"], launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.search(r"skipping checkpoint \S*step_0000002: state/mp_rank_00_model_states.pt has 9 bytes", proc.stderr)
    assert re.search(r"resumed from \S*step_0000001 at step 1", proc.stderr)
    assert losses(tmp_path / "straight") == losses(resumed)
