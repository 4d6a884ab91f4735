"""`python -m swiftkv_train [recipe=<name>] [key=value ...]`: train with a Hydra recipe.

With no arguments it runs the embedded default (recipe smollm2_swiftkv: real SmolLM2-135M-Instruct, GSM8K shipped
in the package, a few dozen steps on CPU) and prints the teacher-fidelity numbers before and after distillation.
Works the same under torchrun, srun and the Hydra submitit launcher.
"""

import sys
from pathlib import Path

import hydra

from .config import check_known_keys, check_override_keys, register_schemas
from .errors import SwiftKVInputError
from .launch import strip_launcher_args

register_schemas()


EXPORT_NOTES = {"lean": "bf16, inference weights only", "full": "every weight, teacher mode still available"}

USAGE = """\
from transformers import AutoModelForCausalLM, AutoTokenizer

path = {path!r}
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
# a plain tokenizer: without trust_remote_code=False, transformers would ask to run the model's config code
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
messages = [{{"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. How many in total?"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""


def print_report(summary: dict, run_dir=None) -> None:
    """The end of the console: fidelity before/after, where the exports are, and how to use one."""
    evals = summary.get("evals", {})
    if "start" in evals and "end" in evals and "kl" in evals["end"]:
        print("\nteacher fidelity on the held-out split (assistant tokens):")
        print(f"{'':8s} {'KL':>8s} {'top-1':>7s} {'ppl student':>12s} {'ppl teacher':>12s}")
        for when in ("start", "end"):
            s = evals[when]
            print(f"{when:8s} {s['kl']:8.4f} {s['top1']:7.3f} {s['ppl_student']:12.2f} {s['ppl_teacher']:12.2f}")
    elif "start" in evals and "end" in evals:  # a method evaluated by its own loss terms (no teacher comparison)
        names = [k for k in evals["end"] if k != "batches"]
        print("\nthe method's loss terms on the held-out split:")
        print(f"{'':8s}" + "".join(f" {name:>12s}" for name in names))
        for when in ("start", "end"):
            print(f"{when:8s}" + "".join(f" {evals[when].get(name, float('nan')):12.4g}" for name in names))
    if run_dir is None:
        return
    run_dir = Path(run_dir).resolve()
    if summary.get("interrupted"):  # stopped early (trainer.stop_after_steps): nothing exported yet
        print(f"\nrun dir {run_dir}: stopped at step {summary.get('step')}; run again to resume")
        return
    # What this run wrote (the trainer lists it): a run dir may still hold another kind from an earlier run.
    exports = [Path(path).resolve() for path in summary.get("exports", [])]
    print(f"\nrun dir {run_dir} (config, metrics.jsonl, checkpoints, summary.json)")
    for path in exports:
        print(f"export  {path} ({EXPORT_NOTES[path.name]})")
    if exports:
        print("\nload and generate (plain transformers, no swiftkv_train needed):\n")
        print(USAGE.format(path=str(exports[0])))


@hydra.main(config_path="pkg://swiftkv_train.recipes", config_name="config", version_base="1.3")
def main(cfg) -> None:
    from .launch import is_rank0
    from .train.trainer import run_training

    try:
        check_known_keys(cfg)  # `+key=value` gets past Hydra's struct mode
        summary = run_training(cfg)
    except SwiftKVInputError as err:
        exit_with(err)
    if is_rank0():
        print_report(summary, cfg.run_dir)


def exit_with(err: SwiftKVInputError) -> None:
    """Bad input: its message names the setting and the fix, a traceback would only bury it."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def cli() -> None:
    # Launchers may inject --local_rank=N, which Hydra would take for a (broken) override.
    sys.argv = [sys.argv[0], *strip_launcher_args(sys.argv[1:])]
    try:
        check_override_keys(sys.argv[1:])  # before Hydra, whose message for a typo suggests adding it with `+`
    except SwiftKVInputError as err:
        exit_with(err)
    main()


if __name__ == "__main__":
    cli()
