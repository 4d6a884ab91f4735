#!/usr/bin/env python
"""Quality vs KV-cache bytes per token across methods, on SmolLM2-135M-Instruct, from the measured result files.

    python scripts/plot_quality_vs_kv.py --results docs/results --out docs/results/quality_vs_kv_bytes.png

Left: fidelity to the teacher (KL on held-out essays, lower is better) of the trained SwiftKV and CSKV variants.
Right: needle-in-a-haystack accuracy on 4000-token prompts for every method (SwiftKV, CSKV, Locret and the
training-free eviction policies at 4x/8x). Bytes per prompt token in bf16: K/V as the model stores them (for the
eviction policies, as measured from the cache after the prefill, their positions and scores included; for CSKV, the
compressed cache measured after a 2048-token prefill). Nothing is recomputed: every point comes from a JSON in
--results, written by scripts/smollm2_quality.py, cskv_quality.py and locret_smollm2.py.
"""

import argparse
import json
from pathlib import Path

FULL_BF16 = 2 * 30 * 3 * 64 * 2  # SmolLM2: K+V x 30 layers x 3 KV heads x 64 dims x 2 bytes


def swiftkv_bytes(m: int, g: int, layers: int = 30) -> int:
    """Cache slots: one per layer below M, one per group of g later layers."""
    return FULL_BF16 * (m + -(-(layers - m) // g)) // layers


def _load(results: Path, name: str) -> dict:
    return json.loads((results / name).read_text())


def swiftkv_points(results: Path) -> list[tuple[str, float, float, float]]:
    """(label, bytes/token, KL, needle@4000) of the best measured run per (M, g)."""
    picks = [("SwiftKV M=20", "smollm2_quality_h100_run8.json", "m20_lsq_essays8", 20, 1),
             ("SwiftKV M=15", "smollm2_quality_h100_run7.json", "m15_lsq_essays8", 15, 1),
             ("SwiftKV M=20 g=2", "smollm2_quality_h100_run8.json", "m20_g2_lsq_essays8", 20, 2),
             ("SwiftKV M=15 g=2", "smollm2_quality_h100_run9.json", "m15_g2_lsq_essays8", 15, 2)]
    points = []
    for label, file, variant, m, g in picks:
        distilled = _load(results, file)["variants"][variant]["distilled"]
        points.append((label, swiftkv_bytes(m, g), distilled["kl"], distilled["needle_model_by_length"]["4000"]))
    return points


def cskv_points(results: Path) -> list[tuple[str, float, float, float | None]]:
    """The later file (a re-run with the needle) wins for a variant measured twice."""
    points = {}
    for file in ("cskv_smollm2_h100.json", "cskv_smollm2_needle_h100.json"):
        for name, v in _load(results, file)["variants"].items():
            needle = v.get("needle", {}).get("model", {}).get("by_length", {}).get("4000")
            points[name] = (f"CSKV {name}", v["cache"]["bytes_per_token"], v["fidelity"]["kl"], needle)
    return list(points.values())


def eviction_points(results: Path) -> list[tuple[str, float, float]]:
    rows = _load(results, "locret_smollm2_h100.json")["rows"]
    out = []
    for r in rows:
        label = "full cache (teacher)" if r["policy"] == "full" else (
            r["policy"] if r["heads"] == "trained" else f"{r['policy']} (untrained heads)")
        out.append((label, r["kv_bytes_per_token"], r["by_length"]["4000"]))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("docs/results"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/quality_vs_kv_bytes.png"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swift, cskv, evict = swiftkv_points(args.results), cskv_points(args.results), eviction_points(args.results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    left.scatter([0 + FULL_BF16], [0.0], marker="*", s=160, color="black", label="teacher")
    for points, marker, color in ((swift, "o", "tab:blue"), (cskv, "s", "tab:orange")):
        left.scatter([p[1] for p in points], [p[2] for p in points], marker=marker, color=color, s=50,
                     label="SwiftKV (distilled)" if color == "tab:blue" else "CSKV (trained)")
        for label, x, y, *_ in points:
            left.annotate(label.split(" ", 1)[1], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    left.set(xlabel="KV bytes per token (bf16)", ylabel="KL(teacher || model), nats/token (held-out essays)",
             title="Fidelity vs cache size")
    left.legend(fontsize=8)

    colors = {"locret": "tab:red", "h2o": "tab:green", "keyformer": "tab:purple", "streaming_llm": "tab:gray"}
    stacked: dict[tuple[int, float], list[str]] = {}  # points that coincide share one label
    for label, x, acc in evict:
        base = label.split("@")[0]
        color = "black" if label.startswith("full") else colors.get(base, "tab:brown")
        marker = "*" if label.startswith("full") else ("x" if "untrained" in label else "^")
        right.scatter([x], [acc], marker=marker, color=color, s=70 if marker != "*" else 160)
        stacked.setdefault((round(x / 1000), acc), []).append(label)
    for (k, acc), labels in stacked.items():
        x = 1000 * k
        right.annotate("\n".join(labels), (x, acc), fontsize=6.5, xytext=(-20, 12), textcoords="offset points",
                       va="bottom")
    for label, x, _, needle in swift + cskv:
        if needle is not None:
            right.scatter([x], [needle], marker="o" if label.startswith("SwiftKV") else "s",
                          color="tab:blue" if label.startswith("SwiftKV") else "tab:orange", s=50)
            right.annotate(label, (x, needle), fontsize=6.5, xytext=(4, -10), textcoords="offset points")
    right.set(xlabel="KV bytes per prompt token (bf16)", ylabel="needle accuracy, 4000-token prompts",
              title="Needle retrieval vs cache size", ylim=(-0.05, 1.1))
    fig.suptitle("SmolLM2-135M-Instruct on an H100: quality against KV-cache bytes (docs/results.md)", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
