"""The RULER suite: every (task, length, sample) through a model under one cache policy, scored by RULER's metric.

Question-independent by default (kvpress's convention, `greedy_generate(..., question_ids=...)`): the policy
compresses the context alone, then the question and answer prefix are appended to the compressed cache and the
answer decoded. The compression ratio is kvpress's: the share of the CONTEXT's entries removed,
``1 - entries kept / context tokens`` (budget ``4x`` = ``25%`` kept = ratio 0.75), measured per sample from the
cache (0 for the full cache). ``query_aware=true`` compresses context and question together (then the ratio is
over the whole prompt). Returns one result dict per task, with one trial per sample.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ...errors import SwiftKVInputError
from ...policies import greedy_generate
from ..subjects import Subject, max_positions
from ..text_source import load_texts
from .data import cache_key, load_samples, sources_fingerprint, tokenizer_fingerprint
from .generators import Resources
from .scoring import postprocess, score
from .tasks import QA_DATASETS, TASKS

__all__ = ["check_config", "prepare", "run_ruler", "run_task"]


def _qa_sources(cfg) -> dict[str, str]:
    wanted = {TASKS[t].args["dataset"] for t in cfg.tasks if TASKS[t].family == "qa"}
    return {name: getattr(cfg, name) for name in QA_DATASETS if name in wanted}


def _answer_budget(task: str, cfg) -> int:
    return cfg.max_new_tokens or TASKS[task].spec.max_new_tokens


def check_config(subject: Subject, cfg) -> None:
    """Every RULER setting checked, then every sample generated (or read from the cache): a bad length or a
    missing QA file fails here, before any model runs."""
    prepare(subject, cfg)


def prepare(subject: Subject, cfg) -> dict[tuple[str, int], list]:
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown or not cfg.tasks:
        raise SwiftKVInputError(f"ruler.tasks: unknown {unknown or 'none given'}; use any of {', '.join(TASKS)}.")
    if not cfg.lengths or any(int(n) < 64 for n in cfg.lengths):
        raise SwiftKVInputError(f"ruler.lengths {list(cfg.lengths)}: give lengths of at least 64 tokens.")
    if cfg.samples < 1 or (cfg.max_new_tokens is not None and cfg.max_new_tokens < 1) \
            or (cfg.prefill_chunk is not None and cfg.prefill_chunk < 1):
        raise SwiftKVInputError("ruler.samples, ruler.max_new_tokens and ruler.prefill_chunk must be >= 1.")
    limit = max_positions(subject.model)
    too_long = [(t, n) for t in cfg.tasks for n in cfg.lengths
                if limit and n - TASKS[t].spec.max_new_tokens + _answer_budget(t, cfg) > limit]
    if too_long:
        raise SwiftKVInputError(
            f"ruler.lengths: {sorted({n for _, n in too_long})} exceed what model {subject.name!r} supports "
            f"({limit} positions, prompt + answer): use lengths <= {limit}."
        )
    texts = load_texts(cfg.haystack, what="ruler.haystack")
    qa_sources = _qa_sources(cfg)
    res = Resources(subject.tokenizer, texts, qa_sources)
    tokenizer_fp = tokenizer_fingerprint(subject.tokenizer)
    sources = sources_fingerprint(texts, qa_sources)
    out = {}
    for task in cfg.tasks:
        for length in cfg.lengths:
            key = cache_key(task, int(length), cfg.samples, cfg.seed, tokenizer_fp, sources)
            out[(task, int(length))], _ = load_samples(res, task, int(length), cfg.samples, cfg.seed, cfg.cache_dir,
                                                       key)
    return out


def _eos(subject: Subject) -> list[int]:
    ids = [subject.tokenizer.eos_token_id, getattr(subject.model.generation_config, "eos_token_id", None)]
    return sorted({e for t in ids if t is not None for e in (t if isinstance(t, list) else [t])})


def _nominal_ratio(policy) -> float | None:
    if policy is None:
        return 0.0
    budget = getattr(policy, "budget", None)
    return None if getattr(budget, "fraction", None) is None else round(1 - budget.fraction, 6)


def run_ruler(subject: Subject, cfg, policy=None, policy_name: str = "full", progress: bool = True) -> list[dict]:
    """Every task of ``cfg.tasks``: one result dict each (`run_task`)."""
    return [run_task(subject, cfg, task, policy, policy_name, progress) for task in cfg.tasks]


def run_task(subject: Subject, cfg, task: str, policy=None, policy_name: str = "full", progress: bool = True) -> dict:
    """One task at every length of ``cfg.lengths``: its score (0-100) overall and by length, the measured
    compression ratio, and one trial per sample (settings, output, answers, score)."""
    samples = prepare(subject, cfg)
    tokenizer = subject.tokenizer
    eos = _eos(subject)
    metric = TASKS[task].spec.metric
    cells = [(int(length), s) for length in cfg.lengths for s in samples[(task, int(length))]]
    rows = []
    with subject.active() as model:
        for length, sample in tqdm(cells, desc=f"ruler {task} {subject.name}/{policy_name}", disable=not progress,
                                   leave=False):
            context = torch.tensor([sample.context_ids], device=model.device)
            question = torch.tensor([sample.question_ids], device=model.device)
            if cfg.query_aware:
                context, question = torch.cat([context, question], dim=1), None
            out = greedy_generate(model, context, _answer_budget(task, cfg), policy=policy, eos_token_id=eos,
                                  prefill_chunk=cfg.prefill_chunk, question_ids=question)
            output = postprocess(tokenizer.decode(out.tokens[0], skip_special_tokens=True))
            held = out.tokens_held_after_context  # of what the policy saw: the context (or the whole prompt)
            rows.append({
                "task": task, "length": length, "index": sample.index, "answers": sample.answers, "output": output,
                "score": score(metric, output, sample.answers),
                "context_tokens": len(sample.context_ids), "question_tokens": len(sample.question_ids),
                "prompt_tokens": sample.prompt_tokens, "max_new_tokens": _answer_budget(task, cfg),
                "kv_tokens_held": held, "compression_ratio": round(1 - held / context.shape[1], 6),
                "kv_bytes_per_token": out.cache_bytes_after_prefill / sample.prompt_tokens,
                "prefill_s": round(out.prefill_seconds, 5), "sample": sample.meta,
            })
    return {
        "model": subject.name, "policy": policy_name, "policy_name": policy.name if policy is not None else "full",
        "task": task, "family": TASKS[task].family, "metric": f"string_match_{metric}",
        "score": 100 * _mean(r["score"] for r in rows),
        "by_length": {str(n): 100 * _mean(r["score"] for r in rows if r["length"] == int(n)) for n in cfg.lengths},
        "compression_ratio": _mean(r["compression_ratio"] for r in rows),
        "nominal_compression_ratio": _nominal_ratio(policy),
        "kv_bytes_per_token": _mean(r["kv_bytes_per_token"] for r in rows),
        "settings": {
            "lengths": [int(n) for n in cfg.lengths], "samples": cfg.samples, "seed": cfg.seed,
            "haystack": cfg.haystack, "qa_source": _qa_sources(cfg).get(TASKS[task].args.get("dataset")),
            "query_aware": cfg.query_aware, "prefill_chunk": cfg.prefill_chunk,
            "max_new_tokens": _answer_budget(task, cfg), "task_args": TASKS[task].args,
            "length_definition": "prompt tokens + the task's answer budget (RULER's max_seq_length)",
            "compression_ratio_definition": "1 - KV entries kept / context tokens (kvpress)",
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "policy": policy.settings() if policy is not None else {"name": "full"},
        },
        "trials": rows,
    }


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")
