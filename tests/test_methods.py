"""Generic tests of every registered method (swiftkv_train.methods.METHODS), so a new method is tested on arrival.

For each method and each source family (Llama, Qwen2 with q/k/v biases, Qwen3 with per-head q/k norms), on a tiny
random model of that family built here and the method's default settings (plus SMALL where a default is too big for
a 64-wide model): the student shares the source's frozen tensors and trains only new ones; run as the original model
(its mode switch, or a plain forward for a method that leaves the outputs alone) it gives transformers' own Llama /
Qwen2 / Qwen3 logits; a full export round-trips to the same logits; a few optimizer steps of its loss on one batch
lower that loss; its config section and its remote-code manifest are complete.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from swiftkv_train.export import save_hf
from swiftkv_train.methods import METHODS, build_method, method_of, transform_schema
from swiftkv_train.models import load_pretrained
from swiftkv_train.models.tiny import byte_tokenizer, random_model

# Settings that make a method's defaults fit the tiny model (a method absent here runs with its defaults).
SMALL = {"locret": {"head_hidden_size": 16, "budget": 64, "chunk_size": 16, "stabilizers": 4, "n_local": 4}}
NAMES = sorted(METHODS)
# source family -> its tiny random preset, 7 layers (ragged AcrossKV groups)
FAMILIES = {"llama": "tiny-7l", "qwen2": "tiny-qwen2", "qwen3": "tiny-qwen3"}
BY_FAMILY = [(name, family) for name in NAMES for family in FAMILIES]


def build(name: str, family: str = "llama"):
    source = random_model(FAMILIES[family], seed=5, num_hidden_layers=7)
    transform = type("T", (), {"name": name, name: SMALL.get(name, {})})
    method = build_method(transform)
    return method, source, method.build_student(source)


def batch(seed: int = 0, rows: int = 2, length: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # the first half is the prompt, the rest the answer
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(length).expand(rows, length)}


def original_logits(student, ids):
    """The student run as the model it was made from."""
    method = method_of(student)
    switch = method.mode_switch(student)
    if switch is None:
        return student(ids, use_cache=False).logits
    before = method.student_mode(student)
    switch(False)
    try:
        return student(ids, use_cache=False).logits
    finally:
        switch(before)


@pytest.mark.parametrize("name,family", BY_FAMILY)
def test_student_shares_frozen_tensors_and_trains_only_new_ones(name, family):
    method, source, student = build(name, family)
    assert method_of(student) is METHODS[name] and student.config.model_type == f"{family}_{name}"
    assert type(source).__name__.lower().startswith(family)
    source_ptrs = {p.data_ptr() for p in source.parameters()}
    trainable = method.trainable_parameters(student)
    assert trainable, "a method must train something"
    assert all(p.data_ptr() not in source_ptrs for _, p in trainable)
    frozen = [p for p in student.parameters() if not p.requires_grad]
    assert frozen and all(p.data_ptr() in source_ptrs for p in frozen)


@pytest.mark.parametrize("name,family", BY_FAMILY)
def test_student_as_original_equals_the_source_model(name, family):
    _, source, student = build(name, family)
    ids = batch()["input_ids"]
    with torch.no_grad():
        want = source(ids, use_cache=False).logits
        got = original_logits(student.eval(), ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,family", BY_FAMILY)
def test_full_export_round_trips(name, family, tmp_path):
    method, _, student = build(name, family)
    model = method.prepare_export(student).eval()
    out = save_hf(model, byte_tokenizer(), tmp_path / "export", lean=False)
    assert {p.name for p in out.glob("*.py")} == set(METHODS[name].remote_code.sources())
    loaded, _ = load_pretrained(str(out))
    ids = batch(1)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids, use_cache=False).logits, model(ids, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,family", BY_FAMILY)
def test_loss_decreases_on_a_fixed_batch(name, family):
    torch.manual_seed(0)
    method, _, student = build(name, family)
    student.train()
    params = [p for _, p in method.trainable_parameters(student)]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    data = batch(2)
    losses = []
    for _ in range(6):
        out = method.loss(student, data)
        assert set(out) >= {"loss"} and torch.isfinite(out["loss"])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", NAMES)
def test_config_section_is_a_validated_dataclass(name):
    method = METHODS[name]
    assert dataclasses.is_dataclass(method.Config)
    schema = transform_schema(None)
    assert {f.name for f in dataclasses.fields(schema)} >= {"name", name}  # the recipe key transform.<name>
    field = dataclasses.fields(method.Config)[0]
    transform = type("T", (), {"name": name, name: {field.name + "_typo": 1}})
    with pytest.raises(ValueError, match=f"transform.{name}.{field.name}_typo"):
        build_method(transform)


@pytest.mark.parametrize("name", NAMES)
def test_remote_code_manifest_ships_every_relative_import(name):
    sources = METHODS[name].remote_code.sources()
    for path in sources.values():
        # the pattern transformers uses to find the relative imports it will load
        for module in re.findall(r"^\s*from\s+\.(\S+)\s+import", path.read_text(encoding="utf-8"), re.MULTILINE):
            assert f"{module}.py" in sources, f"{path.name} imports .{module}, which {name}'s manifest does not ship"
