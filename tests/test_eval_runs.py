"""The results layout (eval/runs.py) and cache policies under lm-eval (eval/lm_eval_suite.py)."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

import swiftkv_train.eval.api as api
from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.eval import evaluate, runs
from swiftkv_train.models import load_pretrained
from swiftkv_train.policies import H2O, greedy_generate

from helpers import one_thread  # noqa: F401 - autouse: every test here runs on one thread

TEXT = "The hills are green and the rivers run to the sea. A boat sails by the old mill at noon. " * 20


@pytest.fixture(scope="module")
def tiny():
    return load_pretrained("random:tiny")


@pytest.fixture(scope="module")
def essays(tmp_path_factory):
    folder = tmp_path_factory.mktemp("essays")
    (folder / "a.txt").write_text(TEXT)
    return folder


def needle(essays):
    return {"haystack": str(essays), "context_lengths": [300], "depths": [0, 100], "max_new_tokens": 4}


POLICIES = {"names": ["h2o"], "budget": "50%"}


@pytest.fixture
def counted(monkeypatch):
    """Counts the retrieval runs evaluate() really makes (the model is run once per call)."""
    calls = []
    real = api.run_retrieval

    def run_retrieval(subject, variant, section, policy, label, progress):
        calls.append(label)
        return real(subject, variant, section, policy, label, progress)

    monkeypatch.setattr(api, "run_retrieval", run_retrieval)
    return calls


def test_layout_is_written_and_the_summary_equals_the_metrics(tiny, essays, tmp_path, counted):
    model, tok = tiny
    res = evaluate(model, tok, "needle", out_dir=tmp_path, progress=False, plots=False, needle=needle(essays),
                   policies=POLICIES)
    assert counted == ["full", "h2o@50%"]
    for result in res["needle"]:
        directory = tmp_path / "model" / result["policy"] / "needle"
        assert sorted(p.name for p in directory.iterdir()) == ["config.yaml", "metrics.json", "predictions.jsonl"]
        lines = [json.loads(line) for line in (directory / "predictions.jsonl").read_text().splitlines()]
        assert lines == result["trials"] and [t["depth"] for t in lines] == [0.0, 100.0]
        assert all({"length", "depth", "value", "output", "correct"} <= set(t) for t in lines)
        metrics = json.loads((directory / "metrics.json").read_text())
        assert "trials" not in metrics and metrics["n_trials"] == 2
        assert metrics["accuracy"] == result["accuracy"] == sum(t["correct"] for t in lines) / 2
        assert (metrics["metric"], metrics["score"]) == ("accuracy", result["accuracy"])
        config = yaml.safe_load((directory / "config.yaml").read_text())
        assert config["needle"]["context_lengths"] == [300] and config["needle"]["query_aware"] is False
        assert config["policy"]["name"] == ("full" if result["policy"] == "full" else "h2o")
    with (tmp_path / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["model"], r["policy"], r["ratio"], r["task"]) for r in rows] == [("model", "full", "1", "needle"),
                                                                              ("model", "h2o", "50%", "needle")]
    for row in rows:
        metrics = json.loads((tmp_path / "model" / (row["policy"] if row["ratio"] == "1" else
                                                    f"{row['policy']}@{row['ratio']}") / "needle" /
                              "metrics.json").read_text())
        assert float(row["score"]) == metrics["score"] and int(row["trials"]) == 2
    summary = (tmp_path / "summary.md").read_text()
    assert "| model | h2o | 50% | needle | accuracy |" in summary
    assert (tmp_path / "results.json").is_file()  # the single-file outputs are still written


def test_resume_skips_finished_runs_and_refuses_changed_settings(tiny, essays, tmp_path, counted, capsys):
    model, tok = tiny
    first = evaluate(model, tok, "needle", out_dir=tmp_path, progress=False, plots=False, needle=needle(essays),
                     policies=POLICIES)
    assert len(counted) == 2
    again = evaluate(model, tok, "needle", out_dir=tmp_path, progress=False, plots=False, needle=needle(essays),
                     policies=POLICIES)
    assert len(counted) == 2  # the model was not run again
    assert capsys.readouterr().out.count("skipping, exists") == 2
    for a, b in zip(first["needle"], again["needle"]):
        assert a["accuracy"] == b["accuracy"] and a["trials"] == b["trials"] and a["grid"] == b["grid"]
    # One more policy: only the new run is made.
    evaluate(model, tok, "needle", out_dir=tmp_path, progress=False, plots=False, needle=needle(essays),
             policies={"names": ["h2o", "streaming_llm"], "budget": "50%"})
    assert counted == ["full", "h2o@50%", "streaming_llm@50%"]
    # Other settings for the same directories: one error before any model call, naming what differs.
    with pytest.raises(SwiftKVInputError, match=r"holds a finished run made with other settings "
                                                r"\(needle.context_lengths differ\)"):
        evaluate(model, tok, "needle", out_dir=tmp_path, progress=False, plots=False,
                 needle={**needle(essays), "context_lengths": [320]}, policies=POLICIES)
    assert len(counted) == 3
    # resume=false: run again and overwrite (a model whose weights changed under the same name)
    redone = evaluate(model, tok, "needle", out_dir=tmp_path, progress=False, plots=False, resume=False,
                      needle={**needle(essays), "context_lengths": [320]}, policies=POLICIES)
    assert counted[3:] == ["full", "h2o@50%"]
    config = yaml.safe_load((tmp_path / "model" / "full" / "needle" / "config.yaml").read_text())
    assert config["needle"]["context_lengths"] == [320]
    assert runs.load_run(tmp_path / "model" / "full" / "needle")["trials"] == redone["needle"][0]["trials"]


def test_a_crash_leaves_no_metrics_and_the_run_is_redone(tiny, essays, tmp_path, counted, monkeypatch):
    model, tok = tiny
    from swiftkv_train.eval.needle import run_retrieval as real

    def crash_under_h2o(subject, variant, section, policy, label, progress):
        if policy is not None:
            raise RuntimeError("killed mid-run")
        return real(subject, variant, section, policy, label, progress)

    monkeypatch.setattr(api, "run_retrieval", crash_under_h2o)
    with pytest.raises(RuntimeError, match="killed mid-run"):
        evaluate(model, tok, "needle", out_dir=tmp_path, progress=False, plots=False, needle=needle(essays),
                 policies=POLICIES)
    assert (tmp_path / "model" / "full" / "needle" / "metrics.json").is_file()
    assert not (tmp_path / "model" / "h2o@50%" / "needle" / "metrics.json").exists()

    # A crash while metrics.json itself is written (its rename never happens): no metrics.json, no temp file left.
    replace = runs.os.replace

    def no_rename(src, dst):
        if Path(dst).name == "metrics.json":
            raise OSError("disk full")
        return replace(src, dst)

    directory = tmp_path / "fake" / "full" / "task"
    monkeypatch.setattr(runs.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        runs.save_run(directory, {"model": "fake", "policy": "full", "trials": [{"correct": True}]}, {})
    monkeypatch.undo()
    assert sorted(p.name for p in directory.iterdir()) == ["config.yaml", "predictions.jsonl"]
    assert runs.load_run(directory) is None

    counted.clear()
    monkeypatch.setattr(api, "run_retrieval", lambda *a: counted.append(a[4]) or real(*a))
    evaluate(model, tok, "needle", out_dir=tmp_path, progress=False, plots=False, needle=needle(essays),
             policies=POLICIES)
    assert counted == ["h2o@50%"]  # the finished run is skipped, the crashed one redone
    assert (tmp_path / "model" / "h2o@50%" / "needle" / "metrics.json").is_file()


def test_any_suite_result_plugs_into_the_layout(tmp_path):
    """The contract: model, policy, task and trials (with a score or correct) are all the layout needs."""
    calls = []

    def compute():
        calls.append(1)
        return {"model": "m", "policy": "snapkv@4x", "task": "niah_single_1",
                "trials": [{"length": 4096, "output": "x", "score": 1.0}, {"length": 4096, "output": "y",
                                                                         "score": 0.5}]}

    for _ in range(2):
        result = runs.run_or_resume(tmp_path, "m", "snapkv@4x", "niah_single_1", {"length": 4096}, compute)
    assert calls == [1] and result["score"] == 0.75 and result["metric"] == "score"
    assert (tmp_path / "m" / "snapkv@4x" / "niah_single_1" / "predictions.jsonl").read_text().count("\n") == 2
    runs.write_summary(tmp_path)
    assert runs.summary_rows(tmp_path) == [{"model": "m", "policy": "snapkv", "ratio": "4x", "task": "niah_single_1",
                                            "metric": "score", "score": 0.75, "trials": 2}]
    assert runs.run_dir(tmp_path, "org/model name", "full", "t") == tmp_path / "org_model_name" / "full" / "t"


# ------------------------------------------------------------------------------------------- policies under lm-eval

UNTIL = ["Question:", "</s>", "<|im_end|>", "<|eot_id|>"]  # swiftkv_gsm8k_local.yaml


@pytest.fixture
def gsm8k(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'lm-eval>=0.4.8'")
    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
            {"question": "Tom has 10 apples and eats 4. How many are left?", "answer": "10 - 4 = 6\n#### 6"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"tasks": ["swiftkv_gsm8k_local"], "limit": 2, "metadata": {"data_file": str(data)},
            "gen_kwargs": {"max_gen_toks": 48}}


def test_lm_eval_generation_task_under_a_policy_equals_greedy_generate(tiny, gsm8k, tmp_path):
    model, tok = tiny
    res = evaluate(model, tok, "lm_eval", progress=False, lm_eval=gsm8k, out_dir=tmp_path / "out", plots=False,
                   policies={"names": ["h2o"], "budget": "25%"})
    full, h2o = res["lm_eval"]
    assert (full["policy"], h2o["policy"]) == ("full", "h2o@25%")
    assert h2o["settings"]["policy"]["name"] == "h2o" and len(h2o["trials"]) == 2
    eos = sorted({tok.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])} - {None})
    for trial in h2o["trials"]:
        ids = torch.tensor([tok(trial["prompt"]).input_ids])
        out = greedy_generate(model, ids, 48, policy=H2O("25%"), eos_token_id=eos)
        text = tok.decode(out.tokens[0], skip_special_tokens=True)
        for stop in UNTIL:
            text = text.split(stop)[0]
        assert trial["output"] == text
    assert [t["output"] for t in h2o["trials"]] != [t["output"] for t in full["trials"]]  # the policy applied
    assert h2o["metric"] == "exact_match,last-number"
    assert h2o["score"] == sum(t["exact_match"] for t in h2o["trials"]) / 2
    # The full-cache run is lm-eval's own HFLM, as without policies.
    alone = evaluate(model, tok, "lm_eval", progress=False, lm_eval=gsm8k)["lm_eval"]
    assert len(alone) == 1
    assert alone[0]["results"] == full["results"]
    assert [t["output"] for t in alone[0]["trials"]] == [t["output"] for t in full["trials"]]
    task_dir = tmp_path / "out" / "model" / "h2o@25%" / "swiftkv_gsm8k_local"
    assert json.loads((task_dir / "metrics.json").read_text())["score"] == h2o["score"]


def test_loglikelihood_tasks_under_a_policy_are_refused_before_running(tiny, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'lm-eval>=0.4.8'")
    model, tok = tiny
    calls = []
    monkeypatch.setattr(api, "run_lm_eval", lambda *a, **k: calls.append(a))
    with pytest.raises(SwiftKVInputError, match=r"lm_eval.tasks \['swiftkv_tiny_mc'\] are \['multiple_choice'\] "
                                                r"tasks.*cannot run under policies.names=\['snapkv'\]"):
        evaluate(model, tok, "lm_eval", progress=False, lm_eval={"tasks": ["swiftkv_tiny_mc"]},
                 policies={"names": ["snapkv"], "budget": "50%"})
    assert calls == []
