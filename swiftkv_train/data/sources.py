"""Load the raw records of one source: local json/jsonl/parquet/txt files, a shipped dataset, or a Hub dataset."""

import glob
import logging
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


def load_records(source: SourceConfig, seed: int, scratch_dir: str | None = None) -> datasets.Dataset:
    """All raw records of a source (or a seeded random ``sample_count`` of them).

    Local files are converted to Arrow under ``scratch_dir`` (thrown away once tokenized; None: the HF
    datasets cache). Hub datasets always use the HF datasets cache, so downloads are shared and kept.
    """
    files = local_files(source.path)
    if files is not None:
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
