"""TOVA, Knorm, ExpectedAttention and the PyramidKV / AdaKV budget wrappers, each against an independent computation
written here (plain torch on the tiny random Llama, or hand-made tensors): the kept entries must be the reference's.
The generic budget / protected-entries tests of every registered policy (and of every wrapper around every ranking
policy) are in test_policies.py; the CLI listing (--help-policies) is tested at the end."""

import math
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from swiftkv_train.cache_stats import cache_nbytes
from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.models import load_pretrained
from swiftkv_train.policies import (
    POLICIES,
    TOVA,
    AdaKV,
    ExpectedAttention,
    Knorm,
    PolicyCache,
    PyramidKV,
    build_policy,
    greedy_generate,
)
from swiftkv_train.policies import attention as policy_attention_mod
from swiftkv_train.policies.active import activated
from swiftkv_train.policies.budgets import pyramid_budgets

from helpers import cli_env, one_thread  # noqa: F401 - one_thread is autouse: every test here runs on one thread


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_pretrained("random:tiny")  # 4 layers, 4 query heads, 2 KV heads, head dim 16
    return model


def prompt(batch=2, length=40, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def keep_sinks_plus_top(score: torch.Tensor, budget: int, sinks: int = 0, newest: int = 0) -> torch.Tensor:
    """Reference selection: the first ``sinks`` and last ``newest`` entries plus the best-scored others."""
    length = score.shape[-1]
    best = score[..., sinks : length - newest].argsort(dim=-1, descending=True)[..., : budget - sinks - newest]
    fixed = torch.cat([torch.arange(sinks), torch.arange(length - newest, length)]).expand(*score.shape[:-1], -1)
    return torch.cat([fixed, best + sinks], dim=-1).sort(dim=-1).values


# ------------------------------------------------------------------------------------------------------------ Knorm

def test_knorm_keeps_the_smallest_key_norms(tiny):
    ids = prompt()
    reference = greedy_generate(tiny, ids, 1).cache  # full cache: the model's own post-RoPE keys
    out = greedy_generate(tiny, ids, 1, policy=Knorm(12, sink_tokens=2))
    for ref_layer, layer in zip(reference.layers, out.cache.layers, strict=True):
        expected = keep_sinks_plus_top(-ref_layer.keys.norm(dim=-1), 12, sinks=2)
        assert torch.equal(layer.positions.long(), expected)


# ------------------------------------------------------------------------------------------------------------- TOVA

@pytest.mark.parametrize("head_average", ["layer", "group"])
def test_tova_keeps_what_the_last_query_attends_to(head_average):
    model, _ = load_pretrained("random:tiny", attn_implementation="eager")
    ids = prompt(length=30)
    attentions = model(ids, output_attentions=True).attentions  # eager: [B, H_q, S, S] per layer
    model.set_attn_implementation("sdpa")
    out = greedy_generate(model, ids, 1, policy=TOVA(10, head_average=head_average))
    for layer, probs in zip(out.cache.layers, attentions, strict=True):
        last = probs[:, :, -1].reshape(2, 2, 2, 30).mean(dim=2)  # the last row, averaged over each group
        if head_average == "layer":
            last = probs[:, :, -1].mean(dim=1, keepdim=True).expand(2, 2, 30)
        assert torch.equal(layer.positions.long(), keep_sinks_plus_top(last, 10, newest=1))
    assert not torch.equal(out.cache.layers[0].positions[:, 0], out.cache.layers[0].positions[:, 1]) \
        or head_average == "layer"


def test_tova_evicts_after_every_decoded_token_like_a_direct_computation(tiny):
    """Hand-made q/k/v through the real attention hook, step by step, against TOVA written out per KV head: after
    each step keep the newest entry plus the budget's best by the last query's attention (mean over the group)."""
    attn = tiny.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    budget, scaling = 5, 0.25
    policy = TOVA(budget, head_average="group")
    cache = PolicyCache(policy, 8, 6)
    policy_attention_mod.register()
    held_pos = [[], []]  # reference: per KV head, positions and keys held
    held_keys = [torch.zeros(0, 16), torch.zeros(0, 16)]
    with activated(cache):
        for step, q_len in enumerate([8, 1, 1, 1, 1, 1]):
            start = cache.step.seen
            cache.begin_step(torch.arange(start, start + q_len), decode_step=step)
            q = torch.randn(1, 4, q_len, 16, generator=gen)
            k_new, v_new = torch.randn(1, 2, q_len, 16, generator=gen), torch.randn(1, 2, q_len, 16, generator=gen)
            keys, values = cache.update(k_new, v_new, 0)
            mask = None if step == 0 else torch.ones(1, 1, 1, keys.shape[2], dtype=torch.bool)
            policy_attention_mod.policy_sdpa_attention(attn, q, keys, values, mask, scaling=scaling)
            cache.end_step()
            for head in range(2):
                held_pos[head] += list(range(start, start + q_len))
                held_keys[head] = torch.cat([held_keys[head], k_new[0, head]])
                last = q[0, 2 * head : 2 * head + 2, -1]  # the group's query heads, last row (it sees every key)
                score = torch.softmax(last @ held_keys[head].T * scaling, dim=-1).mean(dim=0)
                if len(held_pos[head]) > budget:
                    keep = keep_sinks_plus_top(score, budget, newest=1).tolist()
                    held_pos[head] = [held_pos[head][i] for i in keep]
                    held_keys[head] = held_keys[head][keep]
                assert cache.layers[0].positions[0, head].tolist() == held_pos[head], (step, head)
    assert cache.layers[0].positions.shape[-1] == budget


# ---------------------------------------------------------------------------------------------- ExpectedAttention

@torch.no_grad()
def expected_attention_reference(model, ids, budget, sinks, future, use_covariance, use_vnorm):
    """kvpress's ExpectedAttentionPress written out: pre-RoPE queries straight from q_proj (no un-rotation), the
    averaged RoPE matrix built as kvpress builds it, the Gaussian expectation, softmax, group mean, value norms."""
    inputs = {}

    def grab(module, args, kwargs):
        inputs[module.layer_idx] = kwargs.get("hidden_states", args[0] if args else None)

    hooks = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.model.layers]
    try:
        full = greedy_generate(model, ids, 1).cache  # post-RoPE keys and values of the whole prompt
    finally:
        for hook in hooks:
            hook.remove()
    batch, length = ids.shape
    kept = []
    for index, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        d = attn.head_dim
        h = inputs[index][:, sinks:]
        q = attn.q_proj(h).view(batch, length - sinks, -1, d).transpose(1, 2)  # [B, H_q, n, D] before RoPE
        mu = q.mean(dim=2)
        centered = q - mu.unsqueeze(2)
        cov = torch.einsum("bhni,bhnj->bhij", centered, centered) / q.shape[2]
        cos, sin = model.model.rotary_emb(h, torch.arange(length, length + future).unsqueeze(0))
        cos, sin = cos[0], sin[0]
        eye = torch.eye(d)
        swap = torch.zeros(d, d)
        swap[d // 2 :, : d // 2], swap[: d // 2, d // 2 :] = torch.eye(d // 2), -torch.eye(d // 2)
        rotation = (cos.unsqueeze(1) * eye + sin.unsqueeze(1) * swap).mean(dim=0)
        mu, cov = mu @ rotation.T, rotation @ cov @ rotation.T
        keys, values = full.layers[index].keys[:, :, sinks:], full.layers[index].values[:, :, sinks:]
        groups = q.shape[1] // keys.shape[1]
        rep = keys.repeat_interleave(groups, dim=1)
        logits = torch.einsum("bhd,bhnd->bhn", mu, rep) / math.sqrt(d)
        if use_covariance:
            logits = logits + torch.einsum("bhnd,bhde,bhne->bhn", rep, cov, rep) / d / 2
        scores = torch.softmax(logits, dim=-1).reshape(batch, keys.shape[1], groups, -1).mean(dim=2)
        if use_vnorm:
            scores = scores * values.norm(dim=-1)
        scores = torch.nn.functional.pad(scores, (sinks, 0), value=float("inf"))
        kept.append(keep_sinks_plus_top(scores, budget, sinks=sinks))
    return kept


@pytest.mark.parametrize("use_covariance,use_vnorm", [(True, True), (False, False), (True, False)])
def test_expected_attention_keeps_what_future_queries_are_expected_to_attend(tiny, use_covariance, use_vnorm):
    ids = prompt()
    policy = ExpectedAttention(12, sink_tokens=3, future_positions=64, use_covariance=use_covariance,
                               use_vnorm=use_vnorm)
    out = greedy_generate(tiny, ids, 1, policy=policy)
    expected = expected_attention_reference(tiny, ids, 12, 3, 64, use_covariance, use_vnorm)
    for layer, want in zip(out.cache.layers, expected, strict=True):
        assert torch.equal(layer.positions.long(), want)


def test_expected_attention_unrotation_and_mean_rotation_are_ropes_inverse_and_average(tiny):
    from swiftkv_train.policies.scorers import mean_rotation, unrotate

    q = torch.randn(1, 1, 5, 16, generator=torch.Generator().manual_seed(1))
    cos, sin = tiny.model.rotary_emb(q, torch.arange(100, 105).unsqueeze(0))
    rotated, _ = apply_rotary_pos_emb(q, q, cos, sin)
    torch.testing.assert_close(unrotate(rotated, cos[0], sin[0]), q, rtol=1e-5, atol=1e-5)
    # R̄ x == the mean over positions of RoPE(x)
    x = q[0, 0, :1].expand(1, 1, 5, 16)
    torch.testing.assert_close(x[0, 0, 0] @ mean_rotation(cos[0], sin[0]).T,
                               apply_rotary_pos_emb(x, x, cos, sin)[0][0, 0].mean(dim=0), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------- PyramidKV

def test_pyramid_budgets_follow_the_reference_schedule():
    # min = (12-4)/20 = 0.4, max = 2*8 - 0.4 = 15.6, step 5.0667: 4 + [15.6, 10.53, 5.47, 0.4] = 19.6, 14.53, 9.47,
    # 4.4 -> floors 19, 14, 9, 4 (46), the 2 missing entries to the largest remainders (.6, .53): 20, 15, 9, 4
    assert pyramid_budgets(12, 40, 4, 4, 20) == [20, 15, 9, 4]
    # max capped at prompt - window = 36, min = 2*26 - 36 = 16: 40, 33.3, 26.7, 20 -> 40, 33, 27, 20
    assert pyramid_budgets(30, 40, 4, 4, 20) == [40, 33, 27, 20]
    assert pyramid_budgets(30, 40, 4, 4, 1) == [30] * 4  # beta 1: min = max, uniform
    for uniform in [(50, 40, 4, 4, 20), (4, 40, 4, 4, 20), (12, 40, 1, 4, 20)]:  # holds the prompt / all window
        assert pyramid_budgets(*uniform) == [uniform[0]] * uniform[2]
    for capacity, prompt_len, slots, window in [(7, 100, 30, 2), (64, 4096, 30, 32), (100, 120, 5, 0)]:
        sizes = pyramid_budgets(capacity, prompt_len, slots, window, 20)
        assert sum(sizes) == slots * capacity and sizes == sorted(sizes, reverse=True)
        assert max(sizes) <= prompt_len and min(sizes) >= window


def knorm_select(held: list[int], norms: torch.Tensor, capacity: int, sinks: int) -> list[int]:
    """Knorm on one head: the first ``sinks`` held positions plus the smallest-norm others, ``capacity`` in all."""
    if len(held) <= capacity:
        return held
    rest = sorted(held[sinks:], key=lambda p: float(norms[p]))[: capacity - sinks]
    return sorted(held[:sinks] + rest)


def adakv_select(held: list[list[int]], norms: torch.Tensor, capacity: int, sinks: int, alpha: float):
    """AdaKV over Knorm for one layer, written out on lists: each head keeps its sinks and its best
    floor(alpha*capacity) entries, the rest of heads*capacity goes to the best entries over all heads."""
    total = len(held) * capacity
    if sum(map(len, held)) <= total:
        return held
    safe = math.floor(alpha * capacity)
    sure = []
    for head, positions in enumerate(held):
        ranked = positions[:sinks] + sorted(positions[sinks:], key=lambda p: float(norms[head, p]))
        sure.append(set(ranked[: max(safe, sinks)]))
    others = sorted(((float(norms[h, p]), h, p) for h, ps in enumerate(held) for p in ps if p not in sure[h]))
    extra = others[: total - sum(map(len, sure))]
    return [sorted(sure[h] | {p for _, hh, p in extra if hh == h}) for h in range(len(held))]


@torch.no_grad()
def layerwise_reference(model, seq, prompt_len, select):
    """Logits of one forward over ``seq``, run layer by layer, where each decode row of layer l and KV head h attends
    only to what that head held at that point (``select(layer, held, norms)`` evicts after each step, with the
    key norms this very forward computes), prompt rows causally (eviction comes after the prefill)."""
    total = seq.shape[1]
    pos = torch.arange(total).unsqueeze(0)
    hidden = model.model.embed_tokens(seq)
    cos, sin = model.model.rotary_emb(hidden, pos)
    kept = []
    for index, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        keys = attn.k_proj(layer.input_layernorm(hidden)).view(1, total, -1, attn.head_dim).transpose(1, 2)
        norms = apply_rotary_pos_emb(keys, keys, cos, sin)[1][0].norm(dim=-1)  # [H_kv, T]
        heads = norms.shape[0]
        allowed = torch.tril(torch.ones(total, total, dtype=torch.bool)).repeat(heads, 1, 1)
        held = select(index, [list(range(prompt_len)) for _ in range(heads)], norms)
        for row in range(prompt_len, total):
            for head in range(heads):
                allowed[head, row, :row] = False
                allowed[head, row, held[head]] = True
            held = select(index, [h + [row] for h in held], norms)
        mask = allowed.repeat_interleave(attn.num_key_value_groups, dim=0).unsqueeze(0)
        hidden = layer(hidden, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        kept.append(held)
    return model.lm_head(model.model.norm(hidden))[0], kept


def test_pyramid_generation_equals_a_forward_with_each_layers_own_budget(tiny):
    """PyramidKV over Knorm (evicting while decoding): every layer holds its own number of entries, and decoding
    equals a layer-by-layer forward masking, per layer, what that layer's budget evicted."""
    ids = prompt(batch=1, length=24)
    policy = PyramidKV(8, inner="knorm", inner_settings={"sink_tokens": 2, "evict_during_decode": True})
    out = greedy_generate(tiny, ids, 6, policy=policy, keep_logits=True)
    budgets = [policy.slot_capacity(slot) for slot in range(4)]
    assert budgets == pyramid_budgets(8, 24, 4, 2, 20.0) and len(set(budgets)) == 4 and sum(budgets) == 32
    assert [layer.keys.shape[2] for layer in out.cache.layers] == budgets
    seq = torch.cat([ids, out.tokens[:, :-1]], dim=1)
    logits, kept = layerwise_reference(
        tiny, seq, 24, lambda layer, held, norms: [knorm_select(h, norms[i], budgets[layer], 2)
                                                   for i, h in enumerate(held)])
    for layer, want in zip(out.cache.layers, kept, strict=True):
        assert layer.positions[0].tolist() == want
    for step in range(6):
        torch.testing.assert_close(out.logits[step][0], logits[23 + step], rtol=1e-4, atol=1e-4)
    assert out.cache.tokens_held() == 8


# ----------------------------------------------------------------------------------------------------------- AdaKV

def test_adakv_per_head_budgets_padding_and_generation_equal_a_per_head_masked_forward(tiny):
    """AdaKV over Knorm: heads of a layer keep different numbers of entries (the layer keeps heads x budget), the
    padding gets no attention (decoding equals a forward whose per-head masks hold only the kept entries), and it
    is not counted as held, in tokens or bytes."""
    ids = prompt(batch=1, length=24)
    policy = AdaKV(8, inner="knorm", alpha_safeguard=0.5,  # each head: its 2 sinks + its 2 best, then by score
                   inner_settings={"sink_tokens": 2, "evict_during_decode": True})
    out = greedy_generate(tiny, ids, 6, policy=policy, keep_logits=True)
    seq = torch.cat([ids, out.tokens[:, :-1]], dim=1)
    logits, kept = layerwise_reference(tiny, seq, 24, lambda layer, held, norms: adakv_select(held, norms, 8, 2, 0.5))
    padded = 0
    for layer, want in zip(out.cache.layers, kept, strict=True):
        for head in range(2):
            positions = layer.positions[0, head]
            assert positions[positions >= 0].tolist() == want[head]
            assert (positions[: len(positions) - len(want[head])] == -1).all()  # padding in front
        assert sum(map(len, want)) == 2 * 8  # the layer's budget, shared by its heads
        padded += int((layer.positions < 0).sum())
    assert padded > 0  # some head kept fewer entries than another: the padding path ran
    for step in range(6):
        torch.testing.assert_close(out.logits[step][0], logits[23 + step], rtol=1e-4, atol=1e-4)
    assert out.cache.tokens_held() == 8
    entry = 2 * 16 * 4 + 4  # fp32 key + value of head dim 16, int32 position (Knorm keeps no scores)
    assert cache_nbytes(out.cache) == 4 * 2 * 8 * entry


def test_padding_entries_get_no_attention_in_the_hook(tiny):
    """The attention hook on a padded slot: output == softmax attention over each head's real entries only."""
    attn = tiny.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(3)
    policy = AdaKV(4, inner="knorm")
    cache = PolicyCache(policy, 6, 2)
    policy_attention_mod.register()
    with activated(cache):
        cache.begin_step(torch.arange(6), decode_step=0)
        cache.update(torch.randn(1, 2, 6, 16, generator=gen), torch.randn(1, 2, 6, 16, generator=gen), 0)
        cache.layers[0].keep(torch.tensor([[[-1, -1, 0, 2, 4, 5], [1, 2, 3, 4, 5, 0]]]).sort(-1).values, ragged=True)
        layer = cache.layers[0]
        cache.begin_step(torch.tensor([6]), decode_step=1)
        keys, values = cache.update(torch.randn(1, 2, 1, 16, generator=gen), torch.randn(1, 2, 1, 16, generator=gen), 0)
        q = torch.randn(1, 4, 1, 16, generator=gen)
        out, _ = policy_attention_mod.policy_sdpa_attention(attn, q, keys, values, None, scaling=0.25)
    assert layer.positions[0, 0].tolist()[:2] == [-1, -1]
    for q_head in range(4):
        head = q_head // 2
        real = layer.positions[0, head] >= 0
        k, v = keys[0, head][real], values[0, head][real]
        want = torch.softmax(q[0, q_head, 0] @ k.T * 0.25, dim=-1) @ v
        torch.testing.assert_close(out[0, 0, q_head], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- settings/CLI

def test_wrappers_refuse_bad_inner_settings_naming_them():
    with pytest.raises(SwiftKVInputError, match=r"cache policy 'pyramid': inner='full' must name a policy that "
                                                r"ranks entries: one of .*snapkv"):
        build_policy("pyramid", budget=8, inner="full")
    with pytest.raises(SwiftKVInputError, match=r"cache policy 'adakv': inner_settings: cache policy 'snapkv' has no "
                                                r"setting 'pool'"):
        build_policy("adakv", budget=8, inner_settings={"pool": 3})
    with pytest.raises(SwiftKVInputError, match=r"'pyramid': inner_settings=\{'budget': 4\} must not set a budget"):
        build_policy("pyramid", budget=8, inner_settings={"budget": 4})
    with pytest.raises(SwiftKVInputError, match=r"'adakv': alpha_safeguard=2\.0 must be a share"):
        build_policy("adakv", budget=8, alpha_safeguard=2)
    with pytest.raises(SwiftKVInputError, match=r"'tova': head_average='heads' must be 'layer'"):
        build_policy("tova", budget=8, head_average="heads")
    policy = build_policy("pyramid", budget="25%", inner="snapkv", inner_settings={"pool_kernel": 5})
    assert policy.policy.pool_kernel == 5 and policy.policy.budget == policy.budget  # the inner's settings reach it
    assert policy.settings()["inner_settings"] == {"observation_window": 32, "pool_kernel": 5}


def test_eval_config_builds_a_wrapper_with_its_inner_settings():
    from swiftkv_train.eval.api import make_config, policies_from_config

    cfg = make_config(policies=OmegaConf.create({"names": ["adakv", "pyramid"], "budget": "25%", "overrides": {
        "adakv": {"inner": "h2o", "inner_settings": {"recent_share": 0.25}}, "pyramid": {"beta": 4.0}}}))
    (label_a, adakv), (label_p, pyramid) = policies_from_config(cfg.policies)
    assert label_a == "adakv@25%" and adakv.policy.name == "h2o" and adakv.policy.recent_share == 0.25
    assert pyramid.policy.name == "snapkv" and pyramid.beta == 4.0


def test_help_policies_lists_every_policy_with_its_settings():
    proc = subprocess.run([sys.executable, "-m", "swiftkv_train.eval", "--help-policies"], capture_output=True,
                          text=True, timeout=300, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    paragraphs = {p.split()[0]: " ".join(p.split()) for p in proc.stdout.split("\n\n")[1:]}
    assert set(paragraphs) == set(POLICIES)
    for name, cls in POLICIES.items():
        first_line = " ".join(cls.__doc__.strip().split("\n")[0].split())
        assert first_line in paragraphs[name], name
        assert f"settings: {cls.describe_settings()}" in paragraphs[name], name
    assert "budget (required), inner='snapkv', inner_settings={}, beta=20.0" in paragraphs["pyramid"]
    assert "tau_init=1.0" in paragraphs["keyformer"]
