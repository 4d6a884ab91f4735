"""Exports load with trust_remote_code in a fresh process that cannot import swiftkv_train."""

import copy
import json
import pytest
import torch
from safetensors import safe_open

from swiftkv_train.export import save_hf
from swiftkv_train.models import load_pretrained
from swiftkv_train.transform import swiftkv_parameters, to_swiftkv

from helpers import run_loader

@pytest.fixture(scope="module")
def student_and_tokenizer():
    base, tok = load_pretrained("random:tiny-7l")
    student = to_swiftkv(base, 3, 2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in swiftkv_parameters(student):
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return student, tok


def test_full_export_round_trip(student_and_tokenizer, tmp_path):
    student, tok = student_and_tokenizer
    export = save_hf(student, tok, tmp_path / "full", lean=False, max_shard_bytes=200_000)
    index = json.loads((export / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((export / s).is_file() for s in shards)
    total = 0
    for shard in shards:
        with safe_open(str(export / shard), "pt") as f:
            total += sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    assert index["metadata"]["total_size"] == total
    assert "model.layers.5.self_attn.q_proj.weight" in index["weight_map"]
    # the fused prefill kernel the modeling file imports travels with it (used on CUDA, torch path elsewhere)
    assert (export / "swiftkv_prefill_kv.py").is_file()

    result = run_loader(export, tmp_path, "float32", teacher=True)
    assert result["class"] == "LlamaSwiftKVForCausalLM" and result["module"].startswith("transformers_modules")
    with torch.no_grad():
        expected = student.swiftkv(True)(result["ids"]).logits
        expected_teacher = student.swiftkv(False)(result["ids"]).logits
        expected_gen = student.swiftkv(True).generate(result["ids"], max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(result["logits"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(result["teacher_logits"], expected_teacher, rtol=0, atol=1e-5)
    assert torch.equal(result["generated"], expected_gen)


def test_lean_export_round_trip(student_and_tokenizer, tmp_path):
    student, tok = student_and_tokenizer
    export = save_hf(student, tok, tmp_path / "lean", lean=True)
    config = json.loads((export / "config.json").read_text())
    assert config["swiftkv_lean"] and config["swiftkv"] and config["dtype"] == "bfloat16"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llama_swiftkv.LlamaSwiftKVForCausalLM"
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in names)
    assert "model.layers.2.self_attn.q_proj.weight" in names  # early layers keep their projections
    assert not any(f"layers.{i}.self_attn.{p}.weight" in n for i in range(3, 7) for p in ("q_proj", "k_proj", "v_proj")
                   for n in names)
    assert "model.layers.5.self_attn.k_proj_swiftkv.weight" in names  # leader of the second group
    assert "model.layers.4.self_attn.k_proj_swiftkv.weight" not in names  # member of the first group
    assert len(names) == len(student.state_dict()) - 4 * 3 - 1  # - teacher-only q/k/v, - tied lm_head

    # Loaded in fp32, the lean export must compute exactly what the student computes with bf16-rounded weights.
    result = run_loader(export, tmp_path, "float32")
    reference = copy.deepcopy(student).swiftkv(True)
    for param in reference.parameters():  # round the weights only (RoPE buffers stay fp32, as in the export)
        param.data = param.data.to(torch.bfloat16).float()
    with torch.no_grad():
        expected = reference(result["ids"]).logits
    torch.testing.assert_close(result["logits"], expected, rtol=0, atol=1e-5)


def test_export_replaces_atomically_and_cleans_up_on_failure(student_and_tokenizer, tmp_path, monkeypatch):
    student, tok = student_and_tokenizer
    target = tmp_path / "export"
    save_hf(student, tok, target, lean=True)
    before = sorted(p.name for p in target.iterdir())

    from swiftkv_train.export import hf

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_hf(student, tok, target, lean=False)
    assert sorted(p.name for p in target.iterdir()) == before  # the previous export is intact
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary directory left behind


def test_lean_model_refuses_teacher_mode(student_and_tokenizer, tmp_path):
    student, tok = student_and_tokenizer
    export = save_hf(student, tok, tmp_path / "lean", lean=True)
    model, _ = load_pretrained(str(export))
    with pytest.raises(RuntimeError, match="lean SwiftKV checkpoint"):
        model.swiftkv(False)
