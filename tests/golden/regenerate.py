"""Rewrite the golden files of tests/test_golden.py.

    .venv/bin/python tests/golden/regenerate.py [training] [policies] [old_exports]

(DS_ACCELERATOR=cpu, WANDB_MODE=disabled, HF_HUB_OFFLINE=1 are set here unless already set.)

No argument = training + policies (NOT old_exports). ``training`` rewrites training.json and exports.json;
``policies`` policies.json; ``old_exports`` the checked-in exports/<method>/ and their golden logits.

WARNING: only regenerate when a behaviour change is INTENDED, and explain the change in the commit message. The
point of these files is that a refactor passes them UNCHANGED. Regenerating old_exports defeats the "exports written
before the change still load" test: do it only to add a method, never to make a loading test pass.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: test_golden, helpers

import test_golden as g  # noqa: E402


def write(name, data):
    import torch
    import transformers

    data = {"recorded_with": {"torch": torch.__version__, "transformers": transformers.__version__}, **data}
    (g.GOLDEN / name).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print("wrote", g.GOLDEN / name)


def training():
    training_out = {"settings": {"recipe": "tiny_cpu_test", "common_overrides": g.COMMON_OVERRIDES,
                                 "method_overrides": g.METHOD_OVERRIDES, "threads": g.THREADS}, "methods": {}}
    exports_out = {"excluded_config_fields": g.VOLATILE_CONFIG_FIELDS, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for method in g.METHODS:
            run_dir = Path(tmp) / method
            training_out["methods"][method] = g.run_method(run_dir, method)
            exports_out["methods"][method] = {kind: g.export_record(run_dir / "export" / kind)
                                              for kind in ("lean", "full")}
    write("training.json", training_out)
    write("exports.json", exports_out)


def policies():
    write("policies.json", g.compute_policies())


def old_exports():
    with tempfile.TemporaryDirectory() as tmp:
        g.write_old_exports(Path(tmp))
    print("wrote", g.OLD_EXPORTS)


if __name__ == "__main__":
    jobs = {"training": training, "policies": policies, "old_exports": old_exports}
    wanted = sys.argv[1:] or ["training", "policies"]
    unknown = [w for w in wanted if w not in jobs]
    if unknown:
        sys.exit(f"unknown part(s) {unknown}: use {', '.join(jobs)}")
    for name in wanted:
        jobs[name]()
