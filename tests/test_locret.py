"""Locret: labels, budgeted chunked prefill, eviction rules, training and the trust_remote_code export."""

import subprocess
import sys
import textwrap

import pytest
import torch

from swiftkv_train.cache_stats import cache_nbytes
from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.export import save_hf
from swiftkv_train.models import load_pretrained
from swiftkv_train.transformations.locret import (
    LocretConfig,
    LocretTransformation,
    locret_labels,
    prefill_peak,
    to_locret,
)

SMALL = dict(head_hidden_size=32, budget=64, chunk_size=16, stabilizers=4, n_local=8)


@pytest.fixture(scope="module")
def gqa_base():
    """SmolLM2's head layout shrunk: 9 query heads, 3 KV heads (groups of 3)."""
    return load_pretrained("random:smollm2-tiny")


@pytest.fixture(scope="module")
def locret_model(gqa_base):
    base, tok = gqa_base
    return to_locret(base, LocretConfig(**SMALL)), base, tok


def chat_batch():
    """Two rows of different lengths, right padded: prefix then answer tokens (labels), then padding."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 256, (2, 40), generator=gen)
    labels = torch.full_like(input_ids, -100)
    mask = torch.ones_like(input_ids)
    labels[0, 27:40] = input_ids[0, 27:40]  # prefix 27, answer 13
    labels[1, 15:31] = input_ids[1, 15:31]  # prefix 15, answer 16, then 9 padding tokens
    mask[1, 31:] = 0
    position_ids = torch.arange(40).expand(2, -1)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "position_ids": position_ids}


# ---- labels -------------------------------------------------------------------------------------------------
def brute_force_labels(base, batch) -> list[torch.Tensor]:
    """Full S x S attention logits from the layer inputs, RoPE written out here; max over answers and groups."""
    config = base.config
    with torch.no_grad():
        hidden = base(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        ).hidden_states
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    theta = config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    seq = batch["input_ids"].shape[1]
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1).float(), torch.cat([angles.sin()] * 2, -1).float()

    def rope(x):  # x [H, S, D]
        half = dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    rows = []
    for b in range(batch["input_ids"].shape[0]):
        answer = ((batch["labels"][b] != -100) & batch["attention_mask"][b].bool()).nonzero().flatten()
        prefix = int(answer[0])
        per_layer = []
        for idx, layer in enumerate(base.model.layers):
            with torch.no_grad():
                x = layer.input_layernorm(hidden[idx][b])
                q = rope((x @ layer.self_attn.q_proj.weight.T).view(seq, heads, dim).transpose(0, 1))
                k = rope((x @ layer.self_attn.k_proj.weight.T).view(seq, kv_heads, dim).transpose(0, 1))
            k_per_q_head = k.repeat_interleave(heads // kv_heads, dim=0)
            logits = q @ k_per_q_head.transpose(1, 2) / dim**0.5  # [H, S, S]
            logits = logits.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
            block = logits[:, answer][:, :, :prefix]  # [H, A, P]
            per_layer.append(block.view(kv_heads, heads // kv_heads, len(answer), prefix).amax(dim=(1, 2)))
        rows.append(torch.stack(per_layer))
    return rows


def test_labels_equal_brute_force_full_attention(locret_model):
    model, base, _ = locret_model
    batch = chat_batch()
    expected = brute_force_labels(base, batch)
    got = locret_labels(model, batch, label_chunk=5)  # tiles smaller than both prefix and answer
    assert [g.shape for g in got] == [(6, 3, 27), (6, 3, 15)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-4)
    # The answer drives the label: fewer answer queries give a max over a subset (<=, and not all equal).
    other = dict(batch, labels=batch["labels"].clone())
    other["labels"][0, 33:] = -100
    fewer = locret_labels(model, other, label_chunk=5)[0]
    assert (fewer <= got[0] + 1e-5).all() and (fewer < got[0] - 1e-3).any()


# ---- generation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("position_mode", ["compacted", "original"])
def test_budget_at_least_prompt_reproduces_base_generation(locret_model, position_mode):
    model, base, _ = locret_model
    ids = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(2))
    expected = base.generate(ids, max_new_tokens=12, do_sample=False)
    got = model.generate(
        ids, max_new_tokens=12, do_sample=False, locret_budget=45, locret_chunk_size=16,
        locret_position_mode=position_mode,
    )
    assert torch.equal(got, expected)
    # The chunked prefill really ran (and matches the full forward's next-token logits).
    cache = model.chunked_prefill(ids, locret_budget=45, locret_position_mode=position_mode)
    assert cache.tokens_seen == 45 and cache.num_entries() == 45 and cache.peak_entries == 45
    with torch.no_grad():
        nxt = expected[:, 45:46]
        step = model(nxt, past_key_values=cache).logits[:, -1]
        full = base(expected[:, :46]).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_small_budget_changes_generation_and_caps_the_cache(locret_model):
    model, base, _ = locret_model
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(3))
    cache = model.chunked_prefill(ids, locret_budget=24, locret_chunk_size=16)
    assert all(layer.num_entries == 24 for layer in cache.layers)  # evicted to the budget
    out = model.generate(ids, max_new_tokens=5, do_sample=False, locret_budget=24)
    assert out.shape == (1, 125)


# ---- memory -------------------------------------------------------------------------------------------------

def test_prefill_cache_bounded_by_budget_plus_chunk(locret_model):
    model, base, _ = locret_model
    config = model.config
    budget, chunk = 48, 32
    settings = dict(locret_budget=budget, locret_chunk_size=chunk, locret_stabilizers=8, locret_n_local=16)
    short = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(4))
    long = torch.randint(0, 256, (1, 900), generator=torch.Generator().manual_seed(5))
    peak_short, entries_short, _ = prefill_peak(model, short, **settings)
    peak_long, entries_long, cache = prefill_peak(model, long, **settings)

    # Per entry and KV head: key + value (fp32) + score (fp32) + position (int32).
    per_entry = config.num_key_value_heads * (2 * config.head_dim * 4 + 4 + 4)
    assert entries_long <= budget + chunk and entries_short <= budget + chunk
    assert peak_long <= config.num_hidden_layers * (budget + chunk) * per_entry
    assert peak_long == peak_short  # independent of the prompt length
    assert cache_nbytes(cache) == config.num_hidden_layers * budget * per_entry  # after prefill: exactly the budget
    with torch.no_grad():
        full = cache_nbytes(base(long, use_cache=True).past_key_values)
    assert full == config.num_hidden_layers * 900 * config.num_key_value_heads * 2 * config.head_dim * 4
    assert peak_long < full / 8


# ---- eviction rules -----------------------------------------------------------------------------------------
def adversarial_score(position: int, head: int) -> float:
    """Even heads: the newest token scores lowest; odd heads: a scrambled order."""
    return -float(position) if head % 2 == 0 else float((position * 37) % 101)


def simulate_kept(length, budget, chunk, stabilizers, n_local, head):
    """Positions kept by one KV head after each evicting chunk and at the end, from the rules alone."""
    keep, evictable = budget - n_local, length - n_local
    kept, states = [], []
    for start in range(0, evictable, chunk):
        end = min(start + chunk, evictable)
        kept = kept + list(range(start, end))
        if len(kept) > keep:
            protected = set(kept[-stabilizers:]) if end != evictable else set()
            others = sorted((p for p in kept if p not in protected), key=lambda p: -adversarial_score(p, head))
            kept = sorted(protected | set(others[: keep - len(protected)]))
        states.append(kept)
    return states, kept + list(range(evictable, length))


def test_stabilizers_and_local_tokens_are_never_evicted(locret_model, monkeypatch):
    model, _, _ = locret_model
    length, budget, chunk, stabilizers, n_local = 100, 30, 16, 6, 10
    seen = {}

    def grab_cache(module, args, kwargs):
        seen["cache"] = kwargs["past_key_values"]

    def fake_scores(query_flat, key_flat, value_flat):
        cache = seen["cache"]
        positions = torch.arange(cache.tokens_seen, cache.tokens_seen + query_flat.shape[1])
        heads = model.config.num_key_value_heads
        scores = [[adversarial_score(int(p), h) for p in positions] for h in range(heads)]
        return torch.tensor(scores).expand(query_flat.shape[0], -1, -1)

    states = []

    def record(module, args, output):
        cache = seen["cache"]
        states.append((cache.tokens_seen, cache.layers[module.layer_idx].positions[0].clone()))

    handles = [model.model.register_forward_pre_hook(grab_cache, with_kwargs=True)]
    for layer in model.model.layers:
        monkeypatch.setattr(layer.self_attn, "retaining_scores", fake_scores)
        handles.append(layer.self_attn.register_forward_hook(record))
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(6))
    try:
        cache = model.chunked_prefill(
            ids, locret_budget=budget, locret_chunk_size=chunk, locret_stabilizers=stabilizers, locret_n_local=n_local
        )
    finally:
        for handle in handles:
            handle.remove()

    num_layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    evict_steps = -(-(length - n_local) // chunk)
    assert len(states) == num_layers * (evict_steps + 1)  # evicting chunks, then the local tail in one step
    for head in range(heads):
        expected_states, expected_final = simulate_kept(length, budget, chunk, stabilizers, n_local, head)
        for step, expected in enumerate(expected_states):
            for layer in range(num_layers):
                _, kept = states[step * num_layers + layer]
                assert kept[head].tolist() == expected, (step, layer, head)
            end = min((step + 1) * chunk, length - n_local)
            if step < evict_steps - 1:  # the newest stabilizers survive every intermediate eviction
                assert set(range(end - stabilizers, end)) <= set(expected)
        for layer in cache.layers:
            assert layer.positions[0, head].tolist() == expected_final
            assert set(range(length - n_local, length)) <= set(expected_final)
    assert cache.num_entries() == budget

    # Decoding with eviction on: the local tokens (stored with score +inf) outlive every decode eviction.
    handle = model.model.register_forward_pre_hook(grab_cache, with_kwargs=True)
    try:
        out = model.generate(
            ids, max_new_tokens=2 * chunk + 3, do_sample=False, locret_budget=budget, locret_chunk_size=chunk,
            locret_stabilizers=stabilizers, locret_n_local=n_local, locret_decode_eviction=True,
        )
    finally:
        handle.remove()
    cache = seen["cache"]
    assert out.shape[1] == length + 2 * chunk + 3
    for layer in cache.layers:
        assert layer.num_entries < budget + chunk
        for head in range(heads):
            kept = set(layer.positions[0, head].tolist())
            assert set(range(length - n_local, length)) <= kept
            newest = cache.tokens_seen - 1
            assert set(range(newest - (layer.num_entries - budget), newest + 1)) <= kept  # appended since eviction


# ---- training -----------------------------------------------------------------------------------------------
def test_training_steps_reduce_loss_and_change_only_heads(gqa_base):
    base, _ = gqa_base
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    transformation = LocretTransformation(dict(SMALL, smoothness_weight=0.01))
    student = transformation.build_student(base)
    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(".retaining_head." in n for n, _ in trainable)
    assert len(trainable) == 3 * base.config.num_hidden_layers  # fc1.weight, fc2.weight, fc2.bias
    heads_before = {n: p.detach().clone() for n, p in trainable}
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=3e-3)
    batch = chat_batch()
    losses = []
    for _ in range(15):
        out = transformation.loss(student, batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert set(out) >= {"loss", "smooth_l1", "smoothness", "top_overlap"}
    assert losses[-1] < 0.3 * losses[0], losses
    for name, p in base.named_parameters():  # the backbone (shared with the student) is untouched
        assert torch.equal(p, before[name]), name
    for name, p in student.named_parameters():
        if name in heads_before:
            assert not torch.equal(p, heads_before[name]), name
        else:
            assert p.grad is None, name


# ---- export -------------------------------------------------------------------------------------------------
LOADER = textwrap.dedent(
    """
    import sys, torch
    sys.modules["swiftkv_train"] = None  # any import of the package now fails
    from transformers import AutoModelForCausalLM
    export_dir, out_path = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.arange(3, 93).remainder(256)[None]
    cache = model.chunked_prefill(ids, locret_budget=20)
    try:
        model.generate(ids, max_new_tokens=2, locret_chunk_size=0)
        bad = None
    except ValueError as err:
        bad = str(err)
    out = {"class": type(model).__name__, "module": type(model).__module__, "config_budget": model.config.locret_budget,
           "default": model.generate(ids, max_new_tokens=6, do_sample=False),
           "override": model.generate(ids, max_new_tokens=6, do_sample=False, locret_budget=20, locret_n_local=4,
                                      locret_stabilizers=4, locret_position_mode="original"),
           "positions": cache.layers[1].positions, "bad": bad}
    torch.save(out, out_path)
    """
)


def test_export_round_trip_with_trust_remote_code(locret_model, tmp_path):
    model, _, tok = locret_model
    with torch.no_grad():  # distinct heads so that the exported scores matter
        for _, p in model.retaining_head_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.1)
    export = save_hf(model, tok, tmp_path / "locret", lean=False)
    out_path = tmp_path / "out.pt"
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(export), str(out_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out_path, weights_only=False)
    assert result["class"] == "LlamaLocretForCausalLM" and result["module"].startswith("transformers_modules")
    assert result["config_budget"] == SMALL["budget"]
    assert "locret_chunk_size=0" in result["bad"]

    ids = torch.arange(3, 93).remainder(256)[None]
    assert torch.equal(result["default"], model.generate(ids, max_new_tokens=6, do_sample=False))
    expected = model.generate(
        ids, max_new_tokens=6, do_sample=False, locret_budget=20, locret_n_local=4, locret_stabilizers=4,
        locret_position_mode="original",
    )
    assert torch.equal(result["override"], expected)
    assert torch.equal(result["positions"], model.chunked_prefill(ids, locret_budget=20).layers[1].positions)


# ---- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(budget=10, stabilizers=8, n_local=4), "locret.budget=10"),
        (dict(chunk_size=0), "locret.chunk_size=0"),
        (dict(n_local=-1), "locret.n_local=-1"),
        (dict(position_mode="rotary"), "locret.position_mode='rotary'"),
        (dict(head_hidden_size=0), "locret.head_hidden_size=0"),
        (dict(smoothness_weight=-1.0), "locret.smoothness_weight"),
        (dict(budgett=5), "budgett"),
    ],
)
def test_bad_config_raises_input_error(fields, match):
    with pytest.raises(SwiftKVInputError, match=match):
        LocretConfig.from_node(fields)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(locret_budget=11, locret_stabilizers=4, locret_n_local=8), "locret_budget=11"),
        (dict(locret_chunk_size=0), "locret_chunk_size=0"),
        (dict(locret_stabilizers=2.5), "locret_stabilizers=2.5"),
        (dict(locret_position_mode="none"), "locret_position_mode"),
        (dict(locret_bugdet=10), "locret_bugdet"),
    ],
)
def test_bad_generate_settings_raise_input_error(locret_model, kwargs, match):
    model, _, _ = locret_model
    ids = torch.randint(0, 256, (1, 20))
    with pytest.raises(SwiftKVInputError, match=match):
        model.generate(ids, max_new_tokens=2, **kwargs)
    with pytest.raises(SwiftKVInputError, match=match):
        model.chunked_prefill(ids, **kwargs)
