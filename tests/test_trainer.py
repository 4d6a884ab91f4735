"""The shared trainer: config validation, learning, frozen teacher, resume, ZeRO paths, export, divergence."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from safetensors.torch import load_file

from swiftkv_train import SwiftKVInputError
from swiftkv_train.config import register_schemas
from swiftkv_train.models import load_pretrained
from swiftkv_train.train import trainer as trainer_mod
from swiftkv_train.train.trainer import Trainer, TrainingDivergedError, run_training

from helpers import run_loader

register_schemas()


def make_cfg(run_dir, *overrides, recipe="tiny_cpu_test"):
    with initialize_config_module("swiftkv_train.recipes", version_base="1.3"):
        # a short rendezvous timeout: a broken distributed environment fails the test instead of hanging it
        return compose("config", overrides=[f"recipe={recipe}", f"run_dir={run_dir}", "launcher.init_timeout_minutes=2",
                                            *overrides])


def losses(run_dir):
    """Last logged train loss per step (a resumed run logs the replayed steps again)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            out[record["step"]] = record["train/loss"]
    return out


# ---------------------------------------------------------------- configuration


def test_typo_in_override_fails_with_the_key_name(tmp_path):
    with pytest.raises(ConfigCompositionException, match="trainer.lrr"):
        make_cfg(tmp_path, "trainer.lrr=1e-3")
    with pytest.raises(ConfigCompositionException, match="trainer.max_steps"):
        make_cfg(tmp_path, "trainer.max_steps=many")


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.export=sometimes", "trainer.export='sometimes'"),
        ("trainer.lr_schedule=wavy", "trainer.lr_schedule='wavy'"),
        ("trainer.micro_batch_size=0", "trainer.micro_batch_size=0"),
        ("logger.wandb_mode=onlin", "logger.wandb_mode='onlin'"),
        ("transform.name=magic", "transform.name='magic'"),
    ],
)
def test_bad_values_fail_before_the_model_is_loaded(tmp_path, monkeypatch, override, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad config")

    monkeypatch.setattr(trainer_mod, "load_pretrained", no_loading)
    with pytest.raises(SwiftKVInputError, match=message.replace("(", r"\(")):
        Trainer(make_cfg(tmp_path, override)).setup()


def test_impossible_swiftkv_settings_name_the_field(tmp_path):
    with pytest.raises(SwiftKVInputError, match="num_key_value_layers=9 is impossible"):
        run_training(make_cfg(tmp_path, "transform.swiftkv.num_key_value_layers=9"))
    with pytest.raises(SwiftKVInputError, match="hidden_loss_layer=1"):
        run_training(make_cfg(tmp_path, "transform.swiftkv.hidden_loss_layer=1"))


def test_shipped_recipes_compose(tmp_path):
    expected = {
        "llama8b_swiftkv": ("meta-llama/Llama-3.1-8B-Instruct", 16, 1, 2, 8192),
        "llama8b_swiftkv_acrosskv4": ("meta-llama/Llama-3.1-8B-Instruct", 16, 4, 2, 8192),
        "llama70b_swiftkv": ("meta-llama/Llama-3.1-70B-Instruct", 40, 1, 3, 8192),
        "smollm2_swiftkv": ("smollm2-135m-instruct", 20, 1, 0, 512),
    }
    for recipe, (spec, m, g, stage, length) in expected.items():
        cfg = make_cfg(tmp_path, recipe=recipe)
        sw = cfg.transform.swiftkv
        assert (cfg.model.spec, sw.num_key_value_layers, sw.key_value_group_size, cfg.deepspeed.zero_stage,
                cfg.data.max_length) == (spec, m, g, stage, length), recipe
    published = make_cfg(tmp_path, recipe="llama8b_swiftkv")
    assert (published.trainer.lr, published.trainer.lr_schedule, published.trainer.warmup_ratio) == (2e-4, "linear", 0.05)
    assert (published.transform.swiftkv.temperature, published.transform.swiftkv.hidden_loss_weight) == (2.0, 1.0)
    assert published.trainer.precision == "bf16" and published.data.mask_inputs


# ---------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    summary = run_training(make_cfg(run_dir, "trainer.max_steps=16", "trainer.save_every=0"))
    return run_dir, summary


def test_training_reduces_the_loss_and_the_eval_kl(trained_run):
    run_dir, summary = trained_run
    curve = losses(run_dir)
    assert len(curve) == 16
    first, last = sum(list(curve.values())[:4]) / 4, sum(list(curve.values())[-4:]) / 4
    assert last < 0.8 * first, curve
    assert summary["evals"]["end"]["kl"] < summary["evals"]["start"]["kl"]
    assert summary["evals"]["end"]["tokens"] == summary["evals"]["start"]["tokens"] > 0


def test_teacher_is_unchanged_and_only_swiftkv_weights_change(trained_run):
    run_dir, _ = trained_run
    base, _ = load_pretrained("random:tiny")
    exported = load_file(str(run_dir / "export" / "full" / "model.safetensors"))
    original = base.state_dict()
    changed = {name for name, tensor in exported.items() if name in original and not torch.equal(tensor, original[name])}
    assert changed == set()  # every original (teacher) weight is bit-identical after training
    new = {name for name in exported if name not in original}
    assert new == {name for name in exported if "swiftkv" in name} and len(new) == 7
    fresh = {"model.norm_swiftkv.weight": base.model.layers[2].input_layernorm.weight,
             "model.layers.2.self_attn.q_proj_swiftkv.weight": base.model.layers[2].self_attn.q_proj.weight}
    for name, init in fresh.items():
        assert not torch.equal(exported[name], init), f"{name} did not train"


def test_export_after_training_loads_with_trust_remote_code(trained_run, tmp_path):
    run_dir, summary = trained_run
    card = (run_dir / "export" / "lean" / "README.md").read_text()
    assert card.startswith("---\nbase_model: random:tiny\n") and "recipe: tiny_cpu_test" in card
    assert f"{summary['evals']['end']['kl']:.4g}" in card
    result = run_loader(run_dir / "export" / "lean", tmp_path, "float32")
    assert result["class"] == "LlamaSwiftKVForCausalLM"
    full = run_loader(run_dir / "export" / "full", tmp_path, "float32", teacher=True)
    base, _ = load_pretrained("random:tiny")
    with torch.no_grad():
        torch.testing.assert_close(full["teacher_logits"], base(full["ids"]).logits, rtol=0, atol=1e-5)
    # lean = bf16 rounding of the full export's student
    assert (result["logits"] - full["logits"]).abs().max() < 0.1


def test_run_directory_layout(trained_run):
    run_dir, _ = trained_run
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints",
                                                  "export"}
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_0000016" and (run_dir / "checkpoints" / latest / "COMPLETE").is_file()


# ---------------------------------------------------------------- resume


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(make_cfg(straight, "trainer.save_every=2", "trainer.max_steps=6", "trainer.export=full"))
    interrupted = run_training(make_cfg(resumed, "trainer.save_every=2", "trainer.max_steps=6",
                                        "trainer.export=full", "trainer.stop_after_steps=3"))
    assert interrupted == {"interrupted": True, "step": 3}
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    run_training(make_cfg(resumed, "trainer.save_every=2", "trainer.max_steps=6", "trainer.export=full"))
    assert losses(straight) == losses(resumed)  # exact float equality, step by step
    a = load_file(str(straight / "export" / "full" / "model.safetensors"))
    b = load_file(str(resumed / "export" / "full" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from swiftkv_train.methods.swiftkv import SwiftKV

    real_loss = SwiftKV.loss
    calls = {"n": 0}

    def poisoned(self, student, batch):
        out = real_loss(self, student, batch)
        calls["n"] += 1
        if calls["n"] == 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SwiftKV, "loss", poisoned)
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 4.*step_0000002"):
        run_training(make_cfg(tmp_path, "trainer.save_every=2", "trainer.max_steps=6"))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert not (tmp_path / "export").exists()


# ---------------------------------------------------------------- DeepSpeed ZeRO paths


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_train_and_match_zero0(tmp_path, stage):
    ref = run_training(make_cfg(tmp_path / "z0", "trainer.max_steps=3", "trainer.export=lean"))
    got = run_training(make_cfg(tmp_path / f"z{stage}", f"deepspeed=zero{stage}", "trainer.max_steps=3",
                                "trainer.export=lean"))
    for a, b in zip(losses(tmp_path / "z0").values(), losses(tmp_path / f"z{stage}").values()):
        assert a == pytest.approx(b, rel=1e-4)
    assert got["evals"]["end"]["kl"] == pytest.approx(ref["evals"]["end"]["kl"], rel=1e-3)
    ours = load_file(str(tmp_path / f"z{stage}" / "export" / "lean" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "z0" / "export" / "lean" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key].float(), theirs[key].float(), rtol=0, atol=1e-2)


# ---------------------------------------------------------------- launchers


def _run_cli(args, env_extra=None, timeout=600, launcher=None):
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    env.update(env_extra or {})
    cmd = (launcher or [sys.executable, "-m"]) + ["swiftkv_train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_cli_ignores_an_injected_local_rank(tmp_path):
    proc = _run_cli(["--local_rank=0", "recipe=tiny_cpu_test", f"run_dir={tmp_path}", "trainer.max_steps=2",
                     "trainer.export=none"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher fidelity on the held-out split" in proc.stdout
    assert not (tmp_path / ".hydra").exists() and not list(tmp_path.glob("*.log"))  # no per-run Hydra clutter


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    proc = _run_cli(["recipe=tiny_cpu_test", f"run_dir={tmp_path}", "launcher=torchrun", "trainer.max_steps=4",
                     "trainer.save_every=2", "trainer.export=lean"], launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 4
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]  # rank 0 only: each step logged once
    # tokens of both ranks are counted: one rank reads at most 2 rows x 512 tokens per step
    tokens = [r["tokens"] for r in records if "train/loss" in r]
    assert all(t <= 2 * 2 * 512 for t in tokens) and sum(tokens) > 4 * 2 * 512
    assert (tmp_path / "export" / "lean" / "model.safetensors").is_file()


def test_a_crash_mid_save_keeps_the_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    from swiftkv_train.train import checkpointing

    run_training(make_cfg(tmp_path, "trainer.save_every=2", "trainer.max_steps=2", "trainer.export=none"))
    assert checkpointing.latest_checkpoint(tmp_path).name == "step_0000002"
    real_save = checkpointing.save_checkpoint

    def crash_midway(engine, run_dir, step, client_state, keep):
        engine.save_checkpoint = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
        return real_save(engine, run_dir, step, client_state, keep)

    monkeypatch.setattr(checkpointing, "save_checkpoint", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        run_training(make_cfg(tmp_path, "trainer.save_every=2", "trainer.max_steps=4", "trainer.export=none"))
    assert checkpointing.latest_checkpoint(tmp_path).name == "step_0000002"  # the half-written one is not latest
    assert not (tmp_path / "checkpoints" / "step_0000004").exists()


def test_optimizer_holds_state_for_trainable_parameters_only(tmp_path):
    trainer = Trainer(make_cfg(tmp_path, "trainer.max_steps=1", "trainer.export=none"))
    trainer.setup()
    trainer.train()
    optimizer = trainer.engine.optimizer
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in trainer.engine.module.parameters() if p.requires_grad}
    assert in_optimizer == trainable and len(trainable) == 7
    state_numel = sum(t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    assert state_numel == 2 * trainer.num_trainable  # Adam's two moments, for the SwiftKV weights only
    assert trainer.num_trainable < 0.2 * sum(p.numel() for p in trainer.engine.module.parameters())


def test_cskv_trains_through_the_same_loop(tmp_path):
    """A second transformation plugs into the shared trainer: conversion + calibration + its own loss."""
    summary = run_training(make_cfg(tmp_path, "transform=cskv", "transform.cskv.key_density=0.5",
                                    "transform.cskv.value_density=0.75", "transform.cskv.init=asvd",
                                    "transform.cskv.calibration_batches=2",
                                    f"transform.cskv.calibration_cache_dir={tmp_path / 'calibration'}",
                                    "trainer.max_steps=10", "trainer.lr=1e-2", "trainer.export=lean"))
    curve = losses(tmp_path)
    assert sum(list(curve.values())[-3:]) < sum(list(curve.values())[:3])  # reconstruction loss goes down
    assert list((tmp_path / "calibration").glob("cskv-factors-*.safetensors"))  # the cached calibration step
    assert summary["evals"]["end"]["kl"] <= summary["evals"]["start"]["kl"] * 1.05
    config = json.loads((tmp_path / "export" / "lean" / "config.json").read_text())
    assert config["model_type"] == "llama_cskv" and config["auto_map"]


def test_locret_trains_through_the_same_loop(tmp_path):
    run_training(make_cfg(tmp_path, "transform=locret", "data.pack=false", "transform.locret.head_hidden_size=32",
                          "transform.locret.budget=128", "transform.locret.chunk_size=64",
                          "transform.locret.stabilizers=16", "transform.locret.n_local=16", "trainer.max_steps=8",
                          "trainer.lr=5e-3", "trainer.micro_batch_size=1", "trainer.export=lean"))
    curve = losses(tmp_path)
    assert sum(list(curve.values())[-3:]) < sum(list(curve.values())[:3])
    config = json.loads((tmp_path / "export" / "lean" / "config.json").read_text())
    assert config["model_type"] == "llama_locret" and config["locret_budget"] == 128
    exported = load_file(str(tmp_path / "export" / "lean" / "model.safetensors"))
    assert any("retaining_head" in name for name in exported)


def test_evaluation_harness_runs_at_the_end_of_training(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "held_out.txt").write_text("A held-out text about gardens, rivers and the weather. " * 40)
    summary = run_training(make_cfg(tmp_path / "run", "trainer.max_steps=2", "trainer.export=none",
                                    "trainer.harness_suites=[fidelity]",
                                    f"+trainer.harness.fidelity={{data: {texts}, window: 256, num_windows: 2}}"))
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert summary["harness"].endswith("results.json")
    fidelity = results["fidelity"][0]
    assert fidelity["tokens"] == 2 * 255 and fidelity["kl"] > 0  # the student (M=2 of 4) differs from its teacher


def test_harness_reruns_its_suites_after_training_unless_told(tmp_path, monkeypatch):
    """The weights under a run's name change with each training run: results left in <run_dir>/eval by an earlier
    run must not be skipped as done (eval.runs resume), unless trainer.harness.resume=true asks for it."""
    import swiftkv_train.eval.api as api

    calls = []
    monkeypatch.setattr(api, "evaluate", lambda *args, **kwargs: calls.append(kwargs))
    common = ("trainer.max_steps=1", "trainer.export=none", "trainer.eval_at_start=false",
              "trainer.harness_suites=[needle]")
    run_training(make_cfg(tmp_path / "run", *common))
    run_training(make_cfg(tmp_path / "run2", *common, "+trainer.harness.resume=true"))
    assert [c["resume"] for c in calls] == [False, True]
    assert all(str(c["out_dir"]).endswith("eval") for c in calls)


def test_varlen_attention_trains_like_sdpa_on_packed_rows(tmp_path):
    """model.attn_implementation=varlen (documents of packed rows attended separately) gives SDPA's losses."""
    run_training(make_cfg(tmp_path / "sdpa", "trainer.max_steps=2", "trainer.export=none"))
    run_training(make_cfg(tmp_path / "varlen", "trainer.max_steps=2", "trainer.export=none",
                          "model.attn_implementation=varlen"))
    ref, got = losses(tmp_path / "sdpa"), losses(tmp_path / "varlen")
    assert ref.keys() == got.keys() and ref
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4)
