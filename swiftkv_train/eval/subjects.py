"""What gets evaluated: a model object, a display name, and (for SwiftKV) the mode to run it in."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..errors import SwiftKVInputError

__all__ = ["Subject", "teacher_of", "max_positions"]


@dataclass
class Subject:
    """A model under evaluation. ``swiftkv`` = the SwiftKV mode to switch to while it runs (None = leave as is),
    so one SwiftKV model object can serve as both student and teacher (``teacher=self``)."""

    name: str
    model: object
    tokenizer: object
    swiftkv: bool | None = None

    @contextlib.contextmanager
    def active(self):
        if self.swiftkv is None or not hasattr(self.model, "swiftkv"):
            yield self.model
            return
        before = bool(self.model.config.swiftkv)
        self.model.swiftkv(self.swiftkv)
        try:
            yield self.model
        finally:
            self.model.swiftkv(before)


def teacher_of(subject: Subject) -> Subject:
    """``teacher=self``: the same SwiftKV model run as the original model (``swiftkv(False)``)."""
    model = subject.model
    if not hasattr(model, "swiftkv"):
        raise SwiftKVInputError(
            "teacher=self needs a SwiftKV model (it runs model.swiftkv(False)); this model has no SwiftKV mode: "
            "pass the original model as teacher=<spec> instead."
        )
    if getattr(model.config, "swiftkv_lean", False):
        raise SwiftKVInputError(
            "teacher=self is impossible for a lean SwiftKV export (the teacher's projections were dropped); pass "
            "teacher=<original model spec> or export with lean=False."
        )
    return Subject(name="teacher", model=model, tokenizer=subject.tokenizer, swiftkv=False)


def max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
