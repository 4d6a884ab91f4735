"""The committed lock (requirements/lock.txt) agrees with pyproject.toml's ranges, and scripts/lock.py sees drift."""

import importlib.util
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _lock_module():
    spec = importlib.util.spec_from_file_location("lock_script", ROOT / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_locked_dependency_is_inside_the_declared_range():
    lock = _lock_module()
    pins = lock.read_lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    checked = 0
    for line in declared:
        req = Requirement(line)
        name = lock._normalise(req.name)
        if name in lock.NOT_LOCKED:
            continue
        assert name in pins, f"{req.name} is a dependency but not in requirements/lock.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"lock pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}")
        checked += 1
    assert checked >= 15
    assert "transformers" in pins and "pip" in pins and "torch" not in pins


def test_diff_names_the_packages_that_drifted(tmp_path, monkeypatch, capsys):
    lock = _lock_module()
    here = lock.installed(Path(sys.prefix))
    fake = tmp_path / "lock.txt"
    fake.write_text(f"# header\ntransformers==0.0.1\npytest=={here['pytest']}\n")
    monkeypatch.setattr(lock, "LOCK", fake)
    monkeypatch.setattr(lock, "ROOT", tmp_path)
    drifted = lock.diff(Path(sys.prefix))
    out = capsys.readouterr().out
    assert "transformers" in out and "0.0.1" in out and here["transformers"] in out
    assert "\n  pytest " not in out  # the same version: not listed
    assert drifted == len([n for n in here if n not in lock.NOT_LOCKED]) - 1  # all but pytest differ
