"""The results layout: one directory per (model, policy@ratio, task), resumable, and one summary table over all.

    out_dir/<model>/<policy>@<ratio>/<task>/predictions.jsonl   one line per trial (its settings, output, score)
                                           /metrics.json        every number of the run but the trials
                                           /config.yaml         the settings that produced it
    out_dir/summary.md, out_dir/summary.csv                     model, policy, ratio, task, metric, score

The contract (all a suite has to give; nothing here names a suite): a result dict with

- ``model``: the model's display name; ``policy``: ``"full"`` or ``"<policy>@<budget>"`` (the CLI's labels,
  e.g. ``h2o@50%``); ``task``: the task's name (optional: the caller's default, e.g. the suite's name);
- ``trials``: a list of JSON-able dicts, one per prompt: whatever describes it (length, depth, doc id, ...), the
  model's ``output`` and its ``correct`` (bool) or ``score`` (number);
- optionally ``score`` (the run's headline number; default ``accuracy``, else the mean of the trials' ``score``
  or ``correct``) and ``metric`` (its name; default ``accuracy``); anything else JSON-able goes to metrics.json.

`run_or_resume` is the one entry point: a run whose directory already holds metrics.json is not run again (it is
read back: metrics.json + predictions.jsonl give the same dict), unless its config.yaml differs from the settings
asked for, which is an error (`check_resumable`, called for every planned run before the first model call);
``resume=False`` (the eval setting ``resume=false``) runs it again and overwrites it.
metrics.json is written last and atomically (a temporary file renamed over it), so its presence means the run
completed: a crash leaves no metrics.json and the run is redone. `write_summary` reads every metrics.json under
``out_dir`` (this invocation's and earlier ones': a sweep split over several commands gets one table).
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import yaml

from ..errors import SwiftKVInputError
from .report import _json_safe

__all__ = ["run_dir", "run_or_resume", "check_resumable", "load_run", "save_run", "summary_rows", "write_summary",
           "headline"]

METRICS, PREDICTIONS, CONFIG = "metrics.json", "predictions.jsonl", "config.yaml"
SUMMARY_COLUMNS = ["model", "policy", "ratio", "task", "metric", "score", "trials"]


def _safe(name: str) -> str:
    """A directory name: path separators and other odd characters become '_' (``%``, ``@``, ``=`` stay)."""
    cleaned = re.sub(r"[^A-Za-z0-9._%@=+,-]+", "_", str(name)).strip("._")
    return cleaned or "_"


def run_dir(out_dir: str | Path, model: str, policy: str, task: str) -> Path:
    """``out_dir/<model>/<policy>@<ratio>/<task>``; ``policy`` is the label ("full", "h2o@50%")."""
    return Path(out_dir) / _safe(model) / _safe(policy) / _safe(task)


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def headline(result: dict) -> tuple[str, float | None]:
    """(metric name, score) of a result, per the contract above."""
    if "score" in result:
        return result.get("metric") or "score", result["score"]
    if "accuracy" in result:
        return "accuracy", result["accuracy"]
    trials = result.get("trials") or []
    key = "score" if any("score" in t for t in trials) else "correct"
    return result.get("metric") or ("score" if key == "score" else "accuracy"), _mean(t.get(key) for t in trials)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it over ``path`` (all or nothing)."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _config_text(config: dict) -> str:
    return yaml.safe_dump(_json_safe(config), sort_keys=True, allow_unicode=True)


def save_run(directory: Path, result: dict, config: dict) -> None:
    """predictions.jsonl and config.yaml, then metrics.json last (its presence marks the run complete)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / METRICS).unlink(missing_ok=True)  # an older run's metrics must not outlive its predictions
    trials = result.get("trials") or []
    _write_atomic(directory / PREDICTIONS, "".join(json.dumps(_json_safe(t)) + "\n" for t in trials))
    _write_atomic(directory / CONFIG, _config_text(config))
    metric, score = headline(result)
    metrics = {k: v for k, v in result.items() if k != "trials"}
    metrics.update(metric=metric, score=score, n_trials=len(trials))
    _write_atomic(directory / METRICS, json.dumps(_json_safe(metrics), indent=2) + "\n")


def load_run(directory: Path) -> dict | None:
    """The result saved in ``directory`` (metrics.json + the trials of predictions.jsonl), or None if the run is
    not complete (no readable metrics.json)."""
    try:
        metrics = json.loads((directory / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    path = directory / PREDICTIONS
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    metrics["trials"] = [json.loads(line) for line in lines if line.strip()]
    return metrics


def check_resumable(directory: Path, config: dict) -> None:
    """A completed run in ``directory`` must have been made with ``config``: else one clear error."""
    if not (directory / METRICS).is_file() or not (directory / CONFIG).is_file():
        return
    saved = yaml.safe_load((directory / CONFIG).read_text(encoding="utf-8"))
    wanted = yaml.safe_load(_config_text(config))
    if saved != wanted:
        changed = sorted(_differences(saved, wanted))
        raise SwiftKVInputError(
            f"{directory} holds a finished run made with other settings ({', '.join(changed[:5])} differ), which "
            "would be skipped as done: delete that directory to redo it, or choose another out_dir."
        )


def _differences(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".") or "config"]


def run_or_resume(out_dir: str | Path, model: str, policy: str, task: str, config: dict,
                  compute: Callable[[], dict], resume: bool = True) -> dict:
    """The run's result: read back if ``out_dir`` already has it complete ("skipping, exists"), else computed by
    ``compute()`` and saved. ``task`` (and ``model`` / ``policy``) name the directory; a result without a
    ``task`` gets this one. ``resume=False``: always computed, and saved over what is there."""
    directory = run_dir(out_dir, model, policy, task)
    if resume:
        check_resumable(directory, config)
    done = load_run(directory) if resume else None
    if done is not None:
        print(f"skipping, exists: {directory}")
        return done
    result = compute()
    result.setdefault("task", task)
    save_run(directory, result, config)
    return result


def _ratio(policy: str) -> str:
    return policy.split("@", 1)[1] if "@" in policy else "1"


def summary_rows(out_dir: str | Path) -> list[dict]:
    """One row per completed run under ``out_dir`` (sorted by model, policy, task)."""
    rows = []
    for path in sorted(Path(out_dir).glob(f"*/*/*/{METRICS}")):
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        policy = metrics.get("policy", path.parent.parent.name)
        rows.append({"model": metrics.get("model", path.parents[2].name), "policy": policy.split("@", 1)[0],
                     "ratio": _ratio(policy), "task": metrics.get("task", path.parent.name),
                     "metric": metrics.get("metric"), "score": metrics.get("score"),
                     "trials": metrics.get("n_trials")})
    return sorted(rows, key=lambda r: (str(r["model"]), str(r["policy"]), str(r["ratio"]), str(r["task"])))


def write_summary(out_dir: str | Path) -> tuple[Path, Path]:
    """summary.csv and summary.md over every completed run under ``out_dir``."""
    out = Path(out_dir)
    rows = summary_rows(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else ("n/a" if value is None else str(value))

    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in SUMMARY_COLUMNS) + " |" for row in rows]
    (out / "summary.md").write_text("# Summary of all runs\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return out / "summary.md", out / "summary.csv"
