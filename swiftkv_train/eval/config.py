"""Evaluation configuration: dataclass schemas registered in Hydra's ConfigStore (typos fail at start)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ..methods import transform_schema

SUITES = ("fidelity", "needle", "passkey", "lm_eval", "efficiency")
PG_ESSAYS = "/work/shared/data/pg_essays"

# ``transform`` of the eval CLI: like a recipe's, but optional (name null = evaluate the model as loaded).
EvalTransformConfig = transform_schema(None)


@dataclass
class PolicyConfig:
    # Cache policies the model is also run under (needle, passkey, efficiency), next to the full cache:
    # any of streaming_llm, h2o, keyformer, snapkv. Empty = full cache only.
    names: list[str] = field(default_factory=list)
    # Tokens ("512"), share of the prompt ("50%" / "0.5") or compression ratio ("4x"); per policy in `overrides`.
    budget: str = "50%"
    # Settings below apply to every named policy that has them; null = each policy's own default (its class
    # declares it: H2O recent_share 0.5, Keyformer 0.3, SnapKV observation_window 32, ...).
    sink_tokens: int | None = None  # StreamingLLM
    stabilizers: int | None = None  # Locret: newest entries always kept
    recent_share: float | None = None  # H2O, Keyformer
    tau_init: float | None = None  # Keyformer
    tau_end: float | None = None
    observation_window: int | None = None  # H2O/Keyformer: score only the last n query rows; SnapKV: window
    seed: int | None = None
    # Per-policy settings that win over the shared ones, e.g. {keyformer: {budget: "60%"}}.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class FidelityConfig:
    data: str = PG_ESSAYS  # folder of .txt files, a .txt file, or a .jsonl file (see `field`)
    field: str = "text"
    window: int = 2048
    num_windows: int = 4


@dataclass
class NeedleConfig:
    haystack: str = PG_ESSAYS  # folder of .txt essays (ignored by the passkey variant: noise filler)
    context_lengths: list[int] = field(default_factory=lambda: [500, 1000, 2000])
    depths: list[float] = field(default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0])  # percent
    samples: int = 1  # trials per (length, depth)
    digits: int = 7
    max_new_tokens: int = 12
    snap_to_sentence: bool = True
    seed: int = 0
    # Prefill the prompt in chunks of this many tokens, the policy evicting after each (null = one forward): a
    # budgeted cache then never holds more than budget + chunk entries, and the peak is what is reported.
    prefill_chunk: int | None = None


@dataclass
class LmEvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["swiftkv_gsm8k_local"])
    include_path: list[str] = field(default_factory=list)
    limit: int | None = 50
    num_fewshot: int | None = None
    batch_size: int = 1
    max_length: int | None = None
    apply_chat_template: bool = False
    seed: int = 0
    # Passed to the tasks, e.g. {data_file: /path/to/gsm8k.jsonl}.
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class EfficiencyConfig:
    prompt_lengths: list[int] = field(default_factory=lambda: [256, 1024])
    output_length: int = 32
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    warmup: int = 1
    repeats: int = 3
    seed: int = 0


@dataclass
class EvalConfig:
    model: str = MISSING  # any load_pretrained spec or an export directory
    teacher: str | None = None  # a spec, or "self" (a SwiftKV model run with swiftkv(False))
    # One of SUITES, "all", or several: suite=[fidelity,needle] (or quoted: 'suite="fidelity,needle"').
    suite: Any = "fidelity"
    out_dir: str = "eval_out"
    device: str = "auto"  # auto = cuda if available
    dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    progress: bool = True
    cpu_threads: int | None = None  # torch.set_num_threads on CPU (null = torch's default)
    plots: bool = True
    # Convert the loaded model with a method on the fly (no training), with the training recipes' keys:
    # transform.name=<method> transform.<method>.<setting>=... (null = evaluate the model as loaded).
    transform: EvalTransformConfig = field(default_factory=EvalTransformConfig)
    policies: PolicyConfig = field(default_factory=PolicyConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    needle: NeedleConfig = field(default_factory=NeedleConfig)
    passkey: NeedleConfig = field(default_factory=lambda: NeedleConfig(context_lengths=[500, 1000, 2000]))
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)


def register_schemas() -> None:
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
