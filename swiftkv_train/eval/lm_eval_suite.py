"""Task accuracy through EleutherAI lm-evaluation-harness, in process, on the model object (no Hub).

The model is wrapped with ``HFLM(pretrained=<model>, tokenizer=<tokenizer>)`` and run by ``lm_eval.simple_evaluate``
with a TaskManager that also sees the local task YAMLs in ``swiftkv_train/eval/tasks`` (plus any
``include_path`` given). Users with the Hub can list ARC/HellaSwag/MMLU/GSM8K here as usual.

Under a cache policy (``policies.names``) the model is wrapped with `PolicyHFLM` instead: lm-eval's own HFLM (its
prompt building, chat template, truncation, stop sequences and post-processing unchanged) whose generation step
runs `policies.greedy_generate` with the policy, the cache path of the needle suite. The whole prompt (few-shot
examples and question) is the context the policy compresses: a task prompt has no separate question. Requests
run one at a time (no padding: a policy cache holds one length per batch). Only ``generate_until`` tasks can run
under a policy: a loglikelihood task scores given continuations with one forward pass, with no cache to compress,
so `check_policy_tasks` refuses it (one error, before any model runs) rather than report the full-cache number
under the policy's name. Greedy decoding only (``do_sample: false``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import SwiftKVInputError
from .subjects import Subject

__all__ = ["TASKS_DIR", "run_lm_eval", "check_policy_tasks", "task_manager", "policy_lm"]

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

# Per-sample keys lm-eval logs that are not the prompt, the output or a metric.
_SAMPLE_BOOKKEEPING = {"doc", "arguments", "resps", "filtered_resps", "doc_hash", "prompt_hash", "target_hash",
                       "filter", "metrics"}


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise SwiftKVInputError(
            f"the lm_eval suite needs EleutherAI lm-evaluation-harness ({err}): pip install 'lm-eval>=0.4.8'."
        ) from None
    return lm_eval, TaskManager


def task_manager(cfg):
    """The TaskManager for ``cfg`` (LmEvalConfig): our local tasks, ``include_path``, lm-eval's own when needed."""
    _, TaskManager = _lm_eval()
    if not cfg.tasks:
        raise SwiftKVInputError("lm_eval.tasks is empty: name at least one task (e.g. swiftkv_tiny_mc).")
    include = [str(TASKS_DIR)] + [str(Path(p).expanduser()) for p in (cfg.include_path or [])]
    metadata = dict(cfg.metadata or {})
    # Indexing lm-eval's own ~10k task files takes seconds: only do it when a task is not one of ours.
    manager = TaskManager(include_path=include, include_defaults=False, metadata=metadata)
    if any(t not in manager.all_tasks for t in cfg.tasks):
        manager = TaskManager(include_path=include, include_defaults=True, metadata=metadata)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        raise SwiftKVInputError(
            f"lm_eval.tasks {unknown} are not known to lm-eval (local tasks: "
            f"{sorted(p.stem for p in TASKS_DIR.glob('*.yaml'))}); check the names or lm_eval.include_path."
        )
    return manager, include


def _output_types(manager, tasks) -> dict[str, str]:
    """Leaf task -> output type (a group or tag expands to its tasks)."""
    if hasattr(manager, "load"):
        leaves = manager.load(list(tasks))["tasks"]
    else:  # older lm-eval: the nested task dict
        from lm_eval.tasks import get_task_dict

        leaves, stack = {}, [get_task_dict(list(tasks), manager)]
        while stack:
            for name, value in stack.pop().items():
                if isinstance(value, dict):
                    stack.append(value)
                else:
                    leaves[name] = value
    return {name: task.OUTPUT_TYPE for name, task in leaves.items()}


def check_policy_tasks(cfg, policy_labels: list[str]) -> None:
    """With cache policies named, every task must be a generation task (see the module docstring)."""
    if not policy_labels:
        return
    manager, _ = task_manager(cfg)
    scored = {name: kind for name, kind in _output_types(manager, cfg.tasks).items() if kind != "generate_until"}
    if scored:
        raise SwiftKVInputError(
            f"lm_eval.tasks {sorted(scored)} are {sorted(set(scored.values()))} tasks: they score given answers in "
            f"one forward pass, with no cache for a policy to compress, so they cannot run under "
            f"policies.names={[label.split('@')[0] for label in policy_labels]}. Run them without policies "
            "(policies.names=[]) or name generate_until tasks (e.g. swiftkv_gsm8k_local)."
        )


def policy_lm(hflm_kwargs: dict, policy):
    """`PolicyHFLM`: lm-eval's HFLM whose generation runs `greedy_generate` under ``policy``."""
    from lm_eval.models.huggingface import HFLM

    from ..policies import greedy_generate

    class PolicyHFLM(HFLM):
        """HFLM with `_model_generate` replaced by `policies.greedy_generate` (one request at a time)."""

        def _refuse(self, *args, **kwargs):
            raise SwiftKVInputError(
                f"cache policy {policy.name!r} applies to generation (generate_until) tasks only; a loglikelihood "
                "task has no cache to compress."
            )

        loglikelihood = loglikelihood_rolling = _refuse

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            mask = generation_kwargs.pop("attention_mask", None)
            temperature = generation_kwargs.get("temperature") or 0.0
            if generation_kwargs.get("do_sample") or temperature > 0:
                raise SwiftKVInputError(
                    f"a task under cache policy {policy.name!r} must decode greedily (do_sample: false, "
                    f"temperature 0); got do_sample={generation_kwargs.get('do_sample')}, temperature={temperature}."
                )
            new_tokens = max_length - context.shape[1]
            eos = sorted({t for t in (self.tokenizer.eos_token_id, self.eot_token_id) if t is not None}
                         | set(_as_list(getattr(self.model.generation_config, "eos_token_id", None))))

            def stopped(tokens):
                return all(any(s in self.tok_decode(row.tolist()) for s in stop) for row in tokens) if stop else False

            rows = []
            for i in range(context.shape[0]):
                ids = context[i : i + 1] if mask is None else context[i : i + 1, mask[i].bool()]
                out = greedy_generate(self.model, ids, new_tokens, policy=policy, eos_token_id=eos,
                                      stop_when=stopped)
                rows.append(out.tokens[0])
            width = max(len(r) for r in rows)
            pad = self.eot_token_id
            generated = torch.stack([torch.cat([r, r.new_full((width - len(r),), pad)]) for r in rows])
            return torch.cat([context, generated.to(context.device)], dim=1)

    return PolicyHFLM(**hflm_kwargs)


def _as_list(value) -> list:
    return [] if value is None else (list(value) if isinstance(value, (list, tuple)) else [value])


def _json_safe(value):
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return _clean(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


def _trials(samples: list[dict]) -> list[dict]:
    """One record per document: its id, prompt, target, raw and filtered outputs, and its metric values."""
    trials = []
    for sample in samples:
        arguments = sample.get("arguments") or [[None]]
        resps = sample.get("resps") or []
        record = {"doc_id": sample.get("doc_id"), "prompt": arguments[0][0] if arguments[0] else None}
        record["output"] = resps[0][0] if len(resps) == 1 and resps[0] else resps
        record["filtered"] = (sample.get("filtered_resps") or [None])[0] if len(resps) == 1 else \
            sample.get("filtered_resps")
        record.update({k: v for k, v in sample.items() if k not in _SAMPLE_BOOKKEEPING and k not in record})
        trials.append(_json_safe(record))
    return trials


def _headline(metrics: dict) -> tuple[str | None, float | None]:
    """The task's first reported metric ("<metric>,<filter>", not a stderr): the YAML's metric_list comes first."""
    for name, value in metrics.items():
        if "," in name and "stderr" not in name and isinstance(value, (int, float)) and not isinstance(value, bool):
            return name, value
    return None, None


def run_lm_eval(subject: Subject, cfg, policy=None, policy_name: str = "full", tasks: list[str] | None = None) -> dict:
    """``cfg``: LmEvalConfig (tasks, include_path, limit, batch_size, num_fewshot, apply_chat_template, metadata).

    ``tasks``: run these (default ``cfg.tasks``); ``policy``: run generation under this cache policy (see the
    module docstring). The result has the layout's keys (eval/runs.py): ``model``, ``policy``, ``task`` (the tasks,
    comma-joined), ``score`` / ``metric`` (the first task's headline metric) and ``trials`` (one per document).
    """
    lm_eval, _ = _lm_eval()
    tasks = list(tasks or cfg.tasks)
    manager, include = task_manager(cfg)
    if policy is not None:
        check_policy_tasks(cfg, [policy_name])
    with subject.active() as model:
        kwargs = dict(pretrained=model, tokenizer=subject.tokenizer, batch_size=cfg.batch_size,
                      max_length=cfg.max_length, device=str(model.device))
        if policy is None:
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(**kwargs)
        else:
            lm = policy_lm(kwargs, policy)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=cfg.num_fewshot, limit=cfg.limit, task_manager=manager,
            log_samples=True, bootstrap_iters=0, apply_chat_template=cfg.apply_chat_template,
            gen_kwargs=dict(cfg.get("gen_kwargs") or {}) or None,
            random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
        )
    results = {task: {k: _clean(v) for k, v in metrics.items() if k != "alias"}
               for task, metrics in out["results"].items()}
    metric, score = _headline(results.get(tasks[0], {}))
    trials = [dict(t, task=task) for task, samples in (out.get("samples") or {}).items() for t in _trials(samples)]
    return {
        "model": subject.name, "policy": policy_name, "task": ",".join(tasks), "metric": metric, "score": score,
        "results": results,
        "n_samples": {task: v.get("effective", v.get("original")) if isinstance(v, dict) else v
                      for task, v in out.get("n-samples", {}).items()},
        "settings": {"tasks": tasks, "limit": cfg.limit, "num_fewshot": cfg.num_fewshot,
                     "batch_size": cfg.batch_size, "apply_chat_template": cfg.apply_chat_template,
                     "include_path": include, "metadata": dict(cfg.metadata or {}),
                     "gen_kwargs": dict(cfg.get("gen_kwargs") or {}),
                     "lm_eval_version": getattr(lm_eval, "__version__", None),
                     "policy": policy.settings() if policy is not None else {"name": "full"}},
        "trials": trials,
    }
