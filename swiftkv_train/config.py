"""The run configuration: dataclass schemas registered in Hydra's ConfigStore.

Every recipe and override is merged into these schemas in struct mode, so a typo or a wrong type fails at start
with the key name, before any model is loaded; keys that `+key=value` slipped past struct mode are caught by
``check_override_keys`` / ``check_known_keys``. Nothing here has side effects beyond registering the schemas.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .data.config import DataConfig
from .errors import SwiftKVInputError
from .methods import transform_schema


@dataclass
class ModelConfig:
    # Anything load_pretrained accepts: local dir, Hub id, .gguf, smollm2-135m-instruct, random:<preset>.
    spec: str = MISSING
    # auto = bf16 on CUDA, fp32 on CPU. The frozen weights are held in this dtype.
    dtype: str = "auto"
    # sdpa, eager, or varlen: flash attention over the documents of packed rows (training; falls back to SDPA with
    # a document mask where flash cannot run). sdpa turns packed rows into a dense block-diagonal mask.
    attn_implementation: str = "sdpa"


# ``transform``: which method trains and each registered method's own section (see methods.transform_schema).
TransformConfig = transform_schema(MISSING)


@dataclass
class TrainerConfig:
    seed: int = 42
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    # Length of training: max_steps > 0 wins over epochs.
    epochs: float = 1.0
    max_steps: int = 0
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # linear | cosine | constant, each after a linear warm-up over warmup_ratio of the steps.
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    # auto = bf16 on CUDA, fp32 on CPU.
    precision: str = "auto"
    # Held-out evaluation every eval_every optimizer steps (0 = only at start/end), on at most eval_batches.
    eval_every: int = 0
    eval_batches: int = 16
    eval_at_start: bool = True
    # Checkpoint every save_every steps (0 = only at the end); keep the newest keep_checkpoints.
    save_every: int = 0
    keep_checkpoints: int = 2
    # auto: continue from the newest complete checkpoint of this run dir; none: start fresh; or a checkpoint path.
    resume: str = "auto"
    # lean | full | both | none: HF exports written at the end (export/lean, export/full).
    export: str = "both"
    # Tokens per chunk of the logits loss (bounds the [chunk, V] logits held at once).
    loss_chunk_size: int = 1024
    # The fused Triton KL kernel (swiftkv_kernels.kd_loss) on CUDA; the torch chunked loss elsewhere or when off.
    fused_loss: bool = True
    # Stop (as if interrupted) after this many steps of this process: for resume tests. 0 = never.
    stop_after_steps: int = 0
    # Evaluation-harness suites run on rank 0 at the end (e.g. [fidelity, needle]), written to <run_dir>/eval;
    # `harness` holds their settings (the keys of `python -m swiftkv_train.eval`, e.g. {fidelity: {data: ...}}).
    harness_suites: list[str] = field(default_factory=list)
    harness: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    offload_optimizer: bool = False
    overlap_comm: bool = True
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    # Gathered ZeRO-3 parameters stay live up to this many (DeepSpeed's defaults); SwiftKV reuses layers >= M right
    # after the teacher ran them, so a reuse distance above their size saves gathering them again.
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    # Any further DeepSpeed config keys, merged last.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LauncherConfig:
    # local | torchrun | slurm: how the processes were started (the environment is read either way).
    name: str = "local"
    # auto = nccl on CUDA, gloo on CPU.
    backend: str = "auto"
    init_timeout_minutes: int = 30


@dataclass
class LoggerConfig:
    log_every: int = 1
    # disabled | offline | online. Only rank 0 talks to wandb; a wandb failure never stops training.
    wandb_mode: str = "disabled"
    wandb_project: str = "swiftkv_train"
    wandb_entity: str | None = None
    # auto: a progress bar on a TTY, plain lines otherwise.
    progress: str = "auto"


@dataclass
class RunConfig:
    # The recipe name (set by each recipe file); runs/<run_name> holds everything a run writes.
    recipe: str = "custom"
    run_name: str = "${recipe}"
    run_dir: str = "runs/${run_name}"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_schemas() -> None:
    """Register the root schema (``base_config``), which every recipe composes on top of.

    Only the root is stored: the ConfigStore is process-wide, and a stored group named e.g. ``model`` would turn
    another Hydra app's ``model=<value>`` override into a group selection.
    """
    ConfigStore.instance().store(name="base_config", node=RunConfig)


# ---- unknown keys ----------------------------------------------------------------------------------------------
# Struct mode stops `trainer.lrr=1e-3`, but Hydra lets `+trainer.lrr=1e-3` add the key (and its own error for the
# first form suggests exactly that): both are checked here against the schema, with a "did you mean" hint.


def _schema_of(annotation) -> type | None:
    """The dataclass a node of this type is checked against (also through `X | None`); None = free-form."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    candidates = typing.get_args(annotation) if union else [annotation]
    return next((c for c in candidates if dataclasses.is_dataclass(c) and isinstance(c, type)), None)


def _unknown_key_message(path: str, key: str, schema: type) -> str:
    names = list(typing.get_type_hints(schema))
    prefix = path[: -len(key)]
    moved = getattr(schema, "MOVED", {}).get(key)  # a setting that now lives elsewhere: name its new place
    if moved:
        return f"{path} was replaced by {moved}"
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"unknown key {path} (did you mean {prefix}{close[0]}?)"
    return f"unknown key {path}: {prefix.rstrip('.') or 'the run config'} has {', '.join(names)}"


def _raise_unknown(problems: list[str]) -> None:
    if problems:
        raise SwiftKVInputError(
            "; ".join(problems) + ". A `+` override cannot add settings either: fix the name "
            "(`python -m swiftkv_train --cfg job` prints every key)."
        )


def _unknown_in(value, schema: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(schema)
    problems = []
    for key, item in value.items():
        path = f"{prefix}{key}"
        if key not in hints:
            problems.append(_unknown_key_message(path, str(key), schema))
            continue
        annotation = hints[key]
        sub = _schema_of(annotation)
        if sub is not None and isinstance(item, dict):
            problems += _unknown_in(item, sub, f"{path}.")
        elif typing.get_origin(annotation) is list and isinstance(item, list):
            element = _schema_of(typing.get_args(annotation)[0]) if typing.get_args(annotation) else None
            for i, entry in enumerate(item):
                if element is not None and isinstance(entry, dict):
                    problems += _unknown_in(entry, element, f"{path}[{i}].")
    return problems


def check_known_keys(cfg, schema: type | None = None) -> None:
    """Raise SwiftKVInputError naming every key of the composed ``cfg`` that ``schema`` (RunConfig) lacks."""
    tree = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    _raise_unknown(_unknown_in(tree, schema or RunConfig, ""))


def check_override_keys(overrides: list[str]) -> None:
    """The same check on command-line overrides (``[+|++|~]a.b=value``), before Hydra composes anything.

    Group choices (``model=tiny``), ``hydra.*`` / ``hydra/...`` and ``--flags`` are Hydra's; keys inside free-form
    nodes (``deepspeed.extra``, ``trainer.harness``) and list items are not checked.
    """
    problems = []
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if not key or key.split(".")[0] == "hydra" or "/" in key or "@" in key:
            continue
        schema, path = RunConfig, ""
        for part in key.split("."):
            path = f"{path}{part}"
            if part not in typing.get_type_hints(schema):
                problems.append(_unknown_key_message(path, part, schema))
                break
            schema = _schema_of(typing.get_type_hints(schema)[part])
            if schema is None:
                break
            path += "."
    _raise_unknown(problems)
