"""The RULER section of results.md: one row per model / policy, its measured compression ratio, the average score
and each task's score (0-100, all lengths pooled), then the average by length."""

from __future__ import annotations

__all__ = ["markdown_lines"]


def _fmt(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.1f}"


def markdown_lines(results: list[dict]) -> list[str]:
    runs: dict[tuple[str, str], dict[str, dict]] = {}
    for r in results:
        runs.setdefault((r["model"], r["policy"]), {})[r["task"]] = r
    tasks = list(dict.fromkeys(r["task"] for r in results))
    lengths = list(dict.fromkeys(n for r in results for n in r["by_length"]))
    header = ["model", "policy", "ratio", "avg"] + tasks
    lines = ["## RULER-style suite (score 0-100)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, policy), by_task in runs.items():
        rows = list(by_task.values())
        ratio = sum(r["compression_ratio"] for r in rows) / len(rows)
        avg = sum(r["score"] for r in rows) / len(rows)
        lines.append("| " + " | ".join([model, policy, f"{ratio:.3f}", _fmt(avg)]
                                       + [_fmt(by_task[t]["score"]) if t in by_task else "" for t in tasks]) + " |")
    lines += ["", "| model | policy | " + " | ".join(f"{n} tok" for n in lengths) + " |",
              "|---|---|" + "---|" * len(lengths)]
    for (model, policy), by_task in runs.items():
        rows = list(by_task.values())
        means = [sum(r["by_length"].get(n) or 0 for r in rows) / len(rows) for n in lengths]
        lines.append("| " + " | ".join([model, policy] + [_fmt(m) for m in means]) + " |")
    first = results[0]["settings"]
    mode = "query-aware" if first.get("query_aware") else "question-independent"
    lines += ["", f"{first['samples']} sample(s) per task and length, seed {first['seed']}; {mode}; ratio = share of "
              "the context's KV entries removed (kvpress), measured; length = prompt + the task's answer budget "
              "(RULER).", ""]
    return lines
