"""The SwiftKV model against transformers' Llama and against a plain-PyTorch reference written here."""

import math

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from swiftkv_train.cache_stats import cache_nbytes
from swiftkv_train.models import load_pretrained
from swiftkv_train.methods.swiftkv import swiftkv_parameters, to_swiftkv

torch.manual_seed(0)


def tiny(preset="tiny"):
    return load_pretrained(f"random:{preset}")[0]


def prompt(batch=2, length=11, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=gen)


# ---------------------------------------------------------------- plain PyTorch reference


def ref_rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def ref_rope(x, pos, theta):
    # x: [B, H, S, D]; rotate pairs (i, i + D/2) by pos * theta^(-2i/D).
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos[:, None].float() * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def ref_attention(q, k, v):
    # q: [B, Hq, S, D], k/v: [B, Hkv, S, D]; causal, GQA by repeating K/V heads.
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = q.shape[2]
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def reference_logits(model, ids, m=None, g=1):
    """Llama forward written from the equations; with m set, layers >= m use SwiftKV K/V from h_m."""
    sd = {k: v.float() for k, v in model.state_dict().items()}
    cfg = model.config
    eps, theta = cfg.rms_norm_eps, cfg.rope_parameters["rope_theta"]
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    b, s = ids.shape
    pos = torch.arange(s)

    def heads(x, n):
        return x.view(b, s, n, d).transpose(1, 2)

    h = sd["model.embed_tokens.weight"][ids]
    shared = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        if m is not None and i == m:
            x_kv = ref_rms(h, sd["model.norm_swiftkv.weight"], eps)
            for leader in range(m, cfg.num_hidden_layers, g):
                a = f"model.layers.{leader}.self_attn."
                k = ref_rope(heads(x_kv @ sd[a + "k_proj_swiftkv.weight"].T, hkv), pos, theta)
                shared[leader] = (k, heads(x_kv @ sd[a + "v_proj_swiftkv.weight"].T, hkv))
        x = ref_rms(h, sd[p + "input_layernorm.weight"], eps)
        if m is not None and i >= m:
            q = heads(x @ sd[p + "self_attn.q_proj_swiftkv.weight"].T, hq)
            k, v = shared[m + (i - m) // g * g]
        else:
            q = heads(x @ sd[p + "self_attn.q_proj.weight"].T, hq)
            k = ref_rope(heads(x @ sd[p + "self_attn.k_proj.weight"].T, hkv), pos, theta)
            v = heads(x @ sd[p + "self_attn.v_proj.weight"].T, hkv)
        q = ref_rope(q, pos, theta)
        att = ref_attention(q, k, v).transpose(1, 2).reshape(b, s, hq * d)
        h = h + att @ sd[p + "self_attn.o_proj.weight"].T
        x = ref_rms(h, sd[p + "post_attention_layernorm.weight"], eps)
        gate, up = x @ sd[p + "mlp.gate_proj.weight"].T, x @ sd[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    h = ref_rms(h, sd["model.norm.weight"], eps)
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return h @ head.T


def perturb_swiftkv_weights(model, scale=0.05, seed=3):
    """Move the SwiftKV weights off their initial copies, so a wrong wiring cannot pass by coincidence."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in swiftkv_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


# ---------------------------------------------------------------- teacher mode == transformers' Llama


@pytest.mark.parametrize("preset", ["tiny", "tiny-mha", "smollm2-tiny"])
def test_swiftkv_off_equals_hf_llama(preset):
    base = tiny(preset)
    student = to_swiftkv(base, base.config.num_hidden_layers // 2).swiftkv(False)
    ids = prompt()
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, base(ids).logits, rtol=0, atol=1e-6)
        # reference implementation agrees with transformers too (validates the reference itself)
        torch.testing.assert_close(reference_logits(base, ids), base(ids).logits, rtol=1e-4, atol=1e-4)


def test_swiftkv_off_equals_hf_llama_with_cache():
    base = tiny()
    student = to_swiftkv(base, 2).swiftkv(False)
    ids = prompt(length=9)
    with torch.no_grad():
        cache_a, cache_b = DynamicCache(), DynamicCache()
        a = student(ids[:, :6], past_key_values=cache_a, use_cache=True).logits
        b = base(ids[:, :6], past_key_values=cache_b, use_cache=True).logits
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        for t in range(6, 9):
            a = student(ids[:, t : t + 1], past_key_values=cache_a, use_cache=True).logits
            b = base(ids[:, t : t + 1], past_key_values=cache_b, use_cache=True).logits
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_all_layers_kept_equals_original():
    base = tiny()
    ids = prompt()
    student = to_swiftkv(base, base.config.num_hidden_layers)
    assert student.config.swiftkv and swiftkv_parameters(student) == []
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, base(ids).logits, rtol=0, atol=1e-6)
        out = student.generate(ids, max_new_tokens=5, do_sample=False)
        ref = base.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------- student == independent reference


@pytest.mark.parametrize("preset,m,g", [("tiny", 2, 1), ("tiny", 1, 3), ("tiny-7l", 2, 2), ("tiny-7l", 2, 3),
                                         ("tiny-mha", 2, 2), ("smollm2-tiny", 3, 1)])
def test_student_equals_reference(preset, m, g):
    base = tiny(preset)
    student = perturb_swiftkv_weights(to_swiftkv(base, m, g))
    ids = prompt()
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, reference_logits(student, ids, m, g), rtol=1e-4, atol=1e-4)


def test_initialisation_follows_reference_recipe():
    base = tiny("tiny-7l")
    m, g = 2, 3
    student = to_swiftkv(base, m, g)
    layers = student.model.layers
    assert torch.equal(student.model.norm_swiftkv.weight, base.model.layers[m].input_layernorm.weight)
    for i in range(m, 7):
        assert torch.equal(layers[i].self_attn.q_proj_swiftkv.weight, base.model.layers[i].self_attn.q_proj.weight)
    for leader, group in ((2, [2, 3, 4]), (5, [5, 6])):  # 5 later layers, g=3: groups of 3 and 2 (ragged)
        for name in ("k_proj", "v_proj"):
            mean = torch.stack([getattr(base.model.layers[i].self_attn, name).weight for i in group]).mean(0)
            torch.testing.assert_close(getattr(layers[leader].self_attn, f"{name}_swiftkv").weight, mean)
        for member in group[1:]:
            assert not hasattr(layers[member].self_attn, "k_proj_swiftkv")
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in swiftkv_parameters(student)}
    assert len(trainable) == 1 + 5 + 2 * 2  # norm, 5 q projections, k/v of 2 groups


def test_conversion_leaves_source_unchanged_and_shares_frozen_weights():
    base = tiny()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    grads_before = {n: p.requires_grad for n, p in base.named_parameters()}
    student = to_swiftkv(base, 2)
    with torch.no_grad():
        for _, p in swiftkv_parameters(student):
            p.mul_(3.0)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert grads_before == {n: p.requires_grad for n, p in base.named_parameters()}
    assert isinstance(base, LlamaForCausalLM) and not hasattr(base.model, "norm_swiftkv")
    # the frozen MLP weight is the same storage: no second copy in memory
    assert (
        student.model.layers[0].mlp.up_proj.weight.data_ptr() == base.model.layers[0].mlp.up_proj.weight.data_ptr()
    )


# ---------------------------------------------------------------- cached generation and prefill skip


def greedy_without_cache(model, ids, steps):
    seq = ids
    step_logits = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(seq, use_cache=False).logits[:, -1]
        step_logits.append(logits)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq, torch.stack(step_logits, 1)


@pytest.mark.parametrize("g", [1, 2, 3])
def test_cached_generation_equals_recomputation(g):
    base = tiny("tiny-7l")
    student = perturb_swiftkv_weights(to_swiftkv(base, 2, g), scale=0.2)
    ids = prompt(batch=2, length=10)
    with torch.no_grad():
        out = student.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    seq, logits = greedy_without_cache(student, ids, 8)
    assert torch.equal(out.sequences, seq)
    torch.testing.assert_close(torch.stack(out.logits, 1), logits, rtol=1e-4, atol=1e-4)
    assert len(set(seq[:, 10:].flatten().tolist())) > 2  # the check is not vacuous: generation varies


def count_tokens_through_layers(model):
    counts = {}
    hooks = [
        layer.mlp.register_forward_hook(
            lambda mod, inp, out, i=i: counts.__setitem__(i, counts.get(i, 0) + inp[0].shape[1])
        )
        for i, layer in enumerate(model.model.layers)
    ]
    return counts, hooks


def test_prefill_runs_later_layers_on_last_token_only():
    base = tiny("tiny-7l")
    student = perturb_swiftkv_weights(to_swiftkv(base, 3))
    ids = prompt(batch=1, length=12)
    counts, hooks = count_tokens_through_layers(student)
    with torch.no_grad():
        cache = DynamicCache()
        student(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        assert counts == {0: 12, 1: 12, 2: 12, 3: 1, 4: 1, 5: 1, 6: 1}
        assert cache.get_seq_length() == 12 and cache.layers[3].keys.shape[2] == 12
        counts.clear()
        student(ids, use_cache=False)  # all positions' logits: every layer sees every token
        assert set(counts.values()) == {12}
        counts.clear()
        student.generate(ids, max_new_tokens=3, do_sample=False)  # generate uses the skip path
        assert counts[6] == 1 + 2 and counts[0] == 12 + 2
    for h in hooks:
        h.remove()


def test_chunked_prefill_with_skip_equals_full():
    base = tiny("tiny-7l")
    student = perturb_swiftkv_weights(to_swiftkv(base, 3, 2))
    ids = prompt(batch=1, length=15)
    with torch.no_grad():
        cache = DynamicCache()
        for start, end in ((0, 6), (6, 11), (11, 15)):  # prompt in 3 chunks, each keeping only the last logits
            last = student(ids[:, start:end], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        full = student(ids, use_cache=False).logits[:, -1:]
    torch.testing.assert_close(last, full, rtol=1e-4, atol=1e-4)


def test_left_padded_batch_matches_single_prompts():
    base = tiny("tiny-7l")
    student = perturb_swiftkv_weights(to_swiftkv(base, 2, 2), scale=0.2)
    pad = 256
    short, long = prompt(1, 6, seed=5)[0], prompt(1, 10, seed=6)[0]
    batch = torch.stack([torch.cat([torch.full((4,), pad), short]), long])
    mask = (torch.arange(10) >= 4).long()[None].repeat(2, 1)
    mask[1] = 1
    with torch.no_grad():
        out = student.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=pad)
        alone_short = student.generate(short[None], max_new_tokens=6, do_sample=False, pad_token_id=pad)
        alone_long = student.generate(long[None], max_new_tokens=6, do_sample=False, pad_token_id=pad)
    assert torch.equal(out[0, 10:], alone_short[0, 6:])
    assert torch.equal(out[1, 10:], alone_long[0, 10:])


# ---------------------------------------------------------------- AcrossKV: real cache memory saving


@pytest.mark.parametrize("g", [1, 2, 3, 5])
def test_kv_cache_bytes_shrink_by_expected_fraction(g):
    base = tiny("tiny-7l")  # 7 layers; M=2 leaves 5 later layers
    ids = prompt(batch=2, length=16)
    with torch.no_grad():
        full_cache, small_cache = DynamicCache(), DynamicCache()
        base(ids, past_key_values=full_cache, use_cache=True)
        to_swiftkv(base, 2, g)(ids, past_key_values=small_cache, use_cache=True, logits_to_keep=1)
    per_layer = 2 * 2 * base.config.num_key_value_heads * 16 * base.config.head_dim * 4  # K+V, batch 2, fp32
    assert cache_nbytes(full_cache) == 7 * per_layer
    expected_entries = 2 + math.ceil(5 / g)
    assert cache_nbytes(small_cache) == expected_entries * per_layer
    assert cache_nbytes(small_cache) / cache_nbytes(full_cache) == pytest.approx(expected_entries / 7)


# ---------------------------------------------------------------- training-time behaviour


def test_gradients_reach_only_swiftkv_weights():
    base = tiny()
    student = to_swiftkv(base, 2).train()
    ids = prompt()
    student(ids).logits.float().pow(2).mean().backward()
    for name, p in student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_hidden_states_follow_transformers_convention():
    base = tiny()
    student = to_swiftkv(base, 2).swiftkv(False)
    ids = prompt()
    with torch.no_grad():
        ours = student(ids, output_hidden_states=True).hidden_states
        theirs = base(ids, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == base.config.num_hidden_layers + 1
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
