#!/usr/bin/env python
"""vLLM serving our SwiftKV exports vs vLLM serving the original Llama (SmolLM2-135M-Instruct), same machine, same run.

    .venv-vllm/bin/python scripts/bench_vllm.py --out docs/results/bench_vllm_cpu.json    # make test-vllm builds .venv-vllm

Models: the original SmolLM2 (vLLM's own LlamaForCausalLM) and our lean SwiftKV exports at M=15 and M=20 with
g=1, 2, 4 (no training: speed does not depend on the weights), each served by vLLM's CPU build through our plugin,
each engine in its own child process. Equal settings on both sides: dtype, the KV-cache memory
(``kv_cache_memory_bytes``), max_num_batched_tokens (the prefill chunk), max_model_len, prefix caching off (the
repeats reuse prompts), and **eager mode for both** (``enforce_eager=True``: our model has no torch.compile
support, while vLLM compiles its own Llama by default, so compiling only one side would measure the compiler).
SwiftKV runs with ``kv_sharing_fast_prefill=True`` (the prefill skip). Prompts are random token ids (seeded, the
same ids for every model).

**Paired and interleaved**: the teacher's engine stays up for the whole run; each SwiftKV engine is started next to
it and the two take turns, one timed call each, round after round (the order alternating). A ratio is then the
median of the per-round ratios of neighbouring calls, so load that drifts during the run (a busy shared machine)
hits both sides alike; min and max of those per-round ratios are reported as the spread.

- prefill: --prefill-batch prompts of --prompt-len tokens, 1 output token: prompt tokens / wall time of
  ``LLM.generate``. The ideal SwiftKV / teacher ratio is L/M (only the first M of the L layers run on prompt tokens).
- TTFT: one prompt of --prompt-len tokens alone, 1 output token: wall time of ``LLM.generate``.
- decode: each engine's largest batch that fits its KV memory: the engine's own block count (less the one block
  vLLM keeps aside) // blocks per sequence of --decode-context + --decode-tokens tokens (preemptions counted from
  vLLM's stats: 0 expected); all requests at once, ``ignore_eos``, once with decode_tokens / 2 and once with
  decode_tokens output tokens: decode tok/s = batch x (decode_tokens / 2) / (the difference of the two times).
  Both runs share the prefill and the steps where prefill chunks and decode tokens mix (every prompt is in the
  cache long before step decode_tokens / 2), so the difference is decode steps at the full batch only.
Prints a table (ratios to the teacher, with their spread) and writes every number, with the command, machine,
date and load average, to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_utils import bench_parser, device_name

MARK = "@@bench "  # the child's answers on stdout start with this (vLLM logs there too)
READY_TIMEOUT = 900


# ---- the child: one engine, timed calls on request ---------------------------------------------------------------

def serve(request: dict) -> None:
    import random

    from vllm import LLM, SamplingParams

    args = request["args"]
    llm = LLM(model=request["model"], dtype=args["dtype"], max_model_len=args["max_model_len"], seed=0,
              enforce_eager=True, enable_prefix_caching=False, max_num_batched_tokens=args["chunk"],
              max_num_seqs=args["max_num_seqs"], kv_cache_memory_bytes=int(args["kv_gib"] * 2**30),
              disable_log_stats=False, **request["engine"])
    cache = llm.llm_engine.vllm_config.cache_config

    def prompts(n: int, length: int, seed: int):
        rng = random.Random(seed)  # the same ids in every engine: the vocabulary is the same
        return [{"prompt_token_ids": [rng.randrange(100, args["vocab"]) for _ in range(length)]} for _ in range(n)]

    def preemptions() -> int:
        return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")

    context = args["decode_context"] + args["decode_tokens"]
    # vLLM keeps one block aside (the null block): a batch that needs every block gets preempted (recomputed)
    decode_batch = min((cache.num_gpu_blocks - 1) // -(-context // cache.block_size), args["max_num_seqs"])
    batches = {
        "prefill": (prompts(args["prefill_batch"], args["prompt_len"], 1), 1),
        "ttft": (prompts(1, args["prompt_len"], 2), 1),
        "decode_half": (prompts(decode_batch, args["decode_context"], 3), args["decode_tokens"] // 2),
        "decode_full": (prompts(decode_batch, args["decode_context"], 3), args["decode_tokens"]),
    }

    def timed(op: str) -> float:
        batch, max_tokens = batches[op]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return seconds

    for op in batches:  # warm-up
        timed(op)
    print(MARK + json.dumps({"num_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
                             "decode_batch": decode_batch, "preemptions": preemptions()}), flush=True)
    for line in sys.stdin:
        op = json.loads(line)["op"]
        if op == "quit":
            break
        answer = {"preemptions": preemptions()} if op == "preemptions" else {"seconds": timed(op)}
        print(MARK + json.dumps(answer), flush=True)


# ---- the parent: exports, engines side by side, the table --------------------------------------------------------

class Engine:
    """One child process serving one model; ``call(op)`` returns its answer."""

    def __init__(self, name: str, model: dict, args: dict, work: Path):
        self.name = name
        request = work / f"request-{len(list(work.glob('request-*.json')))}.json"
        request.write_text(json.dumps({"model": model["path"], "engine": model["engine"], "args": args}))
        self.log = open(work / f"{request.stem}.log", "w")
        env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # kv_cache_memory_bytes rules
        env["TOKENIZERS_PARALLELISM"] = "false"
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", str(request)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.info = self._answer()

    def _answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.log.flush()
        sys.exit(f"{self.name}: the engine stopped; its log: {self.log.name}\n"
                 f"{Path(self.log.name).read_text()[-6000:]}")

    def call(self, op: str) -> dict:
        self.proc.stdin.write(json.dumps({"op": op}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.log.close()


def make_exports(work: Path, splits: list[tuple[int, int]]) -> tuple[dict[str, dict], int]:
    from swiftkv_train.export import save_hf
    from swiftkv_train.methods.swiftkv import to_swiftkv
    from swiftkv_train.models import load_pretrained

    model, tok = load_pretrained("smollm2-135m-instruct")
    layers = model.config.num_hidden_layers
    teacher = work / "teacher"
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    made = {"teacher": {"path": str(teacher), "L": layers, "M": layers, "g": 1, "caches": layers, "engine": {}}}
    for m, g in splits:
        path = save_hf(to_swiftkv(model, m, g), tok, work / f"m{m}g{g}", lean=True)
        made[f"swiftkv M={m} g={g}"] = {"path": str(path), "L": layers, "M": m, "g": g,
                                        "caches": m + -(-(layers - m) // g),
                                        "engine": {"kv_sharing_fast_prefill": True}}
    return made, model.config.vocab_size


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def compare(teacher: Engine, student: Engine, args: dict) -> dict:
    """Round after round, one timed call each (alternating who goes first); per-round numbers and ratios."""
    times: dict[str, dict[str, list[float]]] = {who: {} for who in ("teacher", "student")}
    engines = [("teacher", teacher), ("student", student)]
    rounds = [("prefill", args["repeats"]), ("ttft", args["repeats"]),
              ("decode_half", args["decode_repeats"]), ("decode_full", args["decode_repeats"])]
    for op, repeats in rounds:
        for r in range(repeats):
            for who, engine in engines if r % 2 == 0 else engines[::-1]:
                times[who].setdefault(op, []).append(engine.call(op)["seconds"])
    out = {}
    for who, engine in engines:
        t = times[who]
        batch = engine.info["decode_batch"]
        half = args["decode_tokens"] // 2
        decode_s = [full - halfway for full, halfway in zip(t["decode_full"], t["decode_half"])]
        out[who] = {
            "num_blocks": engine.info["num_blocks"], "block_size": engine.info["block_size"],
            "prefill": {"batch": args["prefill_batch"], "prompt_len": args["prompt_len"], "seconds": spread(t["prefill"]),
                        "tokens_per_s": args["prefill_batch"] * args["prompt_len"] / statistics.median(t["prefill"])},
            "ttft": {"prompt_len": args["prompt_len"], "seconds": spread(t["ttft"])},
            "decode": {"batch": batch, "context": args["decode_context"], "tokens": args["decode_tokens"],
                       "seconds_half_tokens": t["decode_half"], "seconds_all_tokens": t["decode_full"],
                       "preemptions": engine.call("preemptions")["preemptions"] - engine.info["preemptions"],
                       "tpot_ms": statistics.median(decode_s) / (args["decode_tokens"] - half) * 1e3,
                       "tokens_per_s": batch * (args["decode_tokens"] - half) / statistics.median(decode_s)},
        }
    s, te = times["student"], times["teacher"]
    per_round = {
        "prefill_speedup": [a / b for a, b in zip(te["prefill"], s["prefill"])],
        "ttft_speedup": [a / b for a, b in zip(te["ttft"], s["ttft"])],
        "decode_throughput": [
            (out["student"]["decode"]["batch"] / (sf - sh)) / (out["teacher"]["decode"]["batch"] / (tf - th))
            for sf, sh, tf, th in zip(s["decode_full"], s["decode_half"], te["decode_full"], te["decode_half"])],
    }
    out["ratios"] = {k: spread(v) for k, v in per_round.items()}
    return out


def render(results: dict) -> str:
    rows = results["models"]
    header = (f"{'model':18s} {'caches':>6s} {'KV blocks':>9s} {'prefill tok/s':>13s} {'x (min-max)':>17s} "
              f"{'ideal L/M':>9s} {'TTFT ms':>8s} {'x':>5s} {'decode batch':>12s} {'TPOT ms':>8s} "
              f"{'decode tok/s':>12s} {'x (min-max)':>17s}")
    lines = [header, "-" * len(header)]

    def ratio(r):
        return f"{r['median']:5.2f} ({r['min']:.2f}-{r['max']:.2f})" if r else f"{1:5.2f}{'':12s}"

    for name, r in rows.items():
        x = r.get("ratios", {})
        lines.append(
            f"{name:18s} {r['caches']:6d} {r['num_blocks']:9d} {r['prefill']['tokens_per_s']:13.0f} "
            f"{ratio(x.get('prefill_speedup')):>17s} {r['L'] / r['M']:9.2f} "
            f"{r['ttft']['seconds']['median'] * 1e3:8.0f} {x['ttft_speedup']['median'] if x else 1:5.2f} "
            f"{r['decode']['batch']:12d} {r['decode']['tpot_ms']:8.1f} {r['decode']['tokens_per_s']:12.1f} "
            f"{ratio(x.get('decode_throughput')):>17s}")
    return "\n".join(lines)


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def main() -> None:
    parser = bench_parser(__doc__, repeats=5, repeats_help="timed rounds of prefill and TTFT per SwiftKV model")
    parser.add_argument("--splits", default="15:1,15:2,15:4,20:1,20:2,20:4", help="M:g of the SwiftKV exports")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-gib", type=float, default=0.5, help="KV-cache memory of every engine (GiB)")
    parser.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--prefill-batch", type=int, default=4)
    parser.add_argument("--decode-context", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--decode-repeats", type=int, default=2)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--work-dir", default=None, help="where the exports and engine logs go (default: a temp folder)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve(json.loads(Path(args.child).read_text()))
        return
    if args.small:  # a smoke test of the script, not a measurement
        args.splits, args.prompt_len, args.prefill_batch, args.repeats = "15:4", 256, 2, 1
        args.decode_context, args.decode_tokens, args.decode_repeats = 64, 16, 1
    settings = {k: getattr(args, k) for k in ["dtype", "kv_gib", "chunk", "prompt_len", "prefill_batch",
                                              "decode_context", "decode_tokens", "repeats", "decode_repeats",
                                              "max_num_seqs"]}
    settings["max_model_len"] = max(args.prompt_len + 1, args.decode_context + args.decode_tokens)
    splits = [tuple(int(x) for x in s.split(":")) for s in args.splits.split(",") if s]

    import torch
    import vllm

    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": device_name(torch.device("cpu")),
        "cpus": os.cpu_count(), "platform": platform.platform(), "vllm": vllm.__version__, "torch": torch.__version__,
        "settings": {**settings, "enforce_eager": True, "enable_prefix_caching": False,
                     "swiftkv_kv_sharing_fast_prefill": True, "paired_interleaved": True},
        "loadavg_start": loadavg(), "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        models, settings["vocab"] = make_exports(work, splits)
        print(f"teacher: engine start (load {' '.join(loadavg())})", flush=True)
        teacher = Engine("teacher", models["teacher"], settings, work)
        teacher_runs = []
        try:
            for name, model in models.items():
                if name == "teacher":
                    continue
                print(f"{name}: engine start, then {args.repeats} paired rounds (load {' '.join(loadavg())})",
                      flush=True)
                student = Engine(name, model, settings, work)
                try:
                    pair = compare(teacher, student, settings)
                finally:
                    student.close()
                teacher_runs.append(pair["teacher"])
                row = {k: v for k, v in model.items() if k not in ("path", "engine")} | pair["student"]
                row["ratios"] = pair["ratios"]
                row["teacher_in_this_pair"] = pair["teacher"]
                results["models"][name] = row
                x = pair["ratios"]
                print(f"  prefill x{x['prefill_speedup']['median']:.2f} ({x['prefill_speedup']['min']:.2f}-"
                      f"{x['prefill_speedup']['max']:.2f}), TTFT x{x['ttft_speedup']['median']:.2f}, decode batch "
                      f"{pair['student']['decode']['batch']} vs {pair['teacher']['decode']['batch']}: tok/s "
                      f"x{x['decode_throughput']['median']:.2f}, {pair['student']['decode']['preemptions']} "
                      f"preemptions ({pair['student']['num_blocks']} vs {pair['teacher']['num_blocks']} KV blocks)",
                      flush=True)
                if args.out:  # what is measured so far survives a run stopped before the end
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(args.out).write_text(json.dumps(results | {"partial": True}, indent=2) + "\n")
        finally:
            teacher.close()
    # The teacher's row: its numbers over every pair (each pair's own ratios are in the SwiftKV rows).
    t = teacher_runs[0] | {"L": models["teacher"]["L"], "M": models["teacher"]["M"], "g": 1,
                           "caches": models["teacher"]["caches"]}
    t["prefill"]["tokens_per_s"] = statistics.median(r["prefill"]["tokens_per_s"] for r in teacher_runs)
    t["ttft"]["seconds"] = spread([s for r in teacher_runs for s in r["ttft"]["seconds"]["all"]])
    t["decode"]["tokens_per_s"] = statistics.median(r["decode"]["tokens_per_s"] for r in teacher_runs)
    t["decode"]["tpot_ms"] = statistics.median(r["decode"]["tpot_ms"] for r in teacher_runs)
    results["models"] = {"teacher": t, **results["models"]}
    results["loadavg_end"] = loadavg()
    table = render(results)
    results["table"] = table
    print(table)
    print(f"load average (1/5/15 min) at start {' '.join(results['loadavg_start'])}, "
          f"at end {' '.join(results['loadavg_end'])}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
