"""Golden numbers recorded from the code before the "one room per method" refactor (issue 15).

The refactor must leave behaviour unchanged, and these tests prove it. Each compares the current code with values
recorded under tests/golden/ from the code as it was before the move:

- training.json: per-step training losses (and the logged loss components) of the first 5 optimizer steps of the
  ``tiny_cpu_test`` recipe for each method (swiftkv, cskv, locret), and the held-out eval metrics at start and end;
- exports.json: the sorted file lists of the lean and full exports of those runs, and a sha256 of config.json's
  canonical JSON (sorted keys, volatile fields removed: see VOLATILE_CONFIG_FIELDS);
- policies.json: the cache positions every training-free policy (swiftkv_train.policies.POLICIES, the learned one
  fed by Locret retaining heads) keeps per layer, sequence and KV head on a fixed random input;
- exports/<method>/: a tiny lean export of each method written by the old code, with the logits and greedy tokens
  it gave (exports/<method>.golden.safetensors); it must still load, with trust_remote_code and swiftkv_train
  unimportable, and through swiftkv_train.models.load_pretrained, and give the same numbers.

Regenerate with ``.venv/bin/python tests/golden/regenerate.py [training|policies|old_exports ...]`` (training also
rewrites exports.json). WARNING: regenerating is only legitimate when a behaviour change is INTENDED and the commit
explains it; a refactor that needs new golden files has changed behaviour. Never regenerate the checked-in old
exports (old_exports) to make a loading test pass: they stand for checkpoints users already have.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

GOLDEN = Path(__file__).resolve().parent / "golden"
METHODS = ("swiftkv", "cskv", "locret")

# ---------------------------------------------------------------------------------------------------- training

# The tiny_cpu_test recipe as it ships (max_length 512, micro batch 2, eval on 4 held-out batches at start and
# end), cut to 5 optimizer steps, no intermediate checkpoint, both exports.
COMMON_OVERRIDES = ["trainer.max_steps=5", "trainer.save_every=0", "trainer.export=both"]
METHOD_OVERRIDES = {
    "swiftkv": ["transform=swiftkv"],
    "cskv": ["transform=cskv", "transform.cskv.calibration_batches=2"],
    # Locret's recipe head (1024 hidden) is far too big for the tiny model; the settings of test_trainer.py.
    "locret": ["transform=locret", "data.pack=false", "transform.locret.head_hidden_size=32",
               "transform.locret.budget=128", "transform.locret.chunk_size=64", "transform.locret.stabilizers=16",
               "transform.locret.n_local=16", "trainer.micro_batch_size=1"],
}
# Threads used for every golden computation. Measured on the 2-core CPU box (fp32, torch 2.13, transformers
# 5.23): two runs with the same thread count, in separate processes, give bitwise-equal losses, eval metrics and
# exports (checked with RTOL = ATOL = 0), but 1 vs 2 threads changes SwiftKV's losses in the 8th significant digit
# (reduction order), and another CPU changes more: recorded on an earlier session's box and re-run on an AMD EPYC
# one (2026-12-02), the largest relative deviations were SwiftKV 1.0e-5 (step-3 KL), Locret 1.5e-7, CSKV 3.8e-4 in its step-3
# reconstruction loss (its calibration's least squares and SVD) and, at the end evaluation, 1.0e-3 in KL and one
# flipped top-1 token (6e-3 relative: the quantized cache rounds a value that moved to the other side).
# So losses are compared with rtol=1e-3 and eval metrics with rtol=1e-2: tolerant to thread count, CPU ISA and
# harmless reassociation in the refactor, yet tighter than a real change: a 1% lower learning rate
# (3e-3 -> 2.97e-3) moves the losses by 2.0e-2 (SwiftKV), 2.8e-3 (CSKV) and 0.14 (Locret), each a failure.
# Integers compare exactly.
THREADS = 1
RTOL = 1e-3
RTOL_EVALS = 1e-2
ATOL = 1e-9  # only for values that are exactly 0 (SwiftKV's hidden loss at step 1)

# config.json fields left out of the hash: transformers writes the INSTALLED version into every saved config; it
# changes with the environment, not with this package's behaviour.
VOLATILE_CONFIG_FIELDS = {"transformers_version": "written by transformers.save_pretrained: the installed version"}


@contextlib.contextmanager
def fixed_threads(n=THREADS):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compose_cfg(run_dir, *overrides):
    from hydra import compose, initialize_config_module

    from swiftkv_train.config import register_schemas

    register_schemas()
    with initialize_config_module("swiftkv_train.recipes", version_base="1.3"):
        return compose("config", overrides=["recipe=tiny_cpu_test", f"run_dir={run_dir}",
                                            "launcher.init_timeout_minutes=2", *overrides])


def run_method(run_dir: Path, method: str, *extra) -> dict:
    """Train one method with the golden settings; the record of training.json for it."""
    from swiftkv_train.launch import destroy_distributed
    from swiftkv_train.train.trainer import run_training

    try:
        with fixed_threads():
            summary = run_training(compose_cfg(run_dir, *METHOD_OVERRIDES[method], *COMMON_OVERRIDES, *extra))
    finally:
        destroy_distributed()
    steps = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/loss" in record:
            steps[str(record["step"])] = {k: v for k, v in record.items() if k.startswith("train/")}
    return {"steps": steps, "evals": summary["evals"], "final_step": summary["step"]}


def canonical_config(path: Path) -> dict:
    config = json.loads(path.read_text())
    return {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_FIELDS}


def config_sha256(config: dict) -> str:
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def export_record(export_dir: Path) -> dict:
    config = canonical_config(export_dir / "config.json")
    return {"files": sorted(str(p.relative_to(export_dir)) for p in export_dir.rglob("*") if p.is_file()),
            "config_sha256": config_sha256(config), "config": config}


def assert_close_tree(got, want, where="", rtol=RTOL):
    """Floats within ``rtol`` (RTOL_EVALS under ``evals``; ATOL for exact zeros), everything else exactly equal,
    same keys."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (where, sorted(got), sorted(want))
        for key in sorted(want, key=lambda k: k != "steps"):  # a changed loss is reported before the evals
            assert_close_tree(got[key], want[key], f"{where}/{key}", RTOL_EVALS if key == "evals" else rtol)
    elif isinstance(want, float):
        assert isinstance(got, (int, float)) and got == pytest.approx(want, rel=rtol, abs=ATOL), (where, got, want)
    else:
        assert got == want, (where, got, want)


@pytest.fixture(scope="module")
def golden_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden_runs")
    return {method: (root / method, run_method(root / method, method)) for method in METHODS}


def load_golden(name):
    return json.loads((GOLDEN / name).read_text())


@pytest.mark.parametrize("method", METHODS)
def test_training_losses_and_evals_match_golden(golden_runs, method):
    want = load_golden("training.json")["methods"][method]
    _, got = golden_runs[method]
    assert list(got["steps"]) == ["1", "2", "3", "4", "5"] and got["final_step"] == want["final_step"] == 5
    assert_close_tree(got, want, method)
    assert set(want["evals"]) == {"start", "end"}
    if method == "locret":  # its heads leave the outputs alone: held out, the heads' own loss terms, improving
        assert want["evals"]["end"]["smooth_l1"] < want["evals"]["start"]["smooth_l1"]
    else:
        assert want["evals"]["end"]["kl"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_export_files_and_config_match_golden(golden_runs, method):
    golden = load_golden("exports.json")
    assert golden["excluded_config_fields"] == VOLATILE_CONFIG_FIELDS
    run_dir, _ = golden_runs[method]
    for kind in ("lean", "full"):
        want = golden["methods"][method][kind]
        got = export_record(run_dir / "export" / kind)
        assert got["files"] == want["files"], (method, kind)
        fields = got["config"].keys() | want["config"].keys()
        changed = {k: (got["config"].get(k), want["config"].get(k))
                   for k in sorted(fields) if got["config"].get(k) != want["config"].get(k)}
        assert got["config_sha256"] == want["config_sha256"], (method, kind, "config.json fields changed", changed)
        assert config_sha256(want["config"]) == want["config_sha256"]  # the recorded fields are the hashed ones


# ---------------------------------------------------------------------------------------------------- policies

POLICY_PROMPT = dict(batch=2, length=48, seed=0)
POLICY_NEW_TOKENS = 5


def policy_cases():
    """name -> (policy factory, greedy_generate keyword arguments). One or more settings per registered policy."""
    from swiftkv_train.policies import (H2O, TOVA, AdaKV, ExpectedAttention, FullCache, Keyformer, Knorm,
                                       LearnedScorePolicy, PyramidKV, SnapKV, StreamingLLM)

    snap = {"observation_window": 4, "pool_kernel": 3}

    return {
        "full": (lambda: FullCache(), {}),
        "streaming_llm": (lambda: StreamingLLM(16, sink_tokens=4), {}),
        "h2o": (lambda: H2O(16), {}),
        "h2o_window3": (lambda: H2O(16, observation_window=3), {}),
        "h2o_chunked_prefill": (lambda: H2O(16), {"prefill_chunk": 12}),
        "keyformer": (lambda: Keyformer(budget="50%", recent_share=0.3, seed=0), {}),
        "snapkv": (lambda: SnapKV(16, observation_window=4, pool_kernel=3), {}),
        "learned_locret": (lambda: LearnedScorePolicy(16, stabilizers=4), {"locret": True}),
        "learned_locret_chunked": (lambda: LearnedScorePolicy(16, stabilizers=4),
                                   {"locret": True, "prefill_chunk": 16}),
        # added with issue 17 (the cases above are unchanged)
        "tova": (lambda: TOVA(16), {}),
        "tova_group": (lambda: TOVA(16, head_average="group"), {}),
        "knorm": (lambda: Knorm(16, sink_tokens=2), {}),
        "expected_attention": (lambda: ExpectedAttention(16, future_positions=64), {}),
        "pyramid_snapkv": (lambda: PyramidKV(16, inner="snapkv", inner_settings=snap), {}),
        "adakv_snapkv": (lambda: AdaKV(16, inner="snapkv", inner_settings=snap), {}),
    }


def policy_models():
    from swiftkv_train.models.tiny import random_model
    from swiftkv_train.methods.locret import LocretConfig, to_locret

    base = random_model("tiny", seed=0).eval()
    locret = to_locret(random_model("tiny", seed=0),
                       LocretConfig(head_hidden_size=16, budget=64, chunk_size=16, stabilizers=4, n_local=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random heads with real spread, so the ranking is not decided by ties
        for _, p in locret.retaining_head_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return base, locret.eval()


def compute_policies() -> dict:
    from swiftkv_train.policies import POLICIES, greedy_generate
    from swiftkv_train.methods.locret.policy import locret_scores

    p = POLICY_PROMPT
    ids = torch.randint(0, 256, (p["batch"], p["length"]), generator=torch.Generator().manual_seed(p["seed"]))
    out = {"prompt": dict(p, max_new_tokens=POLICY_NEW_TOKENS, model="random_model('tiny', seed=0)"),
           "registered": sorted(POLICIES), "cases": {}}
    with fixed_threads(), torch.no_grad():
        base, locret = policy_models()
        for name, (make, kwargs) in policy_cases().items():
            kwargs = dict(kwargs)
            use_locret = kwargs.pop("locret", False)
            policy = make()
            model = locret if use_locret else base
            with locret_scores(locret) if use_locret else contextlib.nullcontext():
                result = greedy_generate(model, ids, POLICY_NEW_TOKENS, policy=policy, **kwargs)
            out["cases"][name] = {
                "policy": policy.name, "settings": policy.settings(), "generate_kwargs": kwargs,
                "tokens": result.tokens.tolist(), "held_after_prefill": result.tokens_held_after_prefill,
                # kept[layer][sequence][kv head] = the original positions of the entries the cache still holds
                "kept": [layer.positions.tolist() for layer in result.cache.layers],
            }
    return out


# A policy registered after the recording whose golden cases are another's: "locret" (methods/locret/policy.py) is
# the learned-score policy (same select) with Locret's retaining heads as its scorer, which is exactly what the
# learned_locret cases record (LearnedScorePolicy fed by locret_scores).
RECORDED_AS = {"locret": "learned"}


def test_every_registered_policy_has_a_golden_case():
    from swiftkv_train.policies import POLICIES

    for name, recorded in RECORDED_AS.items():
        assert issubclass(POLICIES[name], POLICIES[recorded]) and POLICIES[name].select is POLICIES[recorded].select
    registered = {RECORDED_AS.get(name, name) for name in POLICIES}
    golden = load_golden("policies.json")
    assert {RECORDED_AS.get(name, name) for name in golden["registered"]} == registered
    assert {case["policy"] for case in golden["cases"].values()} == registered


def test_policy_kept_positions_match_golden():
    want = load_golden("policies.json")
    got = compute_policies()
    assert got["prompt"] == want["prompt"] and got["cases"].keys() == want["cases"].keys()
    for name in want["cases"]:
        g, w = got["cases"][name], want["cases"][name]
        for key in ("policy", "settings", "generate_kwargs", "held_after_prefill", "tokens"):
            assert g[key] == w[key], (name, key, g[key], w[key])
        assert len(g["kept"]) == len(w["kept"]), name
        for layer, (kept_g, kept_w) in enumerate(zip(g["kept"], w["kept"])):
            for seq, (heads_g, heads_w) in enumerate(zip(kept_g, kept_w, strict=True)):
                for head, (pos_g, pos_w) in enumerate(zip(heads_g, heads_w, strict=True)):
                    assert pos_g == pos_w, f"{name}: layer {layer} sequence {seq} KV head {head} keeps {pos_g}, " \
                                           f"golden {pos_w}"
    # the budgets are real: every evicting case holds fewer entries than the full cache
    full = len(want["cases"]["full"]["kept"][0][0][0])
    assert full == POLICY_PROMPT["length"] + POLICY_NEW_TOKENS - 1
    assert all(len(case["kept"][0][0][0]) < full for name, case in want["cases"].items() if name != "full")


# ---------------------------------------------------------------------------------------------------- old exports

OLD_EXPORTS = GOLDEN / "exports"
# The base model of the checked-in exports: the "tiny" preset shrunk (2 layers, hidden 32, GQA 2:1) so that the
# three exports, remote code included, stay well under 1 MB.
OLD_EXPORT_BASE = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                       num_key_value_heads=1)
OLD_EXPORT_OVERRIDES = {
    "swiftkv": ["transform.swiftkv.num_key_value_layers=1", "transform.swiftkv.hidden_loss_layer=-1"],
    "cskv": [],
    "locret": [],
}


def write_old_exports(work: Path) -> None:
    """Train each method 2 steps on the shrunk base with the trainer and check in its lean export (regenerate.py)."""
    import os

    from swiftkv_train.models.tiny import byte_tokenizer, random_model

    from helpers import run_loader

    base_dir = work / "tiny-2l"
    random_model("tiny", seed=0, **OLD_EXPORT_BASE).save_pretrained(base_dir)
    byte_tokenizer().save_pretrained(base_dir)
    cwd = os.getcwd()
    os.chdir(work)  # model.spec=tiny-2l (relative): the model card names no temporary path
    try:
        for method in METHODS:
            run_method(work / method, method, "model.spec=tiny-2l", "trainer.max_steps=2", "trainer.export=lean",
                       "trainer.eval_batches=1", *OLD_EXPORT_OVERRIDES[method])
    finally:
        os.chdir(cwd)
    OLD_EXPORTS.mkdir(parents=True, exist_ok=True)
    for method in METHODS:
        target = OLD_EXPORTS / method
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(work / method / "export" / "lean", target)
        result = run_loader(target, work, "float32")
        from safetensors.torch import save_file

        save_file({"ids": result["ids"].contiguous(), "logits": result["logits"][0].contiguous(),
                   "generated": result["generated"].contiguous()}, str(OLD_EXPORTS / f"{method}.golden.safetensors"),
                  metadata={"class": result["class"]})


def old_export_golden(method):
    from safetensors import safe_open

    path = OLD_EXPORTS / f"{method}.golden.safetensors"
    with safe_open(str(path), "pt") as f:
        cls = f.metadata()["class"]
    return load_file(str(path)), cls


def test_checked_in_exports_are_small_and_complete():
    total = sum(p.stat().st_size for p in OLD_EXPORTS.rglob("*") if p.is_file())
    assert total < 1_000_000, total
    for method in METHODS:
        files = {p.name for p in (OLD_EXPORTS / method).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= files, (method, files)
        assert json.loads((OLD_EXPORTS / method / "config.json").read_text())["model_type"] == f"llama_{method}"


@pytest.mark.parametrize("method", METHODS)
def test_old_export_loads_with_remote_code_only(method, tmp_path):
    from helpers import run_loader

    want, cls = old_export_golden(method)
    got = run_loader(OLD_EXPORTS / method, tmp_path, "float32")  # a subprocess where swiftkv_train is unimportable
    assert got["class"] == cls and got["module"].startswith("transformers_modules")
    assert torch.equal(got["ids"], want["ids"])
    torch.testing.assert_close(got["logits"][0], want["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(got["generated"], want["generated"])


@pytest.mark.parametrize("method", METHODS)
def test_old_export_loads_through_the_package(method):
    from swiftkv_train.models import load_pretrained

    want, cls = old_export_golden(method)
    with fixed_threads():
        model, tokenizer = load_pretrained(str(OLD_EXPORTS / method), dtype=torch.float32)
        assert type(model).__name__ == cls and tokenizer is not None
        ids = want["ids"]
        with torch.no_grad():
            logits = model(ids).logits[0].float()
            generated = model.generate(ids, max_new_tokens=want["generated"].shape[1] - ids.shape[1], do_sample=False)
    torch.testing.assert_close(logits, want["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(generated, want["generated"])
