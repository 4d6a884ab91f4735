"""Locret: labels, budgeted chunked prefill, eviction rules, training and the trust_remote_code export."""

import contextlib
import textwrap

import pytest
import torch

from swiftkv_train.cache_stats import cache_nbytes
from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.export import save_hf
from swiftkv_train.methods import config_from_node
from swiftkv_train.models import load_pretrained
from swiftkv_train.methods.locret import (
    LocretConfig,
    Locret,
    locret_labels,
    prefill_peak,
    to_locret,
)

from helpers import run_export_script

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


@contextlib.contextmanager
def watching_cache(model, seen):
    """While inside, ``seen["cache"]`` is the cache of the model's running forward."""

    def grab_cache(module, args, kwargs):
        seen["cache"] = kwargs.get("cache", kwargs.get("past_key_values"))  # the name differs by transformers release

    handle = model.model.register_forward_pre_hook(grab_cache, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def install_fake_scores(model, monkeypatch, tied=False) -> dict:
    """Every layer's retaining-head scores become adversarial_score of each entry's position (all equal when
    ``tied``), read from the cache that ``watching_cache`` puts into the returned dict."""
    seen = {}

    def fake_scores(query_flat, key_flat, value_flat):
        cache = seen["cache"]
        positions = torch.arange(cache.tokens_seen, cache.tokens_seen + query_flat.shape[1])
        heads = model.config.num_key_value_heads
        if tied:  # every score equal: ties go to the earlier entry
            return torch.zeros(query_flat.shape[0], heads, len(positions))
        scores = [[adversarial_score(int(p), h) for p in positions] for h in range(heads)]
        return torch.tensor(scores).expand(query_flat.shape[0], -1, -1)

    for layer in model.model.layers:
        monkeypatch.setattr(layer.self_attn, "retaining_scores", fake_scores)
    return seen


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
    seen = install_fake_scores(model, monkeypatch)
    states = []

    def record(module, args, output):
        cache = seen["cache"]
        states.append((cache.tokens_seen, cache.layers[module.layer_idx].positions[0].clone()))

    handles = [layer.self_attn.register_forward_hook(record) for layer in model.model.layers]
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(6))
    try:
        with watching_cache(model, seen):
            cache = model.chunked_prefill(ids, locret_budget=budget, locret_chunk_size=chunk,
                                          locret_stabilizers=stabilizers, locret_n_local=n_local)
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
    with watching_cache(model, seen):
        out = model.generate(
            ids, max_new_tokens=2 * chunk + 3, do_sample=False, locret_budget=budget, locret_chunk_size=chunk,
            locret_stabilizers=stabilizers, locret_n_local=n_local, locret_decode_eviction=True,
        )
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
    transformation = Locret(dict(SMALL, smoothness_weight=0.01))
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
# Start of the export scripts (run by `run_export_script`): the package unimportable, the model loaded from the
# export's own files, one budgeted prefill of `ids`.
EXPORT_SCRIPT_START = textwrap.dedent(
    """
    import sys, torch
    sys.modules["swiftkv_train"] = None  # any import of the package now fails
    from transformers import AutoModelForCausalLM
    export_dir, out_path = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.arange(3, 93).remainder(256)[None]
    cache = model.chunked_prefill(ids, locret_budget=20)
    """
)

LOADER = EXPORT_SCRIPT_START + textwrap.dedent(
    """
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
    result = run_export_script(LOADER, export, tmp_path)
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
        (dict(quant_bits=3), "locret.quant_bits=3"),
        (dict(quant_bits=True), "locret.quant_bits=True"),
        (dict(quant_group_size=0), "locret.quant_group_size=0"),
    ],
)
def test_bad_config_raises_input_error(fields, match):
    with pytest.raises(SwiftKVInputError, match=match):
        config_from_node(LocretConfig, fields, prefix="locret.")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(locret_budget=11, locret_stabilizers=4, locret_n_local=8), "locret_budget=11"),
        (dict(locret_chunk_size=0), "locret_chunk_size=0"),
        (dict(locret_stabilizers=2.5), "locret_stabilizers=2.5"),
        (dict(locret_position_mode="none"), "locret_position_mode"),
        (dict(locret_bugdet=10), "locret_bugdet"),
        (dict(locret_quant_bits=3), "locret_quant_bits=3"),
        (dict(locret_quant_bits=16), "locret_quant_bits=16"),
        (dict(locret_quant_group_size=0), "locret_quant_group_size=0"),
    ],
)
def test_bad_generate_settings_raise_input_error(locret_model, kwargs, match):
    model, _, _ = locret_model
    ids = torch.randint(0, 256, (1, 20))
    with pytest.raises(SwiftKVInputError, match=match):
        model.generate(ids, max_new_tokens=2, **kwargs)
    with pytest.raises(SwiftKVInputError, match=match):
        model.chunked_prefill(ids, **kwargs)


# ---- quantized store (Locret + CSKV's quantizer: evict, then store quantized) -------------------------------
QUANT = dict(locret_budget=40, locret_chunk_size=16, locret_stabilizers=4, locret_n_local=8)


def quant_entry_bytes(config, bits, group, dtype_bytes=4):
    """Bytes per stored entry and KV head, written out here: key and value codes (bits each, packed in bytes),
    a scale and a minimum per group of channels for each, the fp32 score and the int32 position."""
    dim = config.head_dim
    codes = -(-dim * bits // 8)
    groups = -(-dim // group)
    return 2 * (codes + 2 * groups * dtype_bytes) + 4 + 4


def unpack_independently(packed, bits, count):
    """Codes from packed bytes, low bits first (``8 // bits`` codes per byte), without the package's helpers."""
    per_byte = 8 // bits
    j = torch.arange(count)
    return (packed[..., j // per_byte].long() >> (bits * (j % per_byte))) & ((1 << bits) - 1)


def group_steps(x, bits, group):
    """Per channel of ``x [..., D]``: its group's minimum and quantization step (max - min) / (2**bits - 1)."""
    mins, steps = [], []
    for part in x.split(group, dim=-1):
        lo, hi = part.amin(-1, keepdim=True), part.amax(-1, keepdim=True)
        mins.append(lo.expand_as(part))
        steps.append(((hi - lo) / ((1 << bits) - 1)).expand_as(part))
    return torch.cat(mins, -1), torch.cat(steps, -1)


class ProjectionCapture:
    """Every k_proj / v_proj output of every layer, in token order: the exact (pre-RoPE) keys and values."""

    def __init__(self, model):
        self.out = {}
        self.handles = []
        for idx, layer in enumerate(model.model.layers):
            for name in ("k_proj", "v_proj"):
                self.handles.append(getattr(layer.self_attn, name).register_forward_hook(self._keep(idx, name)))

    def _keep(self, idx, name):
        def hook(module, args, output):
            self.out.setdefault((idx, name), []).append(output.detach().clone())

        return hook

    def heads(self, idx, name, head_dim, last_step=False):
        """[B, H_kv, T, D] over every step so far (or the last step only)."""
        parts = self.out[(idx, name)]
        flat = parts[-1] if last_step else torch.cat(parts, dim=1)
        return flat.view(*flat.shape[:2], -1, head_dim).transpose(1, 2)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def at_positions(x, positions):
    """x [B, H, T, D] at each entry's position [B, H, N] -> [B, H, N, D]."""
    return x.gather(2, positions.long().unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def assert_within_half_step(stored, exact, bits, group):
    """The dequantized entries are within half a step of the exact ones (the step computed here, per group)."""
    _, steps = group_steps(exact, bits, group)
    error = (stored - exact).abs()
    assert (error <= steps / 2 + 1e-5).all(), (error - steps / 2).max()
    return error


def test_quant_bits_none_keeps_the_unquantized_cache(locret_model):
    model, _, _ = locret_model
    assert model.config.locret_quant_bits is None and model.config.locret_quant_group_size == 32
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(11))
    plain = model.chunked_prefill(ids, **QUANT)
    explicit = model.chunked_prefill(ids, locret_quant_bits=None, **QUANT)
    for a, b in zip(plain.layers, explicit.layers):
        assert a.key_packed is None and b.key_packed is None and a.num_stored == 0
        assert a.keys.shape[-2] == a.num_entries == 40
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert torch.equal(a.positions, b.positions) and torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("position_mode", ["compacted", "original"])
def test_8bit_generation_matches_unquantized(locret_model, position_mode):
    model, _, _ = locret_model
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(3))
    settings = dict(QUANT, locret_position_mode=position_mode)
    expected = model.generate(ids, max_new_tokens=8, do_sample=False, **settings)
    got = model.generate(ids, max_new_tokens=8, do_sample=False, locret_quant_bits=8, **settings)
    assert torch.equal(got[:, 150:154], expected[:, 150:154])  # the first tokens are identical

    # Next-token logits after the prefill: close at 8 bits, and the error grows as the bits shrink.
    def next_logits(**kw):
        cache = model.chunked_prefill(ids[:, :-1], **settings, **kw)
        with torch.no_grad():
            return model(ids[:, -1:], past_key_values=cache).logits[:, -1], cache

    reference, ref_cache = next_logits()
    errors = {}
    for bits in (8, 4, 2):
        logits, cache = next_logits(locret_quant_bits=bits, locret_quant_group_size=4)
        errors[bits] = (logits - reference).abs().max().item()
        assert cache.layers[0].key_packed.dtype == torch.uint8
        # layer 0 sees the embeddings in both runs: the same scores, so the same kept entries
        assert torch.equal(cache.layers[0].positions, ref_cache.layers[0].positions)
    assert 0 < errors[8] < 0.05 * reference.std().item()
    assert errors[8] < errors[4] < errors[2], errors


@pytest.mark.parametrize("bits, group", [(4, 4), (4, 3), (2, 4), (2, 32)])
def test_quantized_cache_bytes_after_prefill(locret_model, bits, group):
    model, _, _ = locret_model
    config = model.config
    ids = torch.randint(0, 256, (2, 130), generator=torch.Generator().manual_seed(12))
    cache = model.chunked_prefill(ids, locret_quant_bits=bits, locret_quant_group_size=group, **QUANT)
    budget, heads = QUANT["locret_budget"], config.num_key_value_heads
    for layer in cache.layers:
        assert layer.num_entries == layer.num_stored == budget and layer.num_pending == 0
        assert tuple(layer.key_packed.shape) == (2, heads, budget, -(-config.head_dim * bits // 8))
        assert tuple(layer.value_scale.shape) == (2, heads, budget, -(-config.head_dim // group))
        assert layer.key_scale.dtype == layer.value_min.dtype == torch.float32  # the model dtype
    expected = config.num_hidden_layers * 2 * heads * budget * quant_entry_bytes(config, bits, group)
    assert cache_nbytes(cache) == expected
    unquantized = model.chunked_prefill(ids, **QUANT)
    full_entry = 2 * config.head_dim * 4 + 4 + 4
    assert cache_nbytes(unquantized) == config.num_hidden_layers * 2 * heads * budget * full_entry
    assert cache_nbytes(cache) < cache_nbytes(unquantized)


@pytest.mark.parametrize("bits, group", [(4, 3), (2, 4), (8, 32)])
def test_stored_entries_are_within_half_a_step_of_the_exact_ones(locret_model, bits, group):
    model, _, _ = locret_model
    dim = model.config.head_dim
    ids = torch.randint(0, 256, (2, 110), generator=torch.Generator().manual_seed(13))
    capture = ProjectionCapture(model)
    try:  # compacted mode: the cached keys are the k_proj outputs (before RoPE)
        cache = model.chunked_prefill(ids, locret_quant_bits=bits, locret_quant_group_size=group, **QUANT)
    finally:
        capture.remove()
    levels = (1 << bits) - 1
    for idx, layer in enumerate(cache.layers):
        keys, values = layer.dequantized_store()
        for name, stored, prefix in (("k_proj", keys, "key"), ("v_proj", values, "value")):
            exact = at_positions(capture.heads(idx, name, dim), layer.positions)
            error = assert_within_half_step(stored, exact, bits, group)
            assert error.max() > 0  # really quantized
            # the stored minimum and scale are the group's, and the packed codes round (x - min) / scale
            lows, steps = group_steps(exact, bits, group)
            scale = getattr(layer, f"{prefix}_scale").repeat_interleave(group, -1)[..., :dim]
            minimum = getattr(layer, f"{prefix}_min").repeat_interleave(group, -1)[..., :dim]
            assert torch.equal(minimum, lows)
            torch.testing.assert_close(scale, steps, rtol=1e-6, atol=1e-7)
            codes = unpack_independently(getattr(layer, f"{prefix}_packed"), bits, dim)
            assert codes.max() <= levels
            ratio = (exact - minimum) / torch.where(scale > 0, scale, torch.ones_like(scale))
            assert ((codes - ratio).abs() <= 0.5 + 1e-4).all()
            torch.testing.assert_close(stored, codes * scale + minimum, rtol=0, atol=1e-6)


def test_current_chunk_is_exact_then_quantized(locret_model, monkeypatch):
    """While a step is processed its entries are attended at full precision (the stored ones dequantized); after
    the layer's eviction the survivors are quantized into the store and nothing stays at full precision."""
    from swiftkv_train.methods.locret.remote_code import cache_llama_locret

    model, _, _ = locret_model
    bits, group, dim = 4, 3, model.config.head_dim
    seen = {"checks": 0, "after": 0}
    capture = ProjectionCapture(model)
    original_update = cache_llama_locret.LocretLayer.update

    def checked_update(layer, key_states, value_states, scores=None, positions=None, *args, **kwargs):
        stored_before = layer.num_stored
        keys, values = original_update(layer, key_states, value_states, scores, positions, *args, **kwargs)
        new = key_states.shape[-2]
        assert layer.num_pending == new and layer.num_stored == stored_before
        assert torch.equal(layer.keys, key_states) and torch.equal(layer.values, value_states)
        assert keys.shape[-2] == stored_before + new
        assert torch.equal(keys[..., stored_before:, :], key_states)  # the new entries: exact
        assert torch.equal(values[..., stored_before:, :], value_states)
        if stored_before:  # the older ones: the store, dequantized
            store_keys, store_values = layer.dequantized_store()
            assert torch.equal(keys[..., :stored_before, :], store_keys)
            assert torch.equal(values[..., :stored_before, :], store_values)
        seen["checks"] += 1
        return keys, values

    def after_attention(module, args, output):  # finish_layer has run: evicted, then stored quantized
        cache = seen["cache"]
        layer = cache.layers[module.layer_idx]
        assert layer.num_pending == 0 and layer.keys.shape[-2] == 0
        assert layer.num_stored == layer.num_entries
        new = layer.positions >= cache.tokens_seen  # this step's survivors (end_step has not run yet)
        assert new.any()
        exact = at_positions(capture.heads(module.layer_idx, "k_proj", dim), layer.positions)
        stored, _ = layer.dequantized_store()
        error = assert_within_half_step(stored, exact, bits, group)
        assert error[new].max() > 0  # the new entries are no longer exact
        seen["after"] += 1

    monkeypatch.setattr(cache_llama_locret.LocretLayer, "update", checked_update)
    handles = [layer.self_attn.register_forward_hook(after_attention) for layer in model.model.layers]
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(14))
    try:
        with watching_cache(model, seen):
            cache = model.chunked_prefill(ids, locret_quant_bits=bits, locret_quant_group_size=group, **QUANT)
            with torch.no_grad():  # a decode step: its token too is exact during the step, stored quantized after
                model(ids[:, -1:], past_key_values=cache)
    finally:
        capture.remove()
        for handle in handles:
            handle.remove()
    steps = -(-(90 - 8) // 16) + 1 + 1  # evicting chunks, the local tail, the decode step
    assert seen["checks"] == seen["after"] == steps * model.config.num_hidden_layers
    assert cache.num_entries() == QUANT["locret_budget"] + 1


@pytest.mark.parametrize("kind", ["scrambled", "tied"])
def test_quantized_eviction_keeps_the_same_entries(locret_model, monkeypatch, kind):
    """Same scores -> the quantized cache keeps the same positions (and scores) as the unquantized one, in
    prefill and with decode eviction, and its codes travel with their entries."""
    model, _, _ = locret_model
    length, budget, chunk, stabilizers, n_local = 100, 30, 16, 6, 10
    seen = install_fake_scores(model, monkeypatch, tied=kind == "tied")
    ids = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(15))
    settings = dict(locret_budget=budget, locret_chunk_size=chunk, locret_stabilizers=stabilizers,
                    locret_n_local=n_local)
    with watching_cache(model, seen):
        plain = model.chunked_prefill(ids, **settings)
        quant = model.chunked_prefill(ids, locret_quant_bits=2, locret_quant_group_size=4, **settings)
        finals = {}
        for bits in (None, 2):
            model.generate(ids, max_new_tokens=2 * chunk + 3, do_sample=False, locret_decode_eviction=True,
                           locret_quant_bits=bits, **settings)
            finals[bits] = seen["cache"]
    if kind == "tied":
        keep = budget - n_local
        assert plain.layers[0].positions[0, 0, : keep - stabilizers].tolist() == list(range(keep - stabilizers))
    for a, b in zip(plain.layers, quant.layers, strict=True):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.scores, b.scores)
    for a, b in zip(finals[None].layers, finals[2].layers, strict=True):
        assert a.num_entries == b.num_entries < budget + chunk
        assert torch.equal(a.positions, b.positions) and torch.equal(a.scores, b.scores)
    # Layer 0's keys are the same in both runs (its input is the embeddings): each stored code decodes to within
    # half a step of the unquantized key of the same entry.
    stored_keys, stored_values = quant.layers[0].dequantized_store()
    assert_within_half_step(stored_keys, plain.layers[0].keys, 2, 4)
    assert_within_half_step(stored_values, plain.layers[0].values, 2, 4)


def test_quantized_prefill_peak_bounded_by_budget_plus_chunk(locret_model):
    model, _, _ = locret_model
    config = model.config
    budget, chunk, n_local, bits, group = 48, 32, 16, 4, 4
    settings = dict(locret_budget=budget, locret_chunk_size=chunk, locret_stabilizers=8, locret_n_local=n_local,
                    locret_quant_bits=bits, locret_quant_group_size=group)
    short = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(4))
    long = torch.randint(0, 256, (1, 900), generator=torch.Generator().manual_seed(5))
    peak_short, entries_short, _ = prefill_peak(model, short, **settings)
    peak_long, entries_long, cache = prefill_peak(model, long, **settings)
    assert entries_long <= budget + chunk and entries_short <= budget + chunk
    assert peak_long == peak_short  # independent of the prompt length

    # The largest moment: one layer holding its stored entries plus a full-precision chunk (or the local tail).
    heads, layers, keep = config.num_key_value_heads, config.num_hidden_layers, budget - n_local
    stored = heads * quant_entry_bytes(config, bits, group)
    pending = heads * (2 * config.head_dim * 4 + 4 + 4)
    evicting_step = layers * keep * stored + chunk * pending
    local_tail = (layers - 1) * budget * stored + keep * stored + n_local * pending
    assert peak_long == max(evicting_step, local_tail)
    assert cache_nbytes(cache) == layers * budget * stored
    plain_peak, _, _ = prefill_peak(model, long, **{k: v for k, v in settings.items() if "quant" not in k})
    assert peak_long < plain_peak


def test_transformation_carries_quant_settings(gqa_base):
    base, _ = gqa_base
    model = to_locret(base, LocretConfig(**SMALL, quant_bits=4, quant_group_size=3))
    assert model.config.locret_quant_bits == 4 and model.config.locret_quant_group_size == 3
    assert model.locret_settings().quant_bits == 4
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(16))
    cache = model.chunked_prefill(ids)
    layer = cache.layers[0]
    assert layer.quant_bits == 4 and layer.group_size == 3 and layer.num_pending == 0
    assert layer.key_packed.shape[-1] == 4 and layer.key_scale.shape[-1] == 3  # D = 8: 4 bytes, 3 groups
    off = model.chunked_prefill(ids, locret_quant_bits=None)  # an explicit None turns it off for this call
    assert off.layers[0].key_packed is None and off.layers[0].keys.shape[-2] == off.num_entries()
    with pytest.raises(Exception, match="locret_quant_bits=3"):
        type(model.config)(**dict(model.config.to_dict(), locret_quant_bits=3))


QUANT_LOADER = EXPORT_SCRIPT_START + textwrap.dedent(
    """
    bad = {}
    for key, value in (("locret_quant_bits", 3), ("locret_quant_group_size", 0)):
        try:
            model.generate(ids, max_new_tokens=2, **{key: value})
        except ValueError as err:
            bad[key] = str(err)
    layer = cache.layers[1]
    out = {"module": type(layer).__module__, "bits": model.config.locret_quant_bits,
           "group": model.config.locret_quant_group_size,
           "default": model.generate(ids, max_new_tokens=6, do_sample=False),
           "q8": model.generate(ids, max_new_tokens=6, do_sample=False, locret_quant_bits=8, locret_budget=20),
           "off": model.generate(ids, max_new_tokens=6, do_sample=False, locret_quant_bits=None),
           "key_packed": layer.key_packed, "value_scale": layer.value_scale, "positions": layer.positions,
           "bad": bad}
    torch.save(out, out_path)
    """
)


def test_quantized_export_round_trip_with_trust_remote_code(gqa_base, tmp_path):
    import json
    from pathlib import Path

    base, tok = gqa_base
    model = to_locret(base, LocretConfig(**SMALL, quant_bits=4, quant_group_size=3))
    with torch.no_grad():
        for _, p in model.retaining_head_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(8)) * 0.1)
    export = save_hf(model, tok, tmp_path / "locret_q", lean=False)
    cskv_quant = Path(__file__).resolve().parents[1] / "swiftkv_train/remote_code/quant_llama_cskv.py"
    assert (export / "quant_llama_cskv.py").read_text() == cskv_quant.read_text()  # CSKV's, shipped as is
    assert (export / "locret_evict.py").is_file()
    saved = json.loads((export / "config.json").read_text())
    assert saved["locret_quant_bits"] == 4 and saved["locret_quant_group_size"] == 3

    result = run_export_script(QUANT_LOADER, export, tmp_path)
    assert result["module"].startswith("transformers_modules") and result["module"].endswith("cache_llama_locret")
    assert (result["bits"], result["group"]) == (4, 3)
    assert "locret_quant_bits=3" in result["bad"]["locret_quant_bits"]
    assert "locret_quant_group_size=0" in result["bad"]["locret_quant_group_size"]

    ids = torch.arange(3, 93).remainder(256)[None]
    assert torch.equal(result["default"], model.generate(ids, max_new_tokens=6, do_sample=False))
    q8 = model.generate(ids, max_new_tokens=6, do_sample=False, locret_quant_bits=8, locret_budget=20)
    assert torch.equal(result["q8"], q8)
    assert torch.equal(result["off"], model.generate(ids, max_new_tokens=6, do_sample=False, locret_quant_bits=None))
    layer = model.chunked_prefill(ids, locret_budget=20).layers[1]
    assert result["key_packed"].dtype == torch.uint8 and result["key_packed"].shape == (1, 3, 20, 4)
    assert torch.equal(result["key_packed"], layer.key_packed)
    assert torch.equal(result["value_scale"], layer.value_scale)
    assert torch.equal(result["positions"], layer.positions)
