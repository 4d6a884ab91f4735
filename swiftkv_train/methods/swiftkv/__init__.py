"""SwiftKV: SingleInputKV (the later layers' K/V from one earlier layer's output, so prompt tokens skip them) and
AcrossKV (neighbouring later layers share one K/V cache), distilled from the original model on the same weights.

Everything about it lives in this folder: ``config.py`` (its settings), ``convert.py`` (the student),
``calibrate.py`` (the least-squares K/V init), ``objective.py`` (the distillation loss), ``remote_code/`` (the
model class the exports ship). This module is the ``Method`` the shared trainer and evaluation talk to.
"""

from __future__ import annotations

from itertools import islice

import torch

from ...errors import SwiftKVInputError
from ..base import Method, unwrap
from .calibrate import least_squares_kv_init
from .config import SwiftKVConfig
from .convert import check_layer_split, swiftkv_config, swiftkv_parameters, to_swiftkv
from .objective import distillation_loss, forward_pair, hidden_index
from .remote_code import (REMOTE_CODE, LlamaSwiftKVConfig, LlamaSwiftKVForCausalLM, LlamaSwiftKVModel,
                          Qwen2SwiftKVForCausalLM, Qwen3SwiftKVForCausalLM)


class SwiftKV(Method):
    name = "swiftkv"
    Config = SwiftKVConfig
    remote_code = REMOTE_CODE
    mode_flag = "swiftkv"
    # vLLM serves the student of every source family (swiftkv_train.serving.vllm_plugin registers these)
    vllm_architectures = tuple((name, f"swiftkv_train.methods.swiftkv.vllm_model:{name}") for name in
                               ("LlamaSwiftKVForCausalLM", "Qwen2SwiftKVForCausalLM", "Qwen3SwiftKVForCausalLM"))

    def num_key_value_layers(self, config) -> int:
        """M for this model: the setting, or half of the layers when it is None."""
        m = self.cfg.num_key_value_layers
        return config.num_hidden_layers // 2 if m is None else m

    def check_model_config(self, config) -> None:
        m, g = self.num_key_value_layers(config), self.cfg.key_value_group_size
        student_config = swiftkv_config(config, m, g, training=True, prefix="transform.swiftkv.")
        if self.cfg.hidden_loss_weight:
            hidden_index(self.cfg, student_config)

    def build_student(self, model):
        self.check_model_config(model.config)
        return to_swiftkv(model, self.num_key_value_layers(model.config), self.cfg.key_value_group_size)

    def calibrate(self, student, batches) -> None:
        """kv_init=least_squares: fit the K/V projections to the teacher's on the first training batches."""
        if self.cfg.kv_init != "least_squares":
            return
        batches = list(islice(iter(batches), self.cfg.calibration_batches))
        if not batches:
            raise SwiftKVInputError("kv_init=least_squares got no calibration batches: give training data.")
        # Runs before DeepSpeed wraps the model: the weights are whole on every rank (the sums are all-reduced).
        self.kv_fit = least_squares_kv_init(unwrap(student), batches, ridge=self.cfg.kv_init_ridge)

    def loss(self, student, batch):
        return distillation_loss(self.cfg, student, batch, self.loss_chunk_size, self.fused_loss)

    def teacher_and_student_hidden(self, student, batch):
        with torch.no_grad():
            out = forward_pair(self.cfg, student, batch, with_grad=False)
        return out["teacher_final"], out["student_final"]

    def describe(self, config) -> str:
        group = f" g={config.key_value_group_size}" if config.key_value_group_size > 1 else ""
        return f"SwiftKV M={config.num_key_value_layers}{group}"

    def flops_per_token(self, config, seq_len: int) -> float:
        """Model FLOPs one training token needs: teacher forward over all layers, student forward and
        activation-gradient backward over layers >= M (recomputation not counted), lm_head for both, and the
        weight gradients of the trainable projections."""
        hidden, layers, m = config.hidden_size, config.num_hidden_layers, config.num_key_value_layers
        head_dim = config.head_dim
        q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        layer_params = hidden * (2 * q_dim + 2 * kv_dim) + 3 * hidden * config.intermediate_size
        head = config.vocab_size * hidden
        attention = 4 * q_dim * seq_len  # QK^T and AV per token per layer (no causal halving)
        teacher = 2 * (layers * layer_params + head) + layers * attention
        later = layers - m
        student_forward = 2 * (later * layer_params + head) + later * attention
        trainable = later * hidden * q_dim + -(-later // config.key_value_group_size) * 2 * hidden * kv_dim
        return float(teacher + 2 * student_forward + 2 * trainable)

    # ---- evaluation ---------------------------------------------------------------------------------------------
    @classmethod
    def cache_slot(cls, config, layer: int) -> int:
        """A later layer in SwiftKV mode reads its AcrossKV group's shared entry."""
        if config.swiftkv and layer >= config.num_key_value_layers:
            return config.swiftkv_cache_slot(layer)
        return layer

    @classmethod
    def teacher_unavailable(cls, model) -> str | None:
        if getattr(model.config, "swiftkv_lean", False):
            return ("a lean SwiftKV export has no teacher (the later layers' original projections were dropped): "
                    "pass teacher=<original model spec> or export with lean=False")
        return None


__all__ = [
    "LlamaSwiftKVConfig", "LlamaSwiftKVForCausalLM", "LlamaSwiftKVModel", "Qwen2SwiftKVForCausalLM",
    "Qwen3SwiftKVForCausalLM", "SwiftKV", "SwiftKVConfig",
    "check_layer_split", "swiftkv_config", "swiftkv_parameters", "to_swiftkv",
]
