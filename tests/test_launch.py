"""swiftkv_train.launch: argv clean-up, Slurm env derivation, and real 2-rank runs under torchrun and SLURM."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.launch import dist_env
from swiftkv_train.launch.dist_env import (
    barrier,
    expand_hostlist,
    export_torch_env_from_slurm,
    hostnames,
    init_distributed,
    is_rank0,
    master_port_for_job,
    strip_launcher_args,
)

REPO = Path(__file__).resolve().parents[1]
SBATCH_DIR = REPO / "scripts" / "slurm"


# --------------------------------------------------------------------------- strip_launcher_args


@pytest.mark.parametrize(
    "argv, local_rank",
    [
        (["prog", "--local_rank=3", "recipe=tiny", "lr=1e-4"], "3"),
        (["prog", "recipe=tiny", "--local-rank", "2", "lr=1e-4"], "2"),
        (["prog", "--local-rank=1", "recipe=tiny", "lr=1e-4"], "1"),
        (["prog", "recipe=tiny", "lr=1e-4", "--local_rank", "0"], "0"),
    ],
)
def test_strip_launcher_args_removes_flag_and_sets_local_rank(argv, local_rank):
    env = {}
    assert strip_launcher_args(argv, env) == ["prog", "recipe=tiny", "lr=1e-4"]
    assert env == {"LOCAL_RANK": local_rank}


def test_strip_launcher_args_keeps_launcher_env_and_other_args():
    env = {"LOCAL_RANK": "5"}
    argv = ["prog", "--local_rank=5", "+trainer.local_rank_note=x", "hydra.run.dir=out"]
    assert strip_launcher_args(argv, env) == ["prog", "+trainer.local_rank_note=x", "hydra.run.dir=out"]
    assert env == {"LOCAL_RANK": "5"}
    untouched = {}
    assert strip_launcher_args(["prog", "a=1"], untouched) == ["prog", "a=1"] and untouched == {}


@pytest.mark.parametrize("argv", [["prog", "--local_rank"], ["prog", "--local_rank=x"], ["prog", "--local-rank", "-1"]])
def test_strip_launcher_args_rejects_bad_values(argv):
    with pytest.raises(SwiftKVInputError, match="local"):
        strip_launcher_args(argv, {})


# --------------------------------------------------------------------------- hostlists


@pytest.mark.parametrize(
    "hostlist, expected",
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("a,b", ["a", "b"]),
        ("localhost", ["localhost"]),
        ("gpu-[1-2]-x", ["gpu-1-x", "gpu-2-x"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("x[01,5],login", ["x01", "x5", "login"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("c[1-2],d[3],e", ["c1", "c2", "d3", "e"]),
    ],
)
def test_expand_hostlist(hostlist, expected):
    assert expand_hostlist(hostlist) == expected


@pytest.mark.parametrize("bad", ["n[1-", "n1-2]", "n[3-1]", "n[a-b]", "n[]", "n[[1]]", ""])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(SwiftKVInputError, match="hostlist"):
        expand_hostlist(bad)


def test_hostnames_falls_back_to_python_without_scontrol(monkeypatch):
    monkeypatch.setattr(dist_env.shutil, "which", lambda name: None)
    assert hostnames("gpu[07-08]") == ["gpu07", "gpu08"]


# --------------------------------------------------------------------------- export_torch_env_from_slurm


def _srun_task_env(**overrides):
    """What srun gives task 5 of a 2-node x 4-task step (values as Slurm 22.05 sets them)."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


@pytest.fixture
def no_scontrol(monkeypatch):
    """Use the Python hostlist expansion, whatever is installed on the test machine."""
    monkeypatch.setattr(dist_env, "_scontrol_hostnames", lambda hostlist, timeout_s: None)


def test_export_from_srun_task(no_scontrol):
    env = _srun_task_env()
    exported = export_torch_env_from_slurm(env)
    expected = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 4242)}
    assert exported == expected
    assert {k: env[k] for k in expected} == expected


def test_export_uneven_nodes_and_step_narrower_than_job(no_scontrol):
    # Third node of `2(x2),1`; the step runs on nodes b[2-4] of a job on b[1-4] with 9 tasks.
    env = _srun_task_env(SLURM_PROCID="4", SLURM_LOCALID="0", SLURM_NODEID="2", SLURM_NTASKS="9",
                         SLURM_STEP_NUM_TASKS="5", SLURM_STEP_TASKS_PER_NODE="2(x2),1",
                         SLURM_JOB_NODELIST="b[1-4]", SLURM_STEP_NODELIST="b[2-4]")
    exported = export_torch_env_from_slurm(env)
    assert (exported["RANK"], exported["WORLD_SIZE"], exported["LOCAL_WORLD_SIZE"]) == ("4", "5", "1")
    assert exported["MASTER_ADDR"] == "b2"


def test_export_derives_local_world_size_without_per_node_spec(no_scontrol):
    env = _srun_task_env(SLURM_STEP_TASKS_PER_NODE=None, SLURM_TASKS_PER_NODE=None)
    assert export_torch_env_from_slurm(env)["LOCAL_WORLD_SIZE"] == "4"  # 8 tasks / 2 nodes
    env = _srun_task_env(SLURM_STEP_TASKS_PER_NODE=None, SLURM_TASKS_PER_NODE=None, SLURM_NTASKS_PER_NODE="3")
    assert export_torch_env_from_slurm(env)["LOCAL_WORLD_SIZE"] == "3"


def test_export_keeps_user_master_addr_and_port(no_scontrol):
    env = _srun_task_env(MASTER_ADDR="10.0.0.9", MASTER_PORT="29511")
    exported = export_torch_env_from_slurm(env)
    assert "MASTER_ADDR" not in exported and "MASTER_PORT" not in exported
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["RANK"]) == ("10.0.0.9", "29511", "5")


@pytest.mark.parametrize(
    "env",
    [
        {"PATH": "/bin"},  # not under SLURM
        _srun_task_env(RANK="3", WORLD_SIZE="16"),  # torchrun inside srun already set the ranks
        _srun_task_env(SLURM_STEP_ID=None),  # the batch script itself, not an srun task
    ],
    ids=["no-slurm", "rank-already-set", "batch-step"],
)
def test_export_does_nothing_when_it_should_not(env, no_scontrol):
    before = dict(env)
    assert export_torch_env_from_slurm(env) == {}
    assert env == before


def test_export_prefers_submitit_in_a_submitit_task(monkeypatch):
    class FakeTDE:  # the fields submitit.helpers.TorchDistributedEnvironment exposes
        master_addr, master_port, rank, world_size, local_rank, local_world_size = "sub-node", 31337, 3, 4, 1, 2

    helpers = types.ModuleType("submitit.helpers")
    helpers.TorchDistributedEnvironment = FakeTDE
    monkeypatch.setitem(sys.modules, "submitit", types.ModuleType("submitit"))
    monkeypatch.setitem(sys.modules, "submitit.helpers", helpers)
    for key, value in _srun_task_env(SUBMITIT_EXECUTOR="slurm").items():
        monkeypatch.setenv(key, value)
    for key in dist_env.TORCH_ENV_KEYS:
        monkeypatch.delenv(key, raising=False)  # also makes monkeypatch remove what export adds
    exported = export_torch_env_from_slurm()
    assert exported == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "sub-node", "MASTER_PORT": "31337"}
    assert os.environ["RANK"] == "3" and "CUDA_VISIBLE_DEVICES" not in exported


def test_export_falls_back_to_slurm_when_submitit_is_missing(monkeypatch, no_scontrol):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    for key, value in _srun_task_env(SUBMITIT_EXECUTOR="slurm").items():
        monkeypatch.setenv(key, value)
    for key in dist_env.TORCH_ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    assert export_torch_env_from_slurm()["RANK"] == "5" and os.environ["MASTER_ADDR"] == "gpu07"


def test_master_port_is_deterministic_and_in_range():
    assert master_port_for_job("123") == master_port_for_job(123) == 20123
    assert master_port_for_job(60001) == 40001
    assert master_port_for_job("123") != master_port_for_job("124")  # concurrent jobs differ
    for job in ("1", "39999", "40000", "987654321", "12345_7", "abc"):
        assert 20000 <= master_port_for_job(job) < 60000
    assert master_port_for_job("12345_7") == master_port_for_job("12345_7")


@pytest.mark.parametrize("template", ["swiftkv_train.sbatch", "swiftkv_train_srun.sbatch"])
def test_sbatch_templates_parse_and_share_the_port_formula(template):
    text = (SBATCH_DIR / template).read_text()
    subprocess.run(["bash", "-n", str(SBATCH_DIR / template)], check=True)
    line = next(ln for ln in text.splitlines() if ln.startswith("MASTER_PORT="))
    for job_id in ("7", "123456", "40000"):
        out = subprocess.run(["bash", "-c", f"SLURM_JOB_ID={job_id}; {line}; echo $MASTER_PORT"],
                             capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]})
        assert int(out.stdout) == master_port_for_job(job_id)


@pytest.mark.slow
@pytest.mark.parametrize("hostlist", ["node[01-03,07]", "r[1-2]n[1-2]", "x[01,5],login", "n[098-101]"])
def test_python_hostlist_matches_scontrol(slurm_cluster, monkeypatch, hostlist):
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    reference = dist_env._scontrol_hostnames(hostlist, timeout_s=10)
    assert reference is not None, "scontrol show hostnames did not answer"
    assert expand_hostlist(hostlist) == reference == hostnames(hostlist)


# --------------------------------------------------------------------------- init_distributed, in process


def test_helpers_without_process_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert is_rank0()
    barrier()  # no process group: must not raise or block
    monkeypatch.setenv("RANK", "2")
    assert not is_rank0()


def test_init_distributed_single_process_is_idempotent(monkeypatch, tmp_path):
    import torch
    import torch.distributed as dist

    for key in (*dist_env.TORCH_ENV_KEYS, "LOCAL_SIZE", "SLURM_PROCID", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))  # where a JIT-compiled op would land
    if dist.is_initialized():
        pytest.skip("another test left a process group open")
    try:
        assert init_distributed() == (0, 1, 0)
        assert dist.get_backend() == "gloo" and is_rank0()
        import deepspeed.comm
        from deepspeed.accelerator import get_accelerator

        # DeepSpeed's comm started without its shared-memory op: nothing was compiled (that took minutes).
        assert isinstance(get_accelerator(), dist_env.training_cpu_accelerator_class())
        assert get_accelerator().device_name() == "cpu" and get_accelerator().communication_backend_name() == "gloo"
        assert deepspeed.comm.comm.cdb.shm_comm_op is None
        assert not (tmp_path / "ext").exists()
        assert 1024 < int(os.environ["MASTER_PORT"]) < 65536 and os.environ["WORLD_SIZE"] == "1"
        assert init_distributed() == (0, 1, 0)  # second call: same group, no error
        t = torch.tensor([2.5])
        dist.all_reduce(t)
        barrier()
        assert t.item() == 2.5
    finally:
        dist_env.destroy_distributed()
    assert not dist.is_initialized()


def test_single_process_defaults_refuse_multi_rank_without_port():
    env = {"WORLD_SIZE": "2", "RANK": "1"}
    with pytest.raises(SwiftKVInputError, match="MASTER_PORT"):
        dist_env._set_single_process_defaults(env)
    env = {}
    dist_env._set_single_process_defaults(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}


# --------------------------------------------------------------------------- the SLURM test helper


@pytest.mark.parametrize(
    "forbid, euid, apt, reason",
    [
        ("0", 0, "/usr/bin/apt-get", "forbids"),
        (None, 1000, "/usr/bin/apt-get", "needs root"),
        (None, 0, None, "no apt-get"),
    ],
)
def test_slurm_helper_explains_why_it_cannot_install(monkeypatch, forbid, euid, apt, reason):
    import slurm_cluster

    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name: apt if name == "apt-get" else None)
    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: euid)
    if forbid is None:
        monkeypatch.delenv(slurm_cluster.INSTALL_ENV, raising=False)
    else:
        monkeypatch.setenv(slurm_cluster.INSTALL_ENV, forbid)
    with pytest.raises(slurm_cluster.SlurmUnavailable, match=reason) as err:
        slurm_cluster.ensure_installed()
    assert "slurmctld" in str(err.value)  # names what is missing


# --------------------------------------------------------------------------- real 2-rank runs

PROBE = """\
import json, os, sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
from swiftkv_train.launch import barrier, destroy_distributed, init_distributed, is_rank0

rank, world, local = init_distributed(timeout_s=120)
again = init_distributed()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)  # 1 + 2 + ... + world
barrier()
out = os.environ.get("PROBE_OUT") or sys.argv[1]
record = dict(rank=rank, world_size=world, local_rank=local, allreduce=t.item(), again=list(again),
              is_rank0=is_rank0(), backend=dist.get_backend(), argv=sys.argv[1:],
              env={{k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "SLURM_JOB_ID")}})
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
    json.dump(record, f)
destroy_distributed()
"""


def _write_probe(folder: Path, name: str = "dist_probe.py") -> Path:
    probe = folder / name
    probe.write_text(PROBE.format(repo=str(REPO)))
    return probe


def _read_ranks(out: Path, world: int, context: str) -> list[dict]:
    files = sorted(out.glob("rank*.json"))
    assert len(files) == world, f"expected {world} rank files in {out}, got {[f.name for f in files]}:\n{context}"
    records = [json.loads(f.read_text()) for f in files]
    expected_sum = world * (world + 1) / 2
    for i, rec in enumerate(records):
        assert rec["rank"] == i and rec["world_size"] == world, rec
        assert rec["allreduce"] == expected_sum and rec["backend"] == "gloo", rec
        assert rec["again"] == [rec["rank"], world, rec["local_rank"]] and rec["is_rank0"] == (i == 0), rec
    assert sorted(r["local_rank"] for r in records) == list(range(world))
    assert len({(r["env"]["MASTER_ADDR"], r["env"]["MASTER_PORT"]) for r in records}) == 1  # all agree
    return records


def _child_env(**extra) -> dict:
    """The test process env minus rank variables (tests above may have set some), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in dist_env.TORCH_ENV_KEYS and k != "LOCAL_SIZE"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)
    return env


def test_torchrun_two_processes(tmp_path):
    probe = _write_probe(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(probe), str(out)]
    ext = tmp_path / "ext"
    proc = subprocess.run(cmd, env=_child_env(TORCH_EXTENSIONS_DIR=str(ext)), capture_output=True, text=True,
                          timeout=180)
    context = proc.stdout + proc.stderr
    assert proc.returncode == 0, context
    records = _read_ranks(out, 2, context)
    assert all(r["env"]["LOCAL_WORLD_SIZE"] == "2" for r in records)
    assert not ext.exists()  # no rank JIT-compiled DeepSpeed's shared-memory op


@pytest.mark.slow
def test_slurm_srun_two_tasks(slurm_cluster, tmp_path):
    """1 node x 2 srun tasks; the ranks come only from SLURM_* variables via init_distributed."""
    probe = _write_probe(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    script = f"""#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=5
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
srun {sys.executable} {probe} {out}
"""
    from slurm_cluster import submit_and_wait

    result = submit_and_wait(slurm_cluster, script, timeout=180, workdir=tmp_path)
    assert (result.state, result.exit_code) == ("COMPLETED", 0), f"{result}\n{result.output}"
    records = _read_ranks(out, 2, result.output)
    for rec in records:
        assert rec["env"]["SLURM_JOB_ID"] == result.job_id
        assert rec["env"]["MASTER_ADDR"] == "localhost"  # first (only) host of the node list
        assert rec["env"]["MASTER_PORT"] == str(master_port_for_job(result.job_id))
        assert rec["env"]["LOCAL_WORLD_SIZE"] == "2"


@pytest.mark.slow
@pytest.mark.parametrize(
    "template, sbatch_args",
    [
        ("swiftkv_train_srun.sbatch", ["--ntasks-per-node=2", "--cpus-per-task=1"]),
        ("swiftkv_train.sbatch", ["--cpus-per-task=2"]),  # 1 task (torchrun) starting 2 processes
    ],
)
def test_slurm_sbatch_templates(slurm_cluster, tmp_path, template, sbatch_args):
    """The shipped templates, submitted unchanged; sbatch options adapt them to this 1-node CPU cluster
    (as users adapt them) and a probe module stands in for `-m swiftkv_train`."""
    _write_probe(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    overrides = ["recipe=tiny", "+note=two words", "lr='1e-4'"]  # must reach the module verbatim
    env = {"PYTHON": sys.executable, "SWIFTKV_MODULE": "dist_probe", "GPUS_PER_NODE": "2",
           "PYTHONPATH": f"{tmp_path}:{REPO}", "PROBE_OUT": str(out), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}
    from slurm_cluster import submit_and_wait

    result = submit_and_wait(
        slurm_cluster, (SBATCH_DIR / template).read_text(), timeout=180, args=overrides, env=env,
        sbatch_args=["--nodes=1", "--gpus-per-node=0", "--time=5", *sbatch_args], workdir=tmp_path,
    )
    assert (result.state, result.exit_code) == ("COMPLETED", 0), f"{result}\n{result.output}"
    assert f"[swiftkv] job {result.job_id}:" in result.output
    records = _read_ranks(out, 2, result.output)
    for rec in records:
        assert rec["argv"] == overrides
        assert rec["env"]["LOCAL_WORLD_SIZE"] == "2"
    if template == "swiftkv_train_srun.sbatch":  # the template's own MASTER_ADDR/PORT reach the ranks
        assert records[0]["env"]["MASTER_ADDR"] == "localhost"
        assert records[0]["env"]["MASTER_PORT"] == str(master_port_for_job(result.job_id))
