"""Dataset loaders for the local lm-eval tasks (referenced from the YAML files as ``!function utils.<name>``).

lm-eval calls them with the task's metadata as keyword arguments, so ``TaskManager(metadata={"data_file": ...})``
(or ``lm_eval.data_file=...`` on our command line) points the GSM8K task at another jsonl.
"""

import json
import re
from pathlib import Path

import datasets

PACKAGE_GSM8K = Path(__file__).resolve().parents[2] / "data" / "gsm8k" / "train.jsonl"

# Four tiny two-choice questions: for the integration test (loglikelihood only, runs in seconds).
TINY_MC = [
    {"question": "The sky on a clear day is", "choices": ["blue", "made of cheese"], "label": 0},
    {"question": "Two plus two equals", "choices": ["five", "four"], "label": 1},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin"], "label": 0},
    {"question": "The capital of France is", "choices": ["Berlin", "Paris"], "label": 1},
]


def load_tiny_mc(**kwargs):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(TINY_MC)})


def load_gsm8k(data_file=None, max_docs=None, **kwargs):
    """GSM8K-format jsonl (question, answer with '#### <number>') -> {"test": ...} with a ``target`` number."""
    path = Path(data_file) if data_file else PACKAGE_GSM8K
    if not path.is_file():
        raise FileNotFoundError(
            f"GSM8K data file {path} not found: pass metadata data_file=<path to a GSM8K-style jsonl>"
        )
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                rows.append({"question": record["question"], "answer": record["answer"],
                             "target": final_number(record["answer"])})
    if max_docs:
        rows = rows[: int(max_docs)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def final_number(answer: str) -> str:
    """The number after '####' without thousands separators (GSM8K's gold format)."""
    tail = answer.split("####")[-1]
    match = re.search(r"-?[\d,]*\.?\d+", tail)
    return match.group(0).replace(",", "") if match else tail.strip()
