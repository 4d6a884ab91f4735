#!/usr/bin/env python
"""Distill SwiftKV variants of the real SmolLM2-135M-Instruct and measure them on held-out natural text.

    PYTHONPATH=$PWD python scripts/smollm2_quality.py --data .device_data --out results/smollm2 \
        --variant m20:transform.swiftkv.num_key_value_layers=20 \
        --variant m15:transform.swiftkv.num_key_value_layers=15

For each variant: the SwiftKV initialisation (no training) and the distilled model are evaluated with the
evaluation harness (fidelity to the teacher on 2048-token windows of the essays, needle in a haystack), next to
the teacher. Training uses recipe smollm2_swiftkv_gpu on GSM8K + Alpaca (local files under --data). A variant may
add natural text with the pseudo-override ``essays=R``: the essays NOT used by the evaluation (all but the first
ones in name order, --essay-holdout-chars) join the mix as plain text, R times over. With
``extra=R`` adds the prompt/response records of --extra-data (e.g. long-context retrieval questions over the
training essays from scripts/make_locret_data.py --holdout-chars 100000) R times over. With
``transform.swiftkv.kv_init=least_squares`` the calibrated initialisation is evaluated too ("calibrated").
Writes <out>/quality.json and prints a table.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from swiftkv_train.config import register_schemas
from swiftkv_train.data import build_datasets, make_dataloader
from swiftkv_train.eval.api import evaluate
from swiftkv_train.models import load_pretrained
from swiftkv_train.train.trainer import run_training
from swiftkv_train.methods.swiftkv import to_swiftkv
from swiftkv_train.methods.swiftkv import SwiftKV

from make_locret_data import training_essays  # this folder is on sys.path when run as scripts/<name>.py


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


def essay_split(folder: Path, holdout_chars: int, tokenizer, eval_tokens: int) -> tuple[list[str], list[str]]:
    """(held-out names, training texts), split as make_locret_data.py does (the first essays in name order up to
    ``holdout_chars`` are held out); the held-out ones must cover every token the evaluation reads (its windows and
    haystacks start at the first essay)."""
    held, texts = training_essays(folder, holdout_chars)
    held_tokens = sum(len(tokenizer((folder / n).read_text(errors="replace"))["input_ids"]) + 1 for n in held)
    if held_tokens < eval_tokens:
        raise SystemExit(f"--essay-holdout-chars {holdout_chars}: the held-out essays hold {held_tokens} tokens, the "
                         f"evaluation reads {eval_tokens}: raise it.")
    return held, texts


def calibrated_init(cfg, device):
    """The least-squares initialisation exactly as the trainer builds it (same batches), before any step."""
    base, tok = load_pretrained("smollm2-135m-instruct", dtype=torch.float32, device=device)
    transformation = SwiftKV(cfg.transform.swiftkv, cfg)
    student = transformation.build_student(base)
    train_set, _ = build_datasets(cfg.data, tok)
    probe = make_dataloader(train_set, cfg.trainer.micro_batch_size, cfg.data.seed, 0, 1)
    transformation.calibrate(student, ({k: v.to(device) for k, v in b.items()} for b in probe))
    return student.eval(), tok


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with gsm8k/, alpaca/ and pg_essays/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", action="append", required=True,
                        help="name:override,override,... (Hydra overrides of recipe smollm2_swiftkv_gpu)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--needle-lengths", default="1000,2000,4000")
    parser.add_argument("--essay-holdout-chars", type=int, default=100_000,
                        help="essays=R variants: hold out the first essays in name order up to this many characters")
    parser.add_argument("--no-init-eval", action="store_true",
                        help="skip evaluating the reference initialisation (the same for every variant with one M, g)")
    parser.add_argument("--extra-data", type=Path,
                        help="extra=R variants: a prompt/response jsonl added to the mix (hold out the same essays)")
    args = parser.parse_args()
    register_schemas()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = eval_settings(args.data, args.windows, [int(x) for x in args.needle_lengths.split(",")])
    sources = (f"data.sources=[{{path:{args.data}/gsm8k/train.jsonl,format:gsm8k}},"
               f"{{path:{args.data}/alpaca/alpaca_5000.json,format:alpaca}}]")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "variants": {}}
    lengths = [int(x) for x in args.needle_lengths.split(",")]
    for spec in args.variant:
        name, _, overrides = spec.partition(":")
        overrides = [o for o in overrides.split(",") if o]
        essays = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("essays=")]
        extra = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("extra=")]
        overrides = [o for o in overrides if not o.startswith(("essays=", "extra="))]
        variant_sources = sources
        if extra:
            if args.extra_data is None:
                raise SystemExit(f"variant {name}: extra={extra[0]} needs --extra-data")
            variant_sources = variant_sources[:-1] + f",{{path:{args.extra_data},format:prompt_response,repeat:{extra[0]}}}]"
        if essays:
            _, tok = load_pretrained("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
            held, train = essay_split(args.data / "pg_essays", args.essay_holdout_chars, tok,
                                      max(args.windows * 2048, *lengths))
            folder = args.out / name / "train_essays"  # written outside the repository, read by the data pipeline
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for i, text in enumerate(train):
                (folder / f"essay_{i:02d}.txt").write_text(text)
            variant_sources = variant_sources[:-1] + f",{{path:{folder},format:text,repeat:{essays[0]}}}]"
            print(f"{name}: held out {len(held)} essays ({held[0]} .. {held[-1]}), training on "
                  f"{len(train)} x {essays[0]}", flush=True)
        with initialize_config_module("swiftkv_train.recipes", version_base="1.3"):
            cfg = compose("config", overrides=["recipe=smollm2_swiftkv_gpu", variant_sources,
                                               f"run_dir={args.out / name}", *overrides])
        start = time.perf_counter()
        summary = run_training(cfg)
        train_s = time.perf_counter() - start
        sw = cfg.transform.swiftkv
        base, tok = load_pretrained("smollm2-135m-instruct", dtype=torch.float32, device=device)
        init = to_swiftkv(base, sw.num_key_value_layers, sw.key_value_group_size).eval()
        before = {} if args.no_init_eval else evaluate(init, tok, "fidelity,needle", teacher="self",
                                                       out_dir=args.out / name / "eval_init", **settings)
        calibrated = None
        if sw.kv_init == "least_squares":
            fitted, tok = calibrated_init(cfg, device)
            calibrated = summarise(evaluate(fitted, tok, "fidelity", teacher="self",
                                            out_dir=args.out / name / "eval_calibrated", **settings))
            del fitted
        trained, tok = load_pretrained(str(args.out / name / "export" / "full"), dtype=torch.float32, device=device)
        after = evaluate(trained.swiftkv(True), tok, "fidelity,needle", teacher="self",
                         out_dir=args.out / name / "eval_distilled", **settings)
        report["variants"][name] = {"overrides": overrides, "train_seconds": train_s,
                                    "train_eval": summary.get("evals"), "init": summarise(before),
                                    "calibrated": calibrated, "distilled": summarise(after)}
        (args.out / "quality.json").write_text(json.dumps(report, indent=2, default=str))
        i, d = report["variants"][name]["init"], report["variants"][name]["distilled"]
        fit = f" (calibrated {calibrated.get('kl')})" if calibrated else ""
        print(f"{name}: KL {i.get('kl')}{fit} -> {d.get('kl')} | top-1 {i.get('top1')} -> {d.get('top1')} | "
              f"train {train_s:.0f} s", flush=True)
        del base, init, trained
        torch.cuda.empty_cache() if device == "cuda" else None


if __name__ == "__main__":
    main()
