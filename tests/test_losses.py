"""The chunked distillation loss must equal the full-logits definition, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from swiftkv_train.losses import (
    REDUCTIONS,
    chunked_kl_loss,
    distillation_loss,
    hidden_mse_loss,
    kl_mask_from_labels,
    naive_kl_loss,
)


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


SHAPES = [
    # (B, S, H, V, chunk): N = B*S ragged w.r.t. chunk, chunk > N, chunk of 1
    (2, 7, 8, 13, 4),
    (1, 5, 16, 33, 64),
    (3, 4, 8, 10, 1),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "batchmean_all"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_matches_naive_fp32(shape, reduction, temperature):
    b, s, h, v, chunk = shape
    student, teacher, weight, mask = _inputs(b, s, h, v)
    assert 0 < mask.sum() < mask.numel()  # the mask really drops some positions
    kwargs = dict(temperature=temperature, reduction=reduction)
    loss_c, grad_c = _value_and_grad(chunked_kl_loss, student, teacher, weight, mask, chunk_size=chunk, **kwargs)
    loss_n, grad_n = _value_and_grad(naive_kl_loss, student, teacher, weight, mask, **kwargs)
    assert loss_c.dtype == torch.float32 and loss_c.shape == ()
    assert loss_n > 1e-3  # a non-trivial loss, so equality means something
    torch.testing.assert_close(loss_c, loss_n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_c, grad_n, rtol=1e-4, atol=1e-6)
    # Unmasked positions get exactly no gradient.
    assert torch.all(grad_c[~mask] == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mask_none_means_all_positions(reduction):
    student, teacher, weight, _ = _inputs(2, 6, 8, 12)
    all_true = torch.ones(2, 6, dtype=torch.bool)
    loss_none, grad_none = _value_and_grad(chunked_kl_loss, student, teacher, weight, None, chunk_size=5, reduction=reduction)
    loss_all, grad_all = _value_and_grad(naive_kl_loss, student, teacher, weight, all_true, reduction=reduction)
    torch.testing.assert_close(loss_none, loss_all)
    torch.testing.assert_close(grad_none, grad_all)


def test_reductions_relate_by_position_counts():
    student, teacher, weight, mask = _inputs(2, 7, 8, 13)
    losses = {r: chunked_kl_loss(student, teacher, weight, mask, chunk_size=4, reduction=r).item() for r in REDUCTIONS}
    assert losses["mean"] == pytest.approx(losses["sum"] / int(mask.sum()), rel=1e-6)
    assert losses["batchmean_all"] == pytest.approx(losses["sum"] / mask.numel(), rel=1e-6)


def test_naive_matches_torch_kl_div_definition():
    # Independent check of the reference itself: F.kl_div(log q, log p) sums p (log p - log q).
    student, teacher, weight, mask = _inputs(2, 5, 8, 9, seed=3)
    temp = 2.0
    log_s = torch.log_softmax(student.detach().double() @ weight.double().T / temp, -1)
    log_t = torch.log_softmax(teacher.double() @ weight.double().T / temp, -1)
    per_pos = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1) * temp**2
    expected = per_pos[mask].mean()
    got = naive_kl_loss(student, teacher, weight, mask, temperature=temp)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bf16_inputs_close_to_fp32():
    student, teacher, weight, mask = _inputs(2, 9, 16, 40, seed=5)
    s16 = student.detach().bfloat16().requires_grad_()
    t16, w16 = teacher.bfloat16(), weight.bfloat16()
    loss16, grad16 = _value_and_grad(chunked_kl_loss, s16, t16, w16, mask, chunk_size=4)
    assert loss16.dtype == torch.float32 and grad16.dtype == torch.bfloat16
    # Same bf16 inputs through the naive fp32 path: only the bf16 gradient rounding differs.
    loss_n, grad_n = _value_and_grad(naive_kl_loss, s16, t16, w16, mask)
    torch.testing.assert_close(loss16, loss_n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad16.float(), grad_n.float(), rtol=2e-2, atol=1e-3)
    # And against the fp32 originals: bf16 input rounding, looser.
    loss32, _ = _value_and_grad(chunked_kl_loss, student, teacher, weight, mask, chunk_size=4)
    torch.testing.assert_close(loss16, loss32, rtol=5e-2, atol=1e-2)


def test_all_masked_gives_zero_without_nan():
    student, teacher, weight, _ = _inputs(2, 4, 8, 10)
    nothing = torch.zeros(2, 4, dtype=torch.bool)
    for reduction in REDUCTIONS:
        loss, grad = _value_and_grad(chunked_kl_loss, student, teacher, weight, nothing, reduction=reduction)
        assert loss.item() == 0.0 and torch.all(grad == 0)
        assert naive_kl_loss(student, teacher, weight, nothing, reduction=reduction).item() == 0.0
    mse = hidden_mse_loss(student, teacher, nothing)
    mse.backward()
    assert mse.item() == 0.0 and torch.all(student.grad == 0)


def test_identical_teacher_and_student_give_zero_loss_and_grad():
    student, _, weight, mask = _inputs(2, 6, 8, 12)
    loss, grad = _value_and_grad(chunked_kl_loss, student, student.detach().clone(), weight, mask, chunk_size=5)
    assert abs(loss.item()) < 1e-6
    assert grad.abs().max().item() < 1e-6


def test_golden_value_is_pinned():
    # Computed once with naive_kl_loss on this exact seeded input; a change in the definition
    # (temperature scaling, reduction, KL direction) moves it far outside the tolerance.
    torch.manual_seed(1234)
    s, t, w = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(6, 4)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert chunked_kl_loss(s, t, w, mask, temperature=2.0, chunk_size=3).item() == pytest.approx(1.2581901550292969, abs=1e-5)
    assert chunked_kl_loss(s, t, w, mask, temperature=1.0, reduction="batchmean_all").item() == pytest.approx(
        0.7634437680244446, abs=1e-5
    )


def test_kl_direction_is_teacher_to_student():
    # KL is asymmetric: swapping the roles must change the value (forward KL(p_t || p_s) is pinned above).
    student, teacher, weight, mask = _inputs(1, 6, 8, 12, seed=7)
    forward = naive_kl_loss(student, teacher, weight, mask)
    swapped = naive_kl_loss(teacher, student.detach(), weight, mask)
    assert abs(forward.item() - swapped.item()) > 1e-3


def test_autograd_keeps_no_vocab_sized_tensor():
    b, s, h, v = 2, 8, 4, 1000  # V >> H so a retained [N, V] tensor could not hide
    student, teacher, weight, mask = _inputs(b, s, h, v)
    loss = chunked_kl_loss(student, teacher, weight, mask, chunk_size=4)
    saved = loss.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(b, s, h)]
    # The graph reachable from the loss holds nothing but the student leaf beyond that.
    assert all(t.numel() <= b * s * h for t in saved)


def test_lm_head_gradient_flows_through_student_side_only():
    student, teacher, weight, mask = _inputs(2, 5, 8, 11)
    w1 = weight.clone().requires_grad_()
    chunked_kl_loss(student, teacher, w1, mask, chunk_size=3).backward()
    w2 = weight.clone().requires_grad_()
    naive_kl_loss(student, teacher, w2, mask).backward()
    assert w1.grad.abs().max() > 1e-4
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-6)


def test_upstream_gradient_scales_result():
    student, teacher, weight, mask = _inputs(2, 5, 8, 11)
    _, grad = _value_and_grad(chunked_kl_loss, student, teacher, weight, mask)
    student.grad = None
    (3.0 * chunked_kl_loss(student, teacher, weight, mask)).backward()
    torch.testing.assert_close(student.grad, 3.0 * grad)


def test_bad_inputs_are_rejected():
    student, teacher, weight, mask = _inputs(2, 5, 8, 11)
    with pytest.raises(ValueError, match="reduction"):
        chunked_kl_loss(student, teacher, weight, mask, reduction="batchmean")
    with pytest.raises(ValueError, match="same shape"):
        chunked_kl_loss(student, teacher[:, :4], weight, mask)
    with pytest.raises(ValueError, match="mask"):
        chunked_kl_loss(student, teacher, weight, mask[:, :4])
    with pytest.raises(ValueError, match="lm_head_weight"):
        chunked_kl_loss(student, teacher, weight[:, :4], mask)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_kl_loss(student, teacher, weight, mask, chunk_size=0)


def test_hidden_mse_by_hand():
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 4.0], [10.0, 10.0]]])
    # Unmasked: (0 + 4 + 9 + 0 + 100 + 100) / 6; masked to the first two positions: (0 + 4 + 9 + 0) / 4.
    assert hidden_mse_loss(student, teacher).item() == pytest.approx(213 / 6)
    assert hidden_mse_loss(student, teacher, torch.tensor([[True, True, False]])).item() == pytest.approx(13 / 4)


def test_distillation_loss_combines_components():
    student, teacher, weight, mask = _inputs(2, 5, 8, 11)
    out = distillation_loss(student, teacher, weight, mask, temperature=2.0, hidden_weight=0.5, chunk_size=4)
    kl = naive_kl_loss(student, teacher, weight, mask, temperature=2.0)
    mse = hidden_mse_loss(student, teacher, mask)
    assert set(out) == {"loss", "kl", "hidden_mse"}
    assert out["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert out["hidden_mse"].item() == pytest.approx(mse.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(kl.item() + 0.5 * mse.item(), rel=1e-5)
    assert not out["kl"].requires_grad and out["loss"].requires_grad
    out["loss"].backward()
    student_grad = student.grad.clone()
    student.grad = None
    (kl + 0.5 * mse).backward()
    torch.testing.assert_close(student_grad, student.grad, rtol=1e-4, atol=1e-6)

    only_kl = distillation_loss(student, teacher, weight, mask, hidden_weight=0.0)
    assert only_kl["loss"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert only_kl["hidden_mse"].item() == pytest.approx(mse.item(), rel=1e-6)


def test_kl_mask_from_labels_shifts_to_predicting_position():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 10]])
    assert kl_mask_from_labels(labels).tolist() == [
        [False, True, True, False, False],
        [True, True, True, True, False],
    ]
    assert kl_mask_from_labels(labels, shift=False).tolist() == (labels != -100).tolist()
