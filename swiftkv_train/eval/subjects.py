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
        toggle = mode_switch(self.model)
        if self.swiftkv is None or toggle is None:
            yield self.model
            return
        before = bool(getattr(self.model.config, toggle))
        getattr(self.model, toggle)(self.swiftkv)
        try:
            yield self.model
        finally:
            getattr(self.model, toggle)(before)


def mode_switch(model) -> str | None:
    """The method that switches a transformed model between itself and the original (same weights), if any:
    ``swiftkv`` (SwiftKV) or ``cskv`` (CSKV). The ``Subject.swiftkv`` flag drives either."""
    return next((name for name in ("swiftkv", "cskv") if callable(getattr(model, name, None))), None)


def teacher_of(subject: Subject) -> Subject:
    """``teacher=self``: the same SwiftKV (or CSKV) model run as the original model (``swiftkv(False)``)."""
    model = subject.model
    if mode_switch(model) is None:
        raise SwiftKVInputError(
            "teacher=self needs a SwiftKV or CSKV model (it runs model.swiftkv(False) / cskv(False)); this model has "
            "no such mode: pass the original model as teacher=<spec> instead."
        )
    if getattr(model.config, "swiftkv_lean", False):
        raise SwiftKVInputError(
            "teacher=self is impossible for a lean SwiftKV export (the teacher's projections were dropped); pass "
            "teacher=<original model spec> or export with lean=False."
        )
    return Subject(name="teacher", model=model, tokenizer=subject.tokenizer, swiftkv=False)


def max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
