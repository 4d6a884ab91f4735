#!/usr/bin/env python
"""Train CSKV variants of the real SmolLM2-135M-Instruct; measure KV bytes/token, fidelity and needle retrieval.

    PYTHONPATH=$PWD python scripts/cskv_quality.py --data .device_data --out results/cskv \
        --variant d25_75:transform.cskv.key_density=0.25,transform.cskv.value_density=0.75 \
        --variant d20_20_q4:transform.cskv.key_density=0.2,transform.cskv.value_density=0.2,transform.cskv.quant_bits=4

Each variant trains with recipe smollm2_cskv on GSM8K + Alpaca (local files under --data; scaled by --steps), then the
full export is evaluated with the evaluation harness (fidelity on 2048-token windows of the essays, every position
scored from the compressed cache, teacher = the same model with CSKV off; needle in a haystack decoded from
the compressed cache) and its cache is measured after a 2048-token prefill (bf16). Writes <out>/cskv.json and prints a table.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from swiftkv_train.cache_stats import cache_nbytes
from swiftkv_train.config import register_schemas
from swiftkv_train.eval.api import evaluate
from swiftkv_train.eval.text_source import load_texts
from swiftkv_train.models import load_pretrained
from swiftkv_train.train.trainer import run_training


def cache_bytes_per_token(export: Path, essays: Path, device: str, tokens: int = 2048) -> dict:
    model, tok = load_pretrained(str(export), dtype=torch.bfloat16, device=device)
    text = " ".join(load_texts(str(essays), "text", what="essays"))
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:tokens]], device=device)
    with torch.no_grad():
        cache = model.cskv(True)(ids, use_cache=True, logits_to_keep=1).past_key_values
    cfg = model.config
    full = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2  # K+V, bf16
    held = cache_nbytes(cache)
    return {"tokens": tokens, "bytes": held, "bytes_per_token": held / tokens, "full_bf16_bytes_per_token": full,
            "share_of_full": held / (tokens * full), "cache_class": type(cache).__name__}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with gsm8k/, alpaca/ and pg_essays/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", action="append", required=True, help="name:override,override,...")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--needle-lengths", default="1000,2000,4000")
    args = parser.parse_args()
    register_schemas()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    essays = args.data / "pg_essays"
    needle_lengths = [int(x) for x in args.needle_lengths.split(",")]
    sources = (f"data.sources=[{{path:{args.data}/gsm8k/train.jsonl,format:gsm8k}},"
               f"{{path:{args.data}/alpaca/alpaca_5000.json,format:alpaca}}]")
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "variants": {}}
    for spec in args.variant:
        name, _, overrides = spec.partition(":")
        overrides = [o for o in overrides.split(",") if o]
        with initialize_config_module("swiftkv_train.recipes", version_base="1.3"):
            cfg = compose("config", overrides=[
                "recipe=smollm2_cskv", sources, f"run_dir={args.out / name}", f"trainer.max_steps={args.steps}",
                "trainer.micro_batch_size=8", "data.max_length=1024", "data.eval_samples=256", "trainer.save_every=0",
                "trainer.export=full", "logger.log_every=50", *overrides])
        start = time.perf_counter()
        summary = run_training(cfg)
        train_s = time.perf_counter() - start
        export = args.out / name / "export" / "full"
        model, tok = load_pretrained(str(export), dtype=torch.float32, device=device)
        res = evaluate(model, tok, "fidelity,needle", teacher="self", progress=False, out_dir=args.out / name / "eval",
                       fidelity={"data": str(essays), "window": 2048, "num_windows": args.windows},
                       needle={"haystack": str(essays), "context_lengths": needle_lengths,
                               "depths": [0.0, 25.0, 50.0, 75.0, 100.0]})
        fidelity = {k: res["fidelity"][0][k] for k in ("kl", "top1", "ppl_student", "ppl_teacher", "tokens")}
        needle = {run["model"]: {"accuracy": run["accuracy"], "by_length": run["by_length"],
                                 "kv_bytes_per_token": run["kv_bytes_per_token"]} for run in res["needle"]}
        del model
        report["variants"][name] = {"overrides": overrides, "train_seconds": train_s, "train_eval": summary["evals"],
                                    "fidelity": fidelity, "needle": needle,
                                    "cache": cache_bytes_per_token(export, essays, device)}
        (args.out / "cskv.json").write_text(json.dumps(report, indent=2, default=str))
        v = report["variants"][name]
        print(f"{name}: KL {fidelity['kl']:.3f} top-1 {fidelity['top1']:.3f} ppl {fidelity['ppl_student']:.1f} "
              f"(teacher {fidelity['ppl_teacher']:.1f}) | {v['cache']['bytes_per_token']:.0f} B/token "
              f"({v['cache']['share_of_full']:.3f} of full) | needle {needle} | train {train_s:.0f} s", flush=True)
        torch.cuda.empty_cache() if device == "cuda" else None


if __name__ == "__main__":
    main()
