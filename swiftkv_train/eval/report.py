"""results.json (every number and its settings) and results.md (Markdown tables)."""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["markdown", "write_results"]


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines + [""]


def markdown(results: dict) -> str:
    meta = results.get("meta", {})
    lines = ["# Evaluation results", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))] + [""]
    if results.get("fidelity"):
        lines += ["## Fidelity to the teacher", ""]
        lines += _table(
            ["model", "teacher", "KL(teacher‖model) nats/token", "top-1 agreement", "ppl teacher", "ppl model",
             "tokens", "windows x tokens"],
            [[r["model"], r["teacher"], r["kl"], r["top1"], r["ppl_teacher"], r["ppl_student"], r["tokens"],
              f"{r['settings']['windows']} x {r['settings']['window']}"] for r in results["fidelity"]],
        )
    for variant in ("needle", "passkey"):
        runs = results.get(variant) or []
        if runs:
            lengths = list(runs[0]["by_length"])
            lines += [f"## {variant.capitalize()} retrieval (exact match)", ""]
            lines += _table(
                ["model", "policy", "KV bytes/token", "peak KV MiB", "prefill s (longest)", "all"]
                + [f"{n} tok" for n in lengths],
                [[r["model"], r["policy"], r["kv_bytes_per_token"], r.get("kv_peak_bytes", 0) / 2**20,
                  r.get("prefill_s_by_length", {}).get(lengths[-1]), r["accuracy"]]
                 + [r["by_length"].get(n) for n in lengths] for r in runs],
            )
            settings = runs[0]["settings"]
            mode = "query-aware (the question compressed with the context)" if settings.get("query_aware") else \
                "question-independent (the policy compresses the context; the question is appended after)"
            lines += [f"Depths {settings['depths_percent']} %, {settings['samples']} sample(s) per cell; {mode}.", ""]
    if results.get("lm_eval"):
        lines += ["## lm-evaluation-harness", ""]
        rows = []
        for run in results["lm_eval"]:
            for task, metrics in run["results"].items():
                for name, value in metrics.items():
                    if "stderr" not in name and isinstance(value, (int, float)):
                        rows.append([run["model"], run.get("policy", "full"), task, name, value,
                                     run["n_samples"].get(task)])
        lines += _table(["model", "policy", "task", "metric", "value", "docs"], rows)
    if results.get("ruler"):
        from .ruler.report import markdown_lines

        lines += markdown_lines(results["ruler"])
    if results.get("efficiency"):
        lines += ["## Efficiency (medians)", ""]
        rows = []
        for run in results["efficiency"]:
            for r in run["rows"]:
                peak = r["peak_memory_bytes"]
                rows.append([run["model"], run["policy"], r["batch_size"], r["prompt_length"], r["ttft_ms"],
                             r["tpot_ms"], r["prefill_tokens_per_s"], r["decode_tokens_per_s"],
                             r["kv_bytes_per_token"], None if peak is None else peak / 2**20])
        lines += _table(["model", "policy", "batch", "prompt", "TTFT ms", "TPOT ms", "prefill tok/s",
                         "decode tok/s", "KV bytes/token", "peak MiB"], rows)
        lines += [f"Memory: {results['efficiency'][0]['settings']['memory_method']}.", ""]
    if results.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in results["skipped"].items()] + [""]
    if results.get("summary"):
        lines += ["## Results layout", "", "One directory per model / policy@ratio / task (predictions.jsonl, "
                  "metrics.json, config.yaml); the table over all of them: "
                  + ", ".join(f"[{Path(p).name}]({Path(p).name})" for p in results["summary"]), ""]
    if results.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in results["plots"]] + [""]
    return "\n".join(lines)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_results(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(_json_safe(results), indent=2) + "\n")
    md_path.write_text(markdown(results))
    return json_path, md_path
