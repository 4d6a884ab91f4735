"""scripts/push_to_hub.py: checks an export and lists it with --dry-run; the token never reaches the output."""

import subprocess
import sys
from pathlib import Path

from swiftkv_train.export import save_hf
from swiftkv_train.models import load_pretrained
from swiftkv_train.methods.swiftkv import to_swiftkv

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "push_to_hub.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_dry_run_lists_the_export_and_hides_the_token(tmp_path):
    model, tok = load_pretrained("random:tiny")
    export = save_hf(to_swiftkv(model, 2), tok, tmp_path / "lean", lean=True, model_card="---\nbase_model: x\n---\n")
    proc = run(export, "me/tiny-swiftkv", "--dry-run", "--token", "hf_SECRET123")
    assert proc.returncode == 0, proc.stderr
    assert "would upload" in proc.stdout and "model.safetensors" in proc.stdout and "modeling_llama_swiftkv.py" in proc.stdout
    assert "hf_SECRET123" not in proc.stdout + proc.stderr


def test_incomplete_export_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    proc = run(tmp_path, "me/x", "--dry-run")
    assert proc.returncode != 0 and "not a complete export (missing README.md, *.safetensors)" in proc.stderr
    proc = run(tmp_path / "nope", "me/x", "--dry-run")
    assert proc.returncode != 0 and "does not exist" in proc.stderr
