"""SwiftKV for vLLM's V1 engine (``LlamaSwiftKVForCausalLM``, ``Qwen2SwiftKVForCausalLM``,
``Qwen3SwiftKVForCausalLM``), served through ``swiftkv_train.serving``.

Imported only where vLLM is installed (the plugin registers it lazily, by name). Written against vLLM's public
model interface (decoder layers, ``Attention`` with ``kv_sharing_target_layer_name``, the fast-prefill metadata of
``--kv-sharing-fast-prefill``), tested on vLLM 0.32 (CPU build). The same model as
``remote_code/modeling_llama_swiftkv.py`` in student mode:

- layers ``< M`` are vLLM's own decoder layers of the source family (Llama, Qwen2, Qwen3);
- ``h_M`` (the residual stream entering layer M) gives, for every token of the step, the K/V of every AcrossKV
  group: ``k/v_proj_swiftkv(norm_swiftkv(h_M))`` of the group's leader, RoPE on K. They are written straight into
  the group's paged cache, which is owned by one cache-only attention layer per group
  (``model.layers.<leader>.self_attn.swiftkv_cache``); every later layer's attention reads that cache through
  ``kv_sharing_target_layer_name`` and writes nothing. So vLLM allocates ``M + ceil((L - M) / g)`` caches;
- layers ``>= M`` then run. With ``kv_sharing_fast_prefill=True`` (``--kv-sharing-fast-prefill``; all later
  layers are KV-sharing layers, so vLLM gives them the reduced attention metadata), they run only on the tokens
  whose logits are sampled (the last token of a prompt, decode tokens): the SingleInputKV prefill skip. Without
  it they run on every token (same logits at the sampled positions, no skip).

Weights: the names of our exports and of the published SwiftKV checkpoints (``model.norm_swiftkv``,
``self_attn.{q,k,v}_proj_swiftkv``; Qwen3: ``self_attn.q_norm_swiftkv`` per later layer, ``self_attn.k_norm_swiftkv``
per group, per-head RMSNorms before RoPE; Qwen2: q/k/v with bias). A full export's original q/k/v (and q/k norms) of
the later layers (the teacher's) are not needed by the served student and are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaMLP
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer
from vllm.distributed import get_tensor_model_parallel_world_size

logger = init_logger(__name__)

# model_type -> the architecture that serves it (one per source family)
ARCHITECTURES = {"llama_swiftkv": "LlamaSwiftKVForCausalLM", "qwen2_swiftkv": "Qwen2SwiftKVForCausalLM",
                 "qwen3_swiftkv": "Qwen3SwiftKVForCausalLM"}


class SwiftKVServingError(ValueError):
    """An export this model cannot serve (raised before the engine starts where vLLM allows it)."""


# ---- the layer split, from the config alone ---------------------------------------------------------------------

def layer_split(config) -> tuple[int, int, int]:
    """(L, M, g) of a SwiftKV config, checked."""
    layers = config.num_hidden_layers
    m = getattr(config, "num_key_value_layers", None)
    g = getattr(config, "key_value_group_size", 1) or 1
    if m is None:
        m = layers
    if not 1 <= m <= layers:
        raise SwiftKVServingError(f"num_key_value_layers={m} must be between 1 and num_hidden_layers={layers}")
    if g < 1 or (m < layers and g > layers - m):
        raise SwiftKVServingError(f"key_value_group_size={g} must be between 1 and {layers - m} (the later layers)")
    return layers, m, g


def group_leader(config, layer: int) -> int:
    _, m, g = layer_split(config)
    return m + ((layer - m) // g) * g


def cache_layer_name(prefix: str, leader: int) -> str:
    """Name of the cache-only attention layer that owns one AcrossKV group's paged KV cache."""
    return f"{prefix}.layers.{leader}.self_attn.swiftkv_cache"


# ---- checks before the engine starts ------------------------------------------------------------------------------

def _checkpoint_keys(model_dir: Path) -> set[str] | None:
    """Weight names of a local safetensors checkpoint (headers only), or None where there is nothing to read."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    keys: set[str] = set()
    for path in files:
        with safe_open(str(path), "pt") as f:
            keys.update(f.keys())
    return keys


def check_export(config, model_dir: str | Path | None = None) -> None:
    """Refuse, with one message, what this model cannot serve: another model type, an impossible layer split, or
    (for a local directory) a ``key_value_group_size`` that does not match the K/V projections in the weights."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise SwiftKVServingError(
            f"swiftkv_train's vLLM models serve model_type {', '.join(map(repr, ARCHITECTURES))} exports only; this "
            f"config has model_type {model_type!r}. Serve an unconverted model with vLLM's own classes."
        )
    layers, m, g = layer_split(config)
    if model_dir is None or not Path(model_dir).is_dir():
        return
    keys = _checkpoint_keys(Path(model_dir))
    if keys is None:
        return
    have = sorted({int(k.split(".")[2]) for k in keys
                   if k.startswith("model.layers.") and ".self_attn.k_proj_swiftkv." in k})
    expected = list(range(m, layers, g))
    if have != expected:
        found_g = have[1] - have[0] if len(have) > 1 else None
        raise SwiftKVServingError(
            f"{model_dir}: config.json says num_key_value_layers={m}, key_value_group_size={g}, so the SwiftKV K/V "
            f"projections (self_attn.k_proj_swiftkv) should be in layers {expected}, but the weights hold them in "
            f"layers {have}" + (f" (as for key_value_group_size={found_g})" if found_g else "")
            + ". Fix key_value_group_size / num_key_value_layers in config.json, or re-export."
        )
    missing = [i for i in range(m, layers) if f"model.layers.{i}.self_attn.q_proj_swiftkv.weight" not in keys]
    if missing or "model.norm_swiftkv.weight" not in keys:
        raise SwiftKVServingError(
            f"{model_dir}: not a SwiftKV student checkpoint: missing "
            + (f"q_proj_swiftkv of layers {missing}" if missing else "model.norm_swiftkv.weight")
        )


# ---- modules ------------------------------------------------------------------------------------------------------

class SwiftKVCacheOwner(nn.Module):
    """The paged KV cache of one AcrossKV group: an attention layer that is only written to (never attends)."""

    def __init__(self, vllm_config: VllmConfig, num_heads: int, num_kv_heads: int, head_dim: int, name: str):
        super().__init__()
        self.attn = Attention(
            num_heads, head_dim, head_dim**-0.5, num_kv_heads=num_kv_heads,
            cache_config=vllm_config.cache_config, quant_config=vllm_config.quant_config, prefix=name,
        )

    def write(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store K/V of every token of this step at the slots vLLM's scheduler assigned."""
        attn = self.attn
        unified_kv_cache_update(key.view(-1, attn.num_kv_heads, attn.head_size),
                                value.view(-1, attn.num_kv_heads, attn.head_size_v), attn.layer_name)


def source_family(config) -> str:
    """"llama", "qwen2" or "qwen3": the config class says (``source_family``, see transformers_compat.py)."""
    return getattr(config, "source_family", "llama")


def early_layer(vllm_config: VllmConfig, prefix: str) -> nn.Module:
    """vLLM's own decoder layer of the source family (a layer < M is the source's, unchanged)."""
    family = source_family(vllm_config.model_config.hf_config)
    if family == "llama":
        return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix)
    layer_class = Qwen2DecoderLayer if family == "qwen2" else Qwen3DecoderLayer
    return layer_class(vllm_config.model_config.hf_config, vllm_config.cache_config, vllm_config.quant_config,
                       prefix=prefix)


class SwiftKVAttention(nn.Module):
    """A later layer's attention: its own query (``q_proj_swiftkv``) over its group's shared cache; the group
    leader also holds the group's K/V projection (``kv_proj_swiftkv`` = [k_proj_swiftkv; v_proj_swiftkv]). Qwen2:
    q/k/v with bias (o_proj without); Qwen3: per-head ``q_norm_swiftkv`` / ``k_norm_swiftkv`` before RoPE."""

    def __init__(self, vllm_config: VllmConfig, layer_idx: int, prefix: str, cache_name: str, leader: bool):
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        tp_size = get_tensor_model_parallel_world_size()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
        self.num_heads = self.total_num_heads // tp_size
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.total_num_heads
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False) or getattr(config, "bias", False)
        family = source_family(config)
        qkv_bias = bias or family == "qwen2"

        self.q_proj_swiftkv = ColumnParallelLinear(
            config.hidden_size, self.total_num_heads * self.head_dim, bias=qkv_bias, gather_output=False,
            quant_config=quant_config, prefix=f"{prefix}.q_proj_swiftkv",
        )
        self.q_norm_swiftkv = self.k_norm_swiftkv = None
        if family == "qwen3":
            self.q_norm_swiftkv = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        if leader:
            self.kv_proj_swiftkv = QKVParallelLinear(
                hidden_size=config.hidden_size, head_size=self.head_dim, total_num_heads=0,
                total_num_kv_heads=self.total_num_kv_heads, bias=qkv_bias, quant_config=quant_config,
                prefix=f"{prefix}.kv_proj_swiftkv",
            )
            if family == "qwen3":
                self.k_norm_swiftkv = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim, config.hidden_size, bias=bias, quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim, max_position=getattr(config, "max_position_embeddings", 8192),
            rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True,
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
            kv_sharing_target_layer_name=cache_name,
        )

    def _per_head(self, norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        """Qwen3's per-head RMSNorm on [tokens, heads * head_dim] (identity without a norm)."""
        if norm is None:
            return x
        return norm(x.reshape(*x.shape[:-1], -1, self.head_dim).contiguous()).view(x.shape)

    def key_value(self, positions: torch.Tensor, kv_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K (per-head normed for Qwen3, RoPE applied) and V of this group for ``kv_input = norm_swiftkv(h_M)``,
        each [tokens, kv_size]."""
        kv, _ = self.kv_proj_swiftkv(kv_input)
        key, value = kv.split([self.kv_size, self.kv_size], dim=-1)
        key, _ = self.rotary_emb(positions, self._per_head(self.k_norm_swiftkv, key.contiguous()))
        return key, value.contiguous()

    def forward(self, positions, hidden_states, key, value):
        query, _ = self.q_proj_swiftkv(hidden_states)
        query, _ = self.rotary_emb(positions, self._per_head(self.q_norm_swiftkv, query))
        out = self.attn(query, key, value)  # a KV-sharing layer: reads the group's cache, writes nothing
        out, _ = self.o_proj(out)
        return out


class SwiftKVDecoderLayer(nn.Module):
    """A later layer (``>= M``): Llama's layer (the same for Qwen2 / Qwen3) with SwiftKV attention."""

    def __init__(self, vllm_config: VllmConfig, layer_idx: int, prefix: str, cache_name: str, leader: bool):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.self_attn = SwiftKVAttention(vllm_config, layer_idx, f"{prefix}.self_attn", cache_name, leader)
        self.mlp = LlamaMLP(
            hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
            bias=getattr(config, "mlp_bias", False), prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual, key, value):
        hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, key, value)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


def _fast_prefill_indices(layer_name: str) -> tuple[torch.Tensor, int] | None:
    """(logits indices, how many are real) when vLLM armed the KV-sharing fast prefill for this step, else None
    (fast prefill off, a pure-decode step, or a dummy/profiling run)."""
    attn_metadata = get_forward_context().attn_metadata
    if isinstance(attn_metadata, list):  # speculative decoding: [0] is the base model's
        attn_metadata = attn_metadata[0] if attn_metadata else None
    if not isinstance(attn_metadata, dict):
        return None
    meta = attn_metadata.get(layer_name)
    indices = getattr(meta, "logits_indices_padded", None)
    count = getattr(meta, "num_logits_indices", None)
    if indices is None or count is None:
        return None
    return indices, int(count)


class LlamaSwiftKVModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        check_export(config)
        self.config = config
        layers, m, g = layer_split(config)
        self.num_layers, self.num_key_value_layers, self.group_size = layers, m, g
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config)
        early = [early_layer(vllm_config, f"{prefix}.layers.{i}") for i in range(m)]
        self.leaders = list(range(m, layers, g))
        # Every group's cache owner is built before any later layer: then all later attention layers come last in
        # vLLM's layer order and all are KV-sharing, so all are eligible for --kv-sharing-fast-prefill.
        probe = early[0].self_attn
        self.swiftkv_cache = nn.ModuleList([
            SwiftKVCacheOwner(vllm_config, probe.num_heads, probe.num_kv_heads, probe.head_dim,
                              cache_layer_name(prefix, leader))
            for leader in self.leaders
        ])
        later = [
            SwiftKVDecoderLayer(vllm_config, i, f"{prefix}.layers.{i}",
                                cache_layer_name(prefix, group_leader(config, i)), leader=(i - m) % g == 0)
            for i in range(m, layers)
        ]
        self.layers = nn.ModuleList(early + later)
        self.norm_swiftkv = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.fast_prefill = bool(vllm_config.cache_config.kv_sharing_fast_prefill)
        # Tokens through layers < M and through layers >= M, summed over forwards with attention metadata (host
        # ints; read with LLM.apply_model): their ratio shows the prefill skip.
        self.token_counts = {"all_layers_input": 0, "later_layers_input": 0}

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, inputs_embeds=None) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        m = self.num_key_value_layers
        for layer in self.layers[:m]:
            hidden_states, residual = layer(positions, hidden_states, residual)
        if m == self.num_layers:
            hidden_states, _ = self.norm(hidden_states, residual)
            return hidden_states

        # SingleInputKV: every group's K/V for every token of the step, from h_M alone, into the group's cache.
        h_m = hidden_states + residual
        kv_input = self.norm_swiftkv(h_m)
        group_kv = []
        for leader, owner in zip(self.leaders, self.swiftkv_cache):
            key, value = self.layers[leader].self_attn.key_value(positions, kv_input)
            owner.write(key, value)
            group_kv.append((key, value))

        # The prefill skip: the later layers only on the tokens whose logits are sampled.
        selected = _fast_prefill_indices(self.layers[-1].self_attn.attn.layer_name) if self.fast_prefill else None
        full_hidden = None
        if selected is not None:
            indices, count = selected
            indices = indices[:count]
            full_hidden = h_m  # positions that are not sampled keep any finite value
            hidden_states, residual, positions = hidden_states[indices], residual[indices], positions[indices]
            group_kv = [(k[indices], v[indices]) for k, v in group_kv]

        if get_forward_context().attn_metadata is not None:  # not a dummy/profiling run
            self.token_counts["all_layers_input"] += h_m.shape[0]
            self.token_counts["later_layers_input"] += hidden_states.shape[0]
        for i, layer in enumerate(self.layers[m:]):
            key, value = group_kv[i // self.group_size]
            hidden_states, residual = layer(positions, hidden_states, residual, key, value)
        hidden_states, _ = self.norm(hidden_states, residual)
        if full_hidden is not None:
            out = torch.zeros_like(full_hidden)
            out[indices] = hidden_states
            return out
        return hidden_states


def token_counts(model: nn.Module) -> dict | None:
    """The model's token counts (``LLM.apply_model(token_counts)``: a module-level function, pickled by name), or
    None for a model that is not ours."""
    counts = getattr(getattr(model, "model", None), "token_counts", None)
    return dict(counts) if counts is not None else None


# A later layer's weights only the teacher uses (a full export holds them).
TEACHER_ONLY = ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm")


class LlamaSwiftKVForCausalLM(nn.Module):
    """vLLM's entry class for ``architectures: ["LlamaSwiftKVForCausalLM"]`` (lean and full exports); the Qwen2 /
    Qwen3 ones below are the same class (the config's family picks the layers)."""

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
        "kv_proj_swiftkv": ["k_proj_swiftkv", "v_proj_swiftkv"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        if not getattr(config, "swiftkv", True):
            logger.info("%s: config.swiftkv is False (teacher mode in transformers); vLLM serves the SwiftKV "
                        "student, the original later-layer projections are not loaded", type(self).__name__)
        self.model = LlamaSwiftKVModel(vllm_config=vllm_config, prefix=f"{prefix}.model" if prefix else "model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=f"{prefix}.lm_head" if prefix else "lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))

    @classmethod
    def verify_and_update_model_config(cls, model_config) -> None:
        """Before the engine starts (vLLM's config hook, wired by swiftkv_train's plugin): refuse an export this
        class cannot serve, with one message."""
        check_export(model_config.hf_config, model_config.model)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        if intermediate_tensors is not None:
            raise NotImplementedError(f"{type(self).__name__} does not support pipeline parallelism")
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        config = self.config
        layers, m, g = layer_split(config)
        params = dict(self.named_parameters())
        stacked = [
            (".qkv_proj.", ".q_proj.", "q"), (".qkv_proj.", ".k_proj.", "k"), (".qkv_proj.", ".v_proj.", "v"),
            (".gate_up_proj.", ".gate_proj.", 0), (".gate_up_proj.", ".up_proj.", 1),
            (".kv_proj_swiftkv.", ".k_proj_swiftkv.", "k"), (".kv_proj_swiftkv.", ".v_proj_swiftkv.", "v"),
        ]
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb." in name:
                continue
            if name.startswith("lm_head.") and config.tie_word_embeddings:
                continue
            layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
            if layer is not None and layer >= m and any(f".self_attn.{p}." in name for p in TEACHER_ONLY):
                continue  # a full export's original (teacher) projections / norms of a later layer: not served
            for param_name, weight_name, shard in stacked:
                if weight_name not in name:
                    continue
                target = name.replace(weight_name, param_name)
                if target not in params:
                    raise SwiftKVServingError(
                        f"checkpoint weight {name} has no place in the model (num_key_value_layers={m}, "
                        f"key_value_group_size={g}): the config does not match the weights"
                    )
                params[target].weight_loader(params[target], tensor, shard)
                loaded.add(target)
                break
            else:
                if name not in params:
                    raise SwiftKVServingError(
                        f"checkpoint weight {name} has no place in the model (num_key_value_layers={m}, "
                        f"key_value_group_size={g}): the config does not match the weights"
                    )
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        if config.tie_word_embeddings:
            loaded |= {n for n in params if n.startswith("lm_head.")}
        return loaded


class Qwen2SwiftKVForCausalLM(LlamaSwiftKVForCausalLM):
    """``architectures: ["Qwen2SwiftKVForCausalLM"]``: a Qwen2 / Qwen2.5 source's SwiftKV export."""


class Qwen3SwiftKVForCausalLM(LlamaSwiftKVForCausalLM):
    """``architectures: ["Qwen3SwiftKVForCausalLM"]``: a Qwen3 source's SwiftKV export."""
