#!/usr/bin/env python
"""Plot RULER-style suite results of several runs: the task x length heat map per model/policy and the score vs
compression ratio picture (kvpress's leaderboard: average score against the share of the context's KV removed).

Reads every RULER task result under the given folders: the results layout's ``metrics.json`` files (one per
model / policy@ratio / task) and ``results.json`` files of `python -m swiftkv_train.eval` (their "ruler" list).

    python scripts/plot_ruler.py eval_out/ruler_sweep [more folders] --out eval_out/ruler_plots
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swiftkv_train.eval.plots import ruler_plots  # noqa: E402
from swiftkv_train.eval.ruler.tasks import TASKS  # noqa: E402


def _is_ruler(result: dict) -> bool:
    return isinstance(result, dict) and result.get("task") in TASKS and "by_length" in result \
        and "compression_ratio" in result


def collect(folders: list[Path]) -> list[dict]:
    """RULER task results, one per (model, policy, task); a later file's copy of the same run replaces an
    earlier one (a results.json and the layout's metrics.json hold the same run)."""
    found: dict[tuple, dict] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*.json")):
            if path.name not in ("metrics.json", "results.json"):
                continue
            data = json.loads(path.read_text())
            results = data.get("ruler", []) if path.name == "results.json" else [data]
            for r in results:
                if _is_ruler(r):
                    found[(r["model"], r["policy"], r["task"])] = r
    return list(found.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    args = parser.parse_args(argv)
    results = collect(args.folders)
    if not results:
        print(f"no RULER results (metrics.json / results.json) under {', '.join(map(str, args.folders))}",
              file=sys.stderr)
        return 2
    for path in ruler_plots(results, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
