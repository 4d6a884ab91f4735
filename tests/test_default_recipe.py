"""`python -m swiftkv_train` with no recipe: the embedded default (real SmolLM2, shipped GSM8K) end to end on CPU,
and the report it ends with."""

import json
import subprocess
import sys

import pytest
import torch

from swiftkv_train.__main__ import print_report
from swiftkv_train.export import save_hf
from swiftkv_train.models import load_pretrained
from swiftkv_train.methods.swiftkv import to_swiftkv

from helpers import cli_env

EVALS = {"start": {"kl": 0.97, "top1": 0.62, "ppl_student": 9.71, "ppl_teacher": 3.82},
         "end": {"kl": 0.25, "top1": 0.80, "ppl_student": 4.50, "ppl_teacher": 3.82}}


def _snippet(console: str) -> str:
    """The copy-paste block print_report ends with (everything after its heading)."""
    head = "load and generate (plain transformers, no swiftkv_train needed):"
    assert head in console, console
    return console.split(head, 1)[1].strip() + "\n"


def _run_snippet(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)


@pytest.mark.slow
def test_embedded_default_distills_smollm2(tmp_path):
    env = cli_env(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "swiftkv_train", f"run_dir={tmp_path}"], capture_output=True,
                          text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "teacher fidelity on the held-out split" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    start, end = summary["evals"]["start"], summary["evals"]["end"]
    assert summary["step"] == 30
    # distillation closes most of the initialisation's gap to the teacher (measured: KL 0.97 -> 0.25)
    assert end["kl"] < 0.5 * start["kl"] and end["top1"] > start["top1"]
    assert end["ppl_teacher"] == pytest.approx(start["ppl_teacher"])  # the teacher is untouched
    config = json.loads((tmp_path / "export" / "lean" / "config.json").read_text())
    assert config["num_key_value_layers"] == 20 and config["model_type"] == "llama_swiftkv"
    # The console ends with where the result is and a snippet that runs as printed.
    assert f"export  {tmp_path.resolve() / 'export' / 'lean'} (" in proc.stdout
    assert f"export  {tmp_path.resolve() / 'export' / 'full'} (" in proc.stdout
    answer = _run_snippet(_snippet(proc.stdout), tmp_path)
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr[-3000:]


def test_report_names_the_exports_and_its_snippet_generates(tmp_path, capsys):
    base, tok = load_pretrained("random:tiny-7l")
    student = to_swiftkv(base, 3, 2)
    run_dir = tmp_path / "run"
    save_hf(student, tok, run_dir / "export" / "full", lean=False)
    save_hf(student, tok, run_dir / "export" / "lean", lean=True)  # left over from an earlier run: not listed

    print_report({"step": 30, "evals": EVALS, "exports": [str(run_dir / "export" / "full")]}, run_dir)
    console = capsys.readouterr().out
    assert "start      0.9700   0.620         9.71         3.82" in console
    assert f"\nrun dir {run_dir.resolve()} (" in console
    assert f"export  {run_dir.resolve() / 'export' / 'full'} (every weight" in console
    assert "export/lean" not in console  # the trainer wrote only the full export: the lean dir is not this run's

    code = _snippet(console)
    assert f"path = {str(run_dir.resolve() / 'export' / 'full')!r}" in code
    proc = _run_snippet(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # What the snippet prints is the student's greedy continuation of the chat prompt (the fp32 full export
    # computes exactly what the student computes).
    messages = [{"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. How many in total?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = student.swiftkv(True).generate(**inputs, max_new_tokens=64, do_sample=False)
    expected = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert proc.stdout == expected + "\n"


def test_report_lists_both_exports_and_snippet_uses_the_lean_one(tmp_path, capsys):
    run_dir = tmp_path / "run"
    for kind in ("lean", "full"):
        (run_dir / "export" / kind).mkdir(parents=True)
    exports = [str(run_dir / "export" / kind) for kind in ("lean", "full")]
    print_report({"step": 30, "evals": EVALS, "exports": exports}, run_dir)
    console = capsys.readouterr().out
    lean, full = run_dir.resolve() / "export" / "lean", run_dir.resolve() / "export" / "full"
    assert console.index(f"export  {lean} (bf16") < console.index(f"export  {full} (")
    assert f"path = {str(lean)!r}" in _snippet(console)


def test_report_of_a_stopped_or_export_free_run_has_no_snippet(tmp_path, capsys):
    (tmp_path / "export" / "lean").mkdir(parents=True)
    print_report({"interrupted": True, "step": 12}, tmp_path)
    assert capsys.readouterr().out == f"\nrun dir {tmp_path.resolve()}: stopped at step 12; run again to resume\n"
    print_report({"step": 30, "evals": EVALS, "exports": []}, tmp_path)
    console = capsys.readouterr().out
    assert "KL" in console and f"run dir {tmp_path.resolve()} (" in console
    assert "export  " not in console and "load and generate" not in console
