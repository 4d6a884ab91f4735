"""`evaluate(...)`: run the chosen suites on a model (and its teacher, and cache policies) and write the results."""

from __future__ import annotations

import contextlib
import datetime
import platform
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..errors import SwiftKVInputError
from ..policies import POLICIES, CachePolicy, build_policy
from .config import MOVED_POLICY_SETTINGS, SUITES, EvalConfig, evaluable_policies
from .efficiency import run_efficiency
from .fidelity import run_fidelity
from .lm_eval_suite import check_policy_tasks, run_lm_eval
from .needle import NEEDLE, PASSKEY, run_retrieval
from .plots import write_plots
from .ruler import run_task as run_ruler_task
from .report import write_results
from .runs import check_resumable, run_dir, run_or_resume, write_summary
from .subjects import Subject, has_mode_switch, teacher_of

__all__ = ["evaluate", "make_config", "parse_suites", "policies_from_config"]


def make_config(config=None, **overrides):
    """An EvalConfig (OmegaConf, struct mode) from a dataclass/dict/DictConfig plus keyword overrides.

    Unknown keys fail here with their name, exactly as on the command line.
    """
    base = OmegaConf.structured(EvalConfig)
    if "model" not in (config or {}) and "model" not in overrides:
        overrides["model"] = "model"
    merged = OmegaConf.merge(base, config or {}, overrides)
    OmegaConf.set_struct(merged, True)
    return merged


def parse_suites(suite) -> list[str]:
    names = str(suite).split(",") if isinstance(suite, str) else [str(n) for n in suite]
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        raise SwiftKVInputError(f"suite={suite!r}: unknown {unknown}; use one of {', '.join(SUITES)}, a comma list, "
                                "or all.")
    return names


def policies_from_config(cfg) -> list[tuple[str, CachePolicy]]:
    """(label, policy) pairs from ``cfg.policies`` (PolicyConfig): each named policy built from its own section
    ``overrides.<name>`` (its dataclass's settings and defaults), with ``budget`` unless the section sets one."""
    evaluable = evaluable_policies()
    moved = [key for key in MOVED_POLICY_SETTINGS if cfg.get(key) is not None]
    if moved:
        raise SwiftKVInputError("; ".join(
            f"policies.{key}={cfg[key]} was replaced by per-policy settings: "
            + " ".join(f"policies.overrides.{name}.{key}={cfg[key]}" for name in _having(key, cfg.names, evaluable))
            for key in moved
        ))
    out = []
    for name in cfg.names:
        if name not in evaluable:
            what = (f"policy {name!r} keeps every entry: it is the run every evaluation already has" if name in POLICIES
                    else f"unknown policy {name!r}")
            raise SwiftKVInputError(f"policies.names: {what}; use any of {', '.join(evaluable)}.")
        settings = OmegaConf.to_container(cfg.overrides[name], resolve=True)
        settings["budget"] = settings.get("budget") or cfg.budget
        try:
            policy = build_policy(name, **settings)
        except SwiftKVInputError as err:
            raise SwiftKVInputError(f"policies.overrides.{name}: {err}") from None
        out.append((f"{name}@{settings['budget']}", policy))
    return out


def _having(setting: str, names, evaluable: dict) -> list[str]:
    """The named policies (all evaluable ones when none is named) that have ``setting``."""
    candidates = [n for n in names if n in evaluable] or list(evaluable)
    return [n for n in candidates if any(f.name == setting for f in evaluable[n].setting_fields())]


def _scores(subject: Subject, policy: CachePolicy | None):
    """What makes ``subject``'s model push the scores ``policy`` ranks by (nothing for most policies)."""
    return policy.scores_from(subject.model) if policy is not None else contextlib.nullcontext()


def _meta(cfg, subjects: list[Subject]) -> dict:
    model = subjects[0].model
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
        "device": str(model.device), "dtype": str(next(model.parameters()).dtype),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "models": {s.name: {"class": type(s.model).__name__, "layers": s.model.config.num_hidden_layers,
                            "student_mode": s.student,
                            "num_key_value_layers": getattr(s.model.config, "num_key_value_layers", None)}
                   for s in subjects},
    }


def _run_config(cfg, suite: str, task: str, subject: Subject, policy: CachePolicy | None) -> dict:
    """The settings that produce one run of the results layout (its config.yaml): what it ran, on what, how."""
    section = OmegaConf.to_container(cfg[suite], resolve=True)
    if suite in ("lm_eval", "ruler"):
        section.pop("tasks", None)  # one run per task: adding a task to the list changes no existing run
    return {"suite": suite, "task": task, "model": subject.name, "student_mode": subject.student,
            "policy": policy.settings() if policy is not None else {"name": "full"}, suite: section}


def _planned(cfg, names, runs) -> list[tuple]:
    """(suite, task, subject, label, policy) of every run that goes through the results layout (eval/runs.py):
    the needle and passkey suites, and each lm-eval task; each for every (subject, policy) run."""
    plan = []
    for suite in names:
        tasks = list(cfg.lm_eval.tasks) if suite == "lm_eval" else [suite] if suite in ("needle", "passkey") else []
        tasks = list(cfg.ruler.tasks) if suite == "ruler" else tasks
        plan += [(suite, task, s, label, p) for task in tasks for s, label, p in runs]
    return plan


def _layout(out: Path | None, cfg, suite: str, task: str, subject: Subject, label: str, policy, compute) -> dict:
    """``compute()``, or its saved result when ``out`` already holds it (the results layout: eval/runs.py)."""
    if out is None:
        return compute()
    config = _run_config(cfg, suite, task, subject, policy)
    return run_or_resume(out, subject.name, label, task, config, compute, resume=cfg.resume)


def _preflight(cfg, names, runs, teacher_subject, out: Path | None = None) -> None:
    """Every input check before the first model call, so a bad setting fails in seconds, not after a suite."""
    from .efficiency import check_config as check_efficiency
    from .fidelity import check_config as check_fidelity
    from .needle import check_config as check_retrieval
    from .ruler import check_config as check_ruler

    subjects = list({id(s): s for s, _, _ in runs}.values())
    for subject, _, policy in runs:
        with _scores(subject, policy):  # a policy fed by the model refuses a model that cannot feed it
            pass
    for subject in subjects:
        if "fidelity" in names and teacher_subject is not None and subject is runs[0][0]:
            check_fidelity(subject, cfg.fidelity)
        if "needle" in names:
            check_retrieval(subject, NEEDLE, cfg.needle)
        if "passkey" in names:
            check_retrieval(subject, PASSKEY, cfg.passkey)
        if "efficiency" in names:
            check_efficiency(subject, cfg.efficiency)
        if "ruler" in names:  # generates (or reads from its cache) every sample: a bad length fails here
            check_ruler(subject, cfg.ruler)
    if "lm_eval" in names:
        check_policy_tasks(cfg.lm_eval, [label for _, label, p in runs if p is not None])
    if out is not None and cfg.resume:
        for suite, task, subject, label, policy in _planned(cfg, names, runs):
            check_resumable(run_dir(out, subject.name, label, task), _run_config(cfg, suite, task, subject, policy))


def evaluate(model, tokenizer, suites="fidelity", teacher=None, teacher_tokenizer=None, config=None,
             out_dir: str | Path | None = None, model_name: str = "model", teacher_name: str = "teacher",
             **overrides) -> dict:
    """Run ``suites`` on ``model`` and return (and, with ``out_dir``, write) every number and its settings.

    ``teacher``: a model object, or ``"self"`` for a model that can run as the original it was made from. ``config``: an
    EvalConfig / dict; keyword ``overrides`` use the same keys (e.g. ``fidelity={"window": 256}``).
    A transformed model is evaluated in its student mode. Fidelity needs a teacher (skipped with the reason otherwise).
    Cache policies (``policies.names``) apply to the generation suites (needle, passkey, efficiency, and lm-eval's
    generation tasks). With ``out_dir``, the needle, passkey and lm-eval runs also go to the results layout
    (eval/runs.py: ``out_dir/<model>/<policy>@<ratio>/<task>/``, one summary table); a run already there is read
    back instead of run again (``resume=False``: run again and overwrite).
    """
    cfg = make_config(config, **overrides)
    names = parse_suites(suites)
    if tokenizer is None:
        raise SwiftKVInputError("evaluate() needs the model's tokenizer (the model directory has none?).")
    student = Subject(model_name, model, tokenizer, student=True if has_mode_switch(model) else None)
    subjects = [student]
    teacher_subject = None
    if isinstance(teacher, str) and teacher == "self":
        teacher_subject = teacher_of(student)
    elif teacher is not None:
        teacher_subject = Subject(teacher_name, teacher, teacher_tokenizer or tokenizer,
                                  student=False if has_mode_switch(teacher) else None)
    if teacher_subject is not None:
        if teacher_subject.model.config.vocab_size != model.config.vocab_size:
            raise SwiftKVInputError(
                f"teacher vocabulary ({teacher_subject.model.config.vocab_size}) differs from the model's "
                f"({model.config.vocab_size}): fidelity needs the same tokenizer."
            )
        subjects.append(teacher_subject)
    policies = policies_from_config(cfg.policies)
    progress = cfg.progress
    results: dict = {"meta": {}, "skipped": {}}
    # One run per (subject, policy): the model under every policy, the teacher with the full cache.
    runs = [(student, "full", None)] + [(student, label, p) for label, p in policies]
    if teacher_subject is not None:
        runs.append((teacher_subject, "full", None))

    out = Path(out_dir) if out_dir is not None else None
    _preflight(cfg, names, runs, teacher_subject, out)
    for suite in names:
        if suite == "fidelity":
            if teacher_subject is None:
                results["skipped"]["fidelity"] = "no teacher: pass teacher=<spec> (or teacher=self for a model that keeps its original mode)"
                continue
            results["fidelity"] = [run_fidelity(student, teacher_subject, cfg.fidelity, progress)]
        elif suite in ("needle", "passkey"):
            variant, section = (NEEDLE, cfg.needle) if suite == "needle" else (PASSKEY, cfg.passkey)
            results[suite] = []
            for s, label, p in runs:
                with _scores(s, p):
                    results[suite].append(_layout(out, cfg, suite, suite, s, label, p, lambda: run_retrieval(
                        s, variant, section, p, label, progress)))
        elif suite == "ruler":  # one run per (subject, policy, task), like lm-eval
            results[suite] = []
            for s, label, p in runs:
                with _scores(s, p):
                    for task in cfg.ruler.tasks:
                        results[suite].append(_layout(out, cfg, suite, task, s, label, p, lambda: run_ruler_task(
                            s, cfg.ruler, task, p, label, progress)))
        elif suite == "efficiency":
            results[suite] = []
            for s, label, p in runs:
                with _scores(s, p):
                    results[suite].append(run_efficiency(s, cfg.efficiency, p, label, progress))
        elif suite == "lm_eval":  # one run per (subject, policy, task), like the retrieval suites
            results[suite] = []
            for task in cfg.lm_eval.tasks:
                for s, label, p in runs:
                    with _scores(s, p):
                        results[suite].append(_layout(out, cfg, suite, task, s, label, p, lambda: run_lm_eval(
                            s, cfg.lm_eval, p, label, [task])))
    results["meta"] = _meta(cfg, subjects)
    results["meta"]["suites"] = names
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    if out is not None:
        results["plots"] = write_plots(results, out) if cfg.plots else []
        results["summary"] = [str(p) for p in write_summary(out)]
        write_results(results, out)
    return results
