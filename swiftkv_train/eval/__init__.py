"""Evaluation harness: fidelity to the teacher, needle/passkey retrieval, lm-eval tasks, efficiency.

Command line: ``python -m swiftkv_train.eval model=<spec> [teacher=<spec>|self] suite=<name|a,b|all> out_dir=...``
Python: ``evaluate(model, tokenizer, suites, teacher=None, ...)``.
"""

from .api import evaluate, make_config, parse_suites

__all__ = ["evaluate", "make_config", "parse_suites"]
