"""The data section of a recipe: plain dataclasses, usable as a Hydra structured-config schema."""

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

from ..errors import SwiftKVInputError

FORMATS = ("auto", "chat", "alpaca", "gsm8k", "prompt_response", "text")


@dataclass
class SourceConfig:
    """One dataset: a Hub name, a local json/jsonl/parquet file, a folder or glob of them, or ``builtin:<name>``."""

    path: str = "builtin:gsm8k"
    # Hub only: the split to load (local files always form one "train" split), the subset and a pinned revision.
    split: str = "train"
    name: str | None = None
    revision: str | None = None
    # How records become samples; "auto" picks from the column names. "text" is plain text (a "text" column, or
    # .txt files, one record per file): no chat template, every token trained, long documents cut into windows of
    # max_length tokens instead of truncated.
    format: str = "auto"
    # Take this many raw records (a seeded random subset) before tokenization; None takes all.
    sample_count: int | None = None
    # Field-name overrides; None uses the format's defaults (see formats.DEFAULT_FIELDS).
    messages_field: str | None = None
    prompt_field: str | None = None
    input_field: str | None = None
    response_field: str | None = None
    # A per-record system prompt column (e.g. OpenOrca's "system_prompt"); when absent or empty the fixed
    # system_prompt is used. Either is prepended as a system turn when a record has none.
    system_field: str | None = None
    system_prompt: str | None = None
    text_field: str | None = None
    # Upsampling: this source's training samples enter the mix this many times (the eval split is drawn first,
    # so a repeated sample never lands in both).
    repeat: int = 1


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    # Tokens per packed row, and the truncation length of single samples.
    max_length: int = 2048
    # Pack several samples per row (position_ids restart per sample); False pads each sample on its own.
    pack: bool = True
    # True: loss only on assistant tokens (and their end-of-turn token). False: on every token.
    mask_inputs: bool = True
    # Text that ends an assistant turn in the chat template; None uses tokenizer.eos_token.
    end_of_turn_token: str | None = None
    # Seeds the sample shuffle, the eval split, sample_count subsets (and, by convention, the dataloader).
    seed: int = 42
    # Held-out samples: eval_samples wins over eval_fraction when set. 0 / None means no eval split.
    eval_fraction: float = 0.0
    eval_samples: int | None = None
    # Tokenized datasets are cached under cache_dir (default: $SWIFTKV_DATA_CACHE or ~/.cache/swiftkv_train/data).
    cache_dir: str | None = None
    use_cache: bool = True
    # Worker processes for tokenization (datasets.map num_proc).
    num_proc: int = 1
    # A JSON Lines line that is not a JSON object stops the run with its file and line number; True skips such
    # lines instead (counted in a warning).
    skip_bad_records: bool = False


def coerce_data_config(cfg: Any) -> DataConfig:
    """Accept a DataConfig, an OmegaConf node or a plain dict (e.g. ``cfg.data`` of a Hydra run)."""
    if isinstance(cfg, DataConfig):
        return cfg
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_object(cfg)
            if isinstance(cfg, DataConfig):
                return cfg
    except ImportError:  # omegaconf is a dependency, but the data package does not need it
        pass
    if is_dataclass(cfg):
        cfg = asdict(cfg)
    if not isinstance(cfg, dict):
        raise SwiftKVInputError(f"data config must be a DataConfig or a mapping, got {type(cfg).__name__}.")
    known = {f.name for f in fields(DataConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise SwiftKVInputError(f"unknown data config field(s) {unknown}: valid fields are {sorted(known)}.")
    values = dict(cfg)
    if "sources" in values:
        values["sources"] = [_coerce_source(s) for s in values["sources"]]
    return DataConfig(**values)


def _coerce_source(source: Any) -> SourceConfig:
    if isinstance(source, SourceConfig):
        return source
    if isinstance(source, str):
        return SourceConfig(path=source)
    if is_dataclass(source):
        source = asdict(source)
    known = {f.name for f in fields(SourceConfig)}
    unknown = sorted(set(source) - known)
    if unknown:
        raise SwiftKVInputError(f"unknown data source field(s) {unknown}: valid fields are {sorted(known)}.")
    return SourceConfig(**dict(source))


def validate_data_config(cfg: DataConfig) -> None:
    """Reject impossible settings before any file is read."""
    if len(cfg.sources) == 0:
        raise SwiftKVInputError("data.sources is empty: list at least one dataset (e.g. path: builtin:gsm8k).")
    if cfg.max_length < 2:
        raise SwiftKVInputError(f"data.max_length={cfg.max_length} is too small: use at least 2 tokens.")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise SwiftKVInputError(f"data.eval_fraction={cfg.eval_fraction} must be in [0, 1).")
    if cfg.eval_samples is not None and cfg.eval_samples < 0:
        raise SwiftKVInputError(f"data.eval_samples={cfg.eval_samples} must be >= 0 (or null).")
    if cfg.num_proc < 1:
        raise SwiftKVInputError(f"data.num_proc={cfg.num_proc} must be >= 1.")
    for source in cfg.sources:
        if source.format not in FORMATS:
            raise SwiftKVInputError(
                f"data source {source.path!r}: unknown format {source.format!r}; use one of {', '.join(FORMATS)}."
            )
        if isinstance(source.repeat, bool) or not isinstance(source.repeat, int) or source.repeat < 1:
            raise SwiftKVInputError(
                f"data source {source.path!r}: repeat={source.repeat!r} must be an integer >= 1 (1 = no upsampling)."
            )
        if source.sample_count is not None and source.sample_count < 1:
            raise SwiftKVInputError(
                f"data source {source.path!r}: sample_count={source.sample_count} must be >= 1 (or null for all)."
            )
