"""Smoke test of every model file against the installed transformers: import, one forward, one generate.

When transformers changes an interface the model files rely on (5.24 renamed the cache argument), this file is the
one clear failure: each family's original mode must equal transformers' own Llama, and cached greedy generation
must equal a plain no-cache greedy loop written here.
"""

import importlib
import inspect

import pytest
import torch
import transformers
from transformers import LlamaForCausalLM, LlamaModel

from swiftkv_train.remote_code import transformers_compat
from swiftkv_train.models.tiny import random_model
from swiftkv_train.methods.swiftkv import to_swiftkv
from swiftkv_train.methods.cskv import CSKVConfig, to_cskv
from swiftkv_train.methods.locret import LocretConfig, to_locret

MODEL_FILES = [
    "swiftkv_train.remote_code.transformers_compat",
    "swiftkv_train.methods.swiftkv.remote_code.configuration_llama_swiftkv",
    "swiftkv_train.methods.swiftkv.remote_code.modeling_llama_swiftkv",
    "swiftkv_train.methods.cskv.remote_code.configuration_llama_cskv",
    "swiftkv_train.methods.cskv.remote_code.modeling_llama_cskv",
    "swiftkv_train.methods.cskv.remote_code.cache_llama_cskv",
    "swiftkv_train.remote_code.quant_llama_cskv",
    "swiftkv_train.methods.locret.remote_code.configuration_llama_locret",
    "swiftkv_train.methods.locret.remote_code.modeling_llama_locret",
    "swiftkv_train.methods.locret.remote_code.cache_llama_locret",
    "swiftkv_train.models.varlen_attention",
]


def greedy_without_cache(forward, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The reference: re-run the whole sequence for every new token, no cache anywhere."""
    for _ in range(new_tokens):
        logits = forward(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def students():
    teacher = random_model("tiny-7l", seed=3)
    yield "swiftkv", teacher, to_swiftkv(teacher, 3, 2).eval(), lambda m, on: m.swiftkv(on)
    yield "cskv", teacher, to_cskv(teacher, CSKVConfig(window=4)).eval(), lambda m, on: m.cskv(on)
    yield "locret", teacher, to_locret(teacher, LocretConfig(head_hidden_size=16)).eval(), None


@pytest.mark.parametrize("module", MODEL_FILES)
def test_model_file_imports(module):
    importlib.import_module(module)


def test_cache_argument_name_is_the_installed_one():
    declared = inspect.signature(LlamaModel.forward).parameters
    assert transformers_compat.CACHE_ARG in declared, (transformers.__version__, list(declared))
    expected = "cache" if "cache" in declared else "past_key_values"
    assert transformers_compat.CACHE_ARG == expected


def test_legacy_and_new_cache_names_reach_the_same_parameter():
    @transformers_compat.accepts_legacy_cache_name
    def forward(x, cache=None, **kwargs):
        return cache, kwargs

    assert forward(1, past_key_values="c") == ("c", {})
    assert forward(1, cache="c") == ("c", {})
    assert forward(1, cache="c", past_key_values=None) == ("c", {})
    with pytest.raises(TypeError, match="pass the cache once"):
        forward(1, cache="a", past_key_values="b")


@pytest.mark.parametrize("family", ["swiftkv", "cskv", "locret"])
def test_forward_and_generate(family):
    name, teacher, student, switch = next(s for s in students() if s[0] == family)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = teacher(ids).logits
        if switch is not None:  # original mode == transformers' own Llama, with and without a cache
            switch(student, False)
            torch.testing.assert_close(student(ids).logits, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(student(ids, use_cache=True).logits, expected, rtol=1e-5, atol=1e-5)
            switch(student, True)
        else:  # Locret without its cache is the backbone
            torch.testing.assert_close(student(ids).logits, expected, rtol=1e-5, atol=1e-5)

        if family == "locret":  # budget larger than the prompt: nothing evicted, so the reference is exact
            generated = student.generate(ids[:1], max_new_tokens=5, do_sample=False, locret_budget=64,
                                         locret_chunk_size=4, locret_n_local=2, locret_stabilizers=2)
            reference = greedy_without_cache(teacher, ids[:1], 5)
        elif family == "cskv":
            # The compressed cache changes later tokens; the prefill is exact, so the first new token is not.
            generated = student.generate(ids, max_new_tokens=5, do_sample=False)
            assert generated.shape == (2, 16)
            assert torch.equal(generated[:, 11], student(ids).logits[:, -1].argmax(-1))
            switch(student, False)
            generated = student.generate(ids, max_new_tokens=5, do_sample=False)
            reference = greedy_without_cache(teacher, ids, 5)
        else:
            generated = student.generate(ids, max_new_tokens=5, do_sample=False)
            reference = greedy_without_cache(student, ids, 5)
    assert torch.equal(generated, reference)


def test_transformers_own_llama_generates_with_the_compat_name():
    """The package calls transformers' models through the compat name (policies, evaluation): no TypeError."""
    model = random_model("tiny", seed=1)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = transformers_compat.output_cache(out)
        step = model(ids[:, -1:] * 0 + 5, use_cache=True, **transformers_compat.cache_kwarg(cache))
        full = model(torch.cat([ids, ids[:, -1:] * 0 + 5], dim=1)).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-5, atol=1e-5)
    assert isinstance(model, LlamaForCausalLM)
