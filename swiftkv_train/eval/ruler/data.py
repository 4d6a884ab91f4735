"""Samples for (task, length): generated once per tokenizer and settings, then read back from a disk cache.

Sample i of a task at a length comes from its own ``random.Random(f"{seed}/{task}/{length}/{i}")``, so the same
seed gives the same token ids whatever else is asked for. The cache file's key hashes everything the ids depend
on: the generator version (bump GENERATOR_VERSION when a generator changes), the task's definition, length,
sample count, seed, the tokenizer (its full serialisation and chat template) and the haystack / QA sources.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from ...errors import SwiftKVInputError
from .generators import GENERATORS, Resources
from .prompt import Sample
from .tasks import TASKS

__all__ = ["GENERATOR_VERSION", "tokenizer_fingerprint", "sources_fingerprint", "cache_key", "load_samples"]

GENERATOR_VERSION = 1
_MEMO: dict[str, list[Sample]] = {}


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha(json.dumps([type(tokenizer).__name__, body, getattr(tokenizer, "chat_template", None) or ""]))


def sources_fingerprint(texts: list[str], qa_sources: dict[str, str]) -> dict:
    qa = {}
    for name, source in sorted(qa_sources.items()):
        path = Path(source).expanduser()
        qa[name] = _sha(path.read_bytes()) if source != "hub" and path.is_file() else source
    return {"haystack": _sha("\n\x00".join(texts)), "qa": qa}


def cache_key(task: str, length: int, samples: int, seed: int, tokenizer_fp: str, sources: dict) -> str:
    t = TASKS[task]
    dataset = t.args.get("dataset")
    relevant = {"haystack": sources["haystack"], "qa": sources["qa"].get(dataset)} if dataset else \
        {"haystack": sources["haystack"]}
    return _sha(json.dumps({"version": GENERATOR_VERSION, "task": task, "family": t.family, "args": t.args,
                            "length": length, "samples": samples, "seed": seed, "tokenizer": tokenizer_fp,
                            "sources": relevant}, sort_keys=True))


def generate(res: Resources, task: str, length: int, samples: int, seed: int) -> list[Sample]:
    t = TASKS[task]
    return [GENERATORS[t.family](t, res, random.Random(f"{seed}/{task}/{length}/{i}"), length, i)
            for i in range(samples)]


def load_samples(res: Resources, task: str, length: int, samples: int, seed: int, cache_dir: str | None,
                 key: str) -> tuple[list[Sample], str]:
    """The samples, and where they came from: "memory", "cache" (the file) or "generated" (then written)."""
    if key in _MEMO:
        return _MEMO[key], "memory"
    path = Path(cache_dir).expanduser() / f"{task}-{length}-{key[:20]}.jsonl" if cache_dir else None
    if path is not None and path.is_file():
        with path.open(encoding="utf-8") as handle:
            out = [Sample.from_json(json.loads(line)) for line in handle if line.strip()]
        origin = "cache"
    else:
        out = generate(res, task, length, samples, seed)
        origin = "generated"
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text("".join(json.dumps(s.to_json()) + "\n" for s in out), encoding="utf-8")
                tmp.replace(path)  # atomic: a concurrent reader sees the whole file or none
            except OSError as err:
                raise SwiftKVInputError(f"ruler.cache_dir={cache_dir!r} is not writable ({err}); set "
                                        "ruler.cache_dir=null to keep the samples in memory only.") from None
    _MEMO[key] = out
    return out, origin
