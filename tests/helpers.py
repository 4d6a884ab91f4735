"""Helpers shared by several test files."""

import subprocess
import sys
import textwrap

import torch

# Runs in a subprocess: swiftkv_train is made unimportable, so only the exported files can serve the model.
LOADER = textwrap.dedent(
    """
    import sys, torch
    sys.modules["swiftkv_train"] = None  # any import of the package now fails
    from transformers import AutoModelForCausalLM, AutoTokenizer
    export_dir, out_path, dtype, teacher = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4] == "1"
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(export_dir)
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


def run_loader(export_dir, tmp_path, dtype, teacher=False):
    out = tmp_path / "out.pt"
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(export_dir), str(out), dtype, "1" if teacher else "0"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)
