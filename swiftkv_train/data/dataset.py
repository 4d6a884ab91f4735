"""A torch Dataset view of a tokenized (and possibly packed) Arrow table."""

import datasets
import numpy as np
import torch


class TokenizedDataset(torch.utils.data.Dataset):
    """Items are dicts of 1-D int64 tensors: input_ids, labels, position_ids (+ attention_mask when not packed).

    Packed rows all have ``max_length`` tokens and no attention_mask (transformers then derives the
    per-sample mask from position_ids). Unpacked samples vary in length; the collator pads them.
    """

    def __init__(self, table: datasets.Dataset, packed: bool, pad_token_id: int, stats: dict | None = None):
        self.table = table.with_format("numpy")
        self.packed = packed
        self.pad_token_id = pad_token_id
        self.stats = stats or {}

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self._item(self.table[int(index)])

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        # One Arrow read for a whole batch instead of one per item.
        columns = self.table[list(map(int, indices))]
        return [self._item({k: v[i] for k, v in columns.items()}) for i in range(len(indices))]

    def _item(self, row: dict) -> dict[str, torch.Tensor]:
        input_ids = torch.as_tensor(np.asarray(row["input_ids"]), dtype=torch.long)
        item = {"input_ids": input_ids, "labels": torch.as_tensor(np.asarray(row["labels"]), dtype=torch.long)}
        if self.packed:
            item["position_ids"] = torch.as_tensor(np.asarray(row["position_ids"]), dtype=torch.long)
        else:
            item["position_ids"] = torch.arange(len(input_ids))
            item["attention_mask"] = torch.ones(len(input_ids), dtype=torch.long)
        return item
