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

import copy
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..cache_stats import cache_nbytes
from ..errors import SwiftKVInputError
from ..models.llama_locret import LlamaLocretConfig, LlamaLocretForCausalLM, LocretSettings, validate_locret_settings
from ..models.llama_locret.modeling_llama_locret import LocretRetainingHead, apply_rope
from .base import Transformation

# Source model types a Locret student can be built from.
SOURCE_TYPES = ("llama", "mistral", "llama_locret")
# Fields of the source config that must not be carried over to the new model type.
_DROP_FIELDS = ("model_type", "architectures", "auto_map", "transformers_version", "sliding_window", "dtype")
_INFERENCE_FIELDS = (
    "budget", "chunk_size", "stabilizers", "n_local", "position_mode", "decode_eviction", "quant_bits",
    "quant_group_size",
)


@dataclass
class LocretConfig:
    """The Locret transformation's settings (``transform.locret`` in the run config); the paper's defaults.

    Training: ``head_hidden_size`` (retaining head width, 1024), ``smoothness_weight`` (lambda, 0.0025),
    ``label_chunk_size`` (tile of the answer x prefix logits, 1024), ``head_init_seed``, ``top_fraction`` (the
    logged overlap of the predicted and true top-10% prefix tokens).
    Inference, written into the exported model's config: ``budget`` (entries kept per layer and KV head, local
    tokens included; the paper's Llama-3.1-8B setting is 16384 + 100 local), ``chunk_size`` 1024,
    ``stabilizers`` 2500, ``n_local`` 100, ``position_mode`` "compacted" (the paper's: keys cached before RoPE and
    re-rotated at positions 0..len(cache)-1, so positions never exceed budget + chunk + generated tokens and
    prompts longer than the model's trained context stay in its position range; "original" keeps true positions,
    exact relative distances but positions up to the prompt length), ``decode_eviction`` False (the paper's),
    ``quant_bits`` None (the paper's; 2, 4 or 8: evict, then store the surviving entries quantized with CSKV's
    group-wise quantizer, per token in groups of ``quant_group_size`` (32) channels along head_dim).
    """

    head_hidden_size: int = 1024
    smoothness_weight: float = 0.0025
    label_chunk_size: int = 1024
    head_init_seed: int = 0
    top_fraction: float = 0.1
    budget: int = 16484
    chunk_size: int = 1024
    stabilizers: int = 2500
    n_local: int = 100
    position_mode: str = "compacted"
    decode_eviction: bool = False
    quant_bits: int | None = None
    quant_group_size: int = 32

    @classmethod
    def from_node(cls, node) -> "LocretConfig":
        """From a LocretConfig, a mapping (dict, OmegaConf node) or None (defaults); unknown keys are errors."""
        if isinstance(node, cls):
            return node.validate()
        if node is None:
            return cls().validate()
        items = dict(node.items()) if hasattr(node, "items") else dict(vars(node))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(items) - known)
        if unknown:
            raise SwiftKVInputError(
                f"unknown locret setting(s) {unknown}: the Locret transformation takes {', '.join(sorted(known))}."
            )
        return cls(**items).validate()

    def settings(self) -> LocretSettings:
        return LocretSettings(**{name: getattr(self, name) for name in _INFERENCE_FIELDS})

    def validate(self) -> "LocretConfig":
        for name in ("head_hidden_size", "label_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SwiftKVInputError(f"locret.{name}={value!r} is invalid: use an integer >= 1.")
        if isinstance(self.smoothness_weight, bool) or not isinstance(self.smoothness_weight, (int, float)) or (
            self.smoothness_weight < 0
        ):
            raise SwiftKVInputError(
                f"locret.smoothness_weight={self.smoothness_weight!r} is invalid: use a number >= 0."
            )
        if not isinstance(self.top_fraction, (int, float)) or not 0 < self.top_fraction <= 1:
            raise SwiftKVInputError(f"locret.top_fraction={self.top_fraction!r} is invalid: use a number in (0, 1].")
        try:
            validate_locret_settings(self.settings(), prefix="locret.")
        except ValueError as err:  # re-raised as the toolkit's input error whatever class the model file used
            raise SwiftKVInputError(str(err)) from None
        return self


# ---- conversion ---------------------------------------------------------------------------------------------
def locret_model_config(source_config, cfg: LocretConfig) -> LlamaLocretConfig:
    model_type = getattr(source_config, "model_type", None)
    if model_type not in SOURCE_TYPES:
        raise SwiftKVInputError(
            f"Locret is built from a Llama-family model ({', '.join(SOURCE_TYPES)}); got model_type {model_type!r}."
        )
    if model_type == "mistral" and getattr(source_config, "sliding_window", None):
        if source_config.sliding_window < source_config.max_position_embeddings:
            raise SwiftKVInputError(
                "sliding-window attention is not supported by the Locret model: use a full-attention checkpoint."
            )
    fields_ = {k: v for k, v in source_config.to_dict().items() if k not in _DROP_FIELDS}
    fields_.update({f"locret_{name}": getattr(cfg, name) for name in _INFERENCE_FIELDS})
    fields_.update(locret_head_hidden_size=cfg.head_hidden_size, locret_enabled=True)
    config = LlamaLocretConfig(**fields_)
    config._attn_implementation = source_config._attn_implementation
    return config


@torch.no_grad()
def to_locret(model: nn.Module, cfg: LocretConfig | None = None) -> LlamaLocretForCausalLM:
    """A Locret model sharing ``model``'s weight tensors (frozen), with new retaining heads (trainable).

    ``model`` stays usable and unchanged. From a Locret model, its heads are kept (continued training)."""
    cfg = LocretConfig.from_node(cfg)
    config = locret_model_config(model.config, cfg)
    reference = model.model.embed_tokens.weight
    keep_heads = getattr(model.config, "model_type", None) == "llama_locret" and (
        model.config.locret_head_hidden_size == cfg.head_hidden_size
    )
    with torch.device("meta"):
        new = LlamaLocretForCausalLM(config)
    state = model.state_dict()
    if not keep_heads:
        state = {k: v for k, v in state.items() if ".retaining_head." not in k}
    result = new.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise SwiftKVInputError(
            f"the source model has weights the Llama layout does not: {result.unexpected_keys[:5]}"
        )
    # Non-persistent buffers (RoPE frequencies) are not in the state dict: rebuild them for real.
    new.model.rotary_emb = type(new.model.rotary_emb)(config=config).to(reference.device)
    if config.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
    if not keep_heads:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.head_init_seed)
            for layer in new.model.layers:  # nn.Linear's default init, on CPU for a device-independent seed
                layer.self_attn.retaining_head = LocretRetainingHead(config).to(reference.device, reference.dtype)
    leftover = [name for name, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"to_locret left tensors uninitialised: {leftover[:5]}")
    new.requires_grad_(False)
    for _, param in new.retaining_head_parameters():
        param.requires_grad_(True)
    new.generation_config = copy.deepcopy(model.generation_config)
    new.config.name_or_path = getattr(model.config, "name_or_path", "")
    return new.train(model.training)


# ---- labels -------------------------------------------------------------------------------------------------
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
            query = apply_rope(q_flat.detach().view(batch, seq, -1, attn.head_dim).transpose(1, 2), cos, sin)
            key = apply_rope(k_flat.detach().view(batch, seq, -1, attn.head_dim).transpose(1, 2), cos, sin)
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


def _unwrap(student: nn.Module) -> LlamaLocretForCausalLM:
    model = getattr(student, "module", student)  # DeepSpeed engine / DDP wrappers
    if not isinstance(model, LlamaLocretForCausalLM):
        raise SwiftKVInputError(f"the Locret loss needs the model from build_student, got {type(model).__name__}.")
    return model


def run_locret_capture(student: nn.Module, batch: dict, label_chunk: int, with_grad: bool = True):
    """Frozen forward with the hooks; returns (layout, per-layer [(pred [B, H_kv, P_max], labels per row)])."""
    model = _unwrap(student)
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


# ---- the transformation -------------------------------------------------------------------------------------
class LocretTransformation(Transformation):
    """Locret for the shared trainer: heads-only training on frozen-backbone labels, budgeted-cache export."""

    name = "locret"

    def __init__(self, cfg, train_cfg=None):
        super().__init__(cfg, train_cfg)
        self.config = LocretConfig.from_node(cfg)

    def check_model_config(self, config) -> None:
        locret_model_config(config, self.config)  # the checks to_locret runs first, on the config alone

    def build_student(self, model: nn.Module) -> nn.Module:
        return to_locret(model, self.config)

    def loss(self, student: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return locret_loss(student, batch, self.config)

    def prepare_export(self, student: nn.Module) -> nn.Module:
        return _unwrap(student)


__all__ = [
    "LocretConfig",
    "LocretTransformation",
    "answer_prefix_max_logits",
    "locret_labels",
    "locret_loss",
    "locret_model_config",
    "to_locret",
]


def prefill_peak(model: LlamaLocretForCausalLM, ids: torch.Tensor, **settings) -> tuple[int, int, object]:
    """Chunked prefill of ``ids``, measuring the largest cache held: (bytes, entries per layer, final cache).

    Measured right after each layer's attention, before that layer's eviction, where the cache is largest.
    """
    state = {"cache": None, "bytes": 0, "entries": 0}

    def grab_cache(module, args, kwargs):
        state["cache"] = kwargs.get("cache", kwargs.get("past_key_values"))

    def measure(module, args, output):
        cache = state["cache"]
        state["bytes"] = max(state["bytes"], cache_nbytes(cache))
        state["entries"] = max(state["entries"], max(layer.num_entries for layer in cache.layers))

    handles = [model.model.register_forward_pre_hook(grab_cache, with_kwargs=True)]
    handles += [layer.self_attn.o_proj.register_forward_hook(measure) for layer in model.model.layers]
    try:
        cache = model.chunked_prefill(ids, **settings)
    finally:
        for handle in handles:
            handle.remove()
    return state["bytes"], state["entries"], cache
