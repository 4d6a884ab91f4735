"""Evaluation configuration: dataclass schemas registered in Hydra's ConfigStore (typos fail at start)."""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ..methods import transform_schema
from ..policies import POLICIES, BudgetedPolicy

SUITES = ("fidelity", "needle", "passkey", "lm_eval", "efficiency", "ruler")
PG_ESSAYS = "/work/shared/data/pg_essays"

# ``transform`` of the eval CLI: like a recipe's, but optional (name null = evaluate the model as loaded).
EvalTransformConfig = transform_schema(None)


def _omegaconf_type(hint):
    """A field's annotation as OmegaConf can check it: bool/int/float/str (or ``X | None``), else Any."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    plain = [a for a in args if a is not type(None)]
    return hint if len(plain) == 1 and plain[0] in (bool, int, float, str) else Any


def _policy_section(policy: type) -> type:
    """One policy's settings for the CLI: its dataclass fields, with their types and the policy's OWN defaults
    (``budget`` null: ``policies.budget``)."""
    hints = typing.get_type_hints(policy)
    fields = []
    for f in policy.setting_fields():
        if f.name == "budget":
            fields.append(("budget", str | None, field(default=None)))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:  # a factory's value, or OmegaConf's MISSING for a setting without a default (required)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else MISSING
        spec = field(default_factory=lambda d=default: copy.deepcopy(d)) if isinstance(default, (list, dict, set)) \
            else field(default=default)
        fields.append((f.name, _omegaconf_type(hints[f.name]), spec))
    return dataclasses.make_dataclass(f"{policy.__name__}Settings", fields)


def evaluable_policies() -> dict[str, type]:
    """The registered policies the harness runs next to the full cache: those with a budget."""
    return {name: cls for name, cls in sorted(POLICIES.items()) if issubclass(cls, BudgetedPolicy)}


# ``policies.overrides``: one section per policy, built from the policies' own dataclasses (so every setting and
# its default is declared once, in the policy class, and ``--cfg job`` shows them).
PolicySettings = dataclasses.make_dataclass(
    "PolicySettings",
    [(name, section, field(default_factory=section))
     for name, section in ((name, _policy_section(cls)) for name, cls in evaluable_policies().items())],
)


def _moved():
    """A flat setting of earlier versions (one value for every named policy that had the field): null; setting it
    is an error naming the per-policy keys that replaced it (eval.api.policies_from_config)."""
    return field(default=None, metadata={"moved": True})


@dataclass
class PolicyConfig:
    # Cache policies the model is also run under (needle, passkey, efficiency), next to the full cache: any
    # registered policy with a budget (a section of `overrides` below). Empty = full cache only.
    names: list[str] = field(default_factory=list)
    # Tokens ("512"), share of the prompt ("50%" / "0.5") or compression ratio ("4x") for every named policy; one
    # policy's own: overrides.<policy>.budget.
    budget: str = "50%"
    # Each policy's settings, with its own defaults: policies.overrides.h2o.recent_share=0.4 (or
    # 'policies.overrides={h2o: {recent_share: 0.4}}').
    overrides: PolicySettings = field(default_factory=PolicySettings)
    # Old flat spellings, replaced by overrides.<policy>.<setting>: setting one fails naming its replacement.
    sink_tokens: Any = _moved()
    stabilizers: Any = _moved()
    recent_share: Any = _moved()
    tau_init: Any = _moved()
    tau_end: Any = _moved()
    observation_window: Any = _moved()
    seed: Any = _moved()


MOVED_POLICY_SETTINGS = tuple(f.name for f in dataclasses.fields(PolicyConfig) if f.metadata.get("moved"))


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
    # budgeted cache then never holds more than budget + chunk entries (+ the question, appended after it unless
    # query_aware), and the peak is what is reported.
    prefill_chunk: int | None = None
    # false (default, the field's convention): question-independent, the policy compresses the context (chat
    # prefix + intro + haystack with the needle) alone, then the question + assistant turn + answer prefix are
    # appended uncompressed and the answer decoded; a fractional budget is a share of the context. true: the
    # question is part of the prompt the policy compresses (query-aware SnapKV/H2O/Keyformer see it).
    query_aware: bool = False


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
    # Override the generation tasks' generation_kwargs, e.g. {max_gen_toks: 64} (lm-eval's --gen_kwargs).
    gen_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RulerConfig:
    # RULER's 13 tasks (eval/ruler/tasks.py); qa_1 / qa_2 read SQuAD / HotpotQA (the squad / hotpotqa sources).
    tasks: list[str] = field(default_factory=lambda: [
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
        "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"])
    # RULER's sequence lengths: prompt + the task's answer budget; every prompt has exactly length - budget tokens.
    lengths: list[int] = field(default_factory=lambda: [4096])
    samples: int = 20  # per (task, length)
    seed: int = 42
    haystack: str = PG_ESSAYS  # essays for the essay haystack and the word lists (keys, cwe)
    squad: str = "hub"  # "hub" (datasets: rajpurkar/squad_v2) or a .jsonl of its rows / the official .json
    hotpotqa: str = "hub"  # "hub" (datasets: hotpotqa/hotpot_qa distractor) or a .jsonl / the official .json
    max_new_tokens: int | None = None  # null = RULER's per task (niah 128, vt 30, cwe 120, fwe 50, qa 32)
    prefill_chunk: int | None = None  # as needle.prefill_chunk
    # false: question-independent (the policy compresses the context, then the question is appended), as needle.
    query_aware: bool = False
    # Generated samples are cached here, keyed by the settings, tokenizer and generator version (null = no cache).
    cache_dir: str | None = "~/.cache/swiftkv_train/ruler"


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
    teacher: str | None = None  # a spec, or "self" (a converted model run in the original mode it keeps)
    # One of SUITES, "all", or several: suite=[fidelity,needle] (or quoted: 'suite="fidelity,needle"').
    suite: Any = "fidelity"
    out_dir: str = "eval_out"
    device: str = "auto"  # auto = cuda if available
    dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    progress: bool = True
    cpu_threads: int | None = None  # torch.set_num_threads on CPU (null = torch's default)
    plots: bool = True
    # Results layout (eval/runs.py): skip each run whose out_dir/<model>/<policy>@<ratio>/<task>/metrics.json exists
    # (and refuse one made with other settings); false = run everything again and overwrite (e.g. the same name
    # for a model whose weights changed).
    resume: bool = True
    # Convert the loaded model with a method on the fly (no training), with the training recipes' keys:
    # transform.name=<method> transform.<method>.<setting>=... (null = evaluate the model as loaded).
    transform: EvalTransformConfig = field(default_factory=EvalTransformConfig)
    policies: PolicyConfig = field(default_factory=PolicyConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    needle: NeedleConfig = field(default_factory=NeedleConfig)
    passkey: NeedleConfig = field(default_factory=lambda: NeedleConfig(context_lengths=[500, 1000, 2000]))
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)
    ruler: RulerConfig = field(default_factory=RulerConfig)


def register_schemas() -> None:
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
