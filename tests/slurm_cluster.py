"""A throwaway one-node SLURM cluster for tests: install if possible, start, submit jobs, stop.

The daemons are started and stopped by `scripts/ci_slurm.sh` (one implementation for CI and tests);
this module adds what tests need around it:

    ensure_installed()            -> raises SlurmUnavailable(reason) when SLURM cannot be had
    cluster = start_cluster()     -> own temp root, own ports and munge socket; node is idle
    submit_and_wait(cluster, script_text, timeout=120) -> JobResult(job_id, state, exit_code, output)
    stop_cluster(cluster)         -> scancel, stop every daemon by PID, check nothing is left

`cluster.env` is the environment for slurm commands (it carries SLURM_CONF); jobs inherit it.
Also runnable by hand: `python tests/slurm_cluster.py` starts a cluster, prints SLURM_CONF, waits for Enter.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
CI_SCRIPT = REPO / "scripts" / "ci_slurm.sh"
REQUIRED_BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo",
                     "munged", "munge", "unmunge", "setpriv")
# Set SWIFTKV_SLURM_INSTALL=0 to forbid the apt-get install (the tests are then skipped).
INSTALL_ENV = "SWIFTKV_SLURM_INSTALL"

# Variables that must not leak from the test process into jobs: a task that sees RANK (left by an
# in-process init_distributed) or an outer job's SLURM_* would not derive its own rank.
_DIST_KEYS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "LOCAL_SIZE", "GROUP_RANK", "NODE_RANK", "CUDA_VISIBLE_DEVICES"}
_TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                    "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed and cannot be installed here; the message says why."""


class JobResult(NamedTuple):
    job_id: str
    state: str  # e.g. COMPLETED, FAILED, CANCELLED, TIMEOUT
    exit_code: int  # the batch script's exit status
    output: str  # the job's stdout+stderr file


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]

    @property
    def conf(self) -> Path:
        return Path(self.env["SLURM_CONF"])

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a slurm command (squeue, scontrol, srun, ...) against this cluster."""
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=check)

    def logs(self, tail: int = 30) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)


def missing_binaries() -> list[str]:
    return [b for b in REQUIRED_BINARIES if shutil.which(b) is None]


def ensure_installed(timeout_s: float = 600) -> None:
    """Install the Debian packages when binaries are missing and we may (root + apt-get)."""
    missing = missing_binaries()
    if not missing:
        return
    why = f"SLURM binaries missing ({', '.join(missing)})"
    if os.environ.get(INSTALL_ENV) == "0":
        raise SlurmUnavailable(f"{why} and {INSTALL_ENV}=0 forbids installing them")
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{why}; installing them needs root (sudo {CI_SCRIPT} install)")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{why}; no apt-get to install slurmctld slurmd slurm-client munge")
    try:
        proc = subprocess.run(["bash", str(CI_SCRIPT), "install"], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"{why}; `ci_slurm.sh install` took more than {timeout_s:.0f} s") from None
    still = missing_binaries()
    if proc.returncode != 0 or still:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise SlurmUnavailable(f"{why}; `ci_slurm.sh install` failed (rc={proc.returncode}, "
                               f"still missing: {still}):\n{tail}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _job_env(extra: dict[str, str]) -> dict[str, str]:
    outer = ("SLURM_", "SBATCH_", "SRUN_")
    env = {k: v for k, v in os.environ.items() if k not in _DIST_KEYS and not k.startswith(outer)}
    env.update(extra)
    return env


def start_cluster(root: Path | None = None, start_timeout_s: float = 120) -> SlurmCluster:
    """Start munged + slurmctld + slurmd on this machine (fresh state) and wait for the node to be idle."""
    root = Path(tempfile.mkdtemp(prefix="swiftkv-slurm-")) if root is None else Path(root)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # munged runs as the munge user and keeps its socket under root/
    ctld_port = _free_port()
    slurmd_port = _free_port()
    while slurmd_port == ctld_port:
        slurmd_port = _free_port()
    env = _job_env({
        "SLURM_CI_ROOT": str(root),
        "SLURM_CONF": str(root / "etc" / "slurm.conf"),
        "SLURM_CI_CTLD_PORT": str(ctld_port),
        "SLURM_CI_SLURMD_PORT": str(slurmd_port),
        # Job ids (and the MASTER_PORT derived from them) differ between clusters started side by side.
        "SLURM_CI_FIRST_JOB_ID": str(random.randint(1000, 30000)),
        "SLURM_CI_CPUS": str(os.cpu_count() or 1),
    })
    cluster = SlurmCluster(root=root, env=env)
    try:
        proc = subprocess.run(["bash", str(CI_SCRIPT), "start"], env=env, capture_output=True, text=True,
                              timeout=start_timeout_s)
    except subprocess.TimeoutExpired:
        stop_cluster(cluster, check=False)
        raise RuntimeError(f"SLURM did not start within {start_timeout_s:.0f} s:\n{cluster.logs()}") from None
    if proc.returncode != 0:
        stop_cluster(cluster, check=False)
        raise RuntimeError(f"`ci_slurm.sh start` failed (rc={proc.returncode}):\n{proc.stderr}\n{cluster.logs()}")
    return cluster


def _processes_mentioning(text: str) -> dict[int, str]:
    """PID -> command line of every process whose command line contains `text`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # the process exited meanwhile
        if text in cmdline:
            found[int(entry.name)] = cmdline.strip()
    return found


def stop_cluster(cluster: SlurmCluster, check: bool = True, remove_root: bool = True) -> None:
    """scancel all jobs, stop slurmd, slurmctld and munged by PID; then make sure none is left.

    Every daemon of this cluster has the root folder on its command line: any such process still
    alive after `ci_slurm.sh stop` is killed and, with check=True, reported as an error.
    """
    proc = subprocess.run(["bash", str(CI_SCRIPT), "stop"], env=cluster.env, capture_output=True, text=True,
                          timeout=120)
    leftovers = _processes_mentioning(str(cluster.root))
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if remove_root and not leftovers and proc.returncode == 0:
        shutil.rmtree(cluster.root, ignore_errors=True)
    if check and (proc.returncode != 0 or leftovers):
        raise RuntimeError(f"stopping SLURM was not clean (rc={proc.returncode}, killed leftovers: "
                           f"{leftovers}):\n{proc.stderr}")


def _job_state(cluster: SlurmCluster, job_id: str) -> tuple[str, int]:
    """(JobState, exit status) from `scontrol show job` (no accounting: sacct is not available)."""
    text = cluster.run("scontrol", "show", "job", "-o", job_id).stdout
    state = re.search(r"\bJobState=(\S+)", text)
    exit_code = re.search(r"\bExitCode=(\d+):(\d+)", text)
    if state is None or exit_code is None:
        raise RuntimeError(f"cannot read the state of job {job_id} from scontrol: {text!r}")
    code, sig = int(exit_code.group(1)), int(exit_code.group(2))
    return state.group(1), code if code else (128 + sig if sig else 0)


def submit_and_wait(cluster: SlurmCluster, script_text: str, timeout: float = 120, *,
                    args: Sequence[str] = (), sbatch_args: Sequence[str] = (), env: dict[str, str] | None = None,
                    workdir: Path | str | None = None, poll_s: float = 0.1) -> JobResult:
    """sbatch `script_text` (a bash script with #SBATCH lines), wait for it to end, return its result.

    `args` go to the script ("$@"), `sbatch_args` to sbatch (they override #SBATCH lines), `env` is
    added to the environment the job inherits (the test process's, minus torch/SLURM rank variables).
    The job runs in `workdir` (default: the cluster root); stdout+stderr go to one file, returned
    as `output`. On timeout the job is cancelled and TimeoutError carries its output so far.
    """
    jobs = cluster.root / "jobs"
    jobs.mkdir(exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="job-", suffix=".sh", dir=jobs)
    os.close(fd)
    script = Path(name)
    script.write_text(script_text)
    out_pattern = jobs / f"{script.stem}-%j.out"
    workdir = Path(workdir) if workdir is not None else cluster.root
    cmd = ["sbatch", "--parsable", f"--output={out_pattern}", f"--chdir={workdir}", *sbatch_args,
           str(script), *args]
    sub = subprocess.run(cmd, env={**cluster.env, **(env or {})}, capture_output=True, text=True, timeout=30)
    if sub.returncode != 0:
        raise RuntimeError(f"sbatch failed (rc={sub.returncode}): {sub.stderr.strip()}")
    job_id = sub.stdout.strip().split(";")[0]
    out_file = Path(str(out_pattern).replace("%j", job_id))

    # Poll squeue rather than `sbatch --wait`, which sleeps 2 s then 8 s between its checks.
    deadline = time.monotonic() + timeout
    while cluster.run("squeue", "-h", "-j", job_id, check=False).stdout.strip():
        if time.monotonic() > deadline:
            cluster.run("scancel", job_id, check=False)
            output = out_file.read_text(errors="replace") if out_file.exists() else ""
            raise TimeoutError(f"SLURM job {job_id} still running after {timeout:.0f} s; cancelled. "
                               f"Output so far:\n{output}")
        time.sleep(poll_s)
    state, exit_code = _job_state(cluster, job_id)
    if state not in _TERMINAL_STATES:
        raise RuntimeError(f"job {job_id} left the queue in state {state}")
    output = out_file.read_text(errors="replace") if out_file.exists() else ""
    return JobResult(job_id=job_id, state=state, exit_code=exit_code, output=output)


if __name__ == "__main__":
    ensure_installed()
    c = start_cluster()
    try:
        print(f"export SLURM_CONF={c.conf}")
        input("cluster is up; press Enter to stop it ")
    finally:
        stop_cluster(c)
