"""A sample's token ids: the chat template split around the user turn, context and question kept apart.

    context  = [chat prefix + preamble (few-shot) + intro] [body] [after]
    question = [question + end of user turn + assistant turn + answer prefix]

Each bracket is tokenized on its own (the body is assembled from token ids by the task's generator) so the
prompt has EXACTLY the requested number of tokens: RULER's length counts the prompt plus the task's answer
budget (its ``max_seq_length``), so the prompt gets ``length - answer budget`` tokens and the body what the rest
leaves. The answer prefix opens the assistant turn (RULER appends it after the model's template too); its leading
space is dropped there, after the turn's own newline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import SwiftKVInputError
from .tasks import Family

__all__ = ["Frame", "Sample", "chat_parts", "frame", "ids"]

_MARKER = "\u2063SWIFTKV_RULER\u2063"


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def chat_parts(tokenizer) -> tuple[str, str]:
    """The text before and after the user content (no chat template: nothing before, a newline after)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": _MARKER}], add_generation_prompt=True,
                                             tokenize=False)
        before, after = text.split(_MARKER)
        return before, after
    return "", "\n"


@dataclass
class Frame:
    prefix: list[int]
    after: list[int]
    question: list[int]
    question_text: str
    answer_prefix: str

    def body_budget(self, prompt_tokens: int, task: str, length: int) -> int:
        budget = prompt_tokens - len(self.prefix) - len(self.after) - len(self.question)
        if budget < 16:
            raise SwiftKVInputError(
                f"ruler.lengths: {length} is too short for {task}: its template, question and answer budget "
                f"take {length - budget} of the {length} tokens. Use longer lengths."
            )
        return budget


def frame(tokenizer, family: Family, fields: dict, preamble: str = "", chat: tuple[str, str] | None = None) -> Frame:
    """The fixed pieces of one sample; ``fields`` fill the family's ``{...}`` (query, type_needle_v, ...)."""
    before, after = chat if chat is not None else chat_parts(tokenizer)
    question = family.question.format(**fields)
    answer_prefix = family.answer_prefix.format(**fields).lstrip()
    return Frame(prefix=ids(tokenizer, before + preamble + family.intro.format(**fields)),
                 after=ids(tokenizer, family.after),
                 question=ids(tokenizer, question + after + answer_prefix),
                 question_text=question, answer_prefix=answer_prefix)


@dataclass
class Sample:
    """One RULER sample: the context the policy compresses, the question appended after, the references."""

    task: str
    length: int  # RULER's: prompt + answer budget
    index: int
    context_ids: list[int]
    question_ids: list[int]
    answers: list[str]
    max_new_tokens: int  # RULER's answer budget for the task
    meta: dict = field(default_factory=dict)  # where needles went, padding, query, ...

    @property
    def prompt_tokens(self) -> int:
        return len(self.context_ids) + len(self.question_ids)

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, record: dict) -> "Sample":
        return cls(**record)


def assemble(task: str, length: int, index: int, fr: Frame, body: list[int], answers: list[str],
             max_new_tokens: int, meta: dict) -> Sample:
    """The sample; checks the exact length (a generator bug, not user input, if it fails)."""
    sample = Sample(task, length, index, fr.prefix + body + fr.after, list(fr.question), list(answers),
                    max_new_tokens, {**meta, "body_offset": len(fr.prefix), "body_tokens": len(body),
                                     "question": fr.question_text, "answer_prefix": fr.answer_prefix})
    expected = length - max_new_tokens
    if sample.prompt_tokens != expected:
        raise AssertionError(f"{task} at {length}: prompt has {sample.prompt_tokens} tokens, expected {expected}")
    return sample
