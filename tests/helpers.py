"""Helpers shared by several test files."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Runs in a subprocess: swiftkv_train is made unimportable, so only the exported files can serve the model.
LOADER = textwrap.dedent(
    """
    import sys, torch
    sys.modules["swiftkv_train"] = None  # any import of the package now fails
    from transformers import AutoModelForCausalLM, AutoTokenizer
    export_dir, out_path, dtype, teacher = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4] == "1"
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=False)  # the tokenizer runs no export code
    text = tok.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True,
                                   tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    out = {"ids": ids, "logits": model(ids).logits.float(),
           "generated": model.generate(ids, max_new_tokens=6, do_sample=False),
           "class": type(model).__name__, "module": type(model).__module__}
    if teacher:
        out["teacher_logits"] = model.swiftkv(False)(ids).logits.float()
    torch.save(out, out_path)
    """
)


def run_export_script(script, export_dir, tmp_path, *args):
    """Run ``python -c script EXPORT_DIR OUT_PATH *args`` offline, with its own HF modules cache under ``tmp_path``;
    it must exit 0. Returns what it saved (torch.save) to OUT_PATH."""
    out = tmp_path / "out.pt"
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(export_dir), str(out), *map(str, args)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def run_loader(export_dir, tmp_path, dtype, teacher=False):
    return run_export_script(LOADER, export_dir, tmp_path, dtype, "1" if teacher else "0")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run far faster on one thread when the 2 CPU cores are shared. Autouse: a test module that
    imports it runs all its tests on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ Triton kernels (kernels/)


def alias_kernels_package():
    """Import `kernels/` as ``swiftkv_kernels`` when the project is not installed (the GPU machine runs the tests
    from the working tree with ``PYTHONPATH=$PWD``, where only ``kernels`` would be importable)."""
    if importlib.util.find_spec("swiftkv_kernels") is not None:
        return
    spec = importlib.util.spec_from_file_location(
        "swiftkv_kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["swiftkv_kernels"] = module
    spec.loader.exec_module(module)


# Start of every Triton-interpreter subprocess script (run by `run_interpreter_script`, cwd = repo root).
INTERPRETER_PREAMBLE = r"""
import torch
import triton.runtime.interpreter as interp

# numpy >= 2.4 refuses int() of a 1-element 1-d array, which the triton 3.6 interpreter does for `range(..., n)`
# bounds given as kernel arguments: read the element explicitly (interpreter-only; GPU compiles are unaffected).
_orig = interp._patch_lang_tensor
def _patch(tensor, scope):
    _orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interp._patch_lang_tensor = _patch

import importlib.util, sys
if importlib.util.find_spec("swiftkv_kernels") is None:  # not installed: map it onto kernels/ (cwd = repo root)
    spec = importlib.util.spec_from_file_location("swiftkv_kernels", "kernels/__init__.py",
                                                  submodule_search_locations=["kernels"])
    sys.modules["swiftkv_kernels"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["swiftkv_kernels"])
"""


def run_interpreter_script(script, *markers, timeout=110):
    """Run ``INTERPRETER_PREAMBLE + script`` in a subprocess with ``TRITON_INTERPRET=1`` (cwd and PYTHONPATH = the
    repo); it must exit 0 and print every one of ``markers``. Skips when this triton's interpreter lacks an op."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_PREAMBLE + script], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0 and "InterpreterError" in proc.stderr and "NotImplemented" in proc.stderr:
        pytest.skip(f"this triton's interpreter lacks an op: {proc.stderr[-400:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for marker in markers:
        assert marker in proc.stdout, (marker, proc.stdout[-2000:])


def compile_sm90(fn, signature, constexprs, num_warps, attrs=None, label=None):
    """Ahead-of-time compile of the Triton kernel ``fn`` down to an sm_90 cubin (ptxas ships with triton; no GPU
    needed) and return it; the ``constexprs`` are marked ``constexpr`` in ``signature``. Skips when triton is missing
    or has no AOT compile API; fails (with ``label``, default the kernel's name) when no cubin comes out."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - triton API drift
        pytest.skip(f"no AOT compile API in this triton: {exc}")
    signature = dict(signature, **{k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm.get("cubin"), label if label is not None else fn.__name__
    return compiled


# The variables a launcher sets; a CLI run in a subprocess must not inherit ones a previous in-process run left.
DIST_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def cli_env(**extra) -> dict[str, str]:
    """The environment for ``python -m swiftkv_train`` in a subprocess: CPU DeepSpeed, no wandb, no launcher
    variables (a single process then picks a free port itself)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV_KEYS}
    return {**env, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", **extra}
