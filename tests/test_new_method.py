"""Adding a method is one folder: a method written into swiftkv_train/methods/ trains and exports through the CLI.

The folder below is the whole method (settings, student, loss); nothing else in the tree is edited. It is written
for the test and removed after it, and exercised end to end: recipe schema (transform.<name>.<setting>), a typo in
its settings, training, the held-out evaluation and the export.
"""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT, cli_env

NAME = "zz_norm_tuning"
METHOD = textwrap.dedent(
    '''
    """Norm tuning: only the final RMSNorm trains, on next-token cross-entropy (a method in one file)."""

    from dataclasses import dataclass

    import torch.nn.functional as F

    from ...errors import SwiftKVInputError
    from ..base import Method


    @dataclass
    class NormTuningConfig:
        label_smoothing: float = 0.0

        def validate(self):
            if not 0 <= self.label_smoothing < 1:
                raise SwiftKVInputError(f"transform.zz_norm_tuning.label_smoothing={self.label_smoothing} must be in [0, 1).")


    class NormTuning(Method):
        name = "zz_norm_tuning"
        Config = NormTuningConfig

        def build_student(self, model):
            model.requires_grad_(False)
            model.model.norm.weight.requires_grad_(True)
            return model

        def loss(self, student, batch):
            logits = student(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                 ignore_index=-100, label_smoothing=self.cfg.label_smoothing)
            return {"loss": ce, "ce": ce.detach()}
    '''
)


@pytest.fixture
def new_method_folder():
    folder = ROOT / "swiftkv_train" / "methods" / NAME
    folder.mkdir()
    try:
        (folder / "__init__.py").write_text(METHOD)
        yield folder
    finally:
        shutil.rmtree(folder)


def run_cli(tmp_path, *overrides):
    return subprocess.run(
        [sys.executable, "-m", "swiftkv_train", "recipe=tiny_cpu_test", f"run_dir={tmp_path / 'run'}",
         f"transform.name={NAME}", "trainer.max_steps=3", "trainer.save_every=0", "trainer.export=lean",
         *overrides], cwd=ROOT, env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_a_method_folder_trains_and_exports_with_no_other_edit(new_method_folder, tmp_path):
    bad = run_cli(tmp_path, f"transform.{NAME}.label_smothing=0.1")
    assert bad.returncode != 0 and f"transform.{NAME}.label_smoothing" in bad.stdout + bad.stderr
    done = run_cli(tmp_path, f"transform.{NAME}.label_smoothing=0.1")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 3
    assert summary["evals"]["end"]["ce"] > 0  # held out: the method's own loss terms, in the end-of-run report
    assert "the method's loss terms on the held-out split" in done.stdout
    assert (tmp_path / "run" / "export" / "lean" / "model.safetensors").is_file()
