"""Resumable training checkpoints: DeepSpeed engine state + step, data position and RNG states.

A checkpoint is written to ``checkpoints/.tmp-step_N`` and renamed to ``checkpoints/step_N`` only once every rank
has finished; ``checkpoints/latest`` (replaced atomically) then names it. A crash mid-save therefore never leaves a
half-written checkpoint as the latest one.
"""

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..launch import barrier, is_rank0

TAG = "state"
COMPLETE = "COMPLETE"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / COMPLETE).is_file() else None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(engine, run_dir: Path, step: int, client_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    root = checkpoint_dir(run_dir)
    name = f"step_{step:07d}"
    tmp, final = root / f".tmp-{name}", root / name
    if is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    state = dict(client_state, rng=rng_state())
    engine.save_checkpoint(str(tmp), tag=TAG, client_state=state, exclude_frozen_parameters=True)
    barrier()
    if is_rank0():
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():  # re-saving the same step (e.g. after a resume) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomically(root / "latest", name + "\n")
        _rotate(root, keep, protect=final)
    barrier()
    return final


def _rotate(root: Path, keep: int, protect: Path) -> None:
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file())
    for old in done[:-keep]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine, path: Path) -> dict:
    """Restore engine (trainable weights, optimizer, scheduler) and RNG state; return the client state."""
    loaded, client_state = engine.load_checkpoint(
        str(path), tag=TAG, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    set_rng_state(client_state["rng"])
    return client_state
