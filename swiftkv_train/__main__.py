"""`python -m swiftkv_train [recipe=<name>] [key=value ...]`: train with a Hydra recipe.

With no arguments it runs the embedded default (recipe smollm2_swiftkv: real SmolLM2-135M-Instruct, GSM8K shipped
in the package, a few dozen steps on CPU) and prints the teacher-fidelity numbers before and after distillation.
Works the same under torchrun, srun and the Hydra submitit launcher.
"""

import sys

import hydra

from .config import check_known_keys, check_override_keys, register_schemas
from .errors import SwiftKVInputError
from .launch import strip_launcher_args

register_schemas()


def print_report(summary: dict) -> None:
    evals = summary.get("evals", {})
    if "start" not in evals or "end" not in evals:
        return
    print("\nteacher fidelity on the held-out split (assistant tokens):")
    print(f"{'':8s} {'KL':>8s} {'top-1':>7s} {'ppl student':>12s} {'ppl teacher':>12s}")
    for when in ("start", "end"):
        s = evals[when]
        print(f"{when:8s} {s['kl']:8.4f} {s['top1']:7.3f} {s['ppl_student']:12.2f} {s['ppl_teacher']:12.2f}")


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
        print_report(summary)


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
