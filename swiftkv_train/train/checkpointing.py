"""Resumable training checkpoints: DeepSpeed engine state + step, data position and RNG states.

A checkpoint is written to ``checkpoints/.tmp-step_N`` and renamed to ``checkpoints/step_N`` only once every rank
has finished; ``checkpoints/latest`` (replaced atomically) then names it. A crash mid-save therefore never leaves a
half-written checkpoint as the latest one.

Layout of ``step_N``: ``state/`` (DeepSpeed's files: weights, optimizer, scheduler), ``trainer_state.json`` (step,
data position, evals), ``rng_rank<R>.json`` (each rank's RNG states), ``MANIFEST.json`` (size and sha256 of every
file, written last) and the ``COMPLETE`` marker. Nothing we write is pickled; DeepSpeed's files are read with
``torch.load(weights_only=True)`` and a short allow-list, so a planted pickle payload is refused, never run.
"""

import base64
import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import SwiftKVInputError
from ..launch import barrier, get_rank, get_world_size, is_rank0

log = logging.getLogger(__name__)

TAG = "state"
COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
# Written into a checkpoint whose weights gave a non-finite loss: resume=auto skips it.
DIVERGED = "DIVERGED"
NOT_IN_MANIFEST = {COMPLETE, MANIFEST, DIVERGED}
STEP_DIR = re.compile(r"step_(\d+)$")


def _deepspeed_types() -> list:
    """The non-container types DeepSpeed 0.19 pickles into its ZeRO / bf16 optimizer files (nothing callable)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _allowed_globals() -> set[str]:
    return {f"{t.__module__}.{t.__qualname__}" for t in _deepspeed_types()}


@contextlib.contextmanager
def weights_only_loading():
    """Every torch.load inside (DeepSpeed's too, which passes weights_only=False) runs the restricted unpickler.

    TORCH_FORCE_WEIGHTS_ONLY_LOAD is torch's documented switch for that; the allow-list adds DeepSpeed's few types.
    """
    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_types()):
            yield
    finally:
        if saved is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved


# ---------------------------------------------------------------------------------------------------- RNG states


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    """This rank's RNG states as plain JSON values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_from_b64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_b64(s) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------------- manifest


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _listed_files(path: Path) -> list[str]:
    """Every file of a checkpoint that the manifest covers, as sorted relative paths."""
    files = (p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    return sorted(f for f in files if f not in NOT_IN_MANIFEST)


def write_manifest(path: Path) -> None:
    """Record the relative path, size and sha256 of every file of the checkpoint at ``path``."""
    files = {rel: {"size": (path / rel).stat().st_size, "sha256": _sha256(path / rel)} for rel in _listed_files(path)}
    _write_atomically(path / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1) + "\n")


def _unsafe_globals(file: Path) -> list[str]:
    """Globals a torch file would import when unpickled, beyond what weights_only allows (read, never run)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception as exc:  # not a torch zip file: the weights_only load refuses it later anyway
        return [f"<unreadable: {exc}>"]
    return sorted(set(found) - _allowed_globals())


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` must not be resumed from (naming the file), or None when it is intact."""
    if not path.is_dir():
        return "no such directory"
    if not (path / COMPLETE).is_file():
        return "no COMPLETE marker: the save did not finish"
    if (path / DIVERGED).is_file():
        return f"marked {DIVERGED}: {(path / DIVERGED).read_text().strip()} (delete that file to use it anyway)"
    try:
        listed = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (not written by this version of swiftkv_train)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    present = set(_listed_files(path))
    for rel, expected in sorted(listed.items()):
        file = path / rel
        if rel not in present:
            return f"{rel} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{rel} has {size} bytes, the manifest says {expected['size']} (truncated or replaced)"
        if _sha256(file) != expected["sha256"]:
            return f"{rel} does not match its sha256 in the manifest (corrupted or replaced)"
        if file.suffix == ".pt" and (unsafe := _unsafe_globals(file)):
            return f"{rel} would import {', '.join(unsafe)} when unpickled: refusing to load it"
    if extra := sorted(present - set(listed)):
        return f"{extra[0]} is not in the manifest"
    return None


# ---------------------------------------------------------------------------------------------------- locating


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def _candidates(run_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first; none newer than the one ``latest`` names (newer ones are left over from
    an abandoned trajectory)."""
    root = checkpoint_dir(run_dir)
    done = sorted((p for p in root.glob("step_*") if _step_of(p) >= 0 and (p / COMPLETE).is_file()),
                  key=_step_of, reverse=True)
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and named in done:
        done = [p for p in done if _step_of(p) <= _step_of(named)]
    return done


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run that is not marked diverged (no hashing), or None."""
    return next((p for p in _candidates(run_dir) if not (p / DIVERGED).is_file()), None)


def newest_intact_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes verification; warns about each newer one it skips."""
    candidates = _candidates(run_dir)
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("resume=auto: skipping checkpoint %s: %s", path, problem)
    if candidates:
        raise SwiftKVInputError(
            f"trainer.resume=auto: none of the {len(candidates)} checkpoint(s) in {checkpoint_dir(run_dir)} is intact "
            "(see the warnings above). Set trainer.resume=none to start over, or trainer.resume=<path> to pick one."
        )
    return None


def _broadcast_step(step: int, device) -> int:
    if get_world_size() == 1:
        return step
    value = torch.tensor([step], dtype=torch.long, device=device)
    torch.distributed.broadcast(value, src=0)
    return int(value.item())


def checkpoint_to_resume(run_dir: Path, resume: str, device) -> Path | None:
    """Collective: rank 0 picks and verifies the checkpoint named by ``trainer.resume``; all ranks get it.

    auto: the newest intact one (older ones replace a corrupt newest, with a warning), None when there is none yet.
    A path: that checkpoint, or one SwiftKVInputError naming the path and the bad file.
    """
    if resume == "none":
        return None
    refused, chosen, error = -2, None, None  # broadcast codes: -2 refused, -1 nothing to resume, else a step
    if is_rank0():
        try:
            if resume == "auto":
                chosen = newest_intact_checkpoint(run_dir)
            else:
                chosen = Path(resume)
                if (problem := checkpoint_problem(chosen)) is not None:
                    raise SwiftKVInputError(f"trainer.resume={resume!r}: cannot resume from {chosen}: {problem}.")
        except SwiftKVInputError as exc:
            error = exc
    code = _broadcast_step(refused if error else max(_step_of(chosen), 0) if chosen else -1, device)
    if code == refused:
        raise error or SwiftKVInputError(f"trainer.resume={resume!r}: rank 0 refused the checkpoint (see its log).")
    if code < 0:
        return None
    return Path(resume) if resume != "auto" else checkpoint_dir(run_dir) / f"step_{code:07d}"


# ---------------------------------------------------------------------------------------------------- save / load


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(engine, run_dir: Path, step: int, client_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path. ``client_state`` must be JSON values."""
    root = checkpoint_dir(run_dir)
    name = f"step_{step:07d}"
    tmp, final = root / f".tmp-{name}", root / name
    if is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(tmp), tag=TAG, client_state={}, exclude_frozen_parameters=True)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / f"rng_rank{get_rank()}.json").write_text(json.dumps(rng_state()))
    barrier()
    if is_rank0():
        (tmp / TRAINER_STATE).write_text(json.dumps(client_state, indent=1) + "\n")
        write_manifest(tmp)  # last: it covers every file above
        (tmp / COMPLETE).write_text(f"{step}\n")
        if final.exists():  # re-saving the same step (e.g. after a resume) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomically(root / "latest", name + "\n")
        _rotate(root, keep, protect=final)
    barrier()
    return final


def _rotate(root: Path, keep: int, protect: Path) -> None:
    """Keep the newest ``keep`` good checkpoints; drop diverged ones older than the one just saved."""
    if keep <= 0:
        return
    done = sorted((p for p in root.glob("step_*") if (p / COMPLETE).is_file()), key=_step_of)
    good = [p for p in done if not (p / DIVERGED).is_file()]
    stale = good[:-keep] + [p for p in done if (p / DIVERGED).is_file() and _step_of(p) < _step_of(protect)]
    for old in stale:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


def mark_diverged(path: Path, reason: str) -> None:
    """Rank 0: flag a checkpoint whose weights gave a non-finite loss, so that resume=auto skips it."""
    if is_rank0():
        (path / DIVERGED).write_text(reason + "\n")


def load_checkpoint(engine, path: Path) -> dict:
    """Restore engine (trainable weights, optimizer, scheduler) and RNG state; return the trainer state.

    Callers verify the checkpoint first (checkpoint_to_resume); the loads here are restricted regardless.
    """
    try:
        with weights_only_loading():
            loaded, _ = engine.load_checkpoint(str(path), tag=TAG, load_module_strict=False,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
            raise SwiftKVInputError(f"{path} holds objects outside the allowed tensor types: refusing to "
                                    f"unpickle it ({str(exc).splitlines()[0]})") from exc
        raise
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    own = path / f"rng_rank{get_rank()}.json"
    set_rng_state(json.loads((own if own.is_file() else path / "rng_rank0.json").read_text()))
    return json.loads((path / TRAINER_STATE).read_text())
