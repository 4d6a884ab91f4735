"""Peak KV-cache bytes and prefill time of Locret's budgeted chunked prefill vs the full cache, on real SmolLM2.

Usage: python scripts/measure_locret.py [--tokens 4096 --budget 1024 --chunk 256 --stabilizers 256 --n-local 100]

The prompt is essay text read at run time from /work/shared/data/pg_essays (nothing is copied into the repo),
wrapped in the chat template with a question at the end. The retaining heads are untrained (random init) unless
--model points at a trained Locret export: the memory and time numbers do not depend on the heads, the generated
tokens do (the agreement printed for untrained heads is only a smoke signal).
"""

import argparse
import json
import time
from pathlib import Path

import torch

from swiftkv_train.cache_stats import cache_nbytes
from swiftkv_train.models import load_pretrained
from swiftkv_train.methods.locret import LocretConfig, prefill_peak, to_locret

ESSAYS = Path("/work/shared/data/pg_essays")
QUESTION = "Summarize the main argument of the essays above in one sentence."


def essay_prompt(tokenizer, num_tokens: int) -> torch.Tensor:
    """Chat-formatted prompt of exactly ``num_tokens`` tokens: essays (truncated) + a question."""
    # The essays sit inside the user turn: template prefix + essays + question + assistant header.
    marker = "\x00ESSAYS\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker + "\n\n" + QUESTION}], add_generation_prompt=True, tokenize=False
    )
    head, tail = text.split(marker)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    suffix_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    body_ids: list[int] = list(head_ids)
    for path in sorted(ESSAYS.glob("*.txt")):
        body_ids += tokenizer(path.read_text(errors="replace") + "\n\n", add_special_tokens=False)["input_ids"]
        if len(body_ids) + len(suffix_ids) >= num_tokens:
            break
    body_ids = body_ids[: num_tokens - len(suffix_ids)]
    ids = torch.tensor([body_ids + suffix_ids])
    if ids.shape[1] != num_tokens:
        raise SystemExit(f"only {ids.shape[1]} tokens of essays found in {ESSAYS}")
    return ids



def timed(fn, repeats: int):
    """Best wall seconds and the process CPU seconds of that run (the machine may be shared: CPU time is the
    steadier number), and the last result."""
    best, result = (float("inf"), 0.0), None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best = min(best, (wall, cpu))
    return best, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--stabilizers", type=int, default=256)
    parser.add_argument("--n-local", type=int, default=100)
    parser.add_argument("--position-mode", default="compacted", choices=["compacted", "original"])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, tokenizer = load_pretrained(args.model, dtype=torch.float32)
    cfg = LocretConfig(budget=args.budget, chunk_size=args.chunk, stabilizers=args.stabilizers, n_local=args.n_local,
                       position_mode=args.position_mode)
    model = base if base.config.model_type == "llama_locret" else to_locret(base, cfg)
    trained = base.config.model_type == "llama_locret"
    ids = essay_prompt(tokenizer, args.tokens)
    settings = dict(locret_budget=args.budget, locret_chunk_size=args.chunk, locret_stabilizers=args.stabilizers,
                    locret_n_local=args.n_local, locret_position_mode=args.position_mode)

    with torch.no_grad():
        full_s, full_out = timed(lambda: model(ids, use_cache=True, logits_to_keep=1), args.repeats)
    full_bytes = cache_nbytes(full_out.past_key_values)
    del full_out
    locret_s, cache = timed(lambda: model.chunked_prefill(ids, **settings), args.repeats)
    final_bytes = cache_nbytes(cache)
    chunked_full_s, _ = timed(lambda: model.chunked_prefill(ids, **dict(settings, locret_budget=args.tokens)),
                              args.repeats)
    peak_bytes, peak_entries, _ = prefill_peak(model, ids, **settings)

    gen_full = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, locret_enabled=False)
    gen_locret = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, **settings)
    new_full, new_locret = gen_full[0, args.tokens :], gen_locret[0, args.tokens :]
    agree = int((new_full[: len(new_locret)] == new_locret[: len(new_full)]).sum())

    report = {
        "model": args.model,
        "heads": "trained" if trained else "untrained (random init)",
        "prompt_tokens": args.tokens,
        "settings": {k.removeprefix("locret_"): v for k, v in settings.items()},
        "full_cache_bytes": full_bytes,
        "locret_peak_bytes_during_prefill": peak_bytes,
        "locret_peak_entries_per_layer": peak_entries,
        "locret_cache_bytes_after_prefill": final_bytes,
        "peak_ratio_full_over_locret": round(full_bytes / peak_bytes, 2),
        "prefill_wall_cpu_seconds_full_single_forward": [round(x, 2) for x in full_s],
        "prefill_wall_cpu_seconds_locret": [round(x, 2) for x in locret_s],
        "prefill_wall_cpu_seconds_chunked_no_eviction": [round(x, 2) for x in chunked_full_s],
        "greedy_tokens_agreeing_with_full_cache": f"{agree}/{args.new_tokens}",
        "full_cache_continuation": tokenizer.decode(new_full),
        "locret_continuation": tokenizer.decode(new_locret),
        "threads": args.threads,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
