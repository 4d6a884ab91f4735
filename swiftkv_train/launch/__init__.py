"""Launch helpers: one distributed setup for torchrun, srun (sbatch), hydra-submitit and plain python."""

from .dist_env import (
    barrier,
    destroy_distributed,
    expand_hostlist,
    export_torch_env_from_slurm,
    get_rank,
    get_world_size,
    hostnames,
    init_distributed,
    is_rank0,
    master_port_for_job,
    strip_launcher_args,
)

__all__ = [
    "barrier",
    "destroy_distributed",
    "expand_hostlist",
    "export_torch_env_from_slurm",
    "get_rank",
    "get_world_size",
    "hostnames",
    "init_distributed",
    "is_rank0",
    "master_port_for_job",
    "strip_launcher_args",
]
