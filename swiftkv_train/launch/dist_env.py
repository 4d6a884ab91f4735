"""Distributed environment setup that works the same under torchrun, srun, submitit or a plain `python`.

Launchers describe the job differently:

- torchrun (also inside `srun torchrun ...`) sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT;
- `srun python ...` (one task per GPU) only sets SLURM_* variables;
- hydra-submitit-launcher runs one task per rank through srun and marks it with SUBMITIT_EXECUTOR;
- the `deepspeed` launcher and `torch.distributed.launch` append `--local_rank=N` to argv, which Hydra rejects.

`init_distributed()` turns all of them into the torch `env://` variables, then starts DeepSpeed's comm.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import zlib
from collections.abc import MutableMapping, Sequence
from datetime import timedelta

from ..errors import SwiftKVInputError

logger = logging.getLogger(__name__)

MIN_MASTER_PORT, MAX_MASTER_PORT = 20000, 60000
TORCH_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

_LOCAL_RANK_FLAGS = ("--local_rank", "--local-rank")


# --------------------------------------------------------------------------- argv


def strip_launcher_args(argv: Sequence[str], environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Return `argv` without the `--local_rank=N` / `--local-rank N` arguments that launchers inject.

    Hydra parses every argument as an override and fails on them. The value is moved to
    `LOCAL_RANK` in `environ` (default `os.environ`) unless the launcher already set that variable.
    """
    environ = os.environ if environ is None else environ
    out: list[str] = []
    local_rank: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if flag in _LOCAL_RANK_FLAGS:
            if not eq:  # `--local_rank N`: the value is the next argument
                if i + 1 >= len(argv):
                    raise SwiftKVInputError(f"{flag} is given without a value; expected e.g. {flag}=0")
                value = argv[i + 1]
                i += 1
            if not value.strip().isdigit():
                raise SwiftKVInputError(f"{flag} must be a non-negative integer, got {value!r}")
            local_rank = str(int(value))
        else:
            out.append(arg)
        i += 1
    if local_rank is not None:
        environ.setdefault("LOCAL_RANK", local_rank)
    return out


# --------------------------------------------------------------------------- Slurm hostlists


def _expand_range_list(body: str, hostlist: str) -> list[str]:
    """`01-03,07` -> ['01', '02', '03', '07']; zero padding follows the range's first bound."""
    items: list[str] = []
    for part in body.split(","):
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise SwiftKVInputError(f"cannot parse range {part!r} in Slurm hostlist {hostlist!r}")
        if not dash:
            items.append(lo)
            continue
        start, stop = int(lo), int(hi)
        if stop < start:
            raise SwiftKVInputError(f"descending range {part!r} in Slurm hostlist {hostlist!r}")
        width = len(lo) if lo.startswith("0") else 0
        items.extend(str(n).zfill(width) for n in range(start, stop + 1))
    return items


def _expand_host_pattern(pattern: str, hostlist: str) -> list[str]:
    """`rack[1-2]-n[01-02]` -> cartesian product, leftmost bracket outermost (as scontrol orders it)."""
    # re.split with a group alternates text, bracket body, text, ...
    pieces = re.split(r"\[([^\[\]]*)\]", pattern)
    hosts = [pieces[0]]
    for body, text in zip(pieces[1::2], pieces[2::2]):
        hosts = [h + item + text for h in hosts for item in _expand_range_list(body, hostlist)]
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    """Split on commas that are outside brackets: `a[1,2],b` -> ['a[1,2]', 'b']."""
    parts, depth, current = [], 0, []
    for ch in hostlist:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise SwiftKVInputError(f"nested brackets in Slurm hostlist {hostlist!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SwiftKVInputError(f"unbalanced ']' in Slurm hostlist {hostlist!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise SwiftKVInputError(f"unbalanced '[' in Slurm hostlist {hostlist!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist in pure Python: `node[01-03,07],login` -> node01..node03, node07, login.

    Supports several bracket groups per host and text after a bracket (`gpu-[1-2]-x`),
    a superset of what Slurm 22.05's scontrol accepts.
    """
    hosts = [h for part in _split_top_level(hostlist) for h in _expand_host_pattern(part, hostlist)]
    if not hosts:
        raise SwiftKVInputError(f"empty Slurm hostlist {hostlist!r}")
    return hosts


def _scontrol_hostnames(hostlist: str, timeout_s: float) -> list[str] | None:
    """`scontrol show hostnames` (the reference implementation), or None when it is unusable."""
    scontrol = shutil.which("scontrol")
    # Without a readable slurm.conf scontrol retries for 60 s before failing: do not even try.
    conf = os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"
    if scontrol is None or not os.path.isfile(conf):
        return None
    try:
        proc = subprocess.run(
            [scontrol, "show", "hostnames", hostlist], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    hosts = proc.stdout.split()
    return hosts if proc.returncode == 0 and hosts else None


def hostnames(hostlist: str, use_scontrol: bool = True, timeout_s: float = 10.0) -> list[str]:
    """Hosts of a Slurm hostlist: scontrol when available, else (or on its failure) `expand_hostlist`."""
    if use_scontrol and "[" in hostlist:  # plain lists need no scontrol round trip
        hosts = _scontrol_hostnames(hostlist, timeout_s)
        if hosts is not None:
            return hosts
    return expand_hostlist(hostlist)


def _expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE `2(x3),1` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise SwiftKVInputError(f"cannot parse Slurm tasks-per-node spec {spec!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


# --------------------------------------------------------------------------- env export


def master_port_for_job(job_id: str | int) -> int:
    """A port in [20000, 60000) that every task of the job computes alike, without talking to each other.

    Numeric ids map by modulo, so jobs that run at the same time on a node (consecutive ids)
    get different ports. `scripts/slurm/*.sbatch` use the same formula in bash.
    """
    job = str(job_id).strip()
    n = int(job) if job.isdigit() else zlib.crc32(job.encode())
    return MIN_MASTER_PORT + n % (MAX_MASTER_PORT - MIN_MASTER_PORT)


def _first(environ: MutableMapping[str, str], *keys: str) -> str | None:
    for key in keys:
        if environ.get(key):
            return environ[key]
    return None


def _slurm_torch_env(environ: MutableMapping[str, str]) -> dict[str, str]:
    """RANK & co from the SLURM_* variables of an srun task (step variables first: a step may use
    fewer tasks or nodes than the allocation)."""
    rank = int(environ["SLURM_PROCID"])
    world = int(_first(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS") or 1)
    local_rank = int(environ.get("SLURM_LOCALID", 0))
    node_id = int(environ.get("SLURM_NODEID", 0))
    per_node = _first(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if per_node:
        counts = _expand_tasks_per_node(per_node)
        local_world = counts[min(node_id, len(counts) - 1)]
    elif environ.get("SLURM_NTASKS_PER_NODE"):
        local_world = int(environ["SLURM_NTASKS_PER_NODE"])
    else:
        nnodes = int(_first(environ, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES") or 1)
        local_world = max(1, world // nnodes)
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world),
    }
    if not environ.get("MASTER_ADDR"):
        # Rank 0 runs on the first node of the step (block distribution, Slurm's default).
        nodelist = _first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        if nodelist is None:
            raise SwiftKVInputError("SLURM_PROCID is set but no SLURM_*NODELIST: cannot pick MASTER_ADDR")
        env["MASTER_ADDR"] = hostnames(nodelist)[0]
    if not environ.get("MASTER_PORT"):
        job_id = _first(environ, "SLURM_JOB_ID", "SLURM_JOBID")
        if job_id is None:
            raise SwiftKVInputError("SLURM_PROCID is set but SLURM_JOB_ID is not: cannot pick MASTER_PORT")
        env["MASTER_PORT"] = str(master_port_for_job(job_id))
    return env


def _submitit_torch_env(environ: MutableMapping[str, str]) -> dict[str, str] | None:
    """The same variables through submitit, when this process is a submitit task (slurm or local)."""
    if not environ.get("SUBMITIT_EXECUTOR") or environ is not os.environ:
        return None  # submitit only reads os.environ
    try:
        from submitit.helpers import TorchDistributedEnvironment

        tde = TorchDistributedEnvironment()
    except Exception as exc:  # not installed, or its job environment is incomplete
        logger.warning("SUBMITIT_EXECUTOR is set but submitit cannot describe the job (%s); using SLURM_*", exc)
        return None
    # Read its fields instead of calling .export(): export() pins CUDA_VISIBLE_DEVICES to one GPU
    # (we select the device from LOCAL_RANK instead) and refuses a MASTER_ADDR the user set.
    env = {
        "RANK": str(tde.rank),
        "WORLD_SIZE": str(tde.world_size),
        "LOCAL_RANK": str(tde.local_rank),
        "LOCAL_WORLD_SIZE": str(tde.local_world_size),
        "MASTER_PORT": str(tde.master_port),  # submitit honours a set MASTER_PORT itself
    }
    if not environ.get("MASTER_ADDR"):
        env["MASTER_ADDR"] = str(tde.master_addr)
    return env


def export_torch_env_from_slurm(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT in `environ` from the job.

    Acts only when the launcher did not set RANK already (torchrun does), in a submitit task
    (through submitit.helpers.TorchDistributedEnvironment) or in an srun task (SLURM_PROCID and a
    step id). A MASTER_ADDR or MASTER_PORT set by the user is kept. Returns the variables it set
    (empty when it did nothing).
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ:
        return {}
    env = _submitit_torch_env(environ)
    if env is None:
        if "SLURM_PROCID" not in environ:
            return {}
        if not _first(environ, "SLURM_STEP_ID", "SLURM_STEPID"):
            # The batch script itself also has SLURM_PROCID=0 and SLURM_NTASKS=<all tasks>; taking
            # those at face value would make this lone process wait forever for the other ranks.
            ntasks = environ.get("SLURM_NTASKS", "1")
            if ntasks != "1":
                logger.warning(
                    "running in the batch script of a %s-task SLURM job, not under srun: starting a single "
                    "process. Use `srun python -m swiftkv_train ...` or `srun torchrun ...` for all ranks.",
                    ntasks,
                )
            return {}
        env = _slurm_torch_env(environ)
    environ.update(env)
    return env


# --------------------------------------------------------------------------- init


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_single_process_defaults(environ: MutableMapping[str, str]) -> None:
    environ.setdefault("RANK", "0")
    environ.setdefault("WORLD_SIZE", "1")
    environ.setdefault("LOCAL_RANK", "0")
    # A guess for hand-made multi-process setups (launchers set the real value): one node.
    environ.setdefault("LOCAL_WORLD_SIZE", environ["WORLD_SIZE"])
    environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in environ:
        if environ["WORLD_SIZE"] != "1":
            raise SwiftKVInputError(
                f"WORLD_SIZE={environ['WORLD_SIZE']} but MASTER_PORT is not set: every rank must be given "
                "the same MASTER_ADDR:MASTER_PORT (torchrun and srun do this)"
            )
        # A free port, not a fixed 29500: two single-process runs on one machine must not collide.
        environ["MASTER_PORT"] = str(_free_port())


_TRAINING_CPU_ACCELERATOR = None


def training_cpu_accelerator_class():
    """DeepSpeed's `CPU_Accelerator` minus its shared-memory comm op (class built on first use: importing
    deepspeed takes seconds).

    DeepSpeed's comm backend JIT-compiles `deepspeed_shm_comm` whenever it starts on CPU: 2.5-4.5 min of silent
    C++ compilation on 2 cores, again for every new venv path. The op only serves DeepSpeed's tensor-parallel
    inference all-reduce (`inference_all_reduce`), which training never calls: gradients go through the gloo group.
    """
    global _TRAINING_CPU_ACCELERATOR
    if _TRAINING_CPU_ACCELERATOR is None:
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        class TrainingCPUAccelerator(CPU_Accelerator):
            def get_op_builder(self, class_name):
                # None is DeepSpeed's own "no such op here" answer: its comm then starts without the op.
                return None if class_name == "ShareMemCommBuilder" else super().get_op_builder(class_name)

        _TRAINING_CPU_ACCELERATOR = TrainingCPUAccelerator
    return _TRAINING_CPU_ACCELERATOR


def _use_training_cpu_accelerator() -> None:
    """Install it through DeepSpeed's public `set_accelerator` (the hook for custom accelerators)."""
    from deepspeed.accelerator import get_accelerator, set_accelerator

    cls = training_cpu_accelerator_class()
    if not isinstance(get_accelerator(), cls):
        set_accelerator(cls())


def init_distributed(backend: str | None = None, timeout_s: float = 1800) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; return (rank, world_size, local_rank).

    Works under torchrun, srun, submitit and a plain single process. Picks nccl with CUDA and
    gloo otherwise (setting DS_ACCELERATOR=cpu when unset), and selects the CUDA device from
    LOCAL_RANK. On CPU, DeepSpeed gets `training_cpu_accelerator_class()`, which compiles nothing.
    Calling it again returns the existing group's values.
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # DeepSpeed reads these from the environment: keep them consistent with the existing group.
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        os.environ.setdefault("LOCAL_RANK", "0")
        return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])

    export_torch_env_from_slurm()
    _set_single_process_defaults(os.environ)
    local_rank = int(os.environ["LOCAL_RANK"])

    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
    if not cuda:
        # Before deepspeed picks its accelerator: otherwise it probes and warns on CPU machines.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # deepspeed's CPU accelerator counts "devices" from LOCAL_SIZE.
        os.environ.setdefault("LOCAL_SIZE", os.environ["LOCAL_WORLD_SIZE"])
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise SwiftKVInputError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                "run one task per GPU (tasks_per_node = gpus_per_node) and do not narrow CUDA_VISIBLE_DEVICES"
            )
        torch.cuda.set_device(local_rank)  # before init: NCCL binds the communicator to it

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        _use_training_cpu_accelerator()  # no minutes-long compile of an op training never uses
    import deepspeed.comm

    deepspeed.comm.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s), verbose=False
    )
    return dist.get_rank(), dist.get_world_size(), local_rank


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank: from the process group when there is one, else from RANK (0 when unset)."""
    if _initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    if _initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_rank0() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group or with one rank."""
    if _initialized() and get_world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def destroy_distributed() -> None:
    """Tear the process group down (end of a run, or between tests); a no-op when there is none."""
    if not _initialized():
        return
    import deepspeed.comm as ds_comm

    if ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # also drops deepspeed's cached groups
    else:
        import torch.distributed as dist

        dist.destroy_process_group()
