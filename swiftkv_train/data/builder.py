"""build_datasets: sources -> messages -> tokens -> shuffled train/eval split -> packed rows, cached on disk."""

import hashlib
import json
import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import datasets

from ..errors import SwiftKVInputError
from . import cache
from .config import DataConfig, SourceConfig, coerce_data_config, validate_data_config
from .dataset import TokenizedDataset
from .formats import RecordMapper, SkipRecord, resolve_mapper
from .packing import pack_samples
from .sources import load_records
from .tokenization import IGNORE_INDEX, check_chat_template, tokenize_messages, tokenize_text

log = logging.getLogger(__name__)

SAMPLE_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "truncated": datasets.Value("bool"),
        "skip_reason": datasets.Value("string"),
        "source": datasets.Value("int32"),  # index into cfg.sources, for per-source upsampling (dropped after)
    }
)


def build_datasets(cfg: DataConfig | Any, tokenizer) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Tokenized (train, eval) datasets for ``cfg``; eval is None without eval_fraction/eval_samples.

    With ``use_cache`` the result is built once per (data files, tokenizer, settings) and reloaded from
    ``cache_dir`` afterwards; under torch.distributed rank 0 builds it while the other ranks wait.
    """
    cfg = coerce_data_config(cfg)
    validate_data_config(cfg)
    check_chat_template(tokenizer)
    pad_token_id = pad_id(tokenizer)
    if not cfg.use_cache:
        # Everything stays in memory; local files' Arrow conversions go to a scratch dir deleted right after.
        with tempfile.TemporaryDirectory(prefix="swiftkv-data-") as scratch:
            train, eval_, stats = build_splits(cfg, tokenizer, workdir=None, scratch_dir=scratch,
                                               fingerprint=cache.cache_key(cfg, tokenizer))
        _log_split_summary(stats)
        return _wrap(train, cfg, pad_token_id, stats), _wrap(eval_, cfg, pad_token_id, stats)

    key = cache.cache_key(cfg, tokenizer)
    entry = cache.cache_root(cfg) / key
    built = cache.ensure_cached(entry, lambda out: _build_into(out, cfg, tokenizer, key))
    stats = json.loads((entry / cache.COMPLETE_MARKER).read_text())
    if not built:
        log.info("loaded tokenized data from cache %s", entry)
    _log_split_summary(stats)
    train = datasets.load_from_disk(str(entry / "train"))
    eval_ = datasets.load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    return _wrap(train, cfg, pad_token_id, stats), _wrap(eval_, cfg, pad_token_id, stats)


def pad_id(tokenizer) -> int:
    """Pad tokens are always masked out, so any id works; prefer pad, then eos (Llama 3 has no pad token)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _wrap(table, cfg: DataConfig, pad_token_id: int, stats: dict):
    return None if table is None else TokenizedDataset(table, packed=cfg.pack, pad_token_id=pad_token_id, stats=stats)


def _build_into(out: Path, cfg: DataConfig, tokenizer, key: str) -> None:
    """Build the splits with intermediate Arrow files under ``out/work`` and save the results into ``out``."""
    workdir = out / "work"
    workdir.mkdir(parents=True)
    train, eval_, stats = build_splits(cfg, tokenizer, workdir=workdir, scratch_dir=str(workdir / "raw"),
                                       fingerprint=key)
    train.save_to_disk(str(out / "train"))
    if eval_ is not None:
        eval_.save_to_disk(str(out / "eval"))
    shutil.rmtree(workdir)
    (out / cache.COMPLETE_MARKER).write_text(json.dumps(stats, indent=1))  # written last: marks completion


def build_splits(cfg: DataConfig, tokenizer, workdir: Path | None, scratch_dir: str | None, fingerprint: str):
    """(train, eval or None, stats) as Arrow datasets.

    Tokenized and packed intermediates go to ``workdir`` (None: kept in memory); local files are
    converted to Arrow under ``scratch_dir``. Both may be deleted once the results are saved.
    """
    end_of_turn = cfg.end_of_turn_token or tokenizer.eos_token
    per_source, source_stats = [], []
    for index, source in enumerate(cfg.sources):
        records = load_records(source, cfg.seed, scratch_dir, where=f"data.sources[{index}]",
                               skip_bad_records=cfg.skip_bad_records)
        mapper = resolve_mapper(source, records.column_names)
        samples, stats = _tokenize_source(records, index, source, mapper, tokenizer, cfg, end_of_turn,
                                          _map_args(workdir, f"source{index}", fingerprint))
        per_source.append(samples)
        source_stats.append(stats)

    # One seeded shuffle decides both the eval split and the order samples are packed in.
    samples = datasets.concatenate_datasets(per_source).shuffle(seed=cfg.seed, keep_in_memory=True)
    n_eval = eval_size(len(samples), cfg)
    eval_samples = samples.select(range(n_eval)).remove_columns("source") if n_eval > 0 else None
    train_samples = upsample(samples.select(range(n_eval, len(samples))), cfg)

    stats: dict[str, Any] = {"sources": source_stats, "max_length": cfg.max_length, "packed": cfg.pack}
    train = _finish_split(train_samples, cfg, tokenizer, _map_args(workdir, "train", fingerprint))
    stats["train"] = split_stats(train_samples, train, cfg)
    eval_ = None
    if eval_samples is not None:
        eval_ = _finish_split(eval_samples, cfg, tokenizer, _map_args(workdir, "eval", fingerprint))
        stats["eval"] = split_stats(eval_samples, eval_, cfg)
    return train, eval_, stats


def upsample(train_samples: datasets.Dataset, cfg: DataConfig) -> datasets.Dataset:
    """Each source's training samples ``repeat`` times, reshuffled (seeded) so the copies spread over the epoch.
    Without any repeat the order is left as it is."""
    repeats = [source.repeat for source in cfg.sources]
    if all(r == 1 for r in repeats):
        return train_samples.remove_columns("source")
    extra = []
    for index, r in enumerate(repeats):
        if r > 1:
            own = train_samples.filter(lambda s: s == index, input_columns="source", keep_in_memory=True)
            extra += [own] * (r - 1)
    mixed = datasets.concatenate_datasets([train_samples, *extra]).shuffle(seed=cfg.seed + 1, keep_in_memory=True)
    return mixed.remove_columns("source")


def _map_args(workdir: Path | None, name: str, fingerprint: str) -> dict:
    # An explicit fingerprint stops `datasets` from hashing the tokenizer (slow, and often unhashable).
    args = {"new_fingerprint": hashlib.sha256(f"{fingerprint}-{name}".encode()).hexdigest()[:16]}
    if workdir is None:
        args["keep_in_memory"] = True
    else:
        args["cache_file_name"] = str(workdir / f"{name}.arrow")
    return args


def tokenize_record(record: dict, mapper: RecordMapper, tokenizer, max_length: int, mask_inputs: bool,
                    end_of_turn: str | None) -> list[dict]:
    """One raw record -> its samples (input_ids/labels; a text record may give several windows), or one empty
    sample with a skip reason."""
    try:
        if mapper.format == "text":
            samples = tokenize_text(tokenizer, mapper.text(record), max_length)
        else:
            samples = [tokenize_messages(tokenizer, mapper(record), max_length, mask_inputs, end_of_turn)]
    except SkipRecord as skip:
        return [{"input_ids": [], "labels": [], "truncated": False, "skip_reason": skip.reason}]
    return [{**sample, "skip_reason": ""} for sample in samples]


def tokenize_batch(batch: dict[str, list], source_index: int, **kwargs) -> dict[str, list]:
    """datasets.map function (batched, so one record may become several samples)."""
    out: dict[str, list] = {name: [] for name in SAMPLE_FEATURES}
    for i in range(len(next(iter(batch.values())))):
        for sample in tokenize_record({k: v[i] for k, v in batch.items()}, **kwargs):
            for name, value in {**sample, "source": source_index}.items():
                out[name].append(value)
    return out


def _tokenize_source(records, index: int, source: SourceConfig, mapper, tokenizer, cfg: DataConfig, end_of_turn,
                     map_args):
    tokenized = records.map(
        tokenize_batch,
        batched=True,
        fn_kwargs={"source_index": index, "mapper": mapper, "tokenizer": tokenizer, "max_length": cfg.max_length,
                   "mask_inputs": cfg.mask_inputs, "end_of_turn": end_of_turn},
        remove_columns=records.column_names,
        features=SAMPLE_FEATURES,
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        desc=f"tokenizing {source.path}",
        **map_args,
    )
    reasons = Counter(tokenized["skip_reason"])
    kept = reasons.pop("", 0)
    for reason, count in reasons.most_common():
        log.warning("%s: skipped %d samples: %s", source.path, count, reason)
    if kept == 0:
        summary = "; ".join(f"{reason} ({count})" for reason, count in reasons.most_common())
        raise SwiftKVInputError(
            f"data source {source.path!r}: all {len(records)} records were skipped: {summary}. "
            f"Check the format ({mapper.format}) and field names (messages_field / prompt_field / response_field)."
        )
    truncated = sum(tokenized["truncated"])
    if truncated:
        log.warning("%s: truncated %d of %d samples to max_length=%d tokens.",
                    source.path, truncated, kept, cfg.max_length)
    samples = tokenized.filter(lambda reason: reason == "", input_columns="skip_reason", keep_in_memory=True)
    samples = samples.remove_columns(["skip_reason", "truncated"])
    stats = {"path": source.path, "records": len(records), "samples": kept, "truncated": truncated,
             "skipped": dict(reasons)}
    return samples, stats


def eval_size(n_samples: int, cfg: DataConfig) -> int:
    if cfg.eval_samples is not None:
        n_eval = cfg.eval_samples
    elif cfg.eval_fraction > 0:
        n_eval = max(1, round(n_samples * cfg.eval_fraction))
    else:
        n_eval = 0
    if n_eval >= n_samples:
        raise SwiftKVInputError(
            f"the eval split ({n_eval} samples) would leave no training data out of {n_samples} samples: "
            f"lower data.eval_samples / data.eval_fraction."
        )
    return n_eval


def _finish_split(samples: datasets.Dataset, cfg: DataConfig, tokenizer, map_args: dict) -> datasets.Dataset:
    if cfg.pack:
        return pack_samples(samples, cfg.max_length, pad_id(tokenizer), **map_args)
    return samples.flatten_indices(keep_in_memory=True) if map_args.get("keep_in_memory") else samples


def split_stats(samples: datasets.Dataset, rows: datasets.Dataset, cfg: DataConfig) -> dict:
    """Samples, rows, real (non-pad) tokens, trained (label) tokens and, when packed, the fill of the rows."""
    tokens = label_tokens = 0
    for batch in samples.with_format("numpy").iter(batch_size=4096):
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            tokens += len(ids)
            label_tokens += int((labels != IGNORE_INDEX).sum())
    stats = {"samples": len(samples), "rows": len(rows), "tokens": tokens, "label_tokens": label_tokens}
    if cfg.pack:
        stats["fill"] = round(tokens / max(1, len(rows) * cfg.max_length), 4)
    return stats


def _log_split_summary(stats: dict) -> None:
    for split in ("train", "eval"):
        if split in stats:
            s = stats[split]
            log.info("%s data: %d samples in %d rows, %d tokens, %d trained (max_length=%d, packed=%s, fill=%s)",
                     split, s["samples"], s["rows"], s["tokens"], s["label_tokens"], stats["max_length"],
                     stats["packed"], s.get("fill", "-"))
