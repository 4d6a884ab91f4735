"""`python -m swiftkv_train` with no recipe: the embedded default (real SmolLM2, shipped GSM8K) end to end on CPU."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_embedded_default_distills_smollm2(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "swiftkv_train", f"run_dir={tmp_path}"], capture_output=True,
                          text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "teacher fidelity on the held-out split" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    start, end = summary["evals"]["start"], summary["evals"]["end"]
    assert summary["step"] == 30
    # distillation closes most of the initialisation's gap to the teacher (measured: KL 0.97 -> 0.25)
    assert end["kl"] < 0.5 * start["kl"] and end["top1"] > start["top1"]
    assert end["ppl_teacher"] == pytest.approx(start["ppl_teacher"])  # the teacher is untouched
    config = json.loads((tmp_path / "export" / "lean" / "config.json").read_text())
    assert config["num_key_value_layers"] == 20 and config["model_type"] == "llama_swiftkv"
