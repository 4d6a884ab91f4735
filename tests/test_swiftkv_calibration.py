"""Least-squares K/V initialisation against a fit computed here from transformers' own Llama activations."""

import pytest
import torch

from swiftkv_train.methods.swiftkv import SwiftKVConfig
from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.models import load_pretrained
from swiftkv_train.methods.swiftkv import to_swiftkv
from swiftkv_train.methods.swiftkv.calibrate import least_squares_kv_init
from swiftkv_train.methods.swiftkv import SwiftKV


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def batches_of(lengths, seed=0, seq=40):
    """Right-padded batches: row i holds lengths[i] real tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (len(lengths), seq), generator=gen)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]


def reference_fit(base, batches, m, group):
    """lstsq over the real tokens: inputs rms_norm(h_M) (layer M's norm weight, as norm_swiftkv starts), targets
    the mean over the group of each layer's k_proj/v_proj of its own normed input (transformers' hidden states)."""
    xs, ks, vs = [], [], []
    eps = base.config.rms_norm_eps
    with torch.no_grad():
        for batch in batches:
            hidden = base(**batch, output_hidden_states=True).hidden_states
            keep = batch["attention_mask"].bool()
            layer_m = base.model.layers[m]
            xs.append(rms_norm(hidden[m], layer_m.input_layernorm.weight, eps)[keep])
            k_targets, v_targets = [], []
            for j in group:
                layer = base.model.layers[j]
                z = rms_norm(hidden[j], layer.input_layernorm.weight, eps)[keep]
                k_targets.append(layer.self_attn.k_proj(z))
                v_targets.append(layer.self_attn.v_proj(z))
            ks.append(torch.stack(k_targets).mean(0))
            vs.append(torch.stack(v_targets).mean(0))
    x = torch.cat(xs).double()
    k_fit = torch.linalg.lstsq(x, torch.cat(ks).double()).solution.T
    v_fit = torch.linalg.lstsq(x, torch.cat(vs).double()).solution.T
    return k_fit.float(), v_fit.float()


@pytest.mark.parametrize("g", [1, 2, 3])
def test_fit_equals_lstsq_on_the_real_tokens(g):
    base, _ = load_pretrained("random:tiny-7l", dtype=torch.float32)
    m = 2
    student = to_swiftkv(base, m, g)
    batches = batches_of([40, 31, 40, 25])  # 136 real tokens > 64 input channels; padding must not count
    report = least_squares_kv_init(student, batches, ridge=0.0)
    assert report.tokens == 136
    for leader in range(m, 7, g):
        group = range(leader, min(leader + g, 7))
        k_ref, v_ref = reference_fit(base, batches, m, group)
        attn = student.model.layers[leader].self_attn
        torch.testing.assert_close(attn.k_proj_swiftkv.weight, k_ref, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(attn.v_proj_swiftkv.weight, v_ref, rtol=1e-3, atol=1e-4)
        assert report.unexplained_after[leader] < report.unexplained_before[leader]
    # The teacher is untouched: the same frozen tensors, and SwiftKV mode is back on.
    assert student.config.swiftkv
    torch.testing.assert_close(student.swiftkv(False)(batches[0]["input_ids"]).logits,
                               base(batches[0]["input_ids"]).logits)


def test_ridge_shrinks_the_fit():
    base, _ = load_pretrained("random:tiny-7l", dtype=torch.float32)
    norms = []
    for ridge in (0.0, 1.0):
        student = to_swiftkv(base, 2, 1)
        least_squares_kv_init(student, batches_of([40, 40, 40, 40]), ridge=ridge)
        norms.append(student.model.layers[3].self_attn.k_proj_swiftkv.weight.norm())
    assert norms[1] < 0.9 * norms[0]


def test_transformation_calibrates_only_when_asked():
    base, _ = load_pretrained("random:tiny-7l", dtype=torch.float32)
    batches = batches_of([40, 40, 40, 40])
    weights = {}
    for init in ("mean", "least_squares"):
        t = SwiftKV(SwiftKVConfig(num_key_value_layers=2, kv_init=init, calibration_batches=1))
        student = t.build_student(base)
        t.calibrate(student, iter(batches))
        weights[init] = student.model.layers[4].self_attn.k_proj_swiftkv.weight.clone()
    torch.testing.assert_close(weights["mean"], base.model.layers[4].self_attn.k_proj.weight)
    # calibration_batches=1: only the first batch is used.
    reference = to_swiftkv(base, 2, 1)
    least_squares_kv_init(reference, batches[:1])
    torch.testing.assert_close(weights["least_squares"], reference.model.layers[4].self_attn.k_proj_swiftkv.weight)


@pytest.mark.parametrize("cfg, field", [
    (dict(kv_init="svd"), "kv_init"),
    (dict(kv_init="least_squares", calibration_batches=0), "calibration_batches"),
])
def test_bad_settings_name_the_field(cfg, field):
    base, _ = load_pretrained("random:tiny-7l", dtype=torch.float32)
    with pytest.raises(SwiftKVInputError, match=field):
        SwiftKV(SwiftKVConfig(num_key_value_layers=2, **cfg)).build_student(base)


def test_bad_ridge_and_bias_are_refused():
    base, _ = load_pretrained("random:tiny-7l", dtype=torch.float32)
    with pytest.raises(SwiftKVInputError, match="kv_init_ridge"):
        least_squares_kv_init(to_swiftkv(base, 2, 1), batches_of([40] * 4), ridge=-1.0)
    biased, _ = load_pretrained("random:tiny-qwen2", dtype=torch.float32)  # Qwen2: k/v projections with a bias
    student = to_swiftkv(biased, 2, 1)
    assert student.model.layers[2].self_attn.k_proj_swiftkv.bias is not None
    with pytest.raises(SwiftKVInputError, match="bias"):
        least_squares_kv_init(student, batches_of([40] * 4))
