#!/usr/bin/env python
"""Train Locret's retaining heads on the real SmolLM2-135M-Instruct, then compare eviction policies on long needles.

    PYTHONPATH=$PWD python scripts/locret_smollm2.py --data .device_data --out results/locret

1. Data: long essay windows with a question about one of their sentences (scripts/make_locret_data.py; the
   first essays in name order are held out: they are the needle haystack) + GSM8K + Alpaca instructions.
2. Training: recipe smollm2_locret_gpu through the shared trainer (only the heads train).
3. Evaluation harness, needle in a haystack on 4K-7K-token prompts, chunked prefill (the policy evicts after every
   chunk), at budgets giving 4x and 8x compression: the full cache (the teacher: the backbone is unchanged), Locret's
   trained heads, the same heads untrained (random init), H2O, Keyformer and StreamingLLM. Per run: accuracy, peak
   KV bytes during the prefill, prefill time.
Writes <out>/locret.json and prints a table.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_locret_data  # noqa: E402

from swiftkv_train.config import register_schemas  # noqa: E402
from swiftkv_train.eval.api import evaluate  # noqa: E402
from swiftkv_train.models import load_pretrained  # noqa: E402
from swiftkv_train.train.trainer import run_training  # noqa: E402
from swiftkv_train.methods.locret import to_locret  # noqa: E402

BASELINES = ["h2o", "keyformer", "streaming_llm"]


def needle_settings(essays: Path, lengths: list[int], samples: int, chunk: int) -> dict:
    return {"haystack": str(essays), "context_lengths": lengths, "depths": [0.0, 25.0, 50.0, 75.0, 100.0],
            "samples": samples, "prefill_chunk": chunk}


def summarise(result: dict, tag: str) -> list[dict]:
    rows = []
    for run in result.get("needle", []):
        rows.append({"heads": tag, "policy": run["policy"], "accuracy": run["accuracy"], "by_length": run["by_length"],
                     "kv_peak_bytes": run["kv_peak_bytes"], "kv_bytes_per_token": run["kv_bytes_per_token"],
                     "prefill_s_by_length": run["prefill_s_by_length"]})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with gsm8k/, alpaca/ and pg_essays/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--long-samples", type=int, default=1500)
    parser.add_argument("--budgets", default="4x,8x")
    parser.add_argument("--lengths", default="4000,5000,6000,7000")
    parser.add_argument("--samples", type=int, default=2, help="needle trials per (length, depth)")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk of every policy")
    parser.add_argument("--stabilizers", type=int, default=100, help="Locret: newest entries always kept")
    parser.add_argument("--skip-training", action="store_true", help="reuse <out>/train/export/lean")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra overrides of the recipe")
    args = parser.parse_args()
    register_schemas()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "args": {k: str(v) for k, v in vars(args).items()}}

    long_data = args.out / "locret_long.jsonl"
    export = args.out / "train" / "export" / "lean"
    if not args.skip_training:
        make_locret_data.main(["--essays", str(args.data / "pg_essays"), "--out", str(long_data),
                               "--samples", str(args.long_samples)])
        sources = (f"data.sources=[{{path:{long_data},format:prompt_response}},"
                   f"{{path:{args.data}/gsm8k/train.jsonl,format:gsm8k,sample_count:750}},"
                   f"{{path:{args.data}/alpaca/alpaca_5000.json,format:alpaca,sample_count:750}}]")
        with initialize_config_module("swiftkv_train.recipes", version_base="1.3"):
            cfg = compose("config", overrides=["recipe=smollm2_locret_gpu", sources, f"run_dir={args.out / 'train'}",
                                               *args.override])
        start = time.perf_counter()
        summary = run_training(cfg)
        report["train_seconds"] = time.perf_counter() - start
        report["train_evals"] = summary.get("evals")

    trained, tok = load_pretrained(str(export), device=device)
    base, _ = load_pretrained("smollm2-135m-instruct", device=device, dtype=trained.dtype)
    untrained = to_locret(base).to(device).eval()
    needle = needle_settings(args.data / "pg_essays", [int(x) for x in args.lengths.split(",")], args.samples,
                             args.chunk)
    rows = []
    for budget in args.budgets.split(","):
        policies = {"names": ["locret", *BASELINES], "budget": budget,
                    "overrides": {"locret": {"stabilizers": args.stabilizers}}}
        res = evaluate(trained, tok, "needle", out_dir=args.out / f"eval_{budget}", progress=False, needle=needle,
                       policies=policies)
        rows += summarise(res, "trained")
        res = evaluate(untrained, tok, "needle", out_dir=args.out / f"eval_{budget}_untrained", progress=False,
                       needle=needle, policies=dict(policies, names=["locret"]))
        rows += [r for r in summarise(res, "untrained") if r["policy"] != "full"]
        report["rows"] = rows
        (args.out / "locret.json").write_text(json.dumps(report, indent=2, default=str))

    print(f"\n{'heads':>9} | {'policy':>22} | {'needle':>6} | {'peak KV MiB':>11} | prefill s (longest) | by length")
    for r in rows:
        longest = list(r["prefill_s_by_length"].values())[-1]
        print(f"{r['heads']:>9} | {r['policy']:>22} | {r['accuracy']:>6.3f} | {r['kv_peak_bytes'] / 2**20:>11.2f} | "
              f"{longest:>19.3f} | {r['by_length']}")


if __name__ == "__main__":
    main()
