"""CSKV model, bi-branch cache, calibration, training loss and export, against plain-PyTorch references."""

import json
import textwrap

import pytest
import torch

from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.export import save_hf
from swiftkv_train.models import load_pretrained
from swiftkv_train.methods.cskv.remote_code import CSKVCache, LlamaCSKVForCausalLM
from swiftkv_train.methods.cskv import CSKVConfig, CSKV, cskv_parameters

from helpers import run_export_script


def build(preset="random:tiny", **settings):
    base, tok = load_pretrained(preset)
    settings.setdefault("init", "svd")
    t = CSKV(settings)
    return base, t.build_student(base), t, tok


# ---- plain-PyTorch reference of the compressed attention ---------------------------------------------------------
def ref_quant_groups(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric min/max round-to-nearest over groups of the last dim, quantize + dequantize."""
    out = torch.empty_like(x)
    levels = 2**bits - 1
    for start in range(0, x.shape[-1], group):
        chunk = x[..., start : start + group]
        lo = chunk.amin(-1, keepdim=True)
        scale = (chunk.amax(-1, keepdim=True) - lo) / levels
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        out[..., start : start + group] = ((chunk - lo) / safe).round().clamp(0, levels) * scale + lo
    return out


def ref_quant_key_blocks(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """[N, r]: every complete block of ``group`` tokens quantized per channel; the tail is left as is."""
    out = x.clone()
    for start in range(0, (x.shape[0] // group) * group, group):
        out[start : start + group] = ref_quant_groups(x[start : start + group].T, bits, group).T
    return out


def ref_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [N, H, D] rotated at ``positions`` (Llama's half-split convention)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = positions[:, None].float() * inv[None]
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


@torch.no_grad()
def reference_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits [N, V] of one unpadded sequence where queries at index >= ``prefill`` see keys/values older than the
    window rebuilt from A, B (quantized like the cache: values per token, complete key blocks per channel)."""
    cfg = model.config
    assert cfg.rope_parameters["rope_type"] == "default"
    theta = cfg.rope_parameters["rope_theta"]
    window, bits, group = cfg.cskv_window, cfg.cskv_quant_bits, cfg.cskv_quant_group_size
    n = ids.shape[0]
    positions = torch.arange(n)
    eps = cfg.rms_norm_eps

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    h = model.model.embed_tokens.weight[ids]
    for layer in model.model.layers:
        a = layer.self_attn
        d = a.head_dim
        x = rms(h, layer.input_layernorm.weight)
        q = (x @ a.q_proj.weight.T).view(n, -1, d)
        k = (x @ a.k_proj.weight.T).view(n, -1, d)
        v = (x @ a.v_proj.weight.T).view(n, -1, d)
        ck, cv = x @ a.k_proj_a.weight.T, x @ a.v_proj_a.weight.T
        ck_q = ref_quant_key_blocks(ck, bits, group) if bits else ck
        cv = ref_quant_groups(cv, bits, group) if bits else cv
        k_fp = (ck @ a.k_proj_b.weight.T).view(n, -1, d)
        k_q = (ck_q @ a.k_proj_b.weight.T).view(n, -1, d)
        v_rec = (cv @ a.v_proj_b.weight.T).view(n, -1, d)
        q, k, k_fp, k_q = (ref_rope(t, positions, theta) for t in (q, k, k_fp, k_q))
        group_size = q.shape[1] // k.shape[1]
        out = torch.empty_like(q)
        for i in range(n):
            j = torch.arange(i + 1)
            exact = (i < prefill) | (i - j < window)
            compressed_count = max(i - window + 1, 0)
            quantized = j < (compressed_count // group) * group if bits else torch.zeros_like(exact)
            sel = lambda t: t[:, None, None]  # noqa: E731
            keys = torch.where(sel(exact), k[: i + 1], torch.where(sel(quantized), k_q[: i + 1], k_fp[: i + 1]))
            values = torch.where(sel(exact), v[: i + 1], v_rec[: i + 1])
            keys, values = keys.repeat_interleave(group_size, 1), values.repeat_interleave(group_size, 1)
            scores = torch.einsum("hd,jhd->hj", q[i], keys) / d**0.5
            out[i] = torch.einsum("hj,jhd->hd", scores.softmax(-1), values)
        h = h + out.reshape(n, -1) @ a.o_proj.weight.T
        m = layer.mlp
        x = rms(h, layer.post_attention_layernorm.weight)
        h = h + (torch.nn.functional.silu(x @ m.gate_proj.weight.T) * (x @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return rms(h, model.model.norm.weight) @ model.lm_head.weight.T


# ---- tests --------------------------------------------------------------------------------------------------------
def test_density_one_svd_reproduces_original_kv_and_logits():
    base, student, _, _ = build(key_density=1.0, value_density=1.0, window=3)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    for layer in student.model.layers:
        a = layer.self_attn
        torch.testing.assert_close(a.k_proj_b(a.k_proj_a(x)), a.k_proj(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(a.v_proj_b(a.v_proj_a(x)), a.v_proj(x), rtol=0, atol=1e-5)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher = base(ids).logits
        torch.testing.assert_close(student(ids).logits, teacher, rtol=0, atol=1e-6)  # prefill is exact
        compressed = student(ids, use_cache=False, cskv_decode_from=0).logits  # every position from the cache
        torch.testing.assert_close(compressed, teacher, rtol=0, atol=1e-4)
        assert torch.equal(student.cskv(False)(ids).logits, teacher)  # teacher mode is the original model
    student.cskv(True)
    out = student.generate(ids, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, CSKVCache)
    expected = base.generate(ids, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), rtol=0, atol=1e-4)


@pytest.mark.parametrize("bits", [None, 4, 2])
def test_cached_generation_equals_recomputation_with_the_same_compression(bits):
    _, student, _, _ = build(key_density=0.3, value_density=0.4, window=5, quant_bits=bits, quant_group_size=4)
    student.generation_config.eos_token_id = None  # generate the full length
    prompt_len, new = 11, 14
    ids = torch.randint(0, 256, (2, prompt_len), generator=torch.Generator().manual_seed(2))
    out = student.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True,
                           pad_token_id=256)
    cached = torch.stack(out.logits, 1)  # [B, new, V]: logits at positions prompt_len-1 .. end-1
    for row in range(2):
        seq = out.sequences[row]
        ref = reference_logits(student, seq, prompt_len)
        torch.testing.assert_close(cached[row], ref[prompt_len - 1 : -1], rtol=0, atol=2e-4)
        # the compressed tokens really change the outputs (the test is not vacuous)
        with torch.no_grad():
            exact = student(seq[None]).logits[0]
        assert (exact[prompt_len - 1 : -1] - ref[prompt_len - 1 : -1]).abs().max() > 1e-2
    # The cache-free simulation (used by fidelity evaluation and the KL term) computes the same thing.
    with torch.no_grad():
        simulated = student(out.sequences, use_cache=False, cskv_decode_from=prompt_len).logits
    for row in range(2):
        ref = reference_logits(student, out.sequences[row], prompt_len)
        torch.testing.assert_close(simulated[row], ref, rtol=0, atol=2e-4)


def test_left_padded_batch_generation_matches_per_row_reference():
    _, student, _, tok = build(key_density=0.25, value_density=0.5, window=4)
    student.generation_config.eos_token_id = None
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen) for n in (7, 12)]
    width = max(len(p) for p in prompts)
    ids = torch.full((2, width), 256)
    mask = torch.zeros((2, width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    out = student.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=256)
    cached = torch.stack(out.logits, 1)
    for row, p in enumerate(prompts):
        seq = torch.cat([p, out.sequences[row, width:]])
        ref = reference_logits(student, seq, len(p))
        torch.testing.assert_close(cached[row], ref[len(p) - 1 : -1], rtol=0, atol=2e-4)


def test_beam_search_runs_on_the_compressed_cache():
    _, student, _, _ = build(key_density=0.5, value_density=0.5, window=3, quant_bits=4, quant_group_size=4)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    out = student.generate(ids, max_new_tokens=6, num_beams=2, do_sample=False, pad_token_id=256)
    assert out.shape[0] == 1 and out.shape[1] > 9


def test_training_steps_reduce_reconstruction_and_touch_only_the_factors():
    _, student, t, _ = build(key_density=0.25, value_density=0.25, window=4, quant_bits=4, quant_group_size=4,
                             fake_quant=True, kl_weight=0.1)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (2, 32), generator=gen)
    positions = torch.cat([torch.arange(20), torch.arange(12)])[None].expand(2, -1)  # two packed documents
    batch = {"input_ids": ids, "labels": ids, "position_ids": positions}
    trainable = dict(cskv_parameters(student))
    assert set(trainable) == {n for n, p in student.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 * student.config.num_hidden_layers
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=3e-3, weight_decay=0.0)
    first = t.loss(student, batch)
    assert set(first) == {"loss", "recon_k", "recon_v", "kl"}
    for _ in range(12):
        optimizer.zero_grad()
        out = t.loss(student, batch)
        out["loss"].backward()
        optimizer.step()
    last = t.loss(student, batch)
    assert last["recon_k"] < 0.8 * first["recon_k"] and last["recon_v"] < 0.8 * first["recon_v"]
    assert last["loss"] < first["loss"]
    for name, param in student.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in trainable), name


def test_loss_matches_an_independent_reconstruction_error():
    _, student, t, _ = build(key_density=0.25, value_density=0.5, window=4)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(6))
    out = t.loss(student, {"input_ids": ids, "labels": ids})
    hidden = student.cskv(False)(ids, output_hidden_states=True, use_cache=False).hidden_states
    theta = student.config.rope_parameters["rope_theta"]
    errs_k, errs_v = [], []
    with torch.no_grad():
        for idx, layer in enumerate(student.model.layers):
            a = layer.self_attn
            x = layer.input_layernorm(hidden[idx][0])
            shape = (16, -1, a.head_dim)
            k = ref_rope(a.k_proj(x).view(shape), torch.arange(16), theta)
            k_hat = ref_rope(a.k_proj_b(a.k_proj_a(x)).view(shape), torch.arange(16), theta)
            errs_k.append((k - k_hat).pow(2).mean())
            errs_v.append((a.v_proj(x) - a.v_proj_b(a.v_proj_a(x))).pow(2).mean())
    torch.testing.assert_close(out["recon_k"], torch.stack(errs_k).mean(), rtol=1e-4, atol=0)
    torch.testing.assert_close(out["recon_v"], torch.stack(errs_v).mean(), rtol=1e-4, atol=0)


def test_asvd_calibration_matches_reference_and_is_cached(tmp_path):
    base, tok = load_pretrained("random:tiny")
    settings = dict(key_density=0.25, value_density=0.5, init="asvd", calibration_batches=2,
                    calibration_cache_dir=str(tmp_path))
    gen = torch.Generator().manual_seed(7)
    batches = [{"input_ids": torch.randint(0, 256, (2, 16), generator=gen)} for _ in range(3)]
    t = CSKV(settings)
    student = t.build_student(base)
    t.calibrate(student, iter(batches))
    assert t.calibration_info["factors_cached"] is False and t.calibration_info["factors_path"].is_file()

    # Reference: mean |x| of each layer's k_proj input over the first 2 batches, then SVD of W·diag(sqrt(s)).
    sums, count = None, 0
    with torch.no_grad():
        for batch in batches[:2]:
            hs = base(batch["input_ids"], output_hidden_states=True).hidden_states
            xs = [layer.input_layernorm(hs[i]).abs().sum((0, 1)) for i, layer in enumerate(base.model.layers)]
            sums = xs if sums is None else [a + b for a, b in zip(sums, xs)]
            count += batch["input_ids"].numel()
    for idx, layer in enumerate(student.model.layers):
        s = (sums[idx] / count).double().sqrt()
        for kind, rank in (("k", 8), ("v", 16)):
            w = getattr(base.model.layers[idx].self_attn, f"{kind}_proj").weight.double()
            u, sigma, vh = torch.linalg.svd(w * s, full_matrices=False)
            best = (u[:, :rank] * sigma[:rank]) @ vh[:rank] / s  # the best rank-r fit in the scaled norm
            attn = layer.self_attn
            got = getattr(attn, f"{kind}_proj_b").weight.double() @ getattr(attn, f"{kind}_proj_a").weight.double()
            torch.testing.assert_close(got, best, rtol=0, atol=1e-5)

    # A fresh run with the same model, data and settings loads the factors instead of recomputing them.
    t2 = CSKV(settings)
    student2 = t2.build_student(base)
    t2.calibrate(student2, iter(batches))
    assert t2.calibration_info["factors_cached"] is True
    for (n, p), (_, q) in zip(cskv_parameters(student), cskv_parameters(student2)):
        assert torch.equal(p, q), n
    # Other densities reuse the activation statistics but not the factors.
    t3 = CSKV({**settings, "key_density": 0.5})
    t3.calibrate(t3.build_student(base), iter(batches))
    assert t3.calibration_info["factors_cached"] is False and t3.calibration_info["stats_cached"] is True


@pytest.mark.parametrize(
    "settings, field",
    [
        (dict(key_density=0.0), "key_density"),
        (dict(key_density=1.5), "key_density"),
        (dict(value_density=-0.2), "value_density"),
        (dict(value_density_per_layer=[0.5, 2.0]), r"value_density_per_layer\[1\]"),
        (dict(quant_bits=3), "quant_bits"),
        (dict(quant_bits=16), "quant_bits"),
        (dict(window=0), "window"),
        (dict(quant_group_size=0), "quant_group_size"),
        (dict(init="random"), "init"),
        (dict(fake_quant=True), "fake_quant"),
        (dict(kl_weight=-1.0), "kl_weight"),
        (dict(densty=0.5), "densty"),
    ],
)
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(SwiftKVInputError, match=field):
        CSKV(settings)


def test_per_layer_densities_must_match_the_layer_count():
    base, _ = load_pretrained("random:tiny")
    with pytest.raises(SwiftKVInputError, match="key_density_per_layer has 3 entries but the model has 4"):
        CSKV(dict(key_density_per_layer=[0.5, 0.5, 0.5])).build_student(base)
    student = CSKV(dict(key_density_per_layer=[1.0, 0.5, 0.25, 0.125], init="svd")).build_student(base)
    assert [layer.self_attn.k_proj_a.out_features for layer in student.model.layers] == [32, 16, 8, 4]
    assert CSKVConfig().value_density == 0.5 and CSKVConfig().window == 32


# ---- export round trip -------------------------------------------------------------------------------------------
LOADER = textwrap.dedent(
    """
    import sys, torch
    sys.modules["swiftkv_train"] = None  # any import of the package now fails
    from transformers import AutoModelForCausalLM
    export_dir, out_path, ids = sys.argv[1], sys.argv[2], torch.tensor(eval(sys.argv[3]))
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=256, return_dict_in_generate=True)
        out = {"simulated": model(ids, use_cache=False, cskv_decode_from=0).logits,
               "generated": gen.sequences, "cache": type(gen.past_key_values).__module__,
               "class": type(model).__module__, "cskv": model.config.cskv,
               "teacher": model.cskv(False)(ids).logits}
    torch.save(out, out_path)
    """
)


def test_export_round_trip_with_trust_remote_code(tmp_path):
    _, student, t, tok = build(key_density=0.25, value_density=0.5, window=3, quant_bits=4, quant_group_size=4)
    with torch.no_grad():  # trained-looking factors, so the export must carry them
        for _, p in cskv_parameters(student):
            p.mul_(1.05)
    export = save_hf(t.prepare_export(student), tok, tmp_path / "full", lean=False)
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "llama_cskv" and config["cskv"] and config["cskv_quant_bits"] == 4
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llama_cskv.LlamaCSKVForCausalLM"
    assert {p.name for p in export.glob("*.py")} == {  # the decode kernel ships beside the modeling file
        "configuration_llama_cskv.py", "modeling_llama_cskv.py", "cache_llama_cskv.py", "quant_llama_cskv.py",
        "cskv_decode.py", "transformers_compat.py"}
    assert config["use_kernels"] is True

    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(8))
    result = run_export_script(LOADER, export, tmp_path, ids.tolist())
    assert result["class"].startswith("transformers_modules") and result["cache"].startswith("transformers_modules")
    assert result["cskv"] is True
    with torch.no_grad():
        expected_sim = student(ids, use_cache=False, cskv_decode_from=0).logits
        expected_gen = student.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=256)
        expected_teacher = student.cskv(False)(ids).logits
    student.cskv(True)
    torch.testing.assert_close(result["simulated"], expected_sim, rtol=0, atol=1e-5)
    torch.testing.assert_close(result["teacher"], expected_teacher, rtol=0, atol=1e-5)
    assert torch.equal(result["generated"], expected_gen)

    # Lean export: bf16, nothing dropped (the window needs the original k/v_proj), student mode on.
    lean = save_hf(t.prepare_export(student), tok, tmp_path / "lean", lean=True)
    from safetensors import safe_open

    with safe_open(str(lean / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == set(student.state_dict()) - {"lm_head.weight"}  # only the tied head is not stored twice
    assert json.loads((lean / "config.json").read_text())["cskv"] is True


def test_cache_type_mismatches_are_refused():
    _, student, _, _ = build(window=3)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        cache = student(ids).past_key_values
        assert isinstance(cache, CSKVCache)
        with pytest.raises(ValueError, match="DynamicCache"):
            student.cskv(False)(ids[:, -1:], past_key_values=cache)
        student.cskv(True)
        with pytest.raises(RuntimeError, match="CSKVCache stores compressed features"):
            cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 0)
    assert isinstance(student, LlamaCSKVForCausalLM)


@pytest.mark.parametrize("quant_bits", [None, 4])
def test_harness_decoding_loop_uses_the_compressed_cache(quant_bits):
    """The evaluation loop (greedy_generate) keeps one cache object across steps: for a CSKV model it must be the
    CSKVCache the model fills (model.new_cache()), so its tokens equal model.generate's."""
    from swiftkv_train.models.tiny import random_model
    from swiftkv_train.policies.generate import greedy_generate
    from swiftkv_train.methods.cskv import to_cskv

    torch.manual_seed(0)
    model = to_cskv(random_model("tiny", dtype=torch.float32),
                    CSKVConfig(window=8, quant_bits=quant_bits, key_density=0.5, value_density=0.5)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    for mode in (True, False):
        model.cskv(mode)
        loop = greedy_generate(model, ids, 12)
        assert isinstance(loop.cache, CSKVCache) == mode
        want = model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[:, 40:]
        assert torch.equal(loop.tokens, want)
