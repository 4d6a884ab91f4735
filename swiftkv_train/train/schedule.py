"""Learning-rate schedules: linear warm-up, then linear / cosine decay to zero or constant."""

import math

from ..errors import SwiftKVInputError

SCHEDULES = ("linear", "cosine", "constant")


def lr_lambda(schedule: str, total_steps: int, warmup_ratio: float):
    """Multiplier of the base lr at optimizer step ``step`` (0-based), as LambdaLR expects."""
    if schedule not in SCHEDULES:
        raise SwiftKVInputError(f"trainer.lr_schedule={schedule!r}: use one of {', '.join(SCHEDULES)}.")
    if not 0.0 <= warmup_ratio < 1.0:
        raise SwiftKVInputError(f"trainer.warmup_ratio={warmup_ratio} must be in [0, 1).")
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
