"""Training data: load chat/instruction datasets, tokenize with the chat template, pack, cache, batch.

    train, eval_ = build_datasets(DataConfig(sources=[SourceConfig(path="data.jsonl")]), tokenizer)
    loader = make_dataloader(train, batch_size=1, seed=42, rank=rank, world_size=world, start_step=step)
"""

from .builder import build_datasets
from .config import DataConfig, SourceConfig, coerce_data_config
from .dataset import TokenizedDataset
from .loader import ShardedBatchSampler, collate, make_dataloader
from .tokenization import IGNORE_INDEX

__all__ = [
    "DataConfig",
    "IGNORE_INDEX",
    "ShardedBatchSampler",
    "SourceConfig",
    "TokenizedDataset",
    "build_datasets",
    "coerce_data_config",
    "collate",
    "make_dataloader",
]
