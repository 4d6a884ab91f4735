"""Fidelity metrics against values worked out by hand on tiny explicit distributions."""

import math

import pytest
import torch

from swiftkv_train.metrics import FidelityAccumulator, next_token_targets

# Two positions that count, with explicit V=3 distributions. Logits = log(probabilities), so the
# softmax inside the metric recovers exactly these numbers.
P_TEACHER = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]
P_STUDENT = [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]
TARGETS = [0, 2]


def _kl_by_hand(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


EXPECTED_KL = (_kl_by_hand(P_TEACHER[0], P_STUDENT[0]) + _kl_by_hand(P_TEACHER[1], P_STUDENT[1])) / 2
# Teacher argmaxes are 0 and 1, student argmaxes 0 and 2: one agreement out of two.
EXPECTED_TOP1 = 0.5
# Perplexity on targets 0 and 2: exp(-(log p[0] + log p[2]) / 2) = 1 / sqrt(p[0] * p[2]).
EXPECTED_PPL_TEACHER = 1 / math.sqrt(0.7 * 0.3)
EXPECTED_PPL_STUDENT = 1 / math.sqrt(0.5 * 0.6)


def _logits(probs):
    return torch.tensor(probs, dtype=torch.float64).log().float()


def _assert_expected(stats, tokens=2):
    assert stats["tokens"] == tokens
    assert stats["kl"] == pytest.approx(EXPECTED_KL, rel=1e-5)
    assert stats["top1"] == pytest.approx(EXPECTED_TOP1)
    assert stats["ppl_teacher"] == pytest.approx(EXPECTED_PPL_TEACHER, rel=1e-5)
    assert stats["ppl_student"] == pytest.approx(EXPECTED_PPL_STUDENT, rel=1e-5)


def test_hand_computed_values():
    acc = FidelityAccumulator()
    acc.update(_logits(P_TEACHER), _logits(P_STUDENT), torch.tensor(TARGETS))
    # Sanity of the hand formula itself, worked on paper:
    # (0.7 ln 1.4 + 0.2 ln(2/3) + 0.1 ln 0.5 = 0.085122) and (0.1 ln 0.5 + 0.6 ln 3 + 0.3 ln 0.5 = 0.381908), halved.
    assert EXPECTED_KL == pytest.approx(0.233515, abs=1e-5)
    _assert_expected(acc.compute())


def test_ignored_targets_and_mask_drop_positions():
    # Batch of [1, 4, 3]: positions 0 and 2 are the counted ones; position 1 has target -100,
    # position 3 is masked out. The dropped positions have wildly different logits, so counting
    # either of them would move every statistic.
    junk_t, junk_s = [0.98, 0.01, 0.01], [0.01, 0.01, 0.98]
    teacher = _logits([[P_TEACHER[0], junk_t, P_TEACHER[1], junk_t]])
    student = _logits([[P_STUDENT[0], junk_s, P_STUDENT[1], junk_s]])
    targets = torch.tensor([[0, -100, 2, 1]])
    mask = torch.tensor([[True, True, True, False]])
    acc = FidelityAccumulator(chunk_size=1)
    acc.update(teacher, student, targets, mask)
    _assert_expected(acc.compute())


def test_accumulates_across_windows_and_chunks():
    acc = FidelityAccumulator(chunk_size=1)
    for i in range(2):  # one position per window
        acc.update(_logits([P_TEACHER[i]]), _logits([P_STUDENT[i]]), torch.tensor([TARGETS[i]]))
    _assert_expected(acc.compute())
    acc.update(_logits(P_TEACHER), _logits(P_STUDENT), torch.tensor(TARGETS))
    _assert_expected(acc.compute(), tokens=4)  # same means, twice the tokens
    acc.reset()
    assert acc.compute()["tokens"] == 0


def test_identical_models_agree_perfectly():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)
    targets = torch.randint(0, 7, (2, 5), generator=gen)
    acc = FidelityAccumulator(chunk_size=3)
    acc.update(logits, logits.clone(), targets)
    stats = acc.compute()
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)
    assert stats["top1"] == 1.0
    assert stats["ppl_teacher"] == pytest.approx(stats["ppl_student"])
    assert stats["tokens"] == 10


def test_bf16_logits_are_accepted():
    acc = FidelityAccumulator()
    acc.update(_logits(P_TEACHER).bfloat16(), _logits(P_STUDENT).bfloat16(), torch.tensor(TARGETS))
    assert acc.compute()["kl"] == pytest.approx(EXPECTED_KL, rel=3e-2)


def test_update_from_hidden_matches_update_on_logits():
    gen = torch.Generator().manual_seed(1)
    t_hidden, s_hidden = torch.randn(2, 6, 4, generator=gen), torch.randn(2, 6, 4, generator=gen)
    weight = torch.randn(9, 4, generator=gen)
    targets = next_token_targets(torch.randint(0, 9, (2, 6), generator=gen))
    from_logits, from_hidden = FidelityAccumulator(), FidelityAccumulator(chunk_size=4)
    from_logits.update(t_hidden @ weight.T, s_hidden @ weight.T, targets)
    from_hidden.update_from_hidden(t_hidden, s_hidden, weight, targets)
    a, b = from_logits.compute(), from_hidden.compute()
    assert a["tokens"] == b["tokens"] == 10  # the last position of each row has no target
    for key in ("kl", "top1", "ppl_teacher", "ppl_student"):
        assert b[key] == pytest.approx(a[key], rel=1e-5)


def test_empty_accumulator_reports_nan_not_zero():
    stats = FidelityAccumulator().compute()
    assert stats["tokens"] == 0
    assert all(math.isnan(stats[k]) for k in ("kl", "top1", "ppl_teacher", "ppl_student"))


def test_tensor_round_trip_for_all_reduce():
    acc = FidelityAccumulator()
    acc.update(_logits(P_TEACHER), _logits(P_STUDENT), torch.tensor(TARGETS))
    # Two identical "ranks" summed: same means, twice the tokens.
    merged = FidelityAccumulator.from_tensor(acc.to_tensor() + acc.to_tensor())
    _assert_expected(merged.compute(), tokens=4)


def test_next_token_targets_shift():
    ids = torch.tensor([[1, 2, 3, 4]])
    assert next_token_targets(ids).tolist() == [[2, 3, 4, -100]]
    labels = torch.tensor([[-100, -100, 3, 4]])
    assert next_token_targets(ids, labels).tolist() == [[-100, 3, 4, -100]]


def test_shape_mismatch_is_rejected():
    acc = FidelityAccumulator()
    with pytest.raises(ValueError, match="same shape"):
        acc.update(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="targets shape"):
        acc.update(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
