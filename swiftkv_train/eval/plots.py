"""PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["write_plots", "ruler_plots", "ruler_heatmap", "ruler_score_vs_ratio"]


def _label(run: dict) -> str:
    return run["model"] if run.get("policy", "full") == "full" else f"{run['model']} / {run['policy']}"


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def retrieval_by_length(runs: list[dict], variant: str, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        lengths = [int(n) for n in run["by_length"]]
        ax.plot(lengths, [run["by_length"][str(n)] for n in lengths], marker="o", label=_label(run))
    ax.set(xlabel="context length (tokens)", ylabel="exact-match accuracy", ylim=(-0.05, 1.05),
           title=f"{variant}: retrieval vs context length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def retrieval_heatmap(runs: list[dict], variant: str, path: Path) -> str:
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs) + 1, 3.6), squeeze=False)
    image = None
    for ax, run in zip(axes[0], runs):
        lengths = list(run["grid"])
        depths = list(next(iter(run["grid"].values())))
        matrix = [[run["grid"][n][d] for n in lengths] for d in depths]
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths, fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{float(d):g}%" for d in depths], fontsize=7)
        ax.set(xlabel="context length", ylabel="needle depth", title=_label(run))
        ax.title.set_fontsize(8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(f"{variant}: depth x length")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def ttft_vs_length(runs: list[dict], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        for batch in sorted({r["batch_size"] for r in run["rows"]}):
            rows = sorted((r for r in run["rows"] if r["batch_size"] == batch), key=lambda r: r["prompt_length"])
            ax.plot([r["prompt_length"] for r in rows], [r["ttft_ms"] for r in rows], marker="o",
                    label=f"{_label(run)} (batch {batch})")
    ax.set(xlabel="prompt length (tokens)", ylabel="TTFT (ms, median)", title="Time to first token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def quality_vs_kv(points: list[tuple[str, str, float, float]], path: Path) -> str:
    """``points``: (label, metric name, KV bytes per token, quality)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric in sorted({p[1] for p in points}):
        chosen = [p for p in points if p[1] == metric]
        ax.scatter([p[2] for p in chosen], [p[3] for p in chosen], label=metric)
        for label, _, x, y in chosen:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="KV-cache bytes per prompt token (measured)", ylabel="accuracy", ylim=(-0.05, 1.05),
           title="Quality vs KV-cache size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _ruler_runs(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """RULER task results grouped by (model, policy label), in first-seen order."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        runs.setdefault((r["model"], r["policy"]), []).append(r)
    return runs


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def ruler_heatmap(results: list[dict], path: Path) -> str:
    """One panel per model/policy: task (rows) x length (columns), RULER score 0-100 written in each cell."""
    runs = _ruler_runs(results)
    tasks = list(dict.fromkeys(r["task"] for r in results))
    lengths = sorted({int(n) for r in results for n in r["by_length"]})
    fig, axes = plt.subplots(1, len(runs), figsize=(1.0 * len(lengths) * len(runs) + 2.5 * len(runs) + 1,
                                                    0.32 * len(tasks) + 1.8), squeeze=False)
    image = None
    for panel, (ax, ((model, policy), rows)) in enumerate(zip(axes[0], runs.items())):
        by_task = {r["task"]: r["by_length"] for r in rows}
        matrix = [[_number(by_task.get(t, {}).get(str(n))) for n in lengths] for t in tasks]
        image = ax.imshow(matrix, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if value == value:  # not NaN
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks if panel == 0 else [""] * len(tasks), fontsize=7)  # rows shared
        ax.set(xlabel="length (tokens)", title=model if policy == "full" else f"{model} / {policy}")
        ax.title.set_fontsize(8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="score (0-100)")
    fig.suptitle("RULER-style suite: task x length")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def ruler_score_vs_ratio(results: list[dict], path: Path) -> str:
    """kvpress's leaderboard picture: the average score over tasks (and lengths) against the measured compression
    ratio (share of the context's KV entries removed), one line per policy and model; the full cache at 0."""
    points: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for (model, _), rows in _ruler_runs(results).items():
        ratio = sum(r["compression_ratio"] for r in rows) / len(rows)
        mean = sum(r["score"] for r in rows) / len(rows)
        points.setdefault((model, rows[0].get("policy_name", rows[0]["policy"])), []).append((ratio, mean))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (model, policy), xy in sorted(points.items()):
        xy.sort()
        if policy == "full":
            for x, y in xy:
                ax.axhline(y, color="gray", ls="--", lw=1)
                ax.scatter([x], [y], color="black", zorder=3, label=f"{model} / full cache")
            continue
        ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", label=f"{model} / {policy}")
    ax.set(xlabel="compression ratio (share of context KV removed)", ylabel="average score (0-100)",
           xlim=(-0.03, 1.0), ylim=(-3, 103), title="RULER-style suite: score vs compression")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def ruler_plots(results: list[dict], out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [ruler_heatmap(results, out_dir / "ruler_heatmap.png"),
            ruler_score_vs_ratio(results, out_dir / "ruler_score_vs_ratio.png")]


def write_plots(results: dict, out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    points = []
    for variant in ("needle", "passkey"):
        runs = results.get(variant) or []
        if runs:
            written.append(retrieval_by_length(runs, variant, out_dir / f"{variant}_by_length.png"))
            written.append(retrieval_heatmap(runs, variant, out_dir / f"{variant}_heatmap.png"))
            points += [(_label(r), variant, r["kv_bytes_per_token"], r["accuracy"]) for r in runs]
    if results.get("ruler"):
        written += ruler_plots(results["ruler"], out_dir)
    if results.get("efficiency"):
        written.append(ttft_vs_length(results["efficiency"], out_dir / "efficiency_ttft.png"))
    if len({p[0] for p in points}) >= 2:
        written.append(quality_vs_kv(points, out_dir / "quality_vs_kv_bytes.png"))
    return written
