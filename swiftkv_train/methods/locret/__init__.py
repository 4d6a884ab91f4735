"""Locret: one trained retaining head per layer scores cache entries, so that a budgeted cache keeps the ones the
answer will need, under chunked prefill. Only the heads train, on labels from the frozen backbone.

``config.py`` (settings), ``convert.py`` (the student), ``objective.py`` (labels and loss), ``measure.py`` (cache
peak of a prefill), ``policy.py`` (the heads as a policy of the shared eviction stack), ``remote_code/`` (the model
class the exports ship); this module is the ``Method``.
"""

from __future__ import annotations

from torch import nn

from ..base import Method
from .config import INFERENCE_FIELDS, LocretConfig
from .convert import SOURCE_TYPES, locret_model_config, to_locret
from .measure import prefill_peak
from .objective import answer_prefix_max_logits, locret_labels, locret_loss, locret_student, run_locret_capture
from .policy import LocretPolicy, locret_policy, locret_scores  # noqa: F401 (registers the "locret" cache policy)
from .remote_code import REMOTE_CODE, LlamaLocretConfig, LlamaLocretForCausalLM, LlamaLocretModel


class Locret(Method):
    """Heads-only training on frozen-backbone labels; the export carries the budgeted cache."""

    name = "locret"
    Config = LocretConfig
    remote_code = REMOTE_CODE

    def check_model_config(self, config) -> None:
        locret_model_config(config, self.cfg)  # the checks to_locret runs first, on the config alone

    def build_student(self, model: nn.Module) -> nn.Module:
        return to_locret(model, self.cfg)

    def loss(self, student, batch):
        return locret_loss(student, batch, self.cfg)

    def prepare_export(self, student: nn.Module) -> nn.Module:
        return locret_student(student)


__all__ = [
    "INFERENCE_FIELDS", "LlamaLocretConfig", "LlamaLocretForCausalLM", "LlamaLocretModel", "Locret", "LocretConfig",
    "SOURCE_TYPES", "answer_prefix_max_logits", "locret_labels", "locret_loss", "locret_model_config",
    "prefill_peak", "run_locret_capture", "to_locret",
]
