"""Real text for the fidelity and needle suites: a folder of .txt files, one .txt file, or a .jsonl field."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from ..errors import SwiftKVInputError

__all__ = ["load_texts"]

# License/readme files that sit next to corpora are not text to evaluate on.
DEFAULT_EXCLUDE = ("*LICENSE*", "README*")


def load_texts(source: str, field: str = "text", exclude=DEFAULT_EXCLUDE, what: str = "text source") -> list[str]:
    """Non-empty documents from ``source`` (sorted file names for a folder). ``what`` names the config field."""
    if not source:
        raise SwiftKVInputError(f"{what} is empty: give a folder of .txt files or a .jsonl file.")
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if not any(fnmatch.fnmatch(p.name, pat) for pat in exclude))
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise SwiftKVInputError(f"{what}={source!r}: the folder has no non-empty .txt files.")
        return texts
    if not path.is_file():
        raise SwiftKVInputError(f"{what}={source!r} does not exist: give a folder of .txt files or a .jsonl file.")
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise SwiftKVInputError(f"{what}={source!r} is empty.")
        return [text]
    if path.suffix in (".jsonl", ".json"):
        texts = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if field not in record:
                    raise SwiftKVInputError(
                        f"{what}={source!r} line {number} has no field {field!r} (fields: {sorted(record)}); "
                        "set the field option to one of them."
                    )
                if str(record[field]).strip():
                    texts.append(str(record[field]))
        if not texts:
            raise SwiftKVInputError(f"{what}={source!r}: no non-empty {field!r} values.")
        return texts
    raise SwiftKVInputError(f"{what}={source!r}: expected a folder, a .txt file or a .jsonl file.")
