"""Evaluation harness: metrics against hand computations, exact needle prompts, lm-eval, plots, errors, CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.eval import evaluate, make_config
from swiftkv_train.eval.config import evaluable_policies
from swiftkv_train.eval.needle import NEEDLE, PASSKEY, build_prompt, haystack_ids, score_answer, template_parts
from swiftkv_train.models import load_pretrained
from swiftkv_train.models.tiny import random_model
from swiftkv_train.policies import POLICIES, Budget
from swiftkv_train.methods.swiftkv import to_swiftkv

from helpers import one_thread  # noqa: F401 - autouse: every test here runs on one thread

ESSAY = (
    "How to start a startup. You need three things to create a successful startup: to start with good people, "
    "to make something customers actually want, and to spend as little money as possible. Most startups that fail "
    "do it because they fail at one of these. A startup that does all three will probably succeed! "
)


@pytest.fixture(scope="module")
def essays(tmp_path_factory):
    folder = tmp_path_factory.mktemp("essays")
    for i in range(3):
        (folder / f"essay{i}.txt").write_text(f"Essay {i}. " + ESSAY * 3)
    (folder / "LICENSE.txt").write_text("not an essay")
    return folder


@pytest.fixture(scope="module")
def tiny():
    return load_pretrained("random:tiny")


def test_fidelity_matches_hand_computation(tiny, essays):
    model, tok = tiny
    teacher = random_model("tiny", seed=1)
    result = evaluate(model, tok, "fidelity", teacher=teacher, progress=False,
                      fidelity={"data": str(essays), "window": 32, "num_windows": 3})["fidelity"][0]
    # Windows by hand: the essays in name order, each followed by EOS, cut into 3 x 32 tokens.
    ids = []
    for name in ("essay0.txt", "essay1.txt", "essay2.txt"):
        ids += tok((essays / name).read_text(), add_special_tokens=False).input_ids + [tok.eos_token_id]
    windows = torch.tensor(ids[:96]).view(3, 32)
    with torch.no_grad():
        log_t = torch.log_softmax(teacher(windows).logits[:, :-1].double(), -1)
        log_s = torch.log_softmax(model(windows).logits[:, :-1].double(), -1)
    targets = windows[:, 1:].unsqueeze(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()
    top1 = (log_t.argmax(-1) == log_s.argmax(-1)).double().mean().item()
    assert result["tokens"] == 3 * 31
    assert result["kl"] == pytest.approx(kl, rel=1e-4)
    assert result["top1"] == pytest.approx(top1, abs=1e-9)
    assert result["ppl_teacher"] == pytest.approx(math.exp(-log_t.gather(-1, targets).mean().item()), rel=1e-4)
    assert result["ppl_student"] == pytest.approx(math.exp(-log_s.gather(-1, targets).mean().item()), rel=1e-4)
    assert result["kl"] > 0.01 and result["settings"]["windows"] == 3


def test_fidelity_of_swiftkv_against_itself_as_teacher(tiny, essays):
    model, tok = tiny
    student = to_swiftkv(model, 2)
    res = evaluate(student, tok, "fidelity", teacher="self", progress=False,
                   fidelity={"data": str(essays), "window": 32, "num_windows": 2})["fidelity"][0]
    assert res["kl"] > 0 and res["top1"] < 1  # the student differs from its teacher mode
    same = evaluate(model, tok, "fidelity", teacher=model, progress=False,
                    fidelity={"data": str(essays), "window": 32, "num_windows": 2})["fidelity"][0]
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["top1"] == 1.0
    assert student.config.swiftkv  # the mode is restored after the teacher ran


@pytest.mark.parametrize("length", [300, 517])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_needle_prompt_has_exact_length_and_depth(tiny, length, depth):
    _, tok = tiny
    hay = haystack_ids(tok, [ESSAY * 5], length)
    p = build_prompt(tok, NEEDLE, hay, length, depth, "1234567", snap_to_sentence=False)
    assert len(p.input_ids) == length
    assert p.tokens_before_needle == round(depth * p.haystack_tokens)
    before, after, _ = template_parts(tok, NEEDLE.question, NEEDLE.answer_prefix, NEEDLE.intro)
    needle = tok(" The special magic number is 1234567. ", add_special_tokens=False).input_ids
    start = len(before) + p.tokens_before_needle
    assert p.input_ids[start : start + len(needle)] == needle
    assert p.haystack_tokens == length - len(before) - len(after) - len(needle)
    assert tok.decode(p.input_ids).endswith("<|im_start|>assistant\nThe special magic number is")
    snapped = build_prompt(tok, NEEDLE, hay, length, depth, "1234567", snap_to_sentence=True)
    assert len(snapped.input_ids) == length
    shift = p.tokens_before_needle - snapped.tokens_before_needle
    assert 0 <= shift <= 40
    cut = snapped.tokens_before_needle
    if cut and shift:
        assert tok.decode(hay[:cut]).rstrip()[-1] in ".!?"  # moved back to just after a sentence end
    elif cut:  # unmoved: it already followed a sentence end, or none was within reach
        ends_sentence = tok.decode(hay[:cut]).rstrip()[-1] in ".!?"
        assert ends_sentence or not any(c in tok.decode(hay[max(0, cut - 40) : cut]) for c in ".!?")


def test_passkey_prompt_uses_noise_filler(tiny):
    _, tok = tiny
    hay = haystack_ids(tok, None, 400)
    p = build_prompt(tok, PASSKEY, hay, 400, 0.5, "42424")
    text = tok.decode(p.input_ids)
    assert len(p.input_ids) == 400 and "The grass is green. The sky is blue." in text
    assert "The pass key is 42424. Remember it." in text and text.endswith("The pass key is")


def test_answer_scoring():
    assert score_answer(" 1234567.", "1234567")
    assert score_answer(" is 1234567", "1234567") is True
    assert not score_answer(" 12345678", "1234567")
    assert not score_answer(" 123 4567", "1234567")
    assert not score_answer(" none", "1234567")


def test_needle_and_efficiency_numbers(tiny, essays):
    model, tok = tiny
    res = evaluate(model, tok, ["needle", "efficiency"], progress=False,
                   needle={"haystack": str(essays), "context_lengths": [300, 350], "depths": [0, 100]},
                   efficiency={"prompt_lengths": [64], "output_length": 3, "repeats": 2, "warmup": 0},
                   policies={"names": ["streaming_llm"], "budget": "32",
                             "overrides": {"streaming_llm": {"sink_tokens": 4}}})
    full, streaming = res["needle"][0], res["needle"][1]
    assert [t["prompt_tokens"] for t in full["trials"]] == [300, 300, 350, 350]
    assert full["kv_bytes_per_token"] == 1024.0  # fp32: 2 (K,V) x 4 layers x 2 KV heads x 16 dims x 4 bytes
    # question-independent (the default): 32 entries of the context kept, then the question appended
    assert all(t["kv_context_tokens_held"] == 32 for t in streaming["trials"])
    assert all(t["kv_tokens_held"] == 32 + t["question_tokens"] for t in streaming["trials"])
    # without chunking the whole context is cached before the first eviction: the peak is its full cache
    assert all(t["kv_peak_bytes"] == 1024 * t["prompt_tokens"] for t in full["trials"])
    assert all(t["kv_peak_bytes"] > 1024 * t["context_tokens"] for t in streaming["trials"])  # + positions
    assert all(t["prefill_s"] > 0 for t in full["trials"])
    eff = {r["policy"]: r["rows"][0] for r in res["efficiency"]}
    assert eff["full"]["kv_bytes_per_token"] == 1024.0
    # 32 entries of K/V plus the policy's int32 positions (2 KV heads x 4 layers), per prompt token.
    assert eff["streaming_llm@32"]["kv_bytes_per_token"] == (32 * 1024 + 32 * 4 * 2 * 4) / 64
    for row in eff.values():
        assert row["ttft_ms"] > 0 and row["tpot_ms"] > 0
        assert row["prefill_tokens_per_s"] == pytest.approx(64 / (row["ttft_ms"] / 1000))


def test_needle_with_chunked_prefill_bounds_the_peak_cache(tiny, essays):
    """prefill_chunk: a budgeted policy never holds more than budget + chunk entries (measured peak)."""
    model, tok = tiny
    res = evaluate(model, tok, "needle", progress=False,
                   needle={"haystack": str(essays), "context_lengths": [300], "depths": [50], "prefill_chunk": 40},
                   policies={"names": ["h2o"], "budget": "32"})
    full, h2o = res["needle"]
    assert full["kv_peak_bytes"] == 300 * 1024  # the full cache: every token, whatever the chunking
    # K/V (1024 B per entry over all layers) + int32 positions + fp32 scores (2 KV heads x 4 layers each)
    per_entry = 1024 + (4 + 4) * 2 * 4
    # the context: at most budget + one chunk; then the question is appended whole (question-independent)
    question = h2o["trials"][0]["question_tokens"]
    assert h2o["kv_peak_bytes"] == (32 + max(40, question)) * per_entry
    assert h2o["trials"][0]["kv_context_tokens_held"] == 32
    assert h2o["settings"]["prefill_chunk"] == 40


def test_lm_eval_runs_local_task_and_matches_own_loglikelihoods(tiny):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'lm-eval>=0.4.8'")
    from swiftkv_train.eval.tasks.utils import TINY_MC

    model, tok = tiny
    res = evaluate(model, tok, "lm_eval", progress=False, lm_eval={"tasks": ["swiftkv_tiny_mc"]})
    acc = res["lm_eval"][0]["results"]["swiftkv_tiny_mc"]["acc,none"]
    correct = 0
    with torch.no_grad():
        for doc in TINY_MC:
            context = tok(doc["question"], add_special_tokens=False).input_ids
            scores = []
            for choice in doc["choices"]:
                cont = tok(" " + choice, add_special_tokens=False).input_ids
                logp = torch.log_softmax(model(torch.tensor([context + cont])).logits[0].double(), -1)
                scores.append(sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(cont)))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    assert acc == pytest.approx(correct / len(TINY_MC))
    assert res["lm_eval"][0]["n_samples"]["swiftkv_tiny_mc"] == 4


def test_plots_are_written_and_readable(tiny, essays, tmp_path):
    model, tok = tiny
    res = evaluate(model, tok, ["needle", "passkey", "efficiency"], out_dir=tmp_path, progress=False,
                   needle={"haystack": str(essays), "context_lengths": [300, 350], "depths": [0, 50, 100]},
                   passkey={"context_lengths": [400], "depths": [50]},
                   efficiency={"prompt_lengths": [32, 64], "output_length": 2, "repeats": 1, "warmup": 0},
                   policies={"names": ["h2o"], "budget": "50%"})
    names = {Path(p).name for p in res["plots"]}
    assert names == {"needle_by_length.png", "needle_heatmap.png", "passkey_by_length.png", "passkey_heatmap.png",
                     "efficiency_ttft.png", "quality_vs_kv_bytes.png"}
    assert [t["prompt_tokens"] for t in res["passkey"][0]["trials"]] == [400]
    for path in res["plots"]:
        assert Path(path).stat().st_size > 5000
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["needle"][1]["settings"]["policy"]["name"] == "h2o"
    assert "| model | policy |" in (tmp_path / "results.md").read_text()


def test_bad_inputs_give_clear_errors(tiny, tmp_path, essays):
    model, tok = tiny
    with pytest.raises(SwiftKVInputError, match="is not a directory, a .gguf file"):
        load_pretrained("no/such/dir/")
    with pytest.raises(SwiftKVInputError, match=r"exceed what model 'model' supports \(2048 positions\)"):
        evaluate(model, tok, "needle", progress=False,
                 needle={"haystack": str(essays), "context_lengths": [1000, 4000]})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SwiftKVInputError, match="needle.haystack=.*no non-empty .txt files"):
        evaluate(model, tok, "needle", progress=False, needle={"haystack": str(empty)})
    with pytest.raises(SwiftKVInputError, match="fidelity.data=.*does not exist"):
        evaluate(model, tok, "fidelity", teacher=model, progress=False, fidelity={"data": str(tmp_path / "nope")})
    with pytest.raises(SwiftKVInputError, match="fidelity.window=4096 is longer than the model supports"):
        evaluate(model, tok, "fidelity", teacher=model, progress=False, fidelity={"data": str(essays), "window": 4096})
    with pytest.raises(SwiftKVInputError, match="teacher=self needs a model that can run as the original"):
        evaluate(model, tok, "fidelity", teacher="self", progress=False)
    with pytest.raises(SwiftKVInputError, match="too short"):
        evaluate(model, tok, "needle", progress=False, needle={"haystack": str(essays), "context_lengths": [100]})
    with pytest.raises(SwiftKVInputError, match="unknown \\['fidelty'\\]"):
        evaluate(model, tok, "fidelty")
    with pytest.raises(Exception, match="windw"):
        make_config(fidelity={"windw": 3})
    skipped = evaluate(model, tok, "fidelity", progress=False)
    assert "no teacher" in skipped["skipped"]["fidelity"]


def _cli(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "swiftkv_train.eval", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_and_typo(essays, tmp_path):
    out = tmp_path / "out"
    proc = _cli([
        "model=random:tiny", "transform.name=swiftkv", "transform.swiftkv.num_key_value_layers=2", "teacher=self",
        "suite=[fidelity,needle,efficiency]", f"out_dir={out}", "cpu_threads=1", "progress=false",
        f"fidelity.data={essays}", "fidelity.window=64", "fidelity.num_windows=2",
        f"needle.haystack={essays}", "needle.context_lengths=[300]", "needle.depths=[0,100]",
        "efficiency.prompt_lengths=[32]", "efficiency.output_length=2", "efficiency.repeats=1",
        "policies.names=[keyformer,h2o]", "policies.budget=50%", "policies.overrides={keyformer: {seed: 3}}",
    ], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["fidelity"][0]["model"] == "random:tiny SwiftKV M=2"
    assert results["fidelity"][0]["kl"] > 0
    assert {r["policy"] for r in results["needle"]} == {"full", "keyformer@50%", "h2o@50%"}
    settings = {r["policy"]: r["settings"]["policy"] for r in results["needle"]}
    assert settings["h2o@50%"]["recent_share"] == 0.5 and settings["keyformer@50%"]["recent_share"] == 0.3  # own
    assert settings["keyformer@50%"]["seed"] == 3
    assert results["config"]["needle"]["context_lengths"] == [300]
    assert (out / "results.md").is_file() and (out / "needle_heatmap.png").is_file()
    assert not (out / ".hydra").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    typo = _cli(["model=random:tiny", "fidelity.windw=64", f"out_dir={tmp_path / 'typo'}"], cwd=tmp_path)
    assert typo.returncode != 0 and "windw" in typo.stderr



def _compose(overrides):
    from hydra import compose, initialize_config_module

    from swiftkv_train.eval.config import register_schemas

    register_schemas()
    with initialize_config_module("swiftkv_train.eval.conf", version_base="1.3"):
        return compose("eval", overrides=overrides)


def test_cli_config_typo_and_missing_model_fail_clearly(tmp_path):
    from hydra.errors import ConfigCompositionException

    from swiftkv_train.eval.__main__ import run

    with pytest.raises(ConfigCompositionException, match="windw"):
        _compose(["model=random:tiny", "fidelity.windw=64"])
    with pytest.raises(ConfigCompositionException, match="context_lengths"):
        _compose(["model=random:tiny", "needle.context_lengths=long"])
    cfg = _compose(["model=/no/such/model/dir", f"out_dir={tmp_path}"])
    with pytest.raises(SwiftKVInputError, match="'/no/such/model/dir' is not a directory"):
        run(cfg)
    with pytest.raises(SwiftKVInputError, match="suite="):
        run(_compose(["model=random:tiny", "suite=needles", f"out_dir={tmp_path}"]))


@pytest.mark.slow
def test_real_smollm2_teacher_finds_the_needle(smollm2):
    """The chat format with the answer prefix works on the real teacher (and the token counts hold for BPE)."""
    model, tok = smollm2
    essays = "/work/shared/data/pg_essays"
    if not Path(essays).is_dir():
        pytest.skip("needs /work/shared/data/pg_essays")
    res = evaluate(model, tok, "needle", progress=False,
                   needle={"haystack": essays, "context_lengths": [500], "depths": [10, 90]})
    trials = res["needle"][0]["trials"]
    assert [t["prompt_tokens"] for t in trials] == [500, 500]
    assert res["needle"][0]["accuracy"] == 1.0, trials


def test_lm_eval_gsm8k_task_from_local_data(tiny, tmp_path):
    """The shipped GSM8K generation task runs in process from a local jsonl (no hub): exact match is scored."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'lm-eval>=0.4.8'")
    import json

    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
            {"question": "What is 10 - 4?", "answer": "10 - 4 = 6\n#### 6"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    model, tok = tiny
    res = evaluate(model, tok, "lm_eval", progress=False,
                   lm_eval={"tasks": ["swiftkv_gsm8k_local"], "limit": 2, "metadata": {"data_file": str(data)}})
    task = res["lm_eval"][0]
    assert task["n_samples"]["swiftkv_gsm8k_local"] == 2
    score = task["results"]["swiftkv_gsm8k_local"]["exact_match,last-number"]
    assert 0.0 <= score <= 1.0


def test_fidelity_of_a_cskv_model_scores_the_compressed_path(tmp_path):
    """teacher=self works for CSKV too, and fidelity measures the compressed cache, not the exact prefill."""
    from swiftkv_train.methods.cskv import CSKVConfig, to_cskv

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("Rivers run to the sea while the hills stay green in spring. " * 30)
    base, tok = load_pretrained("random:tiny")
    model = to_cskv(base, CSKVConfig(key_density=0.25, value_density=0.25, window=8, init="svd"))
    res = evaluate(model, tok, "fidelity", teacher="self", progress=False,
                   fidelity={"data": str(texts), "window": 128, "num_windows": 2})
    kl = res["fidelity"][0]["kl"]
    ids = torch.tensor([tok(((texts / "a.txt").read_text()), add_special_tokens=False)["input_ids"][:128]])
    with torch.no_grad():
        exact = model.cskv(True)(ids).logits
        compressed = model(ids, use_cache=False, cskv_decode_from=0).logits
        teacher = model.cskv(False)(ids).logits
    assert torch.allclose(exact, teacher, atol=1e-5)  # a plain forward is exact: it would report KL 0
    assert kl > 1e-4 and not torch.allclose(compressed, teacher, atol=1e-3)


EVALUABLE = sorted(evaluable_policies())


@pytest.mark.parametrize("name", EVALUABLE)
def test_each_policy_from_the_eval_config_gets_its_own_defaults(name):
    """Every setting a policy takes from the eval config is its own default (its dataclass's), budget aside (the
    comparison's policies.budget): the eval CLI once gave H2O Keyformer's recent_share 0.3 instead of its 0.5."""
    from swiftkv_train.eval.api import policies_from_config

    cfg = make_config(policies={"names": [name]})
    [(label, policy)] = policies_from_config(cfg.policies)
    assert label == f"{name}@50%" and type(policy) is POLICIES[name]
    assert policy == POLICIES[name](budget="50%")
    for field in POLICIES[name].setting_fields():  # and the config shows those defaults
        if field.name != "budget":
            assert cfg.policies.overrides[name][field.name] == getattr(policy, field.name)


def test_policy_settings_from_the_eval_config():
    """Per-policy settings (both spellings), a per-policy budget, and clear errors for unknown names and for the
    old flat spellings."""
    from swiftkv_train.eval.api import policies_from_config

    cfg = make_config(policies={"names": ["h2o", "keyformer", "streaming_llm"], "budget": "32",
                                "overrides": {"keyformer": {"recent_share": 0.4, "budget": "60%"}}})
    cfg.policies.overrides.h2o.observation_window = 8  # as policies.overrides.h2o.observation_window=8 does
    built = dict(policies_from_config(cfg.policies))
    assert list(built) == ["h2o@32", "keyformer@60%", "streaming_llm@32"]
    h2o, keyformer, streaming = built.values()
    assert (h2o.recent_share, h2o.observation_window) == (0.5, 8) and keyformer.recent_share == 0.4
    assert keyformer.budget == Budget(fraction=0.6) and streaming.budget == Budget(tokens=32)
    with pytest.raises(SwiftKVInputError, match="unknown policy 'tova_typo'; use any of " + ", ".join(EVALUABLE)):
        policies_from_config(make_config(policies={"names": ["tova_typo"]}).policies)
    with pytest.raises(SwiftKVInputError, match="policy 'full' keeps every entry"):
        policies_from_config(make_config(policies={"names": ["full"]}).policies)
    with pytest.raises(SwiftKVInputError, match=r"policies.recent_share=0.2 was replaced by per-policy settings: "
                                                r"policies.overrides.h2o.recent_share=0.2 "
                                                r"policies.overrides.keyformer.recent_share=0.2"):
        policies_from_config(make_config(policies={"names": ["h2o", "keyformer", "snapkv"],
                                                   "recent_share": 0.2}).policies)
    with pytest.raises(SwiftKVInputError, match=r"policies.overrides.h2o: cache policy 'h2o': recent_share=1.5 must"):
        policies_from_config(make_config(policies={"names": ["h2o"],
                                                   "overrides": {"h2o": {"recent_share": 1.5}}}).policies)
    with pytest.raises(Exception, match="recent_shar"):  # a typo in a setting name fails when the config is made
        make_config(policies={"overrides": {"h2o": {"recent_shar": 0.4}}})
