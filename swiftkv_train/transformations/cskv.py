"""CSKV as a transformation for the shared trainer: build the student, calibrate (SVD / ASVD), layer-wise loss.

- ``build_student``: a ``llama_cskv`` model sharing the source's (frozen) weights, with per-layer K/V factors A, B
  initialised by a truncated SVD of the weights; only A and B train.
- ``calibrate``: ASVD-style activation-aware initialisation. The mean |x| of every layer's k/v_proj input is
  collected on calibration batches; the factors come from the SVD of ``W·diag(s)``, ``s = mean|x|^alpha``, with
  ``A = √Σ Vᵀ diag(1/s)`` and ``B = U √Σ``. Statistics and factors are cached (safetensors) in
  ``calibration_cache_dir``, keyed by a fingerprint of the model weights, of the calibration data and of the settings.
- ``loss``: one frozen teacher forward (no grad) with hooks on every layer's k/v_proj; each hook reconstructs K/V from
  that layer's input through A, B (optionally with fake quantization, straight-through) and adds
  ``MSE(RoPE(K), RoPE(K̂)) + MSE(V, V̂)``; the loss is the mean over layers. Optionally ``kl_weight`` times the KL from
  the teacher to the student decoding every position from the compressed cache (``cskv_decode_from=0``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import SwiftKVInputError
from ..losses import chunked_kl_loss
from ..models.llama_cskv import CSKV_FACTOR_NAMES, LlamaCSKVConfig, LlamaCSKVForCausalLM
from ..models.llama_cskv.modeling_llama_cskv import apply_rope
from ..models.llama_cskv.quant_llama_cskv import fake_quant_keys, fake_quant_values, straight_through
from ..models.loading import check_llama_family
from .base import Transformation

log = logging.getLogger(__name__)

# Fields of the source config that must not be carried over to the new model type.
_DROP_FIELDS = ("model_type", "architectures", "auto_map", "transformers_version", "sliding_window", "dtype")
INITS = ("svd", "asvd")


@dataclass
class CSKVConfig:
    """Settings of the CSKV transformation (``cfg.transform.cskv``).

    Densities are the share of the ``kv_dim`` channels kept (rank = round(density · kv_dim)); the ``*_per_layer``
    lists, when given, override the scalar for every layer. SmolLM2's values are far less compressible than its keys
    (see docs/smollm2_facts.md), hence the recipes set a higher value density there.
    """

    key_density: float = 0.5
    value_density: float = 0.5
    key_density_per_layer: list[float] | None = None
    value_density_per_layer: list[float] | None = None
    window: int = 32
    quant_bits: int | None = None
    quant_group_size: int = 32
    init: str = "asvd"
    asvd_alpha: float = 0.5
    calibration_batches: int = 8
    calibration_cache_dir: str = ""
    fake_quant: bool = False
    kl_weight: float = 0.0
    kl_temperature: float = 2.0
    kl_chunk_size: int = 1024

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_node(cls, node) -> "CSKVConfig":
        """From a CSKVConfig, a dict, a Hydra/OmegaConf node or None (defaults)."""
        if node is None:
            return cls()
        if isinstance(node, cls):
            return node
        if not isinstance(node, dict):
            try:
                from omegaconf import OmegaConf

                node = OmegaConf.to_container(node, resolve=True)
            except Exception:  # not an OmegaConf node: fall back to its attributes
                node = dict(vars(node))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(node) - known)
        if unknown:
            raise SwiftKVInputError(f"unknown CSKV setting(s) {unknown}: the fields are {sorted(known)}.")
        return cls(**node)

    def validate(self) -> None:
        for name in ("key_density", "value_density"):
            _check_density(name, getattr(self, name))
            per_layer = getattr(self, f"{name}_per_layer")
            if per_layer is not None:
                if not isinstance(per_layer, (list, tuple)) or not per_layer:
                    raise SwiftKVInputError(f"{name}_per_layer={per_layer!r} must be a non-empty list of floats or null.")
                for i, value in enumerate(per_layer):
                    _check_density(f"{name}_per_layer[{i}]", value)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise SwiftKVInputError(f"window={self.window!r} is invalid: the full-precision window needs at least 1 "
                                    "token (the paper uses 32).")
        if self.quant_bits is not None and (isinstance(self.quant_bits, bool) or self.quant_bits not in (2, 4, 8)):
            raise SwiftKVInputError(f"quant_bits={self.quant_bits!r} is not supported: use null (no quantization), "
                                    "2, 4 or 8.")
        if isinstance(self.quant_group_size, bool) or not isinstance(self.quant_group_size, int) \
                or self.quant_group_size < 1:
            raise SwiftKVInputError(f"quant_group_size={self.quant_group_size!r} must be a positive integer (e.g. 32).")
        if self.init not in INITS:
            raise SwiftKVInputError(f"init={self.init!r} is unknown: use one of {INITS}.")
        if not self.asvd_alpha >= 0:
            raise SwiftKVInputError(f"asvd_alpha={self.asvd_alpha!r} must be >= 0 (0.5 in the paper).")
        if isinstance(self.calibration_batches, bool) or not isinstance(self.calibration_batches, int) \
                or self.calibration_batches < 1:
            raise SwiftKVInputError(f"calibration_batches={self.calibration_batches!r} must be a positive integer.")
        if not self.kl_weight >= 0:
            raise SwiftKVInputError(f"kl_weight={self.kl_weight!r} must be >= 0 (0 disables the KL term).")
        if not self.kl_temperature > 0:
            raise SwiftKVInputError(f"kl_temperature={self.kl_temperature!r} must be > 0.")
        if self.fake_quant and self.quant_bits is None:
            raise SwiftKVInputError("fake_quant=true needs quant_bits (2, 4 or 8): there is no quantization to simulate.")

    def densities(self, kind: str, num_layers: int) -> float | list[float]:
        """The model-config value for ``kind`` ("key"/"value"): the per-layer list if given, else the scalar."""
        per_layer = getattr(self, f"{kind}_density_per_layer")
        if per_layer is None:
            return float(getattr(self, f"{kind}_density"))
        if len(per_layer) != num_layers:
            raise SwiftKVInputError(
                f"{kind}_density_per_layer has {len(per_layer)} entries but the model has {num_layers} layers."
            )
        return [float(v) for v in per_layer]


def _check_density(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise SwiftKVInputError(
            f"{name}={value!r} is out of range: a density is the share of K/V channels kept, in (0, 1] "
            "(e.g. 0.2 keeps 20%, an 80% smaller cache)."
        )


# ---- building the student -----------------------------------------------------------------------------------------
def cskv_model_config(source_config, cfg: CSKVConfig) -> LlamaCSKVConfig:
    """A LlamaCSKVConfig with the source's architecture and ``cfg``'s CSKV settings (student mode on)."""
    if getattr(source_config, "model_type", None) != "llama_cskv":
        check_llama_family(source_config, getattr(source_config, "name_or_path", "") or "model")
    layers = source_config.num_hidden_layers
    fields = {k: v for k, v in source_config.to_dict().items() if k not in _DROP_FIELDS}
    fields.update(
        cskv=True,
        cskv_key_density=cfg.densities("key", layers),
        cskv_value_density=cfg.densities("value", layers),
        cskv_window=cfg.window,
        cskv_quant_bits=cfg.quant_bits,
        cskv_quant_group_size=cfg.quant_group_size,
    )
    config = LlamaCSKVConfig(**fields)
    config._attn_implementation = source_config._attn_implementation
    return config


def svd_factors(weight: torch.Tensor, rank: int, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of ``weight [out, in]``: ``A [rank, in]``, ``B [out, rank]`` with ``B @ A ≈ weight``.

    With ``scale [in]`` (ASVD), the SVD is of ``weight · diag(scale)`` and A is multiplied by ``diag(1/scale)``, so the
    error is minimised where the inputs are large. Computed in float64; returned in ``weight``'s dtype.
    """
    w = weight.detach().to(torch.float64)
    if scale is not None:
        s = scale.detach().to(device=w.device, dtype=torch.float64)
        s = s.clamp_min(s.max().clamp_min(1e-30) * 1e-6)  # dead input channels must not divide by 0
        w = w * s
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    root = sigma[:rank].sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root
    if scale is not None:
        a = a / s
    return a.to(weight.dtype), b.to(weight.dtype)


@torch.no_grad()
def init_factors(model: LlamaCSKVForCausalLM, input_scales: list[torch.Tensor] | None = None) -> None:
    """Set every layer's A, B from the SVD of its k/v_proj weight (ASVD when per-layer ``input_scales`` are given)."""
    for idx, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        scale = input_scales[idx] if input_scales is not None else None
        for kind in ("k", "v"):
            down, up = getattr(attn, f"{kind}_proj_a"), getattr(attn, f"{kind}_proj_b")
            a, b = svd_factors(getattr(attn, f"{kind}_proj").weight, down.out_features, scale)
            down.weight.copy_(a)
            up.weight.copy_(b)


@torch.no_grad()
def to_cskv(model: nn.Module, cfg: CSKVConfig) -> LlamaCSKVForCausalLM:
    """A new CSKV student built from a Llama-family ``model`` (which stays usable and unchanged).

    The student shares ``model``'s frozen tensors and adds trainable factors, SVD-initialised from the weights.
    """
    config = cskv_model_config(model.config, cfg)
    source_layers = model.model.layers
    reference = source_layers[0].self_attn.k_proj.weight
    with torch.device("meta"):
        new = LlamaCSKVForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 2)[-2] not in CSKV_FACTOR_NAMES}
    result = new.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise SwiftKVInputError(f"the source model has weights the Llama layout does not: {result.unexpected_keys[:5]}")
    # Non-persistent buffers (RoPE frequencies) are not in the state dict: rebuild them for real.
    new.model.rotary_emb = type(new.model.rotary_emb)(config=config).to(reference.device)
    if config.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
    new.requires_grad_(False)
    for layer in new.model.layers:
        attn = layer.self_attn
        for name in CSKV_FACTOR_NAMES:
            module = getattr(attn, name)
            module.weight = nn.Parameter(
                torch.empty(module.weight.shape, dtype=reference.dtype, device=reference.device), requires_grad=True
            )
    init_factors(new)
    leftover = [name for name, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"to_cskv left tensors uninitialised: {leftover[:5]}")
    new.generation_config = copy.deepcopy(model.generation_config)
    new.config.name_or_path = getattr(model.config, "name_or_path", "")
    return new.train(model.training)


@contextlib.contextmanager
def cskv_mode(model: LlamaCSKVForCausalLM, enabled: bool):
    """Temporarily run ``model`` as the student (True) or the teacher (False)."""
    previous = model.config.cskv
    model.cskv(enabled)
    try:
        yield model
    finally:
        model.cskv(previous)


# ---- calibration --------------------------------------------------------------------------------------------------
def _digest_tensor(h, tensor: torch.Tensor, max_elements: int = 65536) -> None:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // max_elements)
    h.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    h.update(flat[::step].to("cpu", torch.float64).numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """Identity of the weights the calibration statistics depend on (a strided sample of every tensor, + shapes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.rsplit(".", 2)[-2] in CSKV_FACTOR_NAMES:
            continue  # the factors are the result, not an input
        h.update(name.encode())
        _digest_tensor(h, tensor)
    return h.hexdigest()[:16]


def data_fingerprint(batches: list[dict]) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "attention_mask", "position_ids"):
            if batch.get(key) is not None:
                tensor = batch[key]
                h.update(f"{key}{tuple(tensor.shape)}".encode())
                h.update(tensor.detach().to("cpu", torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def collect_input_scales(model: LlamaCSKVForCausalLM, batches: list[dict]) -> list[torch.Tensor]:
    """Mean |x| per input channel of every layer's k/v_proj (one shared input), over the non-padding tokens."""
    sums = [None] * len(model.model.layers)
    counts = [0] * len(model.model.layers)

    def hook_for(idx):
        def hook(module, args):
            x = args[0].detach()
            keep = current_mask
            x = x[keep] if keep is not None else x.reshape(-1, x.shape[-1])
            total = x.abs().to(torch.float64).sum(0)
            sums[idx] = total if sums[idx] is None else sums[idx] + total
            counts[idx] += x.shape[0]
        return hook

    handles = [layer.self_attn.k_proj.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(model.model.layers)]
    try:
        with cskv_mode(model, False):
            for batch in batches:
                current_mask = batch.get("attention_mask")
                current_mask = current_mask.bool() if current_mask is not None else None
                model.model(**_model_inputs(batch), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if any(c == 0 for c in counts):
        raise SwiftKVInputError("the calibration batches hold no (non-padding) tokens.")
    return [(s / c).float().cpu() for s, c in zip(sums, counts)]


def _model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if batch.get(k) is not None}


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# ---- the transformation -------------------------------------------------------------------------------------------
class CSKVTransformation(Transformation):
    name = "cskv"

    def __init__(self, cfg=None, train_cfg=None):
        super().__init__(CSKVConfig.from_node(cfg), train_cfg)
        self.calibration_info: dict = {}

    @staticmethod
    def _unwrap(student) -> LlamaCSKVForCausalLM:
        model = getattr(student, "module", student)  # a DeepSpeed engine wraps the model
        if not isinstance(model, LlamaCSKVForCausalLM):
            raise TypeError(f"expected the CSKV student (LlamaCSKVForCausalLM), got {type(model).__name__}.")
        return model

    def check_model_config(self, config) -> None:
        cskv_model_config(config, self.cfg)  # the checks to_cskv runs first, on the config alone

    def build_student(self, model: nn.Module) -> LlamaCSKVForCausalLM:
        return to_cskv(model, self.cfg)

    # ---- calibration ------------------------------------------------------------------------------------------------
    def calibrate(self, student, batches) -> None:
        """ASVD initialisation from ``calibration_batches`` batches (``init="svd"``: the weight SVD of
        ``build_student`` stays). Results are cached when ``calibration_cache_dir`` is set."""
        model = self._unwrap(student)
        cfg = self.cfg
        if cfg.init == "svd":
            self.calibration_info = {"init": "svd"}
            return
        batches = list(islice(iter(batches), cfg.calibration_batches))
        if not batches:
            raise SwiftKVInputError("ASVD calibration got no batches: give calibration data or use init='svd'.")
        base_key = f"{model_fingerprint(model)}-{data_fingerprint(batches)}"
        ranks = [(layer.self_attn.k_proj_a.out_features, layer.self_attn.v_proj_a.out_features)
                 for layer in model.model.layers]
        settings = hashlib.sha256(f"asvd|{cfg.asvd_alpha}|{ranks}".encode()).hexdigest()[:12]
        cache_dir = Path(cfg.calibration_cache_dir).expanduser() if cfg.calibration_cache_dir else None
        factors_path = cache_dir / f"cskv-factors-{base_key}-{settings}.safetensors" if cache_dir else None
        stats_path = cache_dir / f"cskv-asvd-stats-{base_key}.safetensors" if cache_dir else None
        info = {"init": "asvd", "factors_path": factors_path, "stats_path": stats_path, "factors_cached": False,
                "stats_cached": False, "batches": len(batches)}

        if factors_path is not None and factors_path.is_file():
            self._load_factors(model, load_file(str(factors_path)))
            info["factors_cached"] = True
            self.calibration_info = info
            log.info("CSKV: loaded cached ASVD factors from %s", factors_path)
            return
        if stats_path is not None and stats_path.is_file():
            stats = load_file(str(stats_path))
            scales = [stats[f"layer{i}"] for i in range(len(model.model.layers))]
            info["stats_cached"] = True
        else:
            scales = collect_input_scales(model, batches)
            if stats_path is not None:
                _atomic_save({f"layer{i}": s for i, s in enumerate(scales)}, stats_path, {"key": base_key})
        init_factors(model, [s.pow(cfg.asvd_alpha) for s in scales])
        if factors_path is not None:
            _atomic_save({n: p for n, p in model.cskv_parameters()}, factors_path, {"key": base_key})
        self.calibration_info = info

    @staticmethod
    @torch.no_grad()
    def _load_factors(model: LlamaCSKVForCausalLM, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(model.cskv_parameters())
        if set(tensors) != set(params):
            raise SwiftKVInputError("the cached CSKV factors do not match this model's layout; delete the cache file.")
        for name, param in params.items():
            param.copy_(tensors[name])

    # ---- training ---------------------------------------------------------------------------------------------------
    def loss(self, student, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model = self._unwrap(student)
        cfg = self.cfg
        inputs = _model_inputs(batch)
        input_ids = inputs["input_ids"]
        position_ids = inputs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
        attention_mask = inputs.get("attention_mask")
        keep = attention_mask.bool() if attention_mask is not None else None
        bits, group = model.config.cskv_quant_bits, model.config.cskv_quant_group_size
        fake_quant = cfg.fake_quant and bits is not None
        errors_k: list[torch.Tensor] = []
        errors_v: list[torch.Tensor] = []
        dummy = torch.empty(0, dtype=model.lm_head.weight.dtype, device=input_ids.device)
        cos, sin = model.model.rotary_emb(dummy, position_ids)

        def masked_mse(target, estimate):
            sq = (estimate.float() - target.float()).pow(2)  # [B, S, kv_dim]
            if keep is None:
                return sq.mean()
            return (sq * keep[..., None]).sum() / (keep.sum().clamp_min(1) * sq.shape[-1])

        def key_hook(attn):
            def hook(module, args, output):
                with torch.enable_grad():
                    features = attn.k_proj_a(args[0].detach())
                    if fake_quant:
                        features = straight_through(features, fake_quant_keys(features.detach(), bits, group))
                    estimate = attn.reconstruct_key(features, position_ids, lambda x, p: (cos, sin))
                    shape = (*output.shape[:-1], -1, attn.head_dim)
                    target = apply_rope(output.detach().view(shape).transpose(1, 2), cos, sin)
                    errors_k.append(masked_mse(target.transpose(1, 2).flatten(2), estimate.transpose(1, 2).flatten(2)))
            return hook

        def value_hook(attn):
            def hook(module, args, output):
                with torch.enable_grad():
                    features = attn.v_proj_a(args[0].detach())
                    if fake_quant:
                        features = straight_through(features, fake_quant_values(features.detach(), bits, group))
                    estimate = attn.reconstruct_value(features)
                    errors_v.append(masked_mse(output.detach(), estimate.transpose(1, 2).flatten(2)))
            return hook

        handles = []
        for layer in model.model.layers:
            attn = layer.self_attn
            handles.append(attn.k_proj.register_forward_hook(key_hook(attn)))
            handles.append(attn.v_proj.register_forward_hook(value_hook(attn)))
        try:
            with torch.no_grad(), cskv_mode(model, False):
                teacher = model.model(**inputs, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        recon_k = torch.stack(errors_k).mean()
        recon_v = torch.stack(errors_v).mean()
        total = recon_k + recon_v
        out = {"recon_k": recon_k.detach(), "recon_v": recon_v.detach()}
        if cfg.kl_weight > 0:
            with cskv_mode(model, True):
                student_hidden = model.model(**inputs, use_cache=False, cskv_decode_from=0).last_hidden_state
            kl = chunked_kl_loss(
                student_hidden, teacher.last_hidden_state, model.lm_head.weight, keep,
                temperature=cfg.kl_temperature, chunk_size=cfg.kl_chunk_size,
            )
            total = total + cfg.kl_weight * kl
            out["kl"] = kl.detach()
        out["loss"] = total
        return out

    # ---- evaluation / export ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_and_student_hidden(self, student, batch):
        """Final normed hidden states of the teacher and of the student decoding every position from its compressed
        cache (``cskv_decode_from=0``: keys/values older than the window reconstructed, quantized as in the cache)."""
        model = self._unwrap(student)
        inputs = _model_inputs(batch)
        with cskv_mode(model, False):
            teacher = model.model(**inputs, use_cache=False).last_hidden_state
        with cskv_mode(model, True):
            compressed = model.model(**inputs, use_cache=False, cskv_decode_from=0).last_hidden_state
        return teacher, compressed

    def prepare_export(self, student):
        return self._unwrap(student).cskv(True)


def cskv_parameters(model: LlamaCSKVForCausalLM) -> list[tuple[str, nn.Parameter]]:
    """The factors CSKV adds and trains."""
    return [(n, p) for n, p in model.cskv_parameters() if p.requires_grad]


__all__ = [
    "CSKVConfig",
    "CSKVTransformation",
    "cskv_model_config",
    "cskv_mode",
    "cskv_parameters",
    "collect_input_scales",
    "init_factors",
    "svd_factors",
    "to_cskv",
]
