"""`python -m swiftkv_train.eval model=<spec> [teacher=<spec>|self] suite=<...> out_dir=<dir> key=value ...`

`python -m swiftkv_train.eval --help-policies` lists every registered cache policy and its settings.

Loads the model (any `load_pretrained` spec or export dir), optionally converts it with a method on the fly
(``transform.name=<method> transform.<method>.<setting>=...``, the recipes' keys), loads the teacher, runs the suites and writes results.json, results.md
and PNG plots to ``out_dir`` (Hydra writes nothing else there and never changes directory).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from ..errors import SwiftKVInputError
from .config import register_schemas

register_schemas()
log = logging.getLogger("swiftkv_train.eval")


def _device_dtype(cfg):
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise SwiftKVInputError(f"dtype={cfg.dtype!r}: use auto, float32, bfloat16 or float16.")
    return device, dtype


def _load(spec: str, device, dtype, what: str):
    from ..models import load_pretrained

    model, tokenizer = load_pretrained(spec, dtype=dtype)
    if tokenizer is None:
        raise SwiftKVInputError(f"{what}={spec!r} has no tokenizer files: export the tokenizer with the model.")
    return model.to(device).eval(), tokenizer


def check_moved_keys(args: list[str]) -> None:
    """The on-the-fly conversion moved from ``<method>.<setting>=`` to the recipes' ``transform.*`` keys: an old
    override fails naming the new spelling (Hydra's own error would only say the key is unknown)."""
    from ..methods import METHODS

    for arg in args:
        key, _, value = arg.lstrip("+~").partition("=")
        method = key.split(".", 1)[0]
        if "." in key and method in METHODS:
            raise SwiftKVInputError(
                f"{key}={value} was replaced by: transform.name={method} transform.{key}={value}"
            )


def policies_help() -> str:
    """One paragraph per registered cache policy: its name, what it keeps (its docstring's first line, up to the
    end of that sentence's paragraph) and every setting with its default (from the policy's dataclass)."""
    import textwrap

    from ..policies import POLICIES

    paragraphs = []
    for name, cls in sorted(POLICIES.items()):
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        wrap = dict(width=116, initial_indent="  ", break_on_hyphens=False, break_long_words=False)
        text = textwrap.fill(summary, subsequent_indent="  ", **wrap)
        settings = textwrap.fill(f"settings: {cls.describe_settings()}", subsequent_indent="    ", **wrap)
        paragraphs.append(f"{name} ({cls.__name__})\n{text}\n{settings}")
    return ("Cache policies (policies.names=[...]; settings: policies.overrides.<policy>.<setting>=...):\n\n"
            + "\n\n".join(paragraphs))


def run(cfg: DictConfig) -> dict:
    from .api import evaluate, parse_suites, policies_from_config

    parse_suites(cfg.suite)  # fail on a bad suite or policy setting before loading anything
    policies_from_config(cfg.policies)
    device, dtype = _device_dtype(cfg)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    model, tokenizer = _load(cfg.model, device, dtype, "model")
    name = Path(cfg.model).name if Path(cfg.model).expanduser().exists() else cfg.model
    if cfg.transform.name is not None:
        from ..methods import build_method

        method = build_method(cfg.transform)
        model = method.build_student(model).eval()
        name = f"{name} {method.describe(model.config)}"
    teacher = teacher_tokenizer = None
    if cfg.teacher == "self":
        teacher = "self"
    elif cfg.teacher:
        teacher, teacher_tokenizer = _load(cfg.teacher, device, dtype, "teacher")
    results = evaluate(model, tokenizer, cfg.suite, teacher=teacher, teacher_tokenizer=teacher_tokenizer,
                       config=cfg, out_dir=cfg.out_dir, model_name=name,
                       teacher_name="teacher" if cfg.teacher in (None, "self") else f"teacher ({cfg.teacher})")
    results["meta"]["command"] = " ".join(["python -m swiftkv_train.eval", *sys.argv[1:]])
    from .report import write_results

    write_results(results, Path(cfg.out_dir))
    print(f"results written to {Path(cfg.out_dir) / 'results.md'}")
    return results


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except SwiftKVInputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    if "--help-policies" in sys.argv[1:]:
        print(policies_help())
        sys.exit(0)
    try:
        check_moved_keys(sys.argv[1:])
    except SwiftKVInputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
