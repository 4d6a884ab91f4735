"""The loss components (swiftkv_train.losses): each against an independent plain-PyTorch definition written here
(full fp64 logits, F.kl_div / F.mse_loss, autograd for the gradient), values and gradients; reductions, masks,
the registry, and the fused-kernel dispatch."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from swiftkv_train.losses import (
    JSD,
    KL,
    LOGIT_LOSSES,
    REDUCTIONS,
    LogitLoss,
    hidden_mse_loss,
    kl_mask_from_labels,
    logit_loss,
)
from swiftkv_train.losses import base as losses_base


def _inputs(batch, seq, hidden, vocab, *, seed=0, dtype=torch.float32, mask_p=0.3):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, hidden, generator=gen)
    teacher = student + 0.5 * torch.randn(batch, seq, hidden, generator=gen)
    weight = torch.randn(vocab, hidden, generator=gen) / hidden**0.5 * 3
    mask = torch.rand(batch, seq, generator=gen) > mask_p
    return student.to(dtype).requires_grad_(), teacher.to(dtype), weight.to(dtype), mask


def _value_and_grad(fn, student, *args, **kwargs):
    student.grad = None
    loss = fn(student, *args, **kwargs)
    loss.backward()
    return loss.detach(), student.grad.detach().clone()


# ---- the independent definitions ------------------------------------------------------------------------------------
def reference_divergence(name, log_s, log_t, beta=0.5):
    """Per-position divergence from full log-probabilities, written from the definitions with F.kl_div
    (F.kl_div(a, b, log_target=True) = Σ exp(b) (b − a) = KL(exp b ‖ exp a))."""
    def kl(log_p, log_q):  # KL(p ‖ q) per row
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)

    if name == "kl" or beta == 0:
        return kl(log_t, log_s)
    if beta == 1:
        return kl(log_s, log_t)
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)
    return beta * kl(log_t, log_m) + (1 - beta) * kl(log_s, log_m)


def reference_logit_loss(name, student, teacher, weight, mask=None, *, temperature=2.0, reduction="mean", beta=0.5):
    """T² · divergence over the masked positions, full fp64 logits, reduced as documented."""
    h = student.shape[-1]
    s = student.reshape(-1, h).double()
    t = teacher.detach().reshape(-1, h).double()
    w = weight.double()
    log_s = F.log_softmax(s @ w.T / temperature, dim=-1)
    log_t = F.log_softmax(t @ w.detach().T / temperature, dim=-1)
    per_position = reference_divergence(name, log_s, log_t, beta) * temperature**2
    keep = torch.ones(per_position.shape, dtype=torch.bool) if mask is None else mask.reshape(-1)
    total = (per_position * keep).sum()
    divisor = {"mean": max(int(keep.sum()), 1), "batchmean_all": keep.numel(), "sum": 1}[reduction]
    return total / divisor


COMPONENTS = {
    "kl": (KL(), "kl", None),
    "jsd0": (JSD(beta=0.0), "jsd", 0.0),
    "jsd0.3": (JSD(beta=0.3), "jsd", 0.3),
    "jsd0.5": (JSD(), "jsd", 0.5),
    "jsd1": (JSD(beta=1.0), "jsd", 1.0),
}


def _reference_for(key):
    _, name, beta = COMPONENTS[key]
    return lambda *args, **kw: reference_logit_loss(name, *args, beta=beta if beta is not None else 0.5, **kw)


SHAPES = [
    # (B, S, H, V, chunk): N = B*S ragged w.r.t. chunk, chunk > N, chunk of 1
    (2, 7, 8, 13, 4),
    (1, 5, 16, 33, 64),
    (3, 4, 8, 10, 1),
]


# ---- logits losses against the reference ----------------------------------------------------------------------------
@pytest.mark.parametrize("key", COMPONENTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_component_matches_reference(key, shape, reduction, temperature):
    component = COMPONENTS[key][0]
    b, s, h, v, chunk = shape
    student, teacher, weight, mask = _inputs(b, s, h, v)
    assert 0 < mask.sum() < mask.numel()  # the mask really drops some positions
    kwargs = dict(temperature=temperature, reduction=reduction)
    loss, grad = _value_and_grad(component, student, teacher, weight, mask, chunk_size=chunk, **kwargs)
    student64 = student.detach().double().requires_grad_()
    ref, ref_grad = _value_and_grad(_reference_for(key), student64, teacher, weight, mask, **kwargs)
    assert loss.dtype == torch.float32 and loss.shape == () and grad.dtype == torch.float32
    assert ref > 1e-3  # a non-trivial loss, so equality means something
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert torch.all(grad[~mask] == 0)  # unmasked positions get exactly no gradient


@pytest.mark.parametrize("key", ["kl", "jsd0.3", "jsd1"])
def test_lm_head_gradient_flows_through_student_side_only(key):
    student, teacher, weight, mask = _inputs(2, 5, 8, 11)
    w1 = weight.clone().requires_grad_()
    COMPONENTS[key][0](student, teacher, w1, mask, chunk_size=3).backward()
    w64 = weight.double().requires_grad_()
    _reference_for(key)(student.detach(), teacher, w64, mask).backward()
    assert w1.grad.abs().max() > 1e-4
    torch.testing.assert_close(w1.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("key", ["kl", "jsd0.5"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mask_none_means_all_positions(key, reduction):
    component = COMPONENTS[key][0]
    student, teacher, weight, _ = _inputs(2, 6, 8, 12)
    all_true = torch.ones(2, 6, dtype=torch.bool)
    loss_none, grad_none = _value_and_grad(component, student, teacher, weight, None, chunk_size=5,
                                           reduction=reduction)
    loss_all, grad_all = _value_and_grad(component, student, teacher, weight, all_true, chunk_size=5,
                                         reduction=reduction)
    torch.testing.assert_close(loss_none, loss_all)
    torch.testing.assert_close(grad_none, grad_all)


@pytest.mark.parametrize("key", ["kl", "jsd0.5"])
def test_reductions_relate_by_position_counts(key):
    component = COMPONENTS[key][0]
    student, teacher, weight, mask = _inputs(2, 7, 8, 13)
    losses = {r: component(student, teacher, weight, mask, chunk_size=4, reduction=r).item() for r in REDUCTIONS}
    assert losses["mean"] == pytest.approx(losses["sum"] / int(mask.sum()), rel=1e-6)
    assert losses["batchmean_all"] == pytest.approx(losses["sum"] / mask.numel(), rel=1e-6)


@pytest.mark.parametrize("key", ["kl", "jsd0.5", "jsd1"])
def test_all_masked_gives_zero_without_nan(key):
    component = COMPONENTS[key][0]
    student, teacher, weight, _ = _inputs(2, 4, 8, 10)
    nothing = torch.zeros(2, 4, dtype=torch.bool)
    for reduction in REDUCTIONS:
        loss, grad = _value_and_grad(component, student, teacher, weight, nothing, reduction=reduction)
        assert loss.item() == 0.0 and torch.all(grad == 0)


@pytest.mark.parametrize("key", ["kl", "jsd0.3", "jsd1"])
def test_identical_teacher_and_student_give_zero_loss_and_grad(key):
    student, _, weight, mask = _inputs(2, 6, 8, 12)
    loss, grad = _value_and_grad(COMPONENTS[key][0], student, student.detach().clone(), weight, mask, chunk_size=5)
    assert abs(loss.item()) < 1e-6
    assert grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("key", ["kl", "jsd0.5"])
def test_bf16_inputs_close_to_fp32(key):
    component = COMPONENTS[key][0]
    student, teacher, weight, mask = _inputs(2, 9, 16, 40, seed=5)
    s16 = student.detach().bfloat16().requires_grad_()
    t16, w16 = teacher.bfloat16(), weight.bfloat16()
    loss16, grad16 = _value_and_grad(component, s16, t16, w16, mask, chunk_size=4)
    assert loss16.dtype == torch.float32 and grad16.dtype == torch.bfloat16
    # Same bf16 inputs through the fp64 reference: only the bf16 gradient rounding differs.
    s64 = s16.detach().double().requires_grad_()
    ref, ref_grad = _value_and_grad(_reference_for(key), s64, t16, w16, mask)
    torch.testing.assert_close(loss16.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad16.double(), ref_grad, rtol=2e-2, atol=1e-3)
    # And against the fp32 originals: bf16 input rounding, looser.
    loss32, _ = _value_and_grad(component, student, teacher, weight, mask, chunk_size=4)
    torch.testing.assert_close(loss16, loss32, rtol=5e-2, atol=1e-2)


@pytest.mark.parametrize("key", ["kl", "jsd0.5"])
def test_autograd_keeps_no_vocab_sized_tensor(key):
    b, s, h, v = 2, 8, 4, 1000  # V >> H so a retained [N, V] tensor could not hide
    student, teacher, weight, mask = _inputs(b, s, h, v)
    loss = COMPONENTS[key][0](student, teacher, weight, mask, chunk_size=4)
    saved = loss.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(b, s, h)]


@pytest.mark.parametrize("key", ["kl", "jsd0.3"])
def test_upstream_gradient_scales_result(key):
    component = COMPONENTS[key][0]
    student, teacher, weight, mask = _inputs(2, 5, 8, 11)
    _, grad = _value_and_grad(component, student, teacher, weight, mask)
    student.grad = None
    (3.0 * component(student, teacher, weight, mask)).backward()
    torch.testing.assert_close(student.grad, 3.0 * grad)


# ---- KL and JSD specifics --------------------------------------------------------------------------------------------
def test_kl_golden_value_is_pinned():
    # Computed once on this exact seeded input; a change in the definition (temperature scaling, reduction, KL
    # direction) moves it far outside the tolerance.
    torch.manual_seed(1234)
    s, t, w = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(6, 4)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert KL()(s, t, w, mask, temperature=2.0, chunk_size=3).item() == pytest.approx(1.2581901550292969, abs=1e-5)
    assert KL()(s, t, w, mask, temperature=1.0, reduction="batchmean_all").item() == pytest.approx(
        0.7634437680244446, abs=1e-5
    )


def test_kl_direction_is_teacher_to_student():
    # KL is asymmetric: swapping the roles must change the value (forward KL(p_t || p_s) is pinned above).
    student, teacher, weight, mask = _inputs(1, 6, 8, 12, seed=7)
    forward = KL()(student, teacher, weight, mask)
    swapped = KL()(teacher, student.detach(), weight, mask)
    assert abs(forward.item() - swapped.item()) > 1e-3


def test_kl_component_equals_the_kernel_files_torch_reference():
    """The fused kernel's torch reference (kernels/kd_loss.py, its own copy: kernels import no package code) and
    the component's chunked engine are the same KL."""
    from swiftkv_kernels.kd_loss import kl_loss_reference

    student, teacher, weight, mask = _inputs(2, 7, 8, 13)
    component, grad = _value_and_grad(KL(), student, teacher, weight, mask, chunk_size=4, temperature=1.5)
    reference, reference_grad = _value_and_grad(
        lambda s, t, w, m: kl_loss_reference(s, t, w, m, 1.5, 4, "mean"), student, teacher, weight, mask)
    torch.testing.assert_close(reference, component, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference_grad, grad, rtol=1e-4, atol=1e-6)


def test_jsd_ends_are_the_forward_and_reverse_kl_and_half_is_symmetric():
    student, teacher, weight, mask = _inputs(2, 7, 8, 13, seed=2)
    kl = KL()(student, teacher, weight, mask, chunk_size=4)
    assert torch.equal(JSD(beta=0.0)(student, teacher, weight, mask, chunk_size=4), kl)
    reverse = JSD(beta=1.0)(student, teacher, weight, mask)
    torch.testing.assert_close(reverse, KL()(teacher, student.detach(), weight, mask), rtol=1e-5, atol=1e-7)
    # JSD_0.5 is symmetric in its two distributions; JSD_β with the roles swapped is JSD_(1−β).
    half = JSD(beta=0.5)(student, teacher, weight, mask)
    torch.testing.assert_close(half, JSD(beta=0.5)(teacher, student.detach(), weight, mask), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(JSD(beta=0.3)(student, teacher, weight, mask),
                               JSD(beta=0.7)(teacher, student.detach(), weight, mask), rtol=1e-5, atol=1e-7)
    # bounded by T² · log 2 per position (mean reduction)
    assert 0 < half.item() <= 4 * math.log(2)


# ---- the registry, the settings, the checks ------------------------------------------------------------------------
def test_registry_and_factory():
    assert {"kl", "jsd"} <= set(LOGIT_LOSSES)
    assert all(issubclass(cls, LogitLoss) and LOGIT_LOSSES[cls.name] is cls for cls in LOGIT_LOSSES.values())
    assert logit_loss("kl") == KL()
    assert logit_loss("kl", beta=0.3) == KL()  # settings the component does not declare are ignored
    assert logit_loss("jsd", beta=0.3) == JSD(beta=0.3)
    with pytest.raises(ValueError, match="unknown logits loss 'kld': choose one of .*jsd.*kl"):
        logit_loss("kld")
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        JSD(beta=1.5)


def test_a_new_component_registers_itself_and_runs_on_the_engine():
    class Reverse(KL):  # KL(p_s ‖ p_t) by swapping the roles inside the divergence
        name = "test_reverse_kl"

        def divergence(self, z_s, z_t):
            log_p_s, log_p_t = torch.log_softmax(z_s, -1), torch.log_softmax(z_t, -1)
            p_s = log_p_s.exp()
            f = log_p_s - log_p_t
            kl = (p_s * f).sum(-1, keepdim=True)
            return kl.sum(), p_s * (f - kl)

    try:
        assert LOGIT_LOSSES["test_reverse_kl"] is Reverse
        student, teacher, weight, mask = _inputs(2, 5, 8, 11)
        got = logit_loss("test_reverse_kl")(student, teacher, weight, mask, chunk_size=3)
        torch.testing.assert_close(got, JSD(beta=1.0)(student, teacher, weight, mask), rtol=1e-6, atol=1e-7)
    finally:
        LOGIT_LOSSES.pop("test_reverse_kl", None)


@pytest.mark.parametrize("component", [KL(), JSD()], ids=["kl", "jsd"])
def test_bad_inputs_are_rejected(component):
    student, teacher, weight, mask = _inputs(2, 5, 8, 11)
    with pytest.raises(ValueError, match="reduction"):
        component(student, teacher, weight, mask, reduction="batchmean")
    with pytest.raises(ValueError, match="same shape"):
        component(student, teacher[:, :4], weight, mask)
    with pytest.raises(ValueError, match="mask"):
        component(student, teacher, weight, mask[:, :4])
    with pytest.raises(ValueError, match="lm_head_weight"):
        component(student, teacher, weight[:, :4], mask)
    with pytest.raises(ValueError, match="chunk_size"):
        component(student, teacher, weight, mask, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        component(student, teacher, weight, mask, temperature=0.0)


# ---- fused kernels: used where they exist and can run, never pretended ------------------------------------------------
def test_kl_fused_on_cpu_runs_the_torch_path(monkeypatch):
    from swiftkv_kernels import kd_loss

    def must_not_run(*args, **kwargs):
        raise AssertionError("the fused kernel cannot run on CPU")

    monkeypatch.setattr(kd_loss, "fused_kl_loss", must_not_run)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    student, teacher, weight, mask = _inputs(2, 5, 8, 11)
    fused, fused_grad = _value_and_grad(KL(), student, teacher, weight, mask, chunk_size=3, fused=True)
    plain, plain_grad = _value_and_grad(KL(), student, teacher, weight, mask, chunk_size=3, fused=False)
    assert torch.equal(fused, plain) and torch.equal(fused_grad, plain_grad)


def test_kl_fused_dispatches_to_the_kernel_where_it_can_run(monkeypatch):
    from swiftkv_kernels import kd_loss

    calls = []

    def fake_kernel(s, t, w, mask, *, temperature, chunk_size, reduction):
        calls.append((temperature, chunk_size, reduction))
        return torch.tensor(7.0)

    monkeypatch.setattr(kd_loss, "kernel_available", lambda x: True)
    monkeypatch.setattr(kd_loss, "fused_kl_loss", fake_kernel)
    student, teacher, weight, mask = _inputs(2, 5, 8, 11)
    assert KL()(student, teacher, weight, mask, chunk_size=3, temperature=1.5, fused=True).item() == 7.0
    assert calls == [(1.5, 3, "mean")]
    assert KL()(student, teacher, weight, mask, fused=False).item() != 7.0  # fused=False never asks


def test_component_without_a_fused_kernel_says_so_and_runs_the_torch_path(monkeypatch, caplog):
    monkeypatch.setattr(losses_base, "_WARNED", set())
    student, teacher, weight, mask = _inputs(2, 5, 8, 11)
    with caplog.at_level(logging.WARNING, logger=losses_base.__name__):
        fused, fused_grad = _value_and_grad(JSD(), student, teacher, weight, mask, chunk_size=3, fused=True)
        _value_and_grad(JSD(), student, teacher, weight, mask, chunk_size=3, fused=True)
    plain, plain_grad = _value_and_grad(JSD(), student, teacher, weight, mask, chunk_size=3)
    assert torch.equal(fused, plain) and torch.equal(fused_grad, plain_grad)
    warnings = [r.getMessage() for r in caplog.records if "no fused kernel" in r.getMessage()]
    assert warnings == ["the 'jsd' logits loss has no fused kernel: fused_loss=true runs its torch chunked path"]


# ---- hidden-state MSE ------------------------------------------------------------------------------------------------
def test_hidden_mse_by_hand():
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 4.0], [10.0, 10.0]]])
    # Unmasked: (0 + 4 + 9 + 0 + 100 + 100) / 6; masked to the first two positions: (0 + 4 + 9 + 0) / 4.
    assert hidden_mse_loss(student, teacher).item() == pytest.approx(213 / 6)
    assert hidden_mse_loss(student, teacher, torch.tensor([[True, True, False]])).item() == pytest.approx(13 / 4)


@pytest.mark.parametrize("masked", [False, True])
def test_hidden_mse_matches_reference(masked):
    student, teacher, _, mask = _inputs(2, 7, 8, 3)
    mask = mask if masked else None
    loss, grad = _value_and_grad(hidden_mse_loss, student, teacher, mask)
    s64 = student.detach().double().requires_grad_()
    keep = torch.ones(2, 7, dtype=torch.bool) if mask is None else mask
    ref = F.mse_loss(s64[keep], teacher.double()[keep])  # mean over the kept positions' elements
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad.double(), s64.grad, rtol=1e-5, atol=1e-8)
    teacher_leaf = teacher.clone().requires_grad_()
    assert not hidden_mse_loss(student.detach(), teacher_leaf, mask).requires_grad  # the teacher is a target


def test_hidden_mse_all_masked_and_bad_shapes():
    student, teacher, _, _ = _inputs(2, 4, 8, 3)
    mse = hidden_mse_loss(student, teacher, torch.zeros(2, 4, dtype=torch.bool))
    mse.backward()
    assert mse.item() == 0.0 and torch.all(student.grad == 0)
    with pytest.raises(ValueError, match="same shape"):
        hidden_mse_loss(student, teacher[:, :3])
    with pytest.raises(ValueError, match="mask"):
        hidden_mse_loss(student, teacher, torch.ones(2, 3, dtype=torch.bool))


# ---- masks -----------------------------------------------------------------------------------------------------------
def test_kl_mask_from_labels_shifts_to_predicting_position():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 10]])
    assert kl_mask_from_labels(labels).tolist() == [
        [False, True, True, False, False],
        [True, True, True, True, False],
    ]
    assert kl_mask_from_labels(labels, shift=False).tolist() == (labels != -100).tolist()
