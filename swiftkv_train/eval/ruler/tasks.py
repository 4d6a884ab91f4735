"""The 13 RULER tasks: RULER's published definitions (NVIDIA/RULER scripts/synthetic.yaml for the per-task
arguments, scripts/data/synthetic/constants.py for the templates, answer prefixes and answer budgets,
scripts/eval/synthetic/constants.py for the metrics), split where NVIDIA kvpress splits RULER prompts: the
CONTEXT is everything before the question sentence, the QUESTION that sentence (plus the answer prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Family", "Task", "FAMILIES", "TASKS", "TASK_NAMES", "QA_DATASETS"]


@dataclass(frozen=True)
class Family:
    """One RULER task family. The prompt text is ``intro + <body> + after`` (context) then ``question`` and, in
    the assistant turn, ``answer_prefix``; ``{...}`` fields are filled per sample."""

    name: str
    intro: str
    after: str
    question: str
    answer_prefix: str
    max_new_tokens: int  # RULER's tokens_to_generate
    metric: str  # "all": string_match_all, "part": string_match_part


FAMILIES = {
    "niah": Family(
        "niah",
        intro=("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the {type_needle_v} afterwards.\n"),
        after="\n",
        question="What are all the special magic {type_needle_v} for {query} mentioned in the provided text?",
        answer_prefix=" The special magic {type_needle_v} for {query} mentioned in the provided text are",
        max_new_tokens=128, metric="all",
    ),
    "variable_tracking": Family(
        "variable_tracking",
        intro="Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
        after="\n",
        question="Question: Find all variables that are assigned the value {query} in the text above.",
        answer_prefix=(" Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                       "variables are assigned the value {query}, they are: "),
        max_new_tokens=30, metric="all",
    ),
    "common_words_extraction": Family(
        "common_words_extraction",
        intro=("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
               "ones that appear most often.\n"),
        after="\n",
        question="Question: What are the 10 most common words in the above list?",
        answer_prefix=" Answer: The top 10 words that appear most often in the list are:",
        max_new_tokens=120, metric="all",
    ),
    "freq_words_extraction": Family(
        "freq_words_extraction",
        intro=("Read the following coded text and track the frequency of each coded word. Find the three most "
               "frequently appeared coded words. "),
        after="\n",
        question=("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                  "frequently appeared words in the above coded text?"),
        answer_prefix=" Answer: According to the coded text above, the three most frequently appeared words are:",
        max_new_tokens=50, metric="all",
    ),
    "qa": Family(
        "qa",
        intro=("Answer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nThe following are given documents.\n\n"),
        after="\n\n",
        question=("Answer the question based on the given documents. Only give me the answer and do not output any "
                  "other words.\n\nQuestion: {query}"),
        answer_prefix=" Answer:",
        max_new_tokens=32, metric="part",
    ),
}


@dataclass(frozen=True)
class Task:
    name: str
    family: str
    args: dict = field(default_factory=dict)

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]


def _niah(haystack, key, value, keys=1, values=1, queries=1) -> dict:
    return {"haystack": haystack, "type_needle_k": key, "type_needle_v": value, "num_needle_k": keys,
            "num_needle_v": values, "num_needle_q": queries}


TASKS = {t.name: t for t in [
    Task("niah_single_1", "niah", _niah("noise", "words", "numbers")),
    Task("niah_single_2", "niah", _niah("essay", "words", "numbers")),
    Task("niah_single_3", "niah", _niah("essay", "words", "uuids")),
    Task("niah_multikey_1", "niah", _niah("essay", "words", "numbers", keys=4)),
    Task("niah_multikey_2", "niah", _niah("needle", "words", "numbers")),
    Task("niah_multikey_3", "niah", _niah("needle", "uuids", "uuids")),
    Task("niah_multivalue", "niah", _niah("essay", "words", "numbers", values=4)),
    Task("niah_multiquery", "niah", _niah("essay", "words", "numbers", queries=4)),
    Task("vt", "variable_tracking", {"haystack": "noise", "num_chains": 1, "num_hops": 4}),
    Task("cwe", "common_words_extraction", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    Task("fwe", "freq_words_extraction", {"alpha": 2.0, "coded_wordlen": 6}),
    Task("qa_1", "qa", {"dataset": "squad"}),
    Task("qa_2", "qa", {"dataset": "hotpotqa"}),
]}
TASK_NAMES = tuple(TASKS)
QA_DATASETS = ("squad", "hotpotqa")
