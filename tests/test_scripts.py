"""The benchmark and report scripts still run: CPU smoke runs on small shapes (their numbers are not checked here,
only that every kernel is measured and the files are written)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, timeout=300):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_bench_kernels_measures_all_four_kernels(tmp_path):
    out = tmp_path / "kernels.json"
    _run([str(ROOT / "scripts" / "bench_kernels.py"), "--small", "--device", "cpu", "--no-liger", "--out", str(out)],
         tmp_path)
    main = json.loads(out.read_text())
    assert main["swiftkv"] and main["kd"]
    assert all(row["max_abs_err"] < 1e-3 for row in main["swiftkv"])
    cskv = json.loads((tmp_path / "kernels_cskv_decode.json").read_text())
    locret = json.loads((tmp_path / "kernels_locret_evict.json").read_text())
    assert cskv["rows"] and locret["cases"]
    assert all(case["results"]["reference"]["identical_to_reference"] for case in locret["cases"])


def test_quality_plot_from_the_recorded_results(tmp_path):
    out = tmp_path / "plot.png"
    _run([str(ROOT / "scripts" / "plot_quality_vs_kv.py"), "--results", str(ROOT / "docs" / "results"),
          "--out", str(out)], tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
