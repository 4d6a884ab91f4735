"""Pack tokenized samples into rows of exactly ``max_length`` tokens.

Each row concatenates whole samples; ``position_ids`` restart at 0 for every sample, which is how
transformers recognises a packed row and builds a block-diagonal causal mask (no attention across
samples, when no attention_mask is passed). The tail of a row is padding that forms its own block,
with label -100. Labels never cross samples because every sample's first label is already -100
(see tokenization.tokenize_messages), so no position is trained to predict the next sample's start.
"""

import datasets

from .tokenization import IGNORE_INDEX

# Samples packed together per datasets.map batch; rows never span two batches, so memory stays bounded.
PACK_BATCH = 10_000
# Open rows a sample may still be placed into (first-fit over a bounded window keeps packing O(n)).
OPEN_ROWS = 32

ROW_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "position_ids": datasets.Sequence(datasets.Value("int32")),
    }
)


def assign_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Group sample indices into rows of total length <= max_length, first-fit over recent open rows."""
    rows: list[list[int]] = []
    free: list[int] = []  # free space of rows[open_start:]
    open_start = 0
    for index, length in enumerate(lengths):
        for k, space in enumerate(free):
            if length <= space:
                rows[open_start + k].append(index)
                free[k] -= length
                break
        else:
            rows.append([index])
            free.append(max_length - length)
            if len(free) > OPEN_ROWS:  # close the oldest row: it stays as it is
                free.pop(0)
                open_start += 1
    return rows


def pack_batch(batch: dict[str, list], max_length: int, pad_token_id: int) -> dict[str, list]:
    """datasets.map(batched=True) function: samples in, packed rows out."""
    out = {"input_ids": [], "labels": [], "position_ids": []}
    for row in assign_rows([len(ids) for ids in batch["input_ids"]], max_length):
        input_ids, labels, position_ids = [], [], []
        for index in row:
            ids = batch["input_ids"][index]
            input_ids.extend(ids)
            labels.extend(batch["labels"][index])
            position_ids.extend(range(len(ids)))
        pad = max_length - len(input_ids)
        input_ids.extend([pad_token_id] * pad)
        labels.extend([IGNORE_INDEX] * pad)
        position_ids.extend(range(pad))
        out["input_ids"].append(input_ids)
        out["labels"].append(labels)
        out["position_ids"].append(position_ids)
    return out


def pack_samples(samples: datasets.Dataset, max_length: int, pad_token_id: int, **map_kwargs) -> datasets.Dataset:
    """Packed rows of ``samples`` (which hold input_ids and labels, each at most max_length long)."""
    return samples.map(
        pack_batch,
        batched=True,
        batch_size=PACK_BATCH,
        fn_kwargs={"max_length": max_length, "pad_token_id": pad_token_id},
        remove_columns=samples.column_names,
        features=ROW_FEATURES,
        desc="packing",
        **map_kwargs,
    )
