"""RULER's metrics (scripts/eval/synthetic/constants.py), per sample in [0, 1]; a task's score is their mean x 100.

string_match_all: the share of the references found in the output (niah, vt, cwe, fwe);
string_match_part: 1 if any reference is found (qa). Matching is case-insensitive substring search on the output
after RULER's post-processing (control characters become newlines, then stripped).
"""

from __future__ import annotations

import re

__all__ = ["postprocess", "string_match_all", "string_match_part", "METRICS", "score"]

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(output: str) -> str:
    return _CONTROL.sub("\n", output.strip()).strip()


def string_match_all(output: str, references: list[str]) -> float:
    text = output.lower()
    return sum(r.lower() in text for r in references) / len(references)


def string_match_part(output: str, references: list[str]) -> float:
    text = output.lower()
    return float(any(r.lower() in text for r in references))


METRICS = {"all": string_match_all, "part": string_match_part}


def score(metric: str, output: str, references: list[str]) -> float:
    return METRICS[metric](postprocess(output), references)
