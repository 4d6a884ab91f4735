"""RULER's QA tasks: a SQuAD (qa_1) or HotpotQA (qa_2) question among distractor documents.

Data, as RULER reads it (scripts/data/synthetic/qa.py): SQuAD v2.0 dev without the unanswerable questions (the
gold paragraph; the other paragraphs of its article come first among the distractors), HotpotQA dev in its
distractor setting (all ten paragraphs of the question are gold). Documents are deduplicated and sorted; the
questions are taken in the file's order (sample i asks question i). A source is ``hub`` (the `datasets` library:
rajpurkar/squad_v2 and hotpotqa/hotpot_qa "distractor", validation split) or a local file: a .jsonl of rows in
those datasets' schemas (what ``load_dataset(...).to_json(path)`` writes) or the official .json files RULER
downloads (dev-v2.0.json, hotpot_dev_distractor_v1.json).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ...errors import SwiftKVInputError
from .prompt import assemble, ids
from .tasks import FAMILIES, Task

__all__ = ["QAData", "load_qa", "qa_rows", "generate_qa", "HUB"]

HUB = {"squad": ("rajpurkar/squad_v2", None), "hotpotqa": ("hotpotqa/hotpot_qa", "distractor")}
DOCUMENT = "Document {i}:\n{document}"


@dataclass
class QAData:
    questions: list[dict]  # {"query", "outputs": [answers], "context": [gold doc ids], "more_context": [doc ids]}
    docs: list[str]


def _hub_rows(dataset: str) -> list[dict]:
    name, config = HUB[dataset]
    try:
        from datasets import load_dataset

        return list(load_dataset(name, config, split="validation"))
    except Exception as err:  # no network, no cache: say which setting avoids the Hub
        raise SwiftKVInputError(
            f"ruler.{dataset}=hub: loading {name} from the Hugging Face Hub failed ({type(err).__name__}: {err}). "
            f"Give a local file (ruler.{dataset}=/path/to/{dataset}.jsonl) or drop its task from ruler.tasks."
        ) from None


def qa_rows(dataset: str, source: str) -> list[dict]:
    """Rows in the Hub dataset's schema from ``source`` (``hub``, a .jsonl of such rows, or the official .json)."""
    if source == "hub":
        return _hub_rows(dataset)
    path = Path(source).expanduser()
    if not path.is_file():
        raise SwiftKVInputError(f"ruler.{dataset}={source!r} does not exist: give a .jsonl/.json file or 'hub'.")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    data = json.loads(path.read_text(encoding="utf-8"))
    if dataset == "squad" and isinstance(data, dict) and "data" in data:  # official SQuAD: articles > paragraphs
        return [{"title": art["title"], "context": par["context"], "question": qa["question"],
                 "answers": {"text": [a["text"] for a in qa["answers"]]}}
                for art in data["data"] for par in art["paragraphs"] for qa in par["qas"]]
    if isinstance(data, list):
        return data
    raise SwiftKVInputError(f"ruler.{dataset}={source!r}: expected a .jsonl of rows or the official .json file.")


def _squad(rows: list[dict]) -> QAData:
    docs = sorted({r["context"] for r in rows})
    index = {d: i for i, d in enumerate(docs)}
    by_title: dict[str, list[int]] = {}
    for r in rows:
        group = by_title.setdefault(r.get("title", ""), [])
        if index[r["context"]] not in group:
            group.append(index[r["context"]])
    questions = []
    for r in rows:
        answers = r["answers"]["text"] if isinstance(r["answers"], dict) else list(r["answers"])
        if not answers:  # SQuAD v2's unanswerable questions: RULER skips them
            continue
        gold = index[r["context"]]
        questions.append({"query": r["question"], "outputs": list(answers), "context": [gold],
                          "more_context": [d for d in by_title[r.get("title", "")] if d != gold]})
    return QAData(questions, docs)


def _hotpot_docs(row: dict) -> list[str]:
    context = row["context"]
    if isinstance(context, dict):  # the Hub's schema: {"title": [...], "sentences": [[...], ...]}
        pairs = zip(context["title"], context["sentences"])
    else:  # the official file: [[title, [sentences]], ...]
        pairs = context
    return [f"{title}\n{''.join(sentences)}" for title, sentences in pairs]


def _hotpot(rows: list[dict]) -> QAData:
    docs = sorted({d for r in rows for d in _hotpot_docs(r)})
    index = {d: i for i, d in enumerate(docs)}
    questions = [{"query": r["question"], "outputs": [r["answer"]], "context": [index[d] for d in _hotpot_docs(r)],
                  "more_context": []} for r in rows]
    return QAData(questions, docs)


def load_qa(dataset: str, source: str) -> QAData:
    try:
        rows = qa_rows(dataset, source)
        data = _squad(rows) if dataset == "squad" else _hotpot(rows)
    except (KeyError, TypeError) as err:
        raise SwiftKVInputError(
            f"ruler.{dataset}={source!r}: a row lacks {err} (SQuAD rows need title/context/question/answers.text, "
            "HotpotQA rows question/answer/context)."
        ) from None
    if not data.questions:
        raise SwiftKVInputError(f"ruler.{dataset}={source!r} has no answerable questions.")
    return data


def generate_qa(task: Task, res, rng: random.Random, length: int, index: int):
    """Gold documents + distractors (RULER's order of preference: the gold article's other paragraphs, then random
    documents), as many whole documents as fit, shuffled and numbered; the tokens left are filled with the start
    of one more distractor document, last."""
    family = FAMILIES["qa"]
    data = res.qa(task.args["dataset"])
    question = data.questions[index % len(data.questions)]
    fr = res.frame(family, {"query": question["query"]})
    budget = fr.body_budget(length - family.max_new_tokens, task.name, length)
    gold = list(question["context"])
    more = rng.sample(question["more_context"], len(question["more_context"]))
    excluded = set(gold) | set(more)
    others = [d for d in rng.sample(range(len(data.docs)), min(len(data.docs), budget // 8 + len(excluded)))
              if d not in excluded]
    candidates = gold + more + others
    doc_ids = _DocIds(res, data.docs)
    headers: dict[int, list[int]] = {}
    seed = rng.random()

    def header(i: int) -> list[int]:  # "Document i:" (i from 1), after a blank line but for the first
        if i not in headers:
            headers[i] = ids(res.tokenizer, ("" if i == 1 else "\n\n") + f"Document {i}:\n")
        return headers[i]

    def build(m: int):
        chosen = candidates[:m]
        random.Random(f"{seed}/{m}").shuffle(chosen)
        out = []
        for i, d in enumerate(chosen):
            out += header(i + 1) + doc_ids[d]
        return out, chosen

    doc_ids.prefetch(candidates[: len(gold) + 64])
    if len(build(len(gold))[0]) > budget:
        raise SwiftKVInputError(
            f"ruler.lengths: {length} is too short for {task.name} question {index}: its {len(gold)} gold "
            "document(s) alone do not fit. Use longer lengths."
        )
    lo, hi = len(gold), len(candidates)
    while lo < hi:  # the most whole documents that fit
        mid = (lo + hi + 1) // 2
        doc_ids.prefetch(candidates[:mid])
        lo, hi = (mid, hi) if len(build(mid)[0]) <= budget else (lo, mid - 1)
    body, chosen = build(lo)
    partial = 0
    if lo < len(candidates) and len(body) < budget:
        extra = header(lo + 1) + doc_ids[candidates[lo]]
        partial = budget - len(body)
        body = body + extra[:partial]
    body = body + (res.newline * budget)[: budget - len(body)]  # only if every document is already in
    meta = {"query": question["query"], "documents": len(chosen), "gold_documents": [chosen.index(g) + 1 for g in gold],
            "partial_document_tokens": partial}
    return assemble(task.name, length, index, fr, body, question["outputs"], family.max_new_tokens, meta)


class _DocIds:
    """Token ids of documents, tokenized in batches on first use."""

    def __init__(self, res, docs: list[str]):
        self.res, self.docs, self.cache = res, docs, res.__dict__.setdefault("_doc_ids", {})

    def prefetch(self, wanted: list[int]) -> None:
        missing = [d for d in wanted if (id(self.docs), d) not in self.cache]
        for d, tokens in zip(missing, self.res.batch_ids([self.docs[d] for d in missing])):
            self.cache[(id(self.docs), d)] = tokens

    def __getitem__(self, d: int) -> list[int]:
        self.prefetch([d])
        return self.cache[(id(self.docs), d)]
