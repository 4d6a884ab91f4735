"""Load the raw records of one source: local json/jsonl/parquet/txt files, a shipped dataset, or a Hub dataset."""

import glob
import json
import logging
import tempfile
from pathlib import Path

import datasets

from ..errors import SwiftKVInputError
from .config import SourceConfig

log = logging.getLogger(__name__)

# File suffix -> the `datasets` builder that reads it.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
BUILTIN_PREFIX = "builtin:"
BUILTIN_ROOT = Path(__file__).parent  # shipped datasets live in folders beside this module


def builtin_names() -> list[str]:
    return sorted(p.name for p in BUILTIN_ROOT.iterdir() if p.is_dir() and any(_data_files_in(p)))


def local_files(path: str) -> list[Path] | None:
    """The data files behind a local ``path`` (file, folder, glob or builtin:name); None for a Hub name."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        folder = BUILTIN_ROOT / name
        if not name or not folder.is_dir():
            raise SwiftKVInputError(f"unknown shipped dataset {path!r}: available are {builtin_names()}.")
        return _checked(path, _data_files_in(folder))
    expanded = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        return _checked(path, [Path(p) for p in sorted(glob.glob(str(expanded), recursive=True))])
    if expanded.is_file():
        return _checked(path, [expanded])
    if expanded.is_dir():
        return _checked(path, _data_files_in(expanded))
    if path.startswith(("/", "./", "../", "~")) or expanded.suffix in BUILDERS:
        raise SwiftKVInputError(f"data file {path!r} does not exist: check the path (relative paths start at cwd).")
    return None


def _data_files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in BUILDERS)


def _checked(path: str, files: list[Path]) -> list[Path]:
    if len(files) == 0:
        raise SwiftKVInputError(f"data source {path!r} matches no .json/.jsonl/.parquet/.txt files.")
    unsupported = [f for f in files if f.suffix not in BUILDERS]
    if unsupported:
        raise SwiftKVInputError(
            f"data file {str(unsupported[0])!r} has an unsupported type: use .json, .jsonl, .parquet or .txt."
        )
    if len({BUILDERS[f.suffix] for f in files}) > 1:
        raise SwiftKVInputError(
            f"data source {path!r} mixes json, parquet and/or text files: list them as separate sources."
        )
    return [f.resolve() for f in files]


def file_identity(files: list[Path]) -> list[tuple]:
    """What decides whether a cached tokenization of these files is still valid."""
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def load_records(source: SourceConfig, seed: int, scratch_dir: str | None = None, where: str = "data source",
                 skip_bad_records: bool = False) -> datasets.Dataset:
    """All raw records of a source (or a seeded random ``sample_count`` of them).

    Local files are converted to Arrow under ``scratch_dir`` (thrown away once tokenized; None: the HF
    datasets cache). Hub datasets always use the HF datasets cache, so downloads are shared and kept.
    A malformed JSON Lines line is an error naming ``where`` (e.g. "data.sources[0]"), file and line, or with
    ``skip_bad_records`` is left out.
    """
    files = local_files(source.path)
    if files is not None:
        files = [_checked_json_lines(f, where, skip_bad_records, scratch_dir) for f in files]
        records = _load_local(source.path, files, scratch_dir)
    else:
        records = _load_hub(source)
    if len(records) == 0:
        raise SwiftKVInputError(f"data source {source.path!r} is empty: it has no records.")
    if source.sample_count is not None:
        if source.sample_count > len(records):
            log.warning(
                "%s: sample_count=%d but only %d records exist; using all of them.",
                source.path, source.sample_count, len(records),
            )
        else:
            records = records.shuffle(seed=seed).select(range(source.sample_count))
    return records


def _load_local(path: str, files: list[Path], scratch_dir: str | None) -> datasets.Dataset:
    # `datasets` fails with a bare StopIteration on empty json files: say what is wrong instead.
    empty = [f for f in files if not _has_content(f)]
    if len(empty) == len(files):
        raise SwiftKVInputError(f"data source {path!r} is empty: {str(empty[0])!r} has no records.")
    builder = BUILDERS[files[0].suffix]
    data_files = [str(f) for f in files if f not in empty]
    # A .txt file is one record (one document), not one record per line.
    options = {"sample_by": "document"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=data_files, split="train", cache_dir=scratch_dir, **options)
    except Exception as err:  # pyarrow/json errors: keep the cause, name the file
        raise SwiftKVInputError(
            f"could not read data source {path!r} as {builder}: {err}. Check the file is valid "
            f"{ {'json': 'JSON Lines or a JSON array', 'parquet': 'parquet', 'text': 'UTF-8 text'}[builder] }."
        ) from err


def _is_json_lines(file: Path) -> bool:
    """.jsonl, or a .json file whose first non-blank line is a whole JSON object (not a pretty-printed document
    or an array, which `datasets` reads as one JSON value)."""
    if file.suffix == ".jsonl":
        return True
    if file.suffix != ".json":
        return False
    with open(file, "rb") as fh:
        if not fh.read(1 << 16).lstrip().startswith(b"{"):  # an array (or nothing): not read line by line
            return False
        fh.seek(0)
        first = next((line for line in fh if line.strip()), b"")
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def _line_problem(line: bytes) -> str | None:
    try:
        value = json.loads(line.rstrip(b"\r\n"))  # the newline would count as a line of its own in the error
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        if isinstance(err, json.JSONDecodeError):
            return f"{err.msg} at column {err.colno}"
        return str(err)
    return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object (one record per line)"


def _checked_json_lines(file: Path, where: str, skip: bool, scratch_dir: str | None) -> Path:
    """``file`` itself when every line of it is a JSON object (or it is not JSON Lines); else an error naming the
    first bad line, or with ``skip`` a copy without the bad lines. `datasets` reports a bad line only by byte
    offset, deep in a traceback, hence this pass of our own."""
    if not _is_json_lines(file):
        return file
    bad, lines = {}, 0
    with open(file, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                lines += 1
                problem = _line_problem(line)
                if problem is not None:
                    bad[number] = problem
    if not bad:
        return file
    number, problem = next(iter(bad.items()))
    first, total = f"line {number} is not a valid JSON record: {problem}", f"{len(bad)} of {lines} lines are bad"
    if not skip:
        raise SwiftKVInputError(f"{where}: {file} {first} ({total}). Fix the line or set data.skip_bad_records=true.")
    if len(bad) == lines:
        raise SwiftKVInputError(f"{where}: {file} has no valid record ({total}; {first}).")
    log.warning("%s: skipped %d malformed line(s) of %s (data.skip_bad_records=true); the first, %s",
                where, len(bad), file, first)
    folder = Path(scratch_dir or tempfile.mkdtemp(prefix="swiftkv-data-")) / "clean"
    folder.mkdir(parents=True, exist_ok=True)
    clean = folder / f"{len(list(folder.iterdir()))}-{file.stem}.jsonl"  # numbered: sources may share a name
    with open(file, "rb") as src, open(clean, "wb") as out:
        for number, line in enumerate(src, start=1):
            if line.strip() and number not in bad:
                out.write(line if line.endswith(b"\n") else line + b"\n")
    return clean


def _has_content(file: Path) -> bool:
    """False for a zero-byte file, or a json file holding only whitespace (read until the first other byte)."""
    if file.suffix == ".parquet":
        return file.stat().st_size > 0
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _load_hub(source: SourceConfig) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source.path, source.name, split=source.split, revision=source.revision)
    except Exception as err:  # not found, no network, bad split: one clear message with the cause chained
        raise SwiftKVInputError(
            f"could not load Hub dataset {source.path!r} (name={source.name!r}, split={source.split!r}): {err}. "
            f"For a local file give an existing path ending in .json, .jsonl, .parquet or .txt."
        ) from err
