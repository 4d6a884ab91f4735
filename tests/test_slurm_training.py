"""Training under a real (local, throwaway) SLURM cluster: the shipped sbatch template and Hydra's submitit launcher.

The cluster is started by the `slurm_cluster` fixture (tests/slurm_cluster.py), which installs SLURM from Debian
packages when possible and skips with the reason otherwise.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["recipe=tiny_cpu_test", "launcher=slurm", "trainer.max_steps=3", "trainer.save_every=2",
              "trainer.export=lean"]
JOB_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore"}


def check_two_rank_run(run_dir: Path):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 3 and summary["evals"]["end"]["tokens"] > 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["tokens"] for r in records if "train/loss" in r]
    assert len(tokens) == 3 and sum(tokens) > 3 * 2 * 512  # both ranks' rows are counted
    assert (run_dir / "checkpoints" / "step_0000003" / "COMPLETE").is_file()
    assert (run_dir / "export" / "lean" / "model.safetensors").is_file()


def test_sbatch_template_trains_with_two_tasks(slurm_cluster, tmp_path):
    from slurm_cluster import submit_and_wait

    run_dir = tmp_path / "run"
    result = submit_and_wait(
        slurm_cluster, (REPO / "scripts" / "slurm" / "swiftkv_train_srun.sbatch").read_text(), timeout=400,
        args=[*TRAIN_ARGS, f"run_dir={run_dir}"], env={"PYTHON": sys.executable, **JOB_ENV},
        sbatch_args=["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"],
        workdir=tmp_path,
    )
    assert (result.state, result.exit_code) == ("COMPLETED", 0), result.output[-4000:]
    check_two_rank_run(run_dir)


def test_hydra_submitit_launcher_trains_with_two_tasks(slurm_cluster, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(slurm_cluster.env, **JOB_ENV)
    cmd = [sys.executable, "-m", "swiftkv_train", "--multirun", "hydra/launcher=submitit_slurm",
           "hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path / 'sweep'}", *TRAIN_ARGS,
           f"run_dir={run_dir}"]
    # The launcher polls until the job ends; the timeout guards against a job that dies without a result.
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    logs = "\n".join(p.read_text() for p in (tmp_path / "sweep").rglob("*_log.*")) if proc.returncode else ""
    assert proc.returncode == 0, proc.stderr[-3000:] + logs[-3000:]
    check_two_rank_run(run_dir)
