"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (per-head q/k RMSNorms) sources: tiny random models built here, checked
against transformers' own Qwen2ForCausalLM / Qwen3ForCausalLM and against a plain-PyTorch SwiftKV written here.

The generic per-method tests (shares tensors, original mode == source, export, loss falls) run on these families
too: tests/test_methods.py's family axis.
"""

import copy
import json
import math

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from swiftkv_train.cache_stats import cache_nbytes
from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.export import save_hf
from swiftkv_train.methods import METHODS, method_of
from swiftkv_train.methods.swiftkv import swiftkv_parameters, to_swiftkv
from swiftkv_train.models.loading import check_llama_family
from swiftkv_train.models.tiny import byte_tokenizer

from helpers import one_thread, run_loader  # noqa: F401 - autouse: every test here runs on one thread

FAMILIES = ("qwen2", "qwen3")


def qwen(family: str, layers: int = 7, seed: int = 0, **overrides):
    """A tiny random Qwen2 / Qwen3 with random norms and biases (zero / one at init: they would test nothing)."""
    fields = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, pad_token_id=256, bos_token_id=257, eos_token_id=258)
    if family == "qwen3":
        fields["head_dim"] = 24  # != hidden / heads: the per-head norms' size comes from head_dim
    fields.update(overrides)
    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (Qwen3Config,
                                                                                         Qwen3ForCausalLM)
    torch.manual_seed(seed)
    model = model_class(config_class(**fields))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.2)
            elif name.endswith("weight"):
                param.normal_(0.0, 0.08)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def prompt(batch=2, length=11, seed=1):
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


def perturb(student, scale=0.1, seed=3):
    """Move the SwiftKV weights off their init, so the student differs from the teacher."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in swiftkv_parameters(student):
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return student


# ---------------------------------------------------------------- loading: families accepted, sliding window refused


@pytest.mark.parametrize("family", FAMILIES)
def test_sliding_window_source_is_refused_naming_the_layer(family):
    config = qwen(family, layers=4).config
    check_llama_family(config, "tiny")  # full attention (the default): accepted
    sliding = type(config)(**{**config.to_dict(), "use_sliding_window": True, "sliding_window": 8,
                              "max_window_layers": 2, "layer_types": None})
    assert sliding.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    with pytest.raises(SwiftKVInputError, match=r"sliding-window attention in layer 2 .*use_sliding_window=True, "
                                                r"sliding_window=8, max_window_layers=2.*use_sliding_window=false"):
        check_llama_family(sliding, "tiny")
    with pytest.raises(SwiftKVInputError, match="sliding-window attention in layer 2"):
        METHODS["swiftkv"]({"num_key_value_layers": 2}).check_model_config(sliding)


# ---------------------------------------------------------------- SwiftKV: the model classes and its layout


@pytest.mark.parametrize("family", FAMILIES)
def test_swiftkv_model_type_and_weights_follow_the_published_layout(family):
    student = to_swiftkv(qwen(family), 3, 2)
    assert student.config.model_type == f"{family}_swiftkv" and method_of(student) is METHODS["swiftkv"]
    assert type(student).__name__ == f"{family.capitalize()}SwiftKVForCausalLM"
    names = dict(student.named_parameters())
    # bias where the source's q/k/v have one (Qwen2 always, Qwen3 never by default)
    assert ("model.layers.3.self_attn.k_proj_swiftkv.bias" in names) == (family == "qwen2")
    assert ("model.layers.4.self_attn.q_proj_swiftkv.bias" in names) == (family == "qwen2")
    assert "model.layers.4.self_attn.k_proj_swiftkv.weight" not in names  # second member of the first group
    # ArcticTraining's Qwen3 SwiftKV names: q_norm_swiftkv per later layer, k_norm_swiftkv per group
    assert ("model.layers.4.self_attn.q_norm_swiftkv.weight" in names) == (family == "qwen3")
    assert ("model.layers.5.self_attn.k_norm_swiftkv.weight" in names) == (family == "qwen3")
    assert "model.layers.6.self_attn.k_norm_swiftkv.weight" not in names
    assert "model.layers.2.self_attn.q_norm_swiftkv.weight" not in names


def test_qwen3_norms_initialised_from_the_source():
    source = qwen("qwen3")
    student = to_swiftkv(source, 3, 2)  # groups (3, 4), (5, 6)
    src = source.model.layers
    for idx in range(3, 7):
        attn = student.model.layers[idx].self_attn
        assert torch.equal(attn.q_norm_swiftkv.weight, src[idx].self_attn.q_norm.weight)
        assert attn.q_norm_swiftkv.weight.requires_grad
    for leader in (3, 5):
        want = (src[leader].self_attn.k_norm.weight + src[leader + 1].self_attn.k_norm.weight) / 2
        torch.testing.assert_close(student.model.layers[leader].self_attn.k_norm_swiftkv.weight, want)
    # g = 1: each layer's own k_norm
    single = to_swiftkv(source, 3, 1)
    assert torch.equal(single.model.layers[4].self_attn.k_norm_swiftkv.weight, src[4].self_attn.k_norm.weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_swiftkv_off_equals_transformers_qwen_with_and_without_cache(family):
    source = qwen(family)
    student = perturb(to_swiftkv(source, 3, 2)).swiftkv(False)
    ids = prompt()
    with torch.no_grad():
        torch.testing.assert_close(student(ids, use_cache=False).logits, source(ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
        want = source.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        got = student.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- SwiftKV: against a plain-PyTorch reference


def ref_rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def ref_rope(x, theta):
    """x [B, H, S, D] at positions 0..S-1: pairs (i, i + D/2) rotated by pos * theta^(-2i/D)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(x.shape[2]).float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def ref_linear(x, lin):
    return x @ lin.weight.T + (lin.bias if lin.bias is not None else 0)


def ref_heads(x, d, norm_weight, eps):
    """[B, S, H*D] -> [B, H, S, D], RMS-normed per head first where the layer has a norm (Qwen3)."""
    x = x.view(*x.shape[:2], -1, d)
    if norm_weight is not None:
        x = ref_rms(x, norm_weight, eps)
    return x.transpose(1, 2)


def norm_weight(attn, name):
    """The weight of the per-head norm ``name`` (Qwen3), None where the layer has none (Qwen2)."""
    return getattr(attn, name).weight if hasattr(attn, name) else None


def ref_attention(q, k, v):
    """Causal softmax attention, K/V heads repeated for GQA: [B, H, S, D] -> [B, S, H*D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], s, -1)


def reference_swiftkv_logits(student, ids):
    """SwiftKV written out from the student's weights: layers < M as the source; at M, each AcrossKV group's K/V from
    norm_swiftkv(h_M) (k_norm_swiftkv per head for Qwen3, then RoPE); every later layer's query from
    q_proj_swiftkv (q_norm_swiftkv), attending to its group's K/V."""
    c = student.config
    eps, theta, d = c.rms_norm_eps, c.rope_parameters["rope_theta"], c.head_dim
    m, g, layers = c.num_key_value_layers, c.key_value_group_size, c.num_hidden_layers
    model = student.model
    h = model.embed_tokens.weight[ids]
    shared = {}
    for idx in range(layers):
        layer = model.layers[idx]
        attn = layer.self_attn
        if idx == m:
            x = ref_rms(h, model.norm_swiftkv.weight, eps)
            for leader in range(m, layers, g):
                la = model.layers[leader].self_attn
                k_norm = norm_weight(la, "k_norm_swiftkv")
                shared[leader] = (ref_rope(ref_heads(ref_linear(x, la.k_proj_swiftkv), d, k_norm, eps), theta),
                                  ref_heads(ref_linear(x, la.v_proj_swiftkv), d, None, eps))
        a = ref_rms(h, layer.input_layernorm.weight, eps)
        if idx < m:
            q = ref_heads(ref_linear(a, attn.q_proj), d, norm_weight(attn, "q_norm"), eps)
            k = ref_heads(ref_linear(a, attn.k_proj), d, norm_weight(attn, "k_norm"), eps)
            k, v = ref_rope(k, theta), ref_heads(ref_linear(a, attn.v_proj), d, None, eps)
        else:
            q = ref_heads(ref_linear(a, attn.q_proj_swiftkv), d, norm_weight(attn, "q_norm_swiftkv"), eps)
            k, v = shared[m + (idx - m) // g * g]
        h = h + ref_linear(ref_attention(ref_rope(q, theta), k, v), attn.o_proj)
        b = ref_rms(h, layer.post_attention_layernorm.weight, eps)
        mlp = layer.mlp
        h = h + ref_linear(torch.nn.functional.silu(ref_linear(b, mlp.gate_proj)) * ref_linear(b, mlp.up_proj),
                           mlp.down_proj)
    return ref_linear(ref_rms(h, model.norm.weight, eps), student.lm_head)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("m,g", [(3, 1), (3, 2), (2, 3)])
def test_student_equals_plain_torch_reference(family, m, g):
    student = perturb(to_swiftkv(qwen(family), m, g))
    ids = prompt()
    with torch.no_grad():
        got = student(ids, use_cache=False).logits
        want = reference_swiftkv_logits(student, ids)
        teacher = student.swiftkv(False)(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - teacher).abs().max() > 1e-2  # the student differs from the teacher: the check is not vacuous


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("g", [1, 2, 3])  # 4 later layers: g=3 is ragged (groups of 3 and 1)
def test_cached_generation_equals_recomputation(family, g):
    student = perturb(to_swiftkv(qwen(family), 3, g), scale=0.2)
    ids = prompt(length=9)
    with torch.no_grad():
        out = student.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        seq, logits = ids, []
        for _ in range(6):
            last = student(seq, use_cache=False).logits[:, -1]
            logits.append(last)
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, seq)
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(logits, 1), rtol=1e-4, atol=1e-4)
    assert len(set(seq[:, 9:].flatten().tolist())) > 2  # generation varies: the check is not vacuous


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("g", [1, 2, 3])
def test_kv_cache_bytes_shrink_by_expected_fraction(family, g):
    source = qwen(family)  # 7 layers, M=3: 4 later layers
    ids = prompt(length=16)
    with torch.no_grad():
        full, small = DynamicCache(), DynamicCache()
        source(ids, past_key_values=full, use_cache=True)
        to_swiftkv(source, 3, g)(ids, past_key_values=small, use_cache=True, logits_to_keep=1)
    head_dim = source.model.layers[0].self_attn.head_dim
    per_layer = 2 * 2 * source.config.num_key_value_heads * 16 * head_dim * 4  # K+V, batch 2, fp32
    assert cache_nbytes(full) == 7 * per_layer
    assert cache_nbytes(small) == (3 + math.ceil(4 / g)) * per_layer


# ---------------------------------------------------------------- SwiftKV: exports


@pytest.mark.parametrize("family", FAMILIES)
def test_swiftkv_exports_load_without_the_package(family, tmp_path):
    student = perturb(to_swiftkv(qwen(family), 3, 2))
    tok = byte_tokenizer()
    full = save_hf(student, tok, tmp_path / "full", lean=False)
    config = json.loads((full / "config.json").read_text())
    name = f"{family.capitalize()}SwiftKV"
    assert config["model_type"] == f"{family}_swiftkv"
    assert config["auto_map"] == {"AutoConfig": f"configuration_llama_swiftkv.{name}Config",
                                  "AutoModelForCausalLM": f"modeling_llama_swiftkv.{name}ForCausalLM"}
    result = run_loader(full, tmp_path / "a", "float32", teacher=True)
    assert result["class"] == f"{name}ForCausalLM" and result["module"].startswith("transformers_modules")
    with torch.no_grad():
        want = student.swiftkv(True)(result["ids"]).logits
        want_teacher = student.swiftkv(False)(result["ids"]).logits
        want_gen = student.swiftkv(True).generate(result["ids"], max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(result["logits"], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(result["teacher_logits"], want_teacher, rtol=0, atol=1e-5)
    assert torch.equal(result["generated"], want_gen)

    lean = save_hf(student, tok, tmp_path / "lean", lean=True)
    result = run_loader(lean, tmp_path / "b", "float32")
    reference = copy.deepcopy(student)
    for param in reference.parameters():  # the lean export is bf16: the same rounding
        param.data = param.data.to(torch.bfloat16).float()
    with torch.no_grad():
        want = reference.swiftkv(True)(result["ids"]).logits
    torch.testing.assert_close(result["logits"], want, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- the trainer, every method, on a tiny Qwen

# method -> (source preset, its settings for a 64-wide model)
TRAINER_CASES = {
    "swiftkv": ("tiny-qwen2", ["transform.swiftkv.num_key_value_layers=2"]),
    "cskv": ("tiny-qwen3", ["transform.cskv.key_density=0.25", "transform.cskv.value_density=0.5"]),
    "locret": ("tiny-qwen3", ["transform.locret.head_hidden_size=16", "transform.locret.budget=64",
                              "transform.locret.chunk_size=16", "transform.locret.stabilizers=4",
                              "transform.locret.n_local=4", "data.pack=false"]),
}


def make_cfg(run_dir, *overrides, recipe="tiny_cpu_test"):
    from hydra import compose, initialize_config_module

    from swiftkv_train.config import register_schemas

    register_schemas()
    with initialize_config_module("swiftkv_train.recipes", version_base="1.3"):
        return compose("config", overrides=[f"recipe={recipe}", f"run_dir={run_dir}",
                                            "launcher.init_timeout_minutes=2", *overrides])


def test_qwen_recipe_composes(tmp_path):
    cfg = make_cfg(tmp_path, recipe="qwen2_5_7b_swiftkv")
    sw = cfg.transform.swiftkv
    assert (cfg.model.spec, sw.num_key_value_layers, sw.key_value_group_size, cfg.deepspeed.zero_stage,
            cfg.data.max_length, cfg.trainer.lr) == ("Qwen/Qwen2.5-7B-Instruct", 14, 1, 2, 8192, 2e-4)
    random = make_cfg(tmp_path, "model=qwen2_5_7b_random", recipe="qwen2_5_7b_swiftkv")
    assert random.model.spec == "random:qwen2.5-7b-shape"
    from swiftkv_train.models.loading import load_model_config

    shape = load_model_config(random.model.spec)  # Qwen2.5-7B-Instruct's config.json, random weights
    assert (shape.model_type, shape.num_hidden_layers, shape.hidden_size, shape.intermediate_size,
            shape.num_attention_heads, shape.num_key_value_heads, shape.vocab_size) == (
        "qwen2", 28, 3584, 18944, 28, 4, 152064)
    METHODS["swiftkv"]({"num_key_value_layers": 14}).check_model_config(shape)


@pytest.mark.parametrize("name", sorted(TRAINER_CASES))
def test_trainer_runs_each_method_on_a_tiny_qwen_and_the_loss_falls(name, tmp_path):
    from swiftkv_train.train.trainer import run_training

    preset, settings = TRAINER_CASES[name]
    summary = run_training(make_cfg(tmp_path, f"model.spec=random:{preset}", f"transform={name}", *settings,
                                    "trainer.max_steps=8", "trainer.save_every=0", "trainer.export=lean"))
    # the held-out numbers, same batches before and after: the KL to the teacher where the method changes the
    # outputs (SwiftKV, CSKV), else the method's own loss (Locret's heads)
    start, end = summary["evals"]["start"], summary["evals"]["end"]
    key = "kl" if "kl" in start else "loss"
    assert end[key] < start[key], (start, end)
    config = json.loads((tmp_path / "export" / "lean" / "config.json").read_text())
    assert config["model_type"] == f"{preset.split('-')[1]}_{name}"
