"""The SwiftKV training step against a straightforward full-forward computation of the same loss."""

import pytest
import torch

from swiftkv_train.methods.swiftkv import SwiftKVConfig
from swiftkv_train.losses import kl_mask_from_labels, naive_kl_loss
from swiftkv_train.models import load_pretrained
from swiftkv_train.methods.swiftkv import SwiftKV


def setup(m=3, g=2, **cfg):
    base, _ = load_pretrained("random:tiny-7l")
    t = SwiftKV(SwiftKVConfig(num_key_value_layers=m, key_value_group_size=g, **cfg))
    student = t.build_student(base).train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 20), generator=gen)
    labels = ids.clone()
    labels[:, :8] = -100
    return t, student, {"input_ids": ids, "labels": labels, "position_ids": torch.arange(20).repeat(2, 1)}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("hidden_layer", [-2, -1, 6])
def test_loss_equals_full_forward_reference(hidden_layer):
    t, student, batch = setup(hidden_loss_layer=hidden_layer, hidden_loss_weight=0.5)
    out = t.loss(student, batch)
    out["loss"].backward()
    ours = grads(student)
    student.zero_grad()
    with torch.no_grad():
        teacher = student.swiftkv(False)(batch["input_ids"], output_hidden_states=True).hidden_states
    mine = student.swiftkv(True)(batch["input_ids"], output_hidden_states=True).hidden_states
    kl = naive_kl_loss(mine[-1], teacher[-1], student.lm_head.weight, mask=kl_mask_from_labels(batch["labels"]),
                       temperature=2.0)
    mse = (mine[hidden_layer] - teacher[hidden_layer]).pow(2).mean()
    (kl + 0.5 * mse).backward()
    torch.testing.assert_close(out["kl"], kl.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["hidden_mse"], mse.detach(), rtol=1e-5, atol=1e-7)
    theirs = grads(student)
    assert ours.keys() == theirs.keys() and len(ours) == 1 + 4 + 2 * 2
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)


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
