"""PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["write_plots"]


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
    if results.get("efficiency"):
        written.append(ttft_vs_length(results["efficiency"], out_dir / "efficiency_ttft.png"))
    if len({p[0] for p in points}) >= 2:
        written.append(quality_vs_kv(points, out_dir / "quality_vs_kv_bytes.png"))
    return written
