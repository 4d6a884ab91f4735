"""What gets evaluated: a model object, a display name, and the mode to run it in (student or its own teacher)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..errors import SwiftKVInputError
from ..methods import method_of

__all__ = ["Subject", "teacher_of", "max_positions", "has_mode_switch"]


@dataclass
class Subject:
    """A model under evaluation. ``student`` = the mode to switch to while it runs (True: the method's student,
    False: the original model it was made from; None = leave as is), so one model object can serve as both
    student and teacher (``teacher=self``). The model's method (methods.method_of) does the switching."""

    name: str
    model: object
    tokenizer: object
    student: bool | None = None

    @contextlib.contextmanager
    def active(self):
        method = method_of(self.model)
        switch = method.mode_switch(self.model) if method is not None else None
        if self.student is None or switch is None:
            yield self.model
            return
        before = method.student_mode(self.model)
        switch(self.student)
        try:
            yield self.model
        finally:
            switch(before)

    def scoring_kwargs(self) -> dict:
        """Forward arguments that score every position as decoding from the model's cache would (see Method)."""
        method = method_of(self.model)
        return method.scoring_kwargs(self.model) if method is not None else {}


def has_mode_switch(model) -> bool:
    method = method_of(model)
    return method is not None and method.mode_switch(model) is not None


def teacher_of(subject: Subject) -> Subject:
    """``teacher=self``: the same model run as the original model it was made from (same weights)."""
    model = subject.model
    method = method_of(model)
    if not has_mode_switch(model):
        raise SwiftKVInputError(
            f"teacher=self needs a model that can run as the original it was made from; {type(model).__name__} "
            "has no such mode: pass the original model as teacher=<spec> instead."
        )
    reason = method.teacher_unavailable(model)
    if reason:
        raise SwiftKVInputError(f"teacher=self is impossible: {reason}.")
    return Subject(name="teacher", model=model, tokenizer=subject.tokenizer, student=False)


def max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
