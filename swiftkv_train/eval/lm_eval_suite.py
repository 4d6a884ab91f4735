"""Task accuracy through EleutherAI lm-evaluation-harness, in process, on the model object (no Hub).

The model is wrapped with ``HFLM(pretrained=<model>, tokenizer=<tokenizer>)`` and run by ``lm_eval.simple_evaluate``
with a TaskManager that also sees the local task YAMLs in ``swiftkv_train/eval/tasks`` (plus any
``include_path`` given). Users with the Hub can list ARC/HellaSwag/MMLU/GSM8K here as usual.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import SwiftKVInputError
from .subjects import Subject

__all__ = ["TASKS_DIR", "run_lm_eval"]

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_lm_eval(subject: Subject, cfg) -> dict:
    """``cfg``: LmEvalConfig (tasks, include_path, limit, batch_size, num_fewshot, apply_chat_template, metadata)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise SwiftKVInputError(
            f"the lm_eval suite needs EleutherAI lm-evaluation-harness ({err}): pip install 'lm-eval>=0.4.8'."
        ) from None
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
    with subject.active() as model:
        lm = HFLM(pretrained=model, tokenizer=subject.tokenizer, batch_size=cfg.batch_size,
                  max_length=cfg.max_length, device=str(model.device))
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit, task_manager=manager,
            log_samples=False, bootstrap_iters=0, apply_chat_template=cfg.apply_chat_template,
            random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
        )
    results = {task: {k: _clean(v) for k, v in metrics.items() if k != "alias"}
               for task, metrics in out["results"].items()}
    return {
        "model": subject.name, "results": results,
        "n_samples": {task: v.get("effective", v.get("original")) if isinstance(v, dict) else v
                      for task, v in out.get("n-samples", {}).items()},
        "settings": {"tasks": list(cfg.tasks), "limit": cfg.limit, "num_fewshot": cfg.num_fewshot,
                     "batch_size": cfg.batch_size, "apply_chat_template": cfg.apply_chat_template,
                     "include_path": include, "metadata": dict(cfg.metadata or {}),
                     "lm_eval_version": getattr(lm_eval, "__version__", None)},
    }
