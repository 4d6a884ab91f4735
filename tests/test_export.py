"""Exports load with trust_remote_code in a fresh process that cannot import swiftkv_train."""

import copy
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from swiftkv_train.export import save_hf
from swiftkv_train.models import load_pretrained
from swiftkv_train.methods.swiftkv import swiftkv_parameters, to_swiftkv

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


# ---------------------------------------------------------------- files, card, tokenizer (issue 14, item 7)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_files_get_ordinary_permissions(student_and_tokenizer, tmp_path, umask):
    student, tok = student_and_tokenizer
    previous = os.umask(umask)
    try:
        full = save_hf(student, tok, tmp_path / "full", lean=False, max_shard_bytes=200_000)
        lean = save_hf(student, tok, tmp_path / "lean", lean=True)
    finally:
        os.umask(previous)
    for export in (full, lean):
        weights = sorted(export.glob("*.safetensors"))
        assert weights
        # safetensors' 0600 temporary files must not survive: others read the export as the umask allows
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in export.iterdir() if p.is_file()}
        assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_one_shard_is_model_safetensors_without_index(student_and_tokenizer, tmp_path):
    student, tok = student_and_tokenizer
    export = save_hf(student, tok, tmp_path / "full", lean=False)  # far below the 2 GiB shard size
    assert [p.name for p in export.glob("*.safetensors*")] == ["model.safetensors"]
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == len(student.state_dict()) - 1  # every weight but the tied lm_head


def test_card_lists_only_the_chosen_methods_hyperparameters():
    from omegaconf import OmegaConf

    from swiftkv_train.config import TransformConfig
    from swiftkv_train.train.model_card import chosen_transform, render_model_card

    for name in ("swiftkv", "cskv", "locret"):
        transform = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(TransformConfig), {"name": name}))
        card = render_model_card("base", "recipe", name, {"lr": 1e-3, "transform": chosen_transform(transform)},
                                 {}, lean=True)
        listed = json.loads(card.split("## Hyperparameters\n```json\n")[1].split("```")[0])
        assert listed == {"lr": 1e-3, "transform": {"name": name, name: transform[name]}}


TOKENIZER_CHECK = """
import json, sys
sys.modules["swiftkv_train"] = None  # the exported files alone
from transformers import AutoTokenizer
exec(sys.argv[2].replace("<this directory or repo>", sys.argv[1]))
ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False)
print(json.dumps({"class": type(tokenizer).__module__, "ids": list(ids),
                  "remote": sorted(m for m in sys.modules if m.startswith("transformers_modules"))}))
"""


def test_card_tokenizer_line_loads_without_remote_code(student_and_tokenizer, tmp_path):
    from swiftkv_train.train.model_card import render_model_card

    student, tok = student_and_tokenizer
    card = render_model_card("base", "recipe", "swiftkv", {}, {}, lean=True)
    export = save_hf(student, tok, tmp_path / "lean", lean=True, model_card=card)
    line = next(x for x in card.splitlines() if x.startswith("tokenizer = AutoTokenizer.from_pretrained("))
    modules = tmp_path / "modules"
    env = {"HF_MODULES_CACHE": str(modules), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    # stdin closed: a trust_remote_code prompt would hang an interactive user; here it would show in the output
    proc = subprocess.run([sys.executable, "-c", TOKENIZER_CHECK, str(export), line], capture_output=True,
                          text=True, env=env, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "custom code" not in proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["remote"] == [] and result["class"].startswith("transformers.") and not modules.exists()
    expected = tok.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    assert result["ids"] == list(expected) and len(expected) > 5
    config = json.loads((export / "tokenizer_config.json").read_text())
    assert "auto_map" not in config and config["tokenizer_class"]


# ---------------------------------------------------------------- frozen weights as stored (issue 14, item 9)


@pytest.fixture(scope="module")
def fp32_source(tmp_path_factory):
    """A tiny random Llama saved in fp32 with its tokenizer: the 'original' checkpoint."""
    from swiftkv_train.models.tiny import byte_tokenizer, random_model

    src = tmp_path_factory.mktemp("source")
    random_model("tiny-7l").save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    return src


def test_full_export_of_a_bf16_model_keeps_the_teacher_bit_exact(fp32_source, tmp_path):
    from transformers import LlamaForCausalLM

    base, tok = load_pretrained(str(fp32_source), dtype=torch.bfloat16)
    student = to_swiftkv(base, 3, 2)
    with torch.no_grad():
        for _, p in swiftkv_parameters(student):
            p.add_(0.01)  # "trained": the export must take these from the model
    original = load_file(str(fp32_source / "model.safetensors"))
    name = "model.layers.5.self_attn.q_proj.weight"
    assert not torch.equal(student.state_dict()[name].float(), original[name])  # in memory: rounded copies

    export = save_hf(student, tok, tmp_path / "full", lean=False, frozen_source=fp32_source)
    stored = load_file(str(export / "model.safetensors"))
    trainable = dict(swiftkv_parameters(student))
    assert trainable and all(torch.equal(stored[n], p) and stored[n].dtype == torch.bfloat16
                             for n, p in trainable.items())
    frozen = set(stored) - set(trainable)
    assert frozen == set(original)  # every original tensor, each exactly as the source stores it
    for n in frozen:
        assert stored[n].dtype == original[n].dtype == torch.float32 and torch.equal(stored[n], original[n])
    assert json.loads((export / "config.json").read_text())["dtype"] == "float32"  # dtype="auto" loads them exactly

    result = run_loader(export, tmp_path, "float32", teacher=True)
    reference = LlamaForCausalLM.from_pretrained(fp32_source, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(result["ids"]).logits
    assert torch.equal(result["teacher_logits"], expected)


def test_frozen_source_never_overrides_a_rewritten_tensor(fp32_source, tmp_path):
    base, tok = load_pretrained(str(fp32_source), dtype=torch.bfloat16)
    student = to_swiftkv(base, 3, 2)
    name = "model.layers.1.mlp.up_proj.weight"
    with torch.no_grad():
        student.get_parameter(name).mul_(2)  # frozen, but no longer the source's tensor
    export = save_hf(student, tok, tmp_path / "full", lean=False, frozen_source=fp32_source)
    stored = load_file(str(export / "model.safetensors"))
    assert torch.equal(stored[name], student.get_parameter(name))
    assert stored["model.layers.1.mlp.down_proj.weight"].dtype == torch.float32  # its neighbours: the source's


def test_trainer_full_export_after_bf16_training(fp32_source, tmp_path):
    """The trainer finds the source checkpoint of its model spec; the card lists only the chosen method."""
    from hydra import compose, initialize_config_module
    from transformers import LlamaForCausalLM

    from swiftkv_train.config import register_schemas
    from swiftkv_train.train.trainer import run_training

    register_schemas()
    with initialize_config_module("swiftkv_train.recipes", version_base="1.3"):
        cfg = compose("config", overrides=[
            "recipe=tiny_cpu_test", f"run_dir={tmp_path / 'run'}", "launcher.init_timeout_minutes=2",
            f"model.spec={fp32_source}", "trainer.precision=bf16", "trainer.max_steps=2", "trainer.save_every=0",
            "trainer.eval_batches=1", "trainer.export=full", "transform.swiftkv.num_key_value_layers=3"])
    run_training(cfg)
    export = tmp_path / "run" / "export" / "full"
    stored = load_file(str(export / "model.safetensors"))
    original = load_file(str(fp32_source / "model.safetensors"))
    assert all(torch.equal(stored[n], t) for n, t in original.items())
    assert stored["model.norm_swiftkv.weight"].dtype == torch.bfloat16  # trained in bf16, taken from the model

    card = (export / "README.md").read_text()
    listed = json.loads(card.split("## Hyperparameters\n```json\n")[1].split("```")[0])["transform"]
    assert set(listed) == {"name", "swiftkv"} and listed["swiftkv"]["num_key_value_layers"] == 3

    result = run_loader(export, tmp_path, "float32", teacher=True)
    reference = LlamaForCausalLM.from_pretrained(fp32_source, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(result["teacher_logits"], reference(result["ids"]).logits)


def test_frozen_source_without_safetensors_fails_before_writing(student_and_tokenizer, tmp_path):
    student, tok = student_and_tokenizer
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no safetensors weights"):
        save_hf(student, tok, tmp_path / "full", lean=False, frozen_source=tmp_path / "empty")
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # no temporary directory left behind
