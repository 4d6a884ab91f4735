"""What a method is to the shared layers (trainer, eval, export): the ``Method`` interface and its registry.

A method (SwiftKV, CSKV, Locret, ...) lives in its own folder ``swiftkv_train/methods/<name>/``. Its ``Method``
subclass declares ``name`` and ``Config`` (one dataclass: its settings, ``transform.<name>`` in a recipe) and so
registers itself: there is no central list to edit. The trainer owns the loop, DeepSpeed, data, checkpoints,
logging and export; a method says how to build the student from the loaded model, which parameters train, what
the loss of one batch is, and, for evaluation, how to run the student as its teacher.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from ..errors import SwiftKVInputError

# name -> Method subclass, filled as each method's package is imported (swiftkv_train.methods imports them all).
METHODS: dict[str, type[Method]] = {}


class Method(ABC):
    """Subclasses set ``name`` and ``Config`` and implement ``build_student`` and ``loss``.

    ``cfg`` is this method's own settings (a ``Config`` instance, validated), ``run_cfg`` the whole run config
    (read-only) for the few shared fields a loss needs (``trainer.loss_chunk_size``, ``trainer.fused_loss``).
    """

    name: ClassVar[str] = ""
    # The dataclass of this method's settings. ``validate()`` (if defined) raises SwiftKVInputError naming
    # ``transform.<name>.<field>``; it runs once, when the method is built.
    Config: ClassVar[type] = type(None)
    # The model classes this method's remote code defines (the student and its exports) and the files its exports
    # ship: a swiftkv_train.remote_code.RemoteCode, or None for a method whose student is a stock transformers model.
    # model_classes (config, base model, causal LM) and model_type are read from it.
    remote_code: ClassVar[object] = None
    model_classes: ClassVar[tuple] = ()
    model_type: ClassVar[str] = ""
    # model_type and those of the same model made from the other source families (remote_code.variants)
    model_types: ClassVar[tuple[str, ...]] = ()
    # For a student that keeps the original model's function: the name of both its switch method and its config
    # flag (``model.<flag>(bool)``, ``model.config.<flag>``); None when it has no such mode.
    mode_flag: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.name:
            return  # an abstract intermediate class
        if not dataclasses.is_dataclass(cls.Config):
            raise TypeError(f"method {cls.name!r} must declare its settings as a dataclass: Config = ...")
        cls.model_classes = cls.remote_code.classes if cls.remote_code is not None else ()
        cls.model_type = cls.model_classes[0].model_type if cls.model_classes else ""
        cls.model_types = tuple(c[0].model_type for c in cls.remote_code.all_classes) if cls.remote_code else ()
        if cls.name in METHODS and METHODS[cls.name].__qualname__ != cls.__qualname__:
            raise TypeError(f"two methods are named {cls.name!r}: {METHODS[cls.name]} and {cls}")
        METHODS[cls.name] = cls

    def __init__(self, cfg=None, run_cfg=None):
        self.cfg = config_from_node(self.Config, cfg, prefix=f"transform.{self.name}.")
        self.run_cfg = run_cfg

    # ---- conversion -----------------------------------------------------------------------------------------
    def check_model_config(self, config) -> None:
        """Refuse, from the model's config alone, what ``build_student`` would refuse: the trainer calls this
        before the weights load (seconds instead of a load that can take minutes). Raise SwiftKVInputError."""

    @abstractmethod
    def build_student(self, model: nn.Module) -> nn.Module:
        """Return the model to train (may share ``model``'s frozen tensors). Only trainable parameters may have
        ``requires_grad=True``: the optimizer is built over exactly those."""

    def calibrate(self, student: nn.Module, batches) -> None:
        """Optional data-dependent initialisation before training (e.g. CSKV's activation-aware SVD).

        ``batches`` is an iterable of training batches (dicts of tensors on the student's device)."""

    def trainable_parameters(self, student: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in student.named_parameters() if p.requires_grad]

    # ---- training -------------------------------------------------------------------------------------------
    @abstractmethod
    def loss(self, student: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss of one micro-batch: a dict with ``"loss"`` (the scalar to back-propagate) and any other scalars
        to log (detached). ``batch`` holds ``input_ids``, ``labels``, ``position_ids`` (packed rows) and
        optionally ``attention_mask``."""

    def describe(self, config) -> str:
        """How a converted model is named in reports (e.g. "SwiftKV M=15 g=2")."""
        return self.name

    def flops_per_token(self, config, seq_len: int) -> float | None:
        """Model FLOPs of one training token (for MFU); None when the method does not say."""
        return None

    # ---- the run config's shared loss settings ----------------------------------------------------------------
    @property
    def loss_chunk_size(self) -> int:
        """``trainer.loss_chunk_size``: tokens per chunk of every logits loss (the one setting for all methods)."""
        return self.run_cfg.trainer.loss_chunk_size if self.run_cfg is not None else 1024

    @property
    def fused_loss(self) -> bool:
        return bool(self.run_cfg.trainer.fused_loss) if self.run_cfg is not None else False

    # ---- evaluation -----------------------------------------------------------------------------------------
    def teacher_and_student_hidden(
        self, student: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Final normed hidden states [B, S, H] of the teacher and of the student for fidelity metrics (KL, top-1,
        perplexity through the shared lm_head); None when the method does not change the model's outputs (the
        trainer then reports the mean of the method's own loss terms on the held-out batches instead)."""
        return None

    # ---- export ---------------------------------------------------------------------------------------------
    def prepare_export(self, student: nn.Module) -> nn.Module:
        """The model to hand to ``save_hf`` (default: the student itself)."""
        return getattr(student, "module", student)


# ---- what evaluation asks of a model, whichever method made it ----------------------------------------------------
    # (classmethods: they act on a model object, e.g. an export loaded for evaluation, not on a training run)
    @classmethod
    def mode_switch(cls, model: nn.Module) -> Callable[[bool], object] | None:
        """``switch(True)`` runs ``model`` as the student, ``switch(False)`` as the original model it was made from
        (same weights); None when the model has no such mode (``mode_flag`` unset)."""
        return getattr(model, cls.mode_flag) if cls.mode_flag else None

    @classmethod
    def student_mode(cls, model: nn.Module) -> bool:
        """Whether ``model`` currently runs as the student (the state ``mode_switch`` changes)."""
        return bool(getattr(model.config, cls.mode_flag)) if cls.mode_flag else True

    @classmethod
    def teacher_unavailable(cls, model: nn.Module) -> str | None:
        """Why ``model`` cannot run as its own teacher even though it has a mode switch (None: it can)."""
        return None

    @classmethod
    def cache_slot(cls, config, layer: int) -> int:
        """The cache entry layer ``layer``'s attention reads (its own unless the method shares entries)."""
        return layer

    @classmethod
    def scoring_kwargs(cls, model: nn.Module) -> dict:
        """Extra forward arguments that make a full-sequence forward score every position the way decoding from
        the method's cache would (fidelity metrics); {} when a plain forward already does."""
        return {}


def method_of(model: nn.Module) -> type[Method] | None:
    """The registered method whose model class ``model`` is (by ``config.model_type``), None for a plain model."""
    return method_of_config(getattr(model, "config", None))


def method_of_config(config) -> type[Method] | None:
    model_type = getattr(config, "model_type", None)
    return next((m for m in METHODS.values() if model_type in m.model_types), None)


# ---- settings ------------------------------------------------------------------------------------------------------
def config_from_node(schema: type, node, prefix: str = ""):
    """An instance of the dataclass ``schema`` from a ``schema`` instance, a mapping (dict, OmegaConf node) or None
    (defaults); unknown keys are an error naming the known ones. ``validate()`` runs once on the result."""
    if isinstance(node, schema):
        result = node
    else:
        if node is None:
            items = {}
        elif hasattr(node, "items"):
            try:
                from omegaconf import DictConfig, OmegaConf

                items = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
            except ImportError:
                items = dict(node)
        else:
            items = dict(vars(node))
        known = [f.name for f in dataclasses.fields(schema)]
        unknown = sorted(set(items) - set(known))
        moved = getattr(schema, "MOVED", {})
        if any(k in moved for k in unknown):
            raise SwiftKVInputError("; ".join(f"{prefix}{k} was replaced by {moved[k]}" for k in unknown if k in moved))
        if unknown:
            raise SwiftKVInputError(
                f"unknown setting(s) {', '.join(prefix + k for k in unknown)}: {prefix.rstrip('.') or 'it'} takes "
                f"{', '.join(known)}."
            )
        result = schema(**items)
    validate = getattr(result, "validate", None)
    if callable(validate):
        validate()
    return result


def unwrap(student: nn.Module) -> nn.Module:
    """The model inside a DeepSpeed engine / DDP wrapper (itself otherwise)."""
    return getattr(student, "module", student)
