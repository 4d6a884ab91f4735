"""Packaging: setup.py finds every package folder (a new method's folder included), the wheel ships them."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_found_without_a_list(tmp_path):
    """setup.py's discovery finds every folder with Python files or data, including a method folder added now."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "packages" not in cfg and cfg["package-dir"]["swiftkv_kernels"] == "kernels"
    code = ("import sys, setuptools; sys.argv = ['setup.py', '--name']; found = []; "
            "setuptools.setup = lambda **kw: found.extend(kw['packages']); "
            "exec(open('setup.py').read()); print('\\n'.join(found))")
    new_method = ROOT / "swiftkv_train" / "methods" / "zz_probe_method"
    new_method.mkdir()
    try:
        (new_method / "__init__.py").write_text("")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    finally:
        (new_method / "__init__.py").unlink()
        new_method.rmdir()
    found = set(out.stdout.split())
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "swiftkv_train").rglob("__init__.py")}
    assert on_disk <= found, sorted(on_disk - found)
    assert {"swiftkv_train.methods.zz_probe_method", "swiftkv_train.data.gsm8k", "swiftkv_train.recipes.recipe",
            "swiftkv_kernels"} <= found
    assert not any("__pycache__" in name for name in found)


def test_kernels_folder_is_installed_as_swiftkv_kernels_only(tmp_path):
    # From another directory (the repo root is not on sys.path), as an installed package is used.
    code = (
        "import importlib.util as u, pathlib as p;"
        "s = u.find_spec('swiftkv_kernels'); k = u.find_spec('kernels');"
        "print(p.Path(s.origin).parent); print(None if k is None else k.origin)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    kernels_dir, shadow = out.stdout.split("\n")[:2]
    assert Path(kernels_dir) == ROOT / "kernels"
    assert shadow == "None" or not shadow.startswith(str(ROOT))


def test_wheel_builds_without_setuptools_warnings_and_ships_data(tmp_path):
    """The build prints no deprecation or "absent from packages" blocks, and the wheel holds the recipe groups,
    the GSM8K subset and the compat module every model file imports."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    build_warnings = [line for line in output.splitlines() if "Warning" in line and "Location" not in line]
    assert not build_warnings, "\n".join(build_warnings)
    import zipfile

    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("swiftkv_train/recipes/recipe/smollm2_swiftkv.yaml", "swiftkv_train/recipes/deepspeed/zero2.yaml",
                   "swiftkv_train/data/gsm8k/train.jsonl", "swiftkv_train/data/gsm8k/LICENSE",
                   "swiftkv_train/remote_code/transformers_compat.py", "swiftkv_kernels/swiftkv_prefill_kv.py",
                   "swiftkv_train/methods/swiftkv/remote_code/modeling_llama_swiftkv.py", "swiftkv_train/losses/kl.py"):
        assert needed in names, needed
