#!/usr/bin/env python
"""Distill SwiftKV variants of the real SmolLM2-135M-Instruct and measure them on held-out natural text.

    PYTHONPATH=$PWD python scripts/smollm2_quality.py --data .device_data --out results/smollm2 \
        --variant m20:transform.swiftkv.num_key_value_layers=20 \
        --variant m15:transform.swiftkv.num_key_value_layers=15

For each variant: the SwiftKV initialisation (no training) and the distilled model are evaluated with the
evaluation harness (fidelity to the teacher on 2048-token windows of the essays, needle in a haystack), next to
the teacher. Training uses recipe smollm2_swiftkv_gpu on GSM8K + Alpaca (local files under --data) and never sees
the essays. Writes <out>/quality.json and prints a table.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from swiftkv_train.config import register_schemas
from swiftkv_train.eval.api import evaluate
from swiftkv_train.models import load_pretrained
from swiftkv_train.train.trainer import run_training
from swiftkv_train.transform import to_swiftkv


def eval_settings(data: Path, windows: int, lengths: list[int]) -> dict:
    essays = str(data / "pg_essays")
    return {"fidelity": {"data": essays, "window": 2048, "num_windows": windows},
            "needle": {"haystack": essays, "context_lengths": lengths, "depths": [0.0, 25.0, 50.0, 75.0, 100.0]},
            "progress": False}


def summarise(result: dict) -> dict:
    """The headline numbers of an evaluate() result: fidelity of the model, needle accuracy of each subject."""
    out = {}
    for run in result.get("fidelity", []):
        out.update({k: run[k] for k in ("kl", "top1", "ppl_student", "ppl_teacher", "tokens")})
    for run in result.get("needle", []):
        out[f"needle_{run['model']}"] = run["accuracy"]
        out[f"needle_{run['model']}_by_length"] = run["by_length"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with gsm8k/, alpaca/ and pg_essays/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", action="append", required=True,
                        help="name:override,override,... (Hydra overrides of recipe smollm2_swiftkv_gpu)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--needle-lengths", default="1000,2000,4000")
    args = parser.parse_args()
    register_schemas()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = eval_settings(args.data, args.windows, [int(x) for x in args.needle_lengths.split(",")])
    sources = (f"data.sources=[{{path:{args.data}/gsm8k/train.jsonl,format:gsm8k}},"
               f"{{path:{args.data}/alpaca/alpaca_5000.json,format:alpaca}}]")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "variants": {}}
    for spec in args.variant:
        name, _, overrides = spec.partition(":")
        overrides = [o for o in overrides.split(",") if o]
        with initialize_config_module("swiftkv_train.recipes", version_base="1.3"):
            cfg = compose("config", overrides=["recipe=smollm2_swiftkv_gpu", sources, f"run_dir={args.out / name}",
                                               *overrides])
        start = time.perf_counter()
        summary = run_training(cfg)
        train_s = time.perf_counter() - start
        sw = cfg.transform.swiftkv
        base, tok = load_pretrained("smollm2-135m-instruct", dtype=torch.float32, device=device)
        init = to_swiftkv(base, sw.num_key_value_layers, sw.key_value_group_size).eval()
        before = evaluate(init, tok, "fidelity,needle", teacher="self", out_dir=args.out / name / "eval_init",
                          **settings)
        trained, tok = load_pretrained(str(args.out / name / "export" / "full"), dtype=torch.float32, device=device)
        after = evaluate(trained.swiftkv(True), tok, "fidelity,needle", teacher="self",
                         out_dir=args.out / name / "eval_distilled", **settings)
        report["variants"][name] = {"overrides": overrides, "train_seconds": train_s,
                                    "train_eval": summary.get("evals"), "init": summarise(before),
                                    "distilled": summarise(after)}
        (args.out / "quality.json").write_text(json.dumps(report, indent=2, default=str))
        i, d = report["variants"][name]["init"], report["variants"][name]["distilled"]
        print(f"{name}: KL {i.get('kl')} -> {d.get('kl')} | top-1 {i.get('top1')} -> {d.get('top1')} | "
              f"train {train_s:.0f} s", flush=True)
        del base, init, trained
        torch.cuda.empty_cache() if device == "cuda" else None


if __name__ == "__main__":
    main()
