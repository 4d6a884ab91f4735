"""Measure CSKV on the real SmolLM2-135M-Instruct (CPU): KV-cache bytes per token and teacher fidelity.

Fidelity: every position is decoded from the compressed cache (``cskv_decode_from=0``: the last W tokens exact, older
ones rebuilt from A·x, quantized as the cache stores them) and compared with the teacher (KL, top-1, perplexity) on
512-token windows of held-out essays. Calibration (ASVD) uses other essays than evaluation.

    python scripts/measure_cskv.py --essays /work/shared/data/pg_essays --eval-windows 4 --calib-windows 4
"""

import argparse
import copy
import itertools
import json
import time
from pathlib import Path

import torch

from swiftkv_train.cache_stats import cache_nbytes
from swiftkv_train.metrics import FidelityAccumulator, next_token_targets
from swiftkv_train.models import load_pretrained
from swiftkv_train.methods.cskv import CSKV


def essay_windows(tokenizer, files: list[Path], seq: int) -> list[torch.Tensor]:
    """The first ``seq`` tokens of every essay long enough."""
    windows = []
    for path in files:
        ids = tokenizer(path.read_text(errors="ignore"), add_special_tokens=False)["input_ids"]
        if len(ids) >= seq:
            windows.append(torch.tensor(ids[:seq])[None])
    return windows


@torch.no_grad()
def fidelity(t: CSKV, student, windows) -> dict:
    acc = FidelityAccumulator()
    for ids in windows:
        teacher, compressed = t.teacher_and_student_hidden(student, {"input_ids": ids})
        acc.update_from_hidden(teacher, compressed, student.lm_head.weight, next_token_targets(ids))
    return acc.compute()


@torch.no_grad()
def cache_bytes(student, lengths=(544, 1056)) -> dict:
    """Measured bytes (bf16 model) of the CSKV cache and of the teacher's DynamicCache after prefills of ``lengths``."""
    model = copy.deepcopy(student).to(torch.bfloat16)
    out = {}
    for n in lengths:
        ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n))
        out[f"cskv_{n}"] = cache_nbytes(model.cskv(True)(ids, use_cache=True).past_key_values)
        out[f"full_{n}"] = cache_nbytes(model.cskv(False)(ids, use_cache=True).past_key_values)
    a, b = lengths
    out["marginal_per_token"] = (out[f"cskv_{b}"] - out[f"cskv_{a}"]) / (b - a)
    out["full_per_token"] = out[f"full_{b}"] / b
    out["ratio_marginal"] = out["marginal_per_token"] / out["full_per_token"]
    out[f"ratio_at_{b}"] = out[f"cskv_{b}"] / out[f"full_{b}"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--essays", default="/work/shared/data/pg_essays")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--densities", default="0.5/0.5,0.2/0.2", help="key/value pairs, comma-separated")
    parser.add_argument("--inits", default="svd,asvd")
    parser.add_argument("--bits", default="none,4")
    parser.add_argument("--cache-dir", default="", help="calibration cache directory")
    parser.add_argument("--out", default="", help="optional JSON output path")
    args = parser.parse_args()
    torch.manual_seed(0)

    base, tok = load_pretrained("smollm2-135m-instruct")
    files = sorted(p for p in Path(args.essays).glob("*.txt") if p.name != "TOOL_LICENSE.txt")
    calib = essay_windows(tok, files[: 2 * args.calib_windows], args.seq)[: args.calib_windows]
    evaluation = essay_windows(tok, files[::-1], args.seq)[: args.eval_windows]  # other end of the list
    print(f"calibration windows {len(calib)}, evaluation windows {len(evaluation)} x {args.seq} tokens")

    results = []
    densities = [tuple(float(x) for x in pair.split("/")) for pair in args.densities.split(",")]
    bits_options = [None if b == "none" else int(b) for b in args.bits.split(",")]
    for (kd, vd), init, bits in itertools.product(densities, args.inits.split(","), bits_options):
        start = time.time()
        t = CSKV(dict(key_density=kd, value_density=vd, window=args.window, quant_bits=bits,
                                    init=init, calibration_batches=len(calib),
                                    calibration_cache_dir=args.cache_dir))
        student = t.build_student(base).eval()
        t.calibrate(student, [{"input_ids": ids} for ids in calib])
        row = {"key_density": kd, "value_density": vd, "init": init, "bits": bits, "window": args.window}
        row.update(fidelity(t, student, evaluation))
        if init == args.inits.split(",")[0]:  # the bytes do not depend on the initialisation
            row.update(cache_bytes(student))
        row["seconds"] = round(time.time() - start, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
