"""The training data pipeline: formats, assistant masking, packing, splits, caching, batching, errors."""

import json
import logging
import os
import time
from pathlib import Path

import datasets
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from swiftkv_train.data import (
    IGNORE_INDEX,
    DataConfig,
    SourceConfig,
    build_datasets,
    coerce_data_config,
    collate,
    make_dataloader,
)
from swiftkv_train.data import builder as data_builder
from swiftkv_train.data.formats import SkipRecord, resolve_mapper
from swiftkv_train.data.packing import assign_rows
from swiftkv_train.data.tokenization import tokenize_messages
from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.models.tiny import byte_tokenizer

datasets.disable_progress_bars()
END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def qa_records(n: int, start: int = 0) -> list[dict]:
    # Varying lengths so that packing has something to do.
    return [{"question": f"q{i}: what is {i} + {i}?", "answer": f"a{i}: " + "x" * (i % 7) + f" = {2 * i}"}
            for i in range(start, start + n)]


def config(tmp_path: Path, data: Path, **overrides) -> DataConfig:
    source_fields = {k: overrides.pop(k) for k in list(overrides) if k in SourceConfig.__dataclass_fields__}
    fields = dict(max_length=256, pack=False, cache_dir=str(tmp_path / "cache"), use_cache=False)
    fields.update(overrides)
    return DataConfig(sources=[SourceConfig(path=str(data), **source_fields)], **fields)


def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids])


def label_runs(tok, labels) -> list[str]:
    """The texts of each maximal run of trained (label != -100) tokens."""
    runs, current = [], []
    for label in list(labels) + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(int(label))
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


def all_texts(tok, dataset) -> list[str]:
    return [decode(tok, dataset[i]["input_ids"]) for i in range(len(dataset))]


# --------------------------------------------------------------------------- formats


def test_instruction_formats_map_to_user_and_assistant():
    gsm = resolve_mapper(SourceConfig(format="auto"), ["question", "answer"])
    assert gsm.format == "gsm8k"
    assert gsm({"question": "Q?", "answer": "A."}) == [
        {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]

    alpaca = resolve_mapper(SourceConfig(format="auto"), ["instruction", "input", "output"])
    assert alpaca.format == "alpaca"
    assert alpaca({"instruction": "Sum.", "input": "1 2", "output": "3"})[0]["content"] == "Sum.\n\n1 2"
    assert alpaca({"instruction": "Hi.", "input": "", "output": "Hello"})[0]["content"] == "Hi."

    custom = resolve_mapper(SourceConfig(prompt_field="q", response_field="a", system_prompt="Be brief."),
                            ["q", "a", "other"])
    assert custom.format == "prompt_response"
    assert custom({"q": "x", "a": "y"}) == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]

    # OpenOrca style: a per-record system prompt column, falling back to the fixed one when empty.
    orca = resolve_mapper(SourceConfig(prompt_field="question", response_field="response",
                                       system_field="system_prompt", system_prompt="Default."),
                          ["system_prompt", "question", "response"])
    assert orca({"system_prompt": "Think.", "question": "x", "response": "y"})[0]["content"] == "Think."
    assert orca({"system_prompt": "", "question": "x", "response": "y"})[0]["content"] == "Default."


def test_chat_formats_openai_and_sharegpt():
    chat = resolve_mapper(SourceConfig(), ["messages"])
    turns = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert chat({"messages": turns}) == turns

    share = resolve_mapper(SourceConfig(format="chat"), ["conversations", "id"])
    assert share.messages_field == "conversations"
    record = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "u"},
                                {"from": "gpt", "value": "a"}]}
    assert [m["role"] for m in share(record)] == ["system", "user", "assistant"]
    assert [m["content"] for m in share(record)] == ["s", "u", "a"]


def test_missing_values_skip_and_missing_columns_raise():
    gsm = resolve_mapper(SourceConfig(format="gsm8k"), ["question", "answer"])
    with pytest.raises(SkipRecord, match="missing field 'answer'"):
        gsm({"question": "Q?", "answer": None})
    with pytest.raises(SwiftKVInputError, match="'answer'"):
        resolve_mapper(SourceConfig(format="gsm8k"), ["question", "solution"])
    with pytest.raises(SwiftKVInputError, match="cannot tell the record format"):
        resolve_mapper(SourceConfig(), ["body"])


# --------------------------------------------------------------------------- masking


def test_assistant_only_labels_are_content_plus_end_token(tok):
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "second"},
                {"role": "assistant", "content": "héllo\nworld"}]
    sample = tokenize_messages(tok, messages, max_length=4096, mask_inputs=True, end_of_turn=END)
    assert decode(tok, sample["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
    assert label_runs(tok, sample["labels"]) == ["first answer" + END, "héllo\nworld" + END]
    # Labels are aligned with input_ids (the model shifts them), so trained positions hold the input token.
    trained = [(i, l) for i, l in zip(sample["input_ids"], sample["labels"]) if l != IGNORE_INDEX]
    assert all(i == l for i, l in trained)


def test_mask_inputs_false_trains_on_all_but_the_first_token(tok):
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    sample = tokenize_messages(tok, messages, max_length=4096, mask_inputs=False, end_of_turn=END)
    assert sample["labels"][0] == IGNORE_INDEX
    assert sample["labels"][1:] == sample["input_ids"][1:]


def test_built_dataset_masks_each_sample(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(6))
    train, eval_ = build_datasets(config(tmp_path, data), tok)
    assert eval_ is None and len(train) == 6
    answers = {r["answer"] + END for r in qa_records(6)}
    for i in range(len(train)):
        item = train[i]
        assert set(item) == {"input_ids", "labels", "position_ids", "attention_mask"}
        runs = label_runs(tok, item["labels"])
        assert len(runs) == 1 and runs[0] in answers
        assert torch.equal(item["position_ids"], torch.arange(len(item["input_ids"])))


# --------------------------------------------------------------------------- packing


def test_assign_rows_places_every_sample_once_within_capacity():
    lengths = [5, 9, 3, 10, 1, 7, 2, 8]
    rows = assign_rows(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 5  # first fit: [5,3,1], [9], [10], [7,2], [8]


@pytest.mark.parametrize("mask_inputs", [True, False])
def test_packed_rows_restart_positions_and_never_cross_samples(tmp_path, tok, mask_inputs):
    records = qa_records(40)
    data = write_jsonl(tmp_path / "d.jsonl", records)
    max_length = 160
    train, _ = build_datasets(config(tmp_path, data, pack=True, max_length=max_length, mask_inputs=mask_inputs), tok)
    expected = {tok.apply_chat_template([{"role": "user", "content": r["question"]},
                                         {"role": "assistant", "content": r["answer"]}], tokenize=False)
                for r in records}
    seen = []
    assert len(train) < len(records)  # several samples per row
    for i in range(len(train)):
        row = train[i]
        assert set(row) == {"input_ids", "labels", "position_ids"}  # no attention_mask: packed-sequence mode
        assert all(len(v) == max_length for v in row.values())
        starts = (row["position_ids"] == 0).nonzero().flatten().tolist() + [max_length]
        for start, end in zip(starts, starts[1:]):
            pos, ids, labels = (row[k][start:end] for k in ("position_ids", "input_ids", "labels"))
            assert torch.equal(pos, torch.arange(end - start))  # positions restart per sample
            assert labels[0] == IGNORE_INDEX  # nothing predicts a sample's first token from the previous one
            text = decode(tok, ids)
            if (ids == tok.pad_token_id).all():
                assert (labels == IGNORE_INDEX).all()  # tail padding is its own block, untrained
                continue
            assert text in expected  # each block is exactly one whole sample
            seen.append(text)
            if mask_inputs:
                assert label_runs(tok, labels) == [text.split("assistant\n")[1].removesuffix("\n")]
            else:
                assert torch.equal(labels[1:], ids[1:])
    assert sorted(seen) == sorted(expected)


def test_truncation_is_counted_and_logged(tmp_path, tok, caplog):
    records = qa_records(5) + [{"question": "long?", "answer": "y" * 500} for _ in range(3)]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="swiftkv_train.data"):
        train, _ = build_datasets(config(tmp_path, data, max_length=64), tok)
    assert train.stats["sources"][0]["truncated"] == 3
    assert "truncated 3 of 8 samples to max_length=64" in caplog.text
    assert max(len(train[i]["input_ids"]) for i in range(len(train))) == 64


# --------------------------------------------------------------------------- order and splits


def test_shuffle_is_deterministic_by_seed(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(30))
    order = [all_texts(tok, build_datasets(config(tmp_path, data, seed=s), tok)[0]) for s in (1, 1, 2)]
    assert order[0] == order[1]
    assert order[0] != order[2] and sorted(order[0]) == sorted(order[2])


def test_eval_split_is_disjoint_and_deterministic(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(30))
    train, eval_ = build_datasets(config(tmp_path, data, eval_samples=6), tok)
    train_texts, eval_texts = set(all_texts(tok, train)), set(all_texts(tok, eval_))
    assert len(eval_texts) == 6 and len(train_texts) == 24
    assert not train_texts & eval_texts
    _, again = build_datasets(config(tmp_path, data, eval_samples=6), tok)
    assert set(all_texts(tok, again)) == eval_texts
    _, other_seed = build_datasets(config(tmp_path, data, eval_samples=6, seed=7), tok)
    assert set(all_texts(tok, other_seed)) != eval_texts
    _, by_fraction = build_datasets(config(tmp_path, data, eval_fraction=0.1), tok)
    assert len(by_fraction) == 3


def test_sample_count_takes_a_seeded_subset(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(30))
    first = all_texts(tok, build_datasets(config(tmp_path, data, sample_count=10), tok)[0])
    again = all_texts(tok, build_datasets(config(tmp_path, data, sample_count=10), tok)[0])
    assert len(first) == 10 and first == again


def test_text_files_become_windows_with_every_token_trained(tmp_path, tok):
    folder = tmp_path / "essays"
    folder.mkdir()
    docs = {"a.txt": "Short essay.\nTwo lines.", "b.txt": "".join(f"sentence {i}. " for i in range(40))}
    for name, text in docs.items():
        (folder / name).write_text(text)
    train, _ = build_datasets(config(tmp_path, folder, max_length=64), tok)  # auto-detected: the "text" column
    eos = tok.eos_token_id
    for i in range(len(train)):
        ids, labels = train[i]["input_ids"].tolist(), train[i]["labels"].tolist()
        assert labels[0] == IGNORE_INDEX and labels[1:] == ids[1:]  # no chat template, all trained
    ids_a = tok(docs["a.txt"], add_special_tokens=False)["input_ids"] + [eos]
    ids_b = tok(docs["b.txt"], add_special_tokens=False)["input_ids"] + [eos]
    assert len(ids_b) > 128
    windows = sorted(row["input_ids"].tolist() for row in (train[i] for i in range(len(train))))
    expected = sorted([ids_a] + [ids_b[s : s + 64] for s in range(0, len(ids_b), 64) if len(ids_b[s : s + 64]) > 1])
    assert windows == expected  # one record per file (newlines kept), long documents cut, nothing dropped
    assert train.stats["sources"][0]["records"] == 2 and train.stats["sources"][0]["truncated"] == 0


def test_text_field_of_json_records(tmp_path, tok):
    data = write_jsonl(tmp_path / "t.jsonl", [{"body": "hello there", "id": 1}])
    train, _ = build_datasets(config(tmp_path, data, format="text", text_field="body"), tok)
    assert decode(tok, train[0]["input_ids"]) == "hello there" + tok.eos_token
    with pytest.raises(SwiftKVInputError, match="no field 'text'"):
        build_datasets(config(tmp_path, data, format="text"), tok)


def test_repeat_upsamples_training_samples_only(tmp_path, tok):
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_records(20))
    notes = write_jsonl(tmp_path / "notes.jsonl", [{"text": f"note number {i}"} for i in range(6)])
    base = dict(max_length=256, pack=False, use_cache=False, eval_samples=5)

    def build(repeat):
        cfg = DataConfig(sources=[SourceConfig(path=str(qa)), SourceConfig(path=str(notes), repeat=repeat)], **base)
        train, eval_ = build_datasets(cfg, tok)
        return all_texts(tok, train), all_texts(tok, eval_)

    train_1, eval_1 = build(1)
    train_3, eval_3 = build(3)
    assert eval_3 == eval_1  # the eval split is drawn before upsampling
    notes_1 = [t for t in train_1 if t.startswith("note")]
    assert sorted(t for t in train_3 if t.startswith("note")) == sorted(notes_1 * 3)
    assert sorted(t for t in train_3 if not t.startswith("note")) == sorted(t for t in train_1 if not t.startswith("note"))
    assert not set(train_3) & set(eval_3)
    tail = train_3[-2 * len(notes_1):]
    assert not all(t.startswith("note") for t in tail)  # the copies are shuffled in, not appended
    with pytest.raises(SwiftKVInputError, match="repeat=0"):
        build(0)


# --------------------------------------------------------------------------- caching


def test_second_build_loads_the_cache_without_tokenizing(tmp_path, tok, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(20))
    calls = []
    real = data_builder.tokenize_record
    monkeypatch.setattr(data_builder, "tokenize_record", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = config(tmp_path, data, use_cache=True, pack=True, max_length=128, eval_samples=2)

    first, first_eval = build_datasets(cfg, tok)
    assert len(calls) == 20
    entries = [p for p in (tmp_path / "cache").iterdir() if (p / "stats.json").is_file()]
    assert len(entries) == 1 and (entries[0] / "train").is_dir() and (entries[0] / "eval").is_dir()
    assert not any(".tmp-" in p.name for p in (tmp_path / "cache").iterdir())

    second, second_eval = build_datasets(cfg, tok)
    assert len(calls) == 20  # cache hit: nothing re-tokenized
    assert all_texts(tok, second) == all_texts(tok, first)
    assert all_texts(tok, second_eval) == all_texts(tok, first_eval)
    assert second.stats == first.stats

    build_datasets(config(tmp_path, data, use_cache=True, pack=True, max_length=96, eval_samples=2), tok)
    assert len(calls) == 40  # another max_length is another entry
    write_jsonl(data, qa_records(21))
    build_datasets(cfg, tok)
    assert len(calls) == 61  # changed data file: rebuilt


def test_distributed_ranks_wait_for_rank_zero_and_load_its_cache(tmp_path, tok):
    """Two gloo ranks: rank 0 tokenizes, rank 1 waits at the barrier and only loads."""
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(12))
    results = run_two_ranks(tmp_path, tok, data)
    assert results[0]["tokenized"] == 12 and results[1]["tokenized"] == 0
    assert results[0]["texts"] == results[1]["texts"] and len(results[0]["texts"]) > 0


def test_distributed_rank_zero_failure_reaches_every_rank(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": None}] * 3)
    results = run_two_ranks(tmp_path, tok, data)  # a hang here (rank 1 stuck at the barrier) fails by timeout
    assert "all 3 records were skipped" in results[0]["error"]
    assert "rank 0 failed" in results[1]["error"] and "all 3 records were skipped" in results[1]["error"]
    assert results[1]["tokenized"] == 0


def run_two_ranks(tmp_path: Path, tok, data: Path, timeout: float = 60.0) -> list[dict]:
    # Ranks load one saved tokenizer, as in training (byte_tokenizer() may number bytes differently per process).
    tok.save_pretrained(str(tmp_path / "tokenizer"))
    # fork: no re-import of torch/transformers per rank (spawn costs ~8 s on 2 cores).
    context = torch.multiprocessing.start_processes(_rank_main, args=(tmp_path, data), nprocs=2, join=False,
                                                    start_method="fork")
    try:
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "ranks did not finish: a rank is stuck at a barrier"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _rank_main(rank: int, tmp_path: Path, data: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=rank, world_size=2)
    calls, result = [], {}
    try:
        tok = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
        real = data_builder.tokenize_record
        data_builder.tokenize_record = lambda *a, **k: calls.append(1) or real(*a, **k)
        train, _ = build_datasets(config(tmp_path, data, use_cache=True, pack=True, max_length=128), tok)
        result["texts"] = all_texts(tok, train)
    except SwiftKVInputError as err:
        result["error"] = str(err)
    finally:
        result["tokenized"] = len(calls)
        (tmp_path / f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


# --------------------------------------------------------------------------- batching


@pytest.fixture
def packed_rows(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(60))
    train, _ = build_datasets(config(tmp_path, data, pack=True, max_length=64), tok)
    return train


def test_dataloader_shards_ranks_disjointly_and_deterministically(packed_rows):
    n = len(packed_rows)
    loaders = [make_dataloader(packed_rows, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    shards = [[i for batch in loader.batch_sampler for i in batch] for loader in loaders]
    assert not set(shards[0]) & set(shards[1])
    assert len(shards[0]) == len(shards[1]) == (n // 4) * 2
    again = make_dataloader(packed_rows, batch_size=2, seed=3, rank=0, world_size=2)
    assert [i for batch in again.batch_sampler for i in batch] == shards[0]
    other = make_dataloader(packed_rows, batch_size=2, seed=4, rank=0, world_size=2)
    assert [i for batch in other.batch_sampler for i in batch] != shards[0]
    batch = next(iter(loaders[0]))
    assert batch["input_ids"].shape == (2, 64) and set(batch) == {"input_ids", "labels", "position_ids"}
    assert torch.equal(batch["input_ids"][0], packed_rows[shards[0][0]]["input_ids"])


def test_dataloader_start_step_equals_slicing(packed_rows):
    full = list(make_dataloader(packed_rows, batch_size=2, seed=5, rank=1, world_size=2))
    resumed = make_dataloader(packed_rows, batch_size=2, seed=5, rank=1, world_size=2, start_step=3)
    assert len(resumed) == len(full) - 3
    rest = list(resumed)
    assert len(rest) == len(full) - 3
    for a, b in zip(rest, full[3:]):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_unpacked_batches_are_padded_with_attention_mask(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(8))
    train, _ = build_datasets(config(tmp_path, data), tok)
    loader = make_dataloader(train, batch_size=4, seed=0, shuffle=False)
    batch = next(iter(loader))
    lengths = [len(train[i]["input_ids"]) for i in range(4)]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert torch.equal(batch["input_ids"][0, : lengths[0]], train[0]["input_ids"])


def test_collate_pads_unpacked_samples():
    items = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]),
              "position_ids": torch.arange(3), "attention_mask": torch.ones(3, dtype=torch.long)},
             {"input_ids": torch.tensor([8]), "labels": torch.tensor([-100]),
              "position_ids": torch.arange(1), "attention_mask": torch.ones(1, dtype=torch.long)}]
    batch = collate(items, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# --------------------------------------------------------------------------- errors and sources


def test_empty_file_names_the_source(tmp_path, tok):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    with pytest.raises(SwiftKVInputError, match="empty.jsonl.*is empty"):
        build_datasets(config(tmp_path, data), tok)


def test_missing_path_is_an_input_error(tmp_path, tok):
    with pytest.raises(SwiftKVInputError, match="does not exist"):
        build_datasets(config(tmp_path, tmp_path / "nope.jsonl"), tok)


def test_all_records_missing_a_field_is_an_error(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": None} for i in range(4)])
    with pytest.raises(SwiftKVInputError, match=r"all 4 records were skipped: missing field 'answer' \(4\)"):
        build_datasets(config(tmp_path, data, format="gsm8k"), tok)


def test_no_assistant_tokens_for_all_records_is_an_error(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    with pytest.raises(SwiftKVInputError, match="all 3 records were skipped: no assistant tokens"):
        build_datasets(config(tmp_path, data), tok)


def test_some_bad_records_are_skipped_counted_and_logged(tmp_path, tok, caplog):
    good = [{"messages": [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5)]
    no_assistant = [{"messages": [{"role": "user", "content": "only a question"}]}] * 2
    missing = [{"messages": None}] * 3
    data = write_jsonl(tmp_path / "d.jsonl", good + no_assistant + missing)
    with caplog.at_level(logging.WARNING, logger="swiftkv_train.data"):
        train, _ = build_datasets(config(tmp_path, data), tok)
    assert len(train) == 5
    assert "skipped 3 samples: missing field 'messages'" in caplog.text
    assert "skipped 2 samples: no assistant tokens" in caplog.text
    assert train.stats["sources"][0]["skipped"] == {"missing field 'messages'": 3,
                                                    "no assistant tokens (no assistant turn)": 2}


def test_parquet_source_and_two_sources_mix(tmp_path, tok):
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(qa_records(4)).to_parquet(str(parquet))
    chat = write_jsonl(tmp_path / "c.jsonl", [{"conversations": [{"from": "human", "value": "hey"},
                                                                  {"from": "gpt", "value": "ho"}]}])
    cfg = DataConfig(sources=[SourceConfig(path=str(parquet)), SourceConfig(path=str(chat))], use_cache=False,
                     pack=False)
    train, _ = build_datasets(cfg, tok)
    assert len(train) == 5
    assert sorted(r for i in range(5) for r in label_runs(tok, train[i]["labels"]))[-1] == "ho" + END


def test_shipped_gsm8k_subset(tok):
    folder = Path(data_builder.__file__).parent / "gsm8k"
    assert (folder / "LICENSE").read_text().startswith("MIT License")
    assert os.path.getsize(folder / "train.jsonl") < 1_000_000
    cfg = DataConfig(sources=[SourceConfig(path="builtin:gsm8k", sample_count=8)], use_cache=False, pack=False)
    train, _ = build_datasets(cfg, tok)
    assert train.stats["sources"][0]["records"] == 8 and len(train) == 8
    assert label_runs(tok, train[0]["labels"])[0].split("####")[-1].strip().rstrip(END).strip().isdigit()


def test_data_config_is_a_hydra_schema():
    schema = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(schema, {"max_length": 512, "sources": [{"path": "x.jsonl", "sample_count": 3}]})
    cfg = coerce_data_config(merged)
    assert isinstance(cfg, DataConfig) and cfg.max_length == 512
    assert cfg.sources[0] == SourceConfig(path="x.jsonl", sample_count=3)
    assert coerce_data_config({"sources": ["a.jsonl"], "pack": False}).sources[0].path == "a.jsonl"
    with pytest.raises(SwiftKVInputError, match="unknown data config field"):
        coerce_data_config({"max_len": 3})
