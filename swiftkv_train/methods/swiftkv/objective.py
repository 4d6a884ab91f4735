"""SwiftKV distillation: the student is the same model with SwiftKV on, the teacher the same model with it off.

One step: the teacher runs all layers under no_grad; the student reuses the teacher's h_M (layers < M are frozen
and identical in both, so recomputing them would be wasted work) and runs only layers >= M with gradients,
checkpointed layer by layer. Loss = a logits loss (``logits_loss``: KL(teacher || student) by default, or JSD) at
temperature T (x T^2) on assistant tokens, computed in chunks from hidden states (never the full [B, S, V] logits),
plus a weighted MSE on one hidden state.
"""

import contextlib

import torch
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_causal_mask

from ...errors import SwiftKVInputError
from ...losses import hidden_mse_loss, kl_mask_from_labels
from ...remote_code.transformers_compat import cache_kwarg
from ...zero import gathered
from .config import SwiftKVConfig


def hidden_index(cfg: SwiftKVConfig, config) -> int:
    """transformers' hidden_states index of the MSE target, checked to lie after layer M."""
    layers, m = config.num_hidden_layers, config.num_key_value_layers
    idx = cfg.hidden_loss_layer % (layers + 1)
    if idx <= m:
        valid = f"{layers} (or -1)" if m + 1 == layers else f"{m + 1} to {layers} (or {m - layers} to -1)"
        raise SwiftKVInputError(
            f"transform.swiftkv.hidden_loss_layer={cfg.hidden_loss_layer} selects hidden state {idx}, "
            f"which the student computes exactly like the teacher (only states after layer M={m} differ): use "
            f"hidden_loss_layer={valid}, num_key_value_layers < {idx}, or hidden_loss_weight=0."
        )
    return idx

# ---- the two passes ---------------------------------------------------------------------------------------
def _prepare(inner, batch):
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

def _run(inner, hidden, start, end, pos_emb, mask, position_ids, shared=None, checkpointed=False):
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

def forward_pair(cfg: SwiftKVConfig, student, batch, with_grad: bool):
    """Teacher and student hidden states: final normed [B,S,H] and the MSE target, for both."""
    inner, config = student.model, student.config
    m, layers = config.num_key_value_layers, config.num_hidden_layers
    hidden_idx = hidden_index(cfg, config) if cfg.hidden_loss_weight else layers
    with torch.no_grad():
        student.swiftkv(False)
        embeds, mask, pos_emb, position_ids = _prepare(inner, batch)
        prefix = _run(inner, embeds, 0, m, pos_emb, mask, position_ids)
        h_m = prefix[-1] if prefix else embeds
        teacher_outs = _run(inner, h_m, m, layers, pos_emb, mask, position_ids)
        teacher_final = inner.norm(teacher_outs[-1])
    student.swiftkv(True)
    if not cfg.reuse_teacher_prefix:  # the reference's way: recompute layers < M for the student
        with torch.no_grad():
            h_m = _run(inner, embeds, 0, m, pos_emb, mask, position_ids)[-1]
    grad_ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
    with grad_ctx:
        shared = inner.swiftkv_key_values(h_m, pos_emb)
        student_outs = _run(
            inner, h_m, m, layers, pos_emb, mask, position_ids, shared,
            checkpointed=with_grad and cfg.gradient_checkpointing and student.training,
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
def distillation_loss(cfg: SwiftKVConfig, student, batch, chunk: int, fused: bool) -> dict[str, torch.Tensor]:
    """The chosen logits loss (``cfg.logits_loss``, default KL(teacher || student)) on the final hidden states'
    logits, chunked, + the weighted hidden-state MSE. ``fused``: the loss's fused kernel where it has one and can
    run. Logged under the loss's name ("kl", "jsd") and "hidden_mse"."""
    out = forward_pair(cfg, student, batch, with_grad=True)
    logits_loss = cfg.logits_loss_component()
    weight = student.lm_head.weight
    with gathered(weight):
        value = logits_loss(
            out["student_final"], out["teacher_final"], weight, kl_mask_from_labels(batch["labels"]),
            temperature=cfg.temperature, chunk_size=chunk, reduction=cfg.kl_reduction, fused=fused,
        )
    total = cfg.kl_weight * value
    result = {logits_loss.name: value.detach()}
    if cfg.hidden_loss_weight:
        mse = hidden_mse_loss(out["student_hidden"], out["teacher_hidden"])
        total = total + cfg.hidden_loss_weight * mse
        result["hidden_mse"] = mse.detach()
    result["loss"] = total
    return result
