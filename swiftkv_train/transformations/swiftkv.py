"""SwiftKV distillation: the student is the same model with SwiftKV on, the teacher the same model with it off.

One step: the teacher runs all layers under no_grad; the student reuses the teacher's h_M (layers < M are frozen
and identical in both, so recomputing them would be wasted work) and runs only layers >= M with gradients,
checkpointed layer by layer. Loss = KL(teacher || student) at temperature T (x T^2) on assistant tokens, computed
in chunks from hidden states (never the full [B, S, V] logits), plus a weighted MSE on one hidden state.
"""

import contextlib
from itertools import islice

import torch
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_causal_mask

from ..errors import SwiftKVInputError
from ..losses import chunked_kl_loss, hidden_mse_loss, kl_mask_from_labels
from ..models.transformers_compat import cache_kwarg
from ..transform import swiftkv_config, to_swiftkv
from ..transform.swiftkv_calibration import least_squares_kv_init
from ..zero import gathered
from .base import Transformation


def kl_loss_function(fused: bool):
    """The fused Triton KL (falls back to the torch reference off CUDA) or the plain chunked torch loss."""
    if fused:
        try:
            from swiftkv_kernels.kd_loss import fused_kl_loss

            return fused_kl_loss
        except ImportError:
            pass
    return chunked_kl_loss


class SwiftKVTransformation(Transformation):
    name = "swiftkv"

    def num_key_value_layers(self, config) -> int:
        """M for this model: the setting, or half of the layers when it is None."""
        m = self.cfg.num_key_value_layers
        return config.num_hidden_layers // 2 if m is None else m

    def check_model_config(self, config) -> None:
        m, g = self.num_key_value_layers(config), self.cfg.key_value_group_size
        self._check_loss_settings(swiftkv_config(config, m, g, training=True, prefix="transform.swiftkv."))

    def build_student(self, model):
        self.check_model_config(model.config)
        return to_swiftkv(model, self.num_key_value_layers(model.config), self.cfg.key_value_group_size)

    def _check_loss_settings(self, config):
        if self.cfg.kl_reduction not in ("mean", "batchmean_all"):
            raise SwiftKVInputError(
                f"transform.swiftkv.kl_reduction={self.cfg.kl_reduction!r}: use 'mean' or 'batchmean_all'."
            )
        if self.cfg.temperature <= 0:
            raise SwiftKVInputError(f"transform.swiftkv.temperature={self.cfg.temperature} must be > 0.")
        if self.cfg.hidden_loss_weight:
            self.hidden_index(config)
        if self.cfg.kv_init not in ("mean", "least_squares"):
            raise SwiftKVInputError(
                f"transform.swiftkv.kv_init={self.cfg.kv_init!r}: use 'mean' (the reference init) or 'least_squares'."
            )
        batches = self.cfg.calibration_batches
        if self.cfg.kv_init == "least_squares" and (isinstance(batches, bool) or not isinstance(batches, int)
                                                     or batches < 1):
            raise SwiftKVInputError(f"transform.swiftkv.calibration_batches={batches!r} must be a positive integer.")

    def calibrate(self, student, batches) -> None:
        """kv_init=least_squares: fit the K/V projections to the teacher's on the first training batches."""
        if self.cfg.kv_init != "least_squares":
            return
        batches = list(islice(iter(batches), self.cfg.calibration_batches))
        if not batches:
            raise SwiftKVInputError("kv_init=least_squares got no calibration batches: give training data.")
        # Runs before DeepSpeed wraps the model: the weights are whole on every rank (the sums are all-reduced).
        self.kv_fit = least_squares_kv_init(getattr(student, "module", student), batches, ridge=self.cfg.kv_init_ridge)

    def hidden_index(self, config) -> int:
        """transformers' hidden_states index of the MSE target, checked to lie after layer M."""
        layers, m = config.num_hidden_layers, config.num_key_value_layers
        idx = self.cfg.hidden_loss_layer % (layers + 1)
        if idx <= m:
            valid = f"{layers} (or -1)" if m + 1 == layers else f"{m + 1} to {layers} (or {m - layers} to -1)"
            raise SwiftKVInputError(
                f"transform.swiftkv.hidden_loss_layer={self.cfg.hidden_loss_layer} selects hidden state {idx}, "
                f"which the student computes exactly like the teacher (only states after layer M={m} differ): use "
                f"hidden_loss_layer={valid}, num_key_value_layers < {idx}, or hidden_loss_weight=0."
            )
        return idx

    # ---- the two passes ---------------------------------------------------------------------------------------
    def _prepare(self, inner, batch):
        input_ids = batch["input_ids"]
        position_ids = batch.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        embeds = inner.embed_tokens(input_ids)
        mask = create_causal_mask(
            config=inner.config,
            inputs_embeds=embeds,
            attention_mask=batch.get("attention_mask"),
            position_ids=position_ids,
            **cache_kwarg(None),
        )
        return embeds, mask, inner.rotary_emb(embeds, position_ids=position_ids), position_ids

    def _run(self, inner, hidden, start, end, pos_emb, mask, position_ids, shared=None, checkpointed=False):
        """Layers start..end-1, returning every layer's output (index i -> output of layer start+i)."""
        outputs = []
        for idx in range(start, end):
            if checkpointed:
                hidden = checkpoint(
                    inner.run_layers, hidden, idx, idx + 1, pos_emb, mask, position_ids, None, shared,
                    use_reentrant=False,
                )
            else:
                hidden = inner.run_layers(hidden, idx, idx + 1, pos_emb, mask, position_ids, None, shared)
            outputs.append(hidden)
        return outputs

    def forward_pair(self, student, batch, with_grad: bool):
        """Teacher and student hidden states: final normed [B,S,H] and the MSE target, for both."""
        inner, config = student.model, student.config
        m, layers = config.num_key_value_layers, config.num_hidden_layers
        hidden_idx = self.hidden_index(config) if self.cfg.hidden_loss_weight else layers
        with torch.no_grad():
            student.swiftkv(False)
            embeds, mask, pos_emb, position_ids = self._prepare(inner, batch)
            prefix = self._run(inner, embeds, 0, m, pos_emb, mask, position_ids)
            h_m = prefix[-1] if prefix else embeds
            teacher_outs = self._run(inner, h_m, m, layers, pos_emb, mask, position_ids)
            teacher_final = inner.norm(teacher_outs[-1])
        student.swiftkv(True)
        if not self.cfg.reuse_teacher_prefix:  # the reference's way: recompute layers < M for the student
            with torch.no_grad():
                h_m = self._run(inner, embeds, 0, m, pos_emb, mask, position_ids)[-1]
        grad_ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
        with grad_ctx:
            shared = inner.swiftkv_key_values(h_m, pos_emb)
            student_outs = self._run(
                inner, h_m, m, layers, pos_emb, mask, position_ids, shared,
                checkpointed=with_grad and self.cfg.gradient_checkpointing and student.training,
            )
            student_final = inner.norm(student_outs[-1])

        def pick(outs, final):  # hidden_states[idx] in transformers' numbering (idx = L is the normed output)
            return final if hidden_idx == layers else outs[hidden_idx - 1 - m]

        return {
            "teacher_final": teacher_final,
            "student_final": student_final,
            "teacher_hidden": pick(teacher_outs, teacher_final),
            "student_hidden": pick(student_outs, student_final),
        }

    # ---- the loss ------------------------------------------------------------------------------------------
    def loss(self, student, batch):
        out = self.forward_pair(student, batch, with_grad=True)
        trainer_cfg = self.train_cfg.trainer if self.train_cfg is not None else None
        chunk = trainer_cfg.loss_chunk_size if trainer_cfg is not None else 1024
        kl_loss = kl_loss_function(trainer_cfg.fused_loss if trainer_cfg is not None else False)
        weight = student.lm_head.weight
        with gathered(weight):
            kl = kl_loss(
                out["student_final"], out["teacher_final"], weight, mask=kl_mask_from_labels(batch["labels"]),
                temperature=self.cfg.temperature, chunk_size=chunk, reduction=self.cfg.kl_reduction,
            )
        total = self.cfg.kl_weight * kl
        result = {"kl": kl.detach()}
        if self.cfg.hidden_loss_weight:
            mse = hidden_mse_loss(out["student_hidden"], out["teacher_hidden"])
            total = total + self.cfg.hidden_loss_weight * mse
            result["hidden_mse"] = mse.detach()
        result["loss"] = total
        return result

    def teacher_and_student_hidden(self, student, batch):
        with torch.no_grad():
            out = self.forward_pair(student, batch, with_grad=False)
        return out["teacher_final"], out["student_final"]

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
