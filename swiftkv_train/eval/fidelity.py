"""Fidelity to the teacher on held-out real text: KL(teacher‖model), top-1 agreement, perplexity of both."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..errors import SwiftKVInputError
from ..metrics import FidelityAccumulator, next_token_targets
from .subjects import Subject, max_positions
from .text_source import load_texts

__all__ = ["token_windows", "check_config", "run_fidelity"]


def token_windows(texts: list[str], tokenizer, window: int, num_windows: int | None) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of ``window`` tokens over the documents joined end to end
    (documents separated by the EOS token when the tokenizer has one). Short remainders are dropped."""
    if window < 2:
        raise SwiftKVInputError(f"fidelity.window={window} must be >= 2 tokens.")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if num_windows and len(ids) >= window * num_windows:
            break
    count = len(ids) // window
    if num_windows:
        count = min(count, num_windows)
    if count == 0:
        raise SwiftKVInputError(
            f"the fidelity text has {len(ids)} tokens, fewer than one window of fidelity.window={window}: "
            "add text or lower the window."
        )
    return [torch.tensor(ids[i * window : (i + 1) * window]).unsqueeze(0) for i in range(count)]


@torch.no_grad()
def _logits(subject: Subject, ids: torch.Tensor) -> torch.Tensor:
    with subject.active() as model:
        return model(input_ids=ids.to(model.device), use_cache=False, **subject.scoring_kwargs()).logits.float()


def check_config(subject: Subject, cfg) -> list[torch.Tensor]:
    """Validate the fidelity section and build its windows (before any model runs)."""
    texts = load_texts(cfg.data, cfg.field, what="fidelity.data")
    limit = max_positions(subject.model)
    if limit and cfg.window > limit:
        raise SwiftKVInputError(
            f"fidelity.window={cfg.window} is longer than the model supports ({limit} positions): lower it."
        )
    return token_windows(texts, subject.tokenizer, cfg.window, cfg.num_windows)


def run_fidelity(subject: Subject, teacher: Subject, cfg, progress: bool = True) -> dict:
    """``cfg``: FidelityConfig (data, field, window, num_windows)."""
    windows = check_config(subject, cfg)
    acc = FidelityAccumulator()
    for ids in tqdm(windows, desc=f"fidelity {subject.name}", disable=not progress, leave=False):
        teacher_logits = _logits(teacher, ids)
        student_logits = _logits(subject, ids)
        acc.update(teacher_logits, student_logits, next_token_targets(ids).to(teacher_logits.device))
    stats = acc.compute()
    return {
        "model": subject.name,
        "teacher": teacher.name,
        **stats,
        "settings": {"data": cfg.data, "field": cfg.field, "window": cfg.window, "windows": len(windows)},
    }
