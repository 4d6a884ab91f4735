"""On-disk cache of tokenized datasets: a content key, atomic writes, and rank-0-first building.

An entry is a folder ``<cache_root>/<key>/`` that is complete once ``stats.json`` exists in it. Entries
are built in a temporary sibling folder and renamed into place, so a reader never sees half an entry.
Under torch.distributed, rank 0 builds while the other ranks wait at a barrier, then they all load.
"""

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from ..errors import SwiftKVInputError
from .config import DataConfig
from .sources import file_identity, local_files

log = logging.getLogger(__name__)

# Bump when the pipeline's output changes for the same inputs, so that old entries are not reused.
PIPELINE_VERSION = 1
COMPLETE_MARKER = "stats.json"
FAILED_SUFFIX = ".failed"


def default_cache_root() -> Path:
    return Path(os.environ.get("SWIFTKV_DATA_CACHE", Path.home() / ".cache" / "swiftkv_train" / "data"))


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_root()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids: vocabulary/merges/normalizer, chat template and special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(cfg: DataConfig, tokenizer) -> str:
    """Hash of the data files' identity, the tokenizer and every config field that changes the output."""
    sources = []
    for source in cfg.sources:
        files = local_files(source.path)
        # Hub datasets are identified by name/split/revision: pin `revision` to pick up upstream changes.
        sources.append({**asdict(source), "files": file_identity(files) if files is not None else None})
    settings = asdict(cfg)
    for irrelevant in ("sources", "cache_dir", "use_cache", "num_proc"):
        settings.pop(irrelevant)
    payload = {
        "version": PIPELINE_VERSION,
        "sources": sources,
        "settings": settings,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def is_complete(entry: Path) -> bool:
    return (entry / COMPLETE_MARKER).is_file()


def build_atomically(entry: Path, build: Callable[[Path], None]) -> None:
    """Run ``build(tmp_dir)`` (which must write COMPLETE_MARKER last) and move the result to ``entry``."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f"{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not is_complete(entry):  # a stale incomplete entry: replace it
                shutil.rmtree(entry, ignore_errors=True)
                os.rename(tmp, entry)
            # else another process finished the same entry first; ours is redundant
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _distributed() -> tuple[bool, int]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return True, dist.get_rank()
    return False, 0


def ensure_cached(entry: Path, build: Callable[[Path], None]) -> bool:
    """Make ``entry`` complete; returns True if this process built it. Rank 0 first, then a barrier."""
    if is_complete(entry):
        return False
    distributed, rank = _distributed()
    if not distributed:
        build_atomically(entry, build)
        return True
    failed = entry.parent / (entry.name + FAILED_SUFFIX)
    built = False
    if rank == 0:
        failed.unlink(missing_ok=True)
        try:
            build_atomically(entry, build)
            built = True
        except Exception as err:
            # Still reach the barrier, or every other rank would hang there; leave them the reason.
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{type(err).__name__}: {err}")
            dist.barrier()
            raise
    dist.barrier()
    if rank != 0 and failed.is_file():
        raise SwiftKVInputError(f"rank 0 failed to build the tokenized data ({failed.read_text()}); see its log.")
    if not is_complete(entry):
        # cache_dir is not shared with rank 0 (node-local disk on a multi-node run): build it here too.
        log.warning("rank %d: data cache %s not visible after rank 0 built it; building locally.", rank, entry)
        build_atomically(entry, build)
        built = True
    return built
