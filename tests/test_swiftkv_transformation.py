"""The SwiftKV training step against a straightforward full-forward computation of the same loss."""

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.losses import JSD, kl_mask_from_labels
from swiftkv_train.losses import base as losses_base
from swiftkv_train.methods.swiftkv import SwiftKV, SwiftKVConfig
from swiftkv_train.models import load_pretrained


def setup(m=3, g=2, run_cfg=None, **cfg):
    base, _ = load_pretrained("random:tiny-7l")
    t = SwiftKV(SwiftKVConfig(num_key_value_layers=m, key_value_group_size=g, **cfg), run_cfg)
    student = t.build_student(base).train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 20), generator=gen)
    labels = ids.clone()
    labels[:, :8] = -100
    return t, student, {"input_ids": ids, "labels": labels, "position_ids": torch.arange(20).repeat(2, 1)}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_full_forward(t, student, batch):
    """The training step's losses and gradients, then (gradients cleared) the full-forward hidden states of the
    teacher (no grad) and of the student, from which a test recomputes that loss."""
    out = t.loss(student, batch)
    out["loss"].backward()
    ours = grads(student)
    student.zero_grad()
    with torch.no_grad():
        teacher = student.swiftkv(False)(batch["input_ids"], output_hidden_states=True).hidden_states
    mine = student.swiftkv(True)(batch["input_ids"], output_hidden_states=True).hidden_states
    return out, ours, teacher, mine


def assert_same_grads(ours, student):
    """The gradients the reference left on ``student`` are the training step's ``ours``."""
    theirs = grads(student)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)


def full_logits_kl(student_hidden, teacher_hidden, weight, mask, temperature):
    """The definition: T² · KL(p_teacher ‖ p_student) from full logits, mean over the masked positions."""
    log_s = torch.log_softmax(student_hidden[mask] @ weight.T / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_hidden[mask] @ weight.T / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="sum") / mask.sum() * temperature**2


@pytest.mark.parametrize("hidden_layer", [-2, -1, 6])
def test_loss_equals_full_forward_reference(hidden_layer):
    t, student, batch = setup(hidden_loss_layer=hidden_layer, hidden_loss_weight=0.5)
    out, ours, teacher, mine = loss_and_full_forward(t, student, batch)
    kl = full_logits_kl(mine[-1], teacher[-1], student.lm_head.weight, kl_mask_from_labels(batch["labels"]), 2.0)
    mse = (mine[hidden_layer] - teacher[hidden_layer]).pow(2).mean()
    (kl + 0.5 * mse).backward()
    torch.testing.assert_close(out["kl"], kl.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["hidden_mse"], mse.detach(), rtol=1e-5, atol=1e-7)
    assert len(ours) == 1 + 4 + 2 * 2
    assert_same_grads(ours, student)


def test_reusing_the_teacher_prefix_and_checkpointing_change_nothing():
    results = []
    for reuse, ckpt in ((True, True), (False, False), (True, False)):
        t, student, batch = setup(reuse_teacher_prefix=reuse, gradient_checkpointing=ckpt)
        out = t.loss(student, batch)
        out["loss"].backward()
        results.append((out["loss"].detach(), grads(student)))
    for loss, g in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=0)
        for name in g:
            torch.testing.assert_close(g[name], results[0][1][name], rtol=1e-6, atol=1e-8)


def test_packed_rows_attend_within_their_own_document():
    t, student, _ = setup()
    gen = torch.Generator().manual_seed(1)
    doc_a, doc_b = torch.randint(0, 256, (1, 7), generator=gen), torch.randint(0, 256, (1, 9), generator=gen)
    packed = {"input_ids": torch.cat([doc_a, doc_b], 1),
              "position_ids": torch.cat([torch.arange(7), torch.arange(9)])[None]}
    with torch.no_grad():
        teacher, student_h = t.teacher_and_student_hidden(student.eval(), packed)
        for doc, sl in ((doc_a, slice(0, 7)), (doc_b, slice(7, 16))):
            alone_t, alone_s = t.teacher_and_student_hidden(student, {"input_ids": doc})
            torch.testing.assert_close(teacher[:, sl], alone_t, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(student_h[:, sl], alone_s, rtol=1e-5, atol=1e-5)


def test_flops_per_token_counts_teacher_and_student_work():
    t, student, _ = setup(m=3, g=2)
    cfg = student.config
    flops = t.flops_per_token(cfg, seq_len=0)
    layer = 64 * (64 + 64 + 32 + 32) + 3 * 64 * 128  # q,o (64x64), k,v (64x32), MLP
    head = 320 * 64
    expected = 2 * (7 * layer + head) + 2 * 2 * (4 * layer + head) + 2 * (4 * 64 * 64 + 2 * 2 * 64 * 32)
    assert flops == expected


# ---- the logits loss is a recipe choice (transform.swiftkv.logits_loss) ------------------------------------------------
def _run_cfg(fused, chunk=7):
    return SimpleNamespace(trainer=SimpleNamespace(loss_chunk_size=chunk, fused_loss=fused))


def test_jsd_loss_equals_full_forward_reference():
    """logits_loss=jsd: the logged value is T² · JSD_β of the full-forward logits (computed here from the definition)
    and the gradients are those of that definition plus the hidden MSE."""
    t, student, batch = setup(logits_loss="jsd", jsd_beta=0.3, hidden_loss_weight=0.5, run_cfg=_run_cfg(False))
    out, ours, teacher, mine = loss_and_full_forward(t, student, batch)
    assert set(out) == {"loss", "jsd", "hidden_mse"}
    w, beta, temp = student.lm_head.weight, 0.3, 2.0
    log_s = torch.log_softmax(mine[-1] @ w.T / temp, -1)
    log_t = torch.log_softmax(teacher[-1] @ w.T / temp, -1)
    log_m = torch.logsumexp(torch.stack([log_s + torch.log(torch.tensor(1 - beta)), log_t + torch.log(torch.tensor(beta))]), 0)
    per_position = beta * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1)
    mask = kl_mask_from_labels(batch["labels"])
    jsd = temp**2 * per_position[mask].mean()
    mse = (mine[-2] - teacher[-2]).pow(2).mean()
    (jsd + 0.5 * mse).backward()
    torch.testing.assert_close(out["jsd"], jsd.detach(), rtol=1e-5, atol=1e-7)
    assert_same_grads(ours, student)


def test_training_with_jsd_decreases_it():
    """A few optimizer steps on one batch with logits_loss=jsd: finite, and it goes down step by step."""
    torch.manual_seed(0)
    t, student, batch = setup(logits_loss="jsd", run_cfg=_run_cfg(False))
    with torch.no_grad():  # a student visibly off its teacher (the mean init is already close)
        for _, p in t.trainable_parameters(student):
            p.add_(0.3 * torch.randn_like(p))
    optimizer = torch.optim.Adam([p for _, p in t.trainable_parameters(student)], lr=1e-2)
    curve = []
    for _ in range(5):
        out = t.loss(student, batch)
        assert set(out) == {"loss", "jsd", "hidden_mse"}
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        curve.append(out["jsd"].item())
    assert all(torch.isfinite(torch.tensor(curve)))
    assert all(b < a for a, b in zip(curve, curve[1:])) and curve[-1] < 0.9 * curve[0], curve


@pytest.mark.parametrize("logits_loss", ["kl", "jsd"])
def test_fused_loss_on_cpu_runs_the_torch_path(logits_loss, monkeypatch, caplog):
    """trainer.fused_loss=true on CPU: the same numbers as the torch path, no kernel call; a loss without a fused
    kernel (jsd) says so instead of silently running another loss."""
    from swiftkv_kernels import kd_loss

    def must_not_run(*args, **kwargs):
        raise AssertionError("no fused kernel can run on CPU")

    monkeypatch.setattr(kd_loss, "fused_kl_loss", must_not_run)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(losses_base, "_WARNED", set())
    results = {}
    for fused in (True, False):
        t, student, batch = setup(logits_loss=logits_loss, run_cfg=_run_cfg(fused))
        assert t.fused_loss is fused
        with caplog.at_level(logging.WARNING, logger=losses_base.__name__):
            out = t.loss(student, batch)
        out["loss"].backward()
        results[fused] = (out, grads(student))
    assert set(results[True][0]) == {"loss", logits_loss, "hidden_mse"}
    assert torch.equal(results[True][0]["loss"], results[False][0]["loss"])
    for name, grad in results[True][1].items():
        assert torch.equal(grad, results[False][1][name])
    said = [r.getMessage() for r in caplog.records if "no fused kernel" in r.getMessage()]
    assert said == ([] if logits_loss == "kl" else [f"the {logits_loss!r} logits loss has no fused kernel: "
                                                      "fused_loss=true runs its torch chunked path"])


def test_logits_loss_setting_is_checked_and_reaches_the_objective():
    with pytest.raises(SwiftKVInputError, match=r"transform.swiftkv.logits_loss='kld' is unknown: use one of jsd, kl"):
        SwiftKV(SwiftKVConfig(logits_loss="kld"))
    with pytest.raises(SwiftKVInputError, match="jsd_beta"):
        SwiftKV(SwiftKVConfig(logits_loss="jsd", jsd_beta=1.5))
    assert SwiftKVConfig().logits_loss_component().name == "kl"
    assert SwiftKVConfig(logits_loss="jsd", jsd_beta=0.25).logits_loss_component() == JSD(beta=0.25)


def test_one_recipe_override_switches_the_loss():
    """``transform.swiftkv.logits_loss=jsd`` on the command line is the whole change."""
    from hydra import compose, initialize_config_module

    from swiftkv_train.config import register_schemas
    from swiftkv_train.methods import build_method

    register_schemas()
    with initialize_config_module("swiftkv_train.recipes", version_base="1.3"):
        default = compose("config", overrides=["recipe=tiny_cpu_test", "transform=swiftkv"])
        jsd = compose("config", overrides=["recipe=tiny_cpu_test", "transform=swiftkv",
                                           "transform.swiftkv.logits_loss=jsd", "transform.swiftkv.jsd_beta=0.2"])
    assert build_method(default.transform, default).cfg.logits_loss_component().name == "kl"
    assert build_method(jsd.transform, jsd).cfg.logits_loss_component() == JSD(beta=0.2)
