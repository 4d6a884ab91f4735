"""CSKV: low-rank K/V projections and a bi-branch cache (a recent window exact, older tokens compressed and
optionally quantized), trained by layer-wise reconstruction on the frozen model.

``config.py`` (settings), ``convert.py`` (the student), ``calibrate.py`` (ASVD init + its cache), ``objective.py``
(the loss), ``remote_code/`` (the model class the exports ship); this module is the ``Method``.
"""

from __future__ import annotations

from torch import nn

from ..base import Method, unwrap
from .calibrate import asvd_calibrate, collect_input_scales, data_fingerprint, model_fingerprint
from .config import CSKVConfig
from .convert import cskv_mode, cskv_model_config, cskv_parameters, init_factors, svd_factors, to_cskv
from .objective import reconstruction_loss, teacher_and_compressed_hidden
from .remote_code import CSKV_FACTOR_NAMES, REMOTE_CODE, LlamaCSKVConfig, LlamaCSKVForCausalLM, LlamaCSKVModel


def _student(student) -> LlamaCSKVForCausalLM:
    model = unwrap(student)
    if not isinstance(model, LlamaCSKVForCausalLM):
        raise TypeError(f"expected the CSKV student (LlamaCSKVForCausalLM), got {type(model).__name__}.")
    return model


class CSKV(Method):
    name = "cskv"
    Config = CSKVConfig
    remote_code = REMOTE_CODE
    mode_flag = "cskv"

    def __init__(self, cfg=None, run_cfg=None):
        super().__init__(cfg, run_cfg)
        self.calibration_info: dict = {}

    def check_model_config(self, config) -> None:
        cskv_model_config(config, self.cfg)  # the checks to_cskv runs first, on the config alone

    def build_student(self, model: nn.Module) -> LlamaCSKVForCausalLM:
        return to_cskv(model, self.cfg)

    def calibrate(self, student, batches) -> None:
        self.calibration_info = asvd_calibrate(_student(student), self.cfg, batches)

    def loss(self, student, batch):
        return reconstruction_loss(_student(student), self.cfg, batch, self.loss_chunk_size)

    def teacher_and_student_hidden(self, student, batch):
        """The teacher's final hidden states and the student's, decoding every position from its compressed cache
        (keys/values older than the window reconstructed, quantized as in the cache)."""
        return teacher_and_compressed_hidden(_student(student), batch)

    def prepare_export(self, student):
        return _student(student).cskv(True)

    # ---- evaluation ---------------------------------------------------------------------------------------------
    @classmethod
    def scoring_kwargs(cls, model) -> dict:
        # CSKV attends exactly over a prompt; score every position as decoded from the compressed cache.
        return {"cskv_decode_from": 0} if getattr(model.config, "cskv", False) else {}


__all__ = [
    "CSKV", "CSKVConfig", "CSKV_FACTOR_NAMES", "LlamaCSKVConfig", "LlamaCSKVForCausalLM", "LlamaCSKVModel",
    "collect_input_scales", "cskv_mode", "cskv_model_config", "cskv_parameters", "data_fingerprint",
    "init_factors", "model_fingerprint", "svd_factors", "to_cskv",
]
