"""Locret: train one retaining head per layer to predict how much each prompt token will matter to the answer.

Student: ``LlamaLocretForCausalLM`` sharing the (frozen) backbone of the loaded model; only the heads train.

Loss of one micro-batch (un-packed rows: one instruction + answer per row, right padded):
1. One forward of the frozen backbone under ``no_grad``. Hooks on each layer's q/k/v projections capture their
   outputs (before RoPE) for every token.
2. Predictions: the layer's retaining head on ``cat(q, k, v)`` of the prefix tokens (with grad; the only graph).
3. Labels (on the fly, nothing cached): for each prefix key, the max over the answer queries and over the query
   heads of its GQA group of the pre-softmax logit ``(RoPE(q) . RoPE(k)) * scaling``, exactly as the model's
   attention computes it. The answer x prefix block is computed in ``label_chunk_size`` x ``label_chunk_size``
   tiles (never S x S); a cached label stage would only save these tiles, since the same forward feeds the heads.
4. ``SmoothL1(pred, label)`` averaged over layers, heads and prefix tokens, plus ``smoothness_weight`` times the
   sum over layers of the mean squared difference of adjacent prefix tokens' predicted scores.

Data the pipeline must provide (the lead's data config with ``pack: false``): ``input_ids`` [B, S], ``labels``
[B, S] with the answer (assistant) token ids and -100 elsewhere, ``attention_mask`` [B, S] (1 = real token, right
padding), ``position_ids`` [B, S] (0..S-1; optional). Per row the *prefix* is every token before the first answer
token and the *answer queries* are the tokens whose label is not -100. Rows without an answer or without a prefix
contribute nothing. Long prompts should be truncated from the middle of the prefix so the answer survives (the
paper caps the prefix at 10240 tokens).

Recipe-level training defaults from the paper (for the lead's recipes): AdamW lr 5e-4, betas (0.9, 0.95), no
weight decay; linear warm-up 2000 steps then linear decay, 3000 steps in total (1 epoch over ~3000 samples, one
sample per step); gradient clipping by value 0.5 (DeepSpeed clips by norm: 0.5-1.0 is the nearest setting); bf16;
seed 0. Only the heads train, so ZeRO-2 suffices.
"""


import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SwiftKVInputError
from .config import LocretConfig
from .remote_code import LlamaLocretForCausalLM
from .remote_code.modeling_llama_locret import apply_rope, to_heads


def answer_prefix_max_logits(
    query: torch.Tensor, key: torch.Tensor, answer_index: torch.Tensor, prefix_len: int, scaling: float, chunk: int
) -> torch.Tensor:
    """Label [H_kv, P] of one row: max over answer queries and GQA group of ``(q . k) * scaling``.

    ``query`` [H_q, S, D] and ``key`` [H_kv, S, D] are after RoPE. Query head j belongs to KV head j // G (the
    grouping of transformers' ``repeat_kv``). Computed in fp32 tiles of ``chunk`` queries x ``chunk`` keys."""
    num_kv, _, dim = key.shape
    group = query.shape[0] // num_kv
    answers = query[:, answer_index].float().view(num_kv, group, -1, dim)
    keys = key[:, :prefix_len].float()
    labels = torch.empty(num_kv, prefix_len, dtype=torch.float32, device=key.device)
    for k0 in range(0, prefix_len, chunk):
        key_tile = keys[:, k0 : k0 + chunk]
        best = None
        for a0 in range(0, answers.shape[2], chunk):
            logits = torch.einsum("hgad,hpd->hgap", answers[:, :, a0 : a0 + chunk], key_tile) * scaling
            tile_max = logits.amax(dim=(1, 2))
            best = tile_max if best is None else torch.maximum(best, tile_max)
        labels[:, k0 : k0 + chunk] = best
    return labels


def _row_layout(labels: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[int, torch.Tensor] | None]:
    """Per row: (prefix length, answer positions), or None when the row has no prefix or no answer."""
    layout = []
    answer = (labels != -100) & attention_mask.bool()
    for row in answer:
        positions = row.nonzero().flatten()
        if positions.numel() == 0 or positions[0].item() == 0:
            layout.append(None)
        else:
            layout.append((int(positions[0]), positions))
    return layout


class _LayerCapture:
    """Forward hooks that turn each layer's q/k/v into (prediction, label) pairs while the backbone runs."""

    def __init__(self, model: LlamaLocretForCausalLM, layout, label_chunk: int, with_grad: bool = True):
        self.layout = layout
        self.label_chunk = label_chunk
        self.with_grad = with_grad
        self.max_prefix = max((item[0] for item in layout if item is not None), default=0)
        self.projections: dict[int, dict[str, torch.Tensor]] = {}
        self.results: list[tuple[torch.Tensor, list[torch.Tensor | None]]] = []  # per layer: pred, labels per row
        self.handles = []
        for idx, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                self.handles.append(getattr(attn, name).register_forward_hook(self._keep(idx, name)))
            self.handles.append(attn.register_forward_hook(self._score_layer(idx), with_kwargs=True))

    def _keep(self, idx, name):
        def hook(module, args, output):
            self.projections.setdefault(idx, {})[name] = output

        return hook

    def _score_layer(self, idx):
        def hook(attn, args, kwargs, output):
            proj = self.projections.pop(idx)
            q_flat, k_flat, v_flat = proj["q_proj"], proj["k_proj"], proj["v_proj"]
            with torch.set_grad_enabled(self.with_grad):
                pred = attn.retaining_scores(
                    q_flat[:, : self.max_prefix], k_flat[:, : self.max_prefix], v_flat[:, : self.max_prefix]
                )
            cos, sin = kwargs["position_embeddings"]
            batch, seq = q_flat.shape[:2]
            # the attention's own queries and keys (through Qwen3's per-head norms where the layer has them)
            query = apply_rope(to_heads(q_flat.detach(), attn.head_dim, getattr(attn, "q_norm", None)), cos, sin)
            key = apply_rope(to_heads(k_flat.detach(), attn.head_dim, getattr(attn, "k_norm", None)), cos, sin)
            row_labels = [
                None
                if item is None
                else answer_prefix_max_logits(query[b], key[b], item[1], item[0], attn.scaling, self.label_chunk)
                for b, item in enumerate(self.layout)
            ]
            self.results.append((pred, row_labels))

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.projections.clear()


def locret_student(student: nn.Module) -> LlamaLocretForCausalLM:
    model = getattr(student, "module", student)  # DeepSpeed engine / DDP wrappers
    if not isinstance(model, LlamaLocretForCausalLM):
        raise SwiftKVInputError(f"the Locret loss needs the model from build_student, got {type(model).__name__}.")
    return model


def run_locret_capture(student: nn.Module, batch: dict, label_chunk: int, with_grad: bool = True):
    """Frozen forward with the hooks; returns (layout, per-layer [(pred [B, H_kv, P_max], labels per row)])."""
    model = locret_student(student)
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if "labels" not in batch:
        raise SwiftKVInputError("the Locret loss needs batch['labels'] marking the answer tokens (-100 elsewhere).")
    layout = _row_layout(batch["labels"], attention_mask)
    capture = _LayerCapture(model, layout, label_chunk, with_grad)
    try:
        with torch.no_grad():
            model.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=batch.get("position_ids"),
                use_cache=False,
            )
    finally:
        capture.remove()
    return layout, capture.results


def locret_labels(student: nn.Module, batch: dict, label_chunk: int = 1024) -> list[torch.Tensor | None]:
    """Labels per row, stacked over layers: [L, H_kv, prefix_len] (None for rows without prefix or answer)."""
    layout, results = run_locret_capture(student, batch, label_chunk, with_grad=False)
    return [
        None if item is None else torch.stack([labels[b] for _, labels in results]) for b, item in enumerate(layout)
    ]


def _top_overlap(pred: torch.Tensor, label: torch.Tensor, fraction: float) -> torch.Tensor:
    """Share of the true top-``fraction`` tokens that the prediction also ranks in its top-``fraction`` (per head)."""
    k = max(1, int(fraction * label.shape[-1]))
    chosen = torch.zeros_like(label, dtype=torch.bool).scatter_(-1, pred.topk(k, dim=-1).indices, True)
    truth = torch.zeros_like(label, dtype=torch.bool).scatter_(-1, label.topk(k, dim=-1).indices, True)
    return (chosen & truth).sum(-1).float().mean() / k


def locret_loss(student: nn.Module, batch: dict, cfg: LocretConfig) -> dict[str, torch.Tensor]:
    layout, results = run_locret_capture(student, batch, cfg.label_chunk_size)
    l1_sum = smooth_sum = overlap_sum = 0.0
    l1_count = pair_count = overlap_count = 0
    anchor = 0.0
    for pred, row_labels in results:
        anchor = anchor + pred.sum() * 0.0  # keeps every head in the graph even when no row counts
        for b, item in enumerate(layout):
            if item is None:
                continue
            prefix = item[0]
            p = pred[b, :, :prefix].float()
            label = row_labels[b]
            l1_sum = l1_sum + F.smooth_l1_loss(p, label, reduction="sum")
            l1_count += label.numel()
            smooth_sum = smooth_sum + (p[:, 1:] - p[:, :-1]).pow(2).sum()
            overlap_sum += _top_overlap(p.detach(), label, cfg.top_fraction).item()
            overlap_count += 1
        if not pair_count:  # adjacent pairs per layer (the same count for every layer)
            pair_count = sum(pred.shape[1] * (item[0] - 1) for item in layout if item is not None)
    if not l1_count:
        zero = anchor if isinstance(anchor, torch.Tensor) else torch.zeros(())
        return {"loss": zero, "smooth_l1": zero.detach(), "smoothness": zero.detach(), "rows": torch.zeros(())}
    smooth_l1 = l1_sum / l1_count
    # Paper: sum over layers of each layer's mean squared adjacent difference.
    smoothness = smooth_sum / max(pair_count, 1)
    loss = smooth_l1 + cfg.smoothness_weight * smoothness + anchor
    return {
        "loss": loss,
        "smooth_l1": smooth_l1.detach(),
        "smoothness": smoothness.detach() if isinstance(smoothness, torch.Tensor) else torch.tensor(smoothness),
        "top_overlap": torch.tensor(overlap_sum / overlap_count),
        "rows": torch.tensor(float(sum(item is not None for item in layout))),
    }
