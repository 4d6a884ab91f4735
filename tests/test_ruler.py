"""RULER-style suite: generators against hand-computed answers, exact lengths, seeding, the cache, RULER's metrics,
the suite end to end on a tiny random model (full cache == transformers' greedy generate), and the real SmolLM2
tokenizer's lengths."""

import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from swiftkv_train.errors import SwiftKVInputError
from swiftkv_train.eval import evaluate
from swiftkv_train.eval.ruler import TASKS, Resources, score, string_match_all, string_match_part
from swiftkv_train.eval.ruler import data as ruler_data
from swiftkv_train.eval.ruler.data import cache_key, generate, load_samples, sources_fingerprint, \
    tokenizer_fingerprint
from swiftkv_train.eval.ruler.generators import zeta
from swiftkv_train.eval.ruler.haystack import Stream, depth_offsets, insert
from swiftkv_train.models import load_pretrained

from helpers import one_thread  # noqa: F401 - autouse: every test here runs on one thread

_SYLLABLES = "ba be bi bo bu da de di do du ka ke ki ko ku la le li lo lu ma me mi mo mu".split()
WORDS = [a + b for a in _SYLLABLES for b in _SYLLABLES] + (
    "apple anchor basket butter candle castle dinner dragon eagle engine falcon forest garden giant harbor "
    "hammer island ivory jacket jungle kettle kingdom ladder lemon marble meadow needle nickel orange oyster "
    "parrot pepper quarry quilt rabbit river saddle silver table tiger umbrella uncle valley violin walnut "
    "window yellow yogurt zebra zipper bridge cotton desert feather glacier helmet insect jewel lantern mirror "
    "noodle pillow rocket sunset thunder velvet wagon").split()
SYNTHETIC = [t for t in TASKS if TASKS[t].family != "qa"]
# Long enough for every synthetic task with the byte-level tiny tokenizer (one token per byte).
LENGTH = {"vt": 2000, "cwe": 2200, "fwe": 1200, "qa_1": 700, "qa_2": 700}


def _essay(seed: int) -> str:
    rng = random.Random(seed)
    sentences = []
    for _ in range(150):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 10))]
        sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
    return " ".join(sentences)


@pytest.fixture(scope="module")
def essays(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ruler_essays")
    for i in range(2):
        (folder / f"essay{i}.txt").write_text(_essay(i))
    return folder


@pytest.fixture(scope="module")
def tiny():
    return load_pretrained("random:tiny")


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ruler_qa")
    squad = [
        {"title": "Rivers", "context": "The Nile is the longest river in Africa. It flows north.",
         "question": "Which river is the longest in Africa?", "answers": {"text": ["The Nile", "Nile"]}},
        {"title": "Rivers", "context": "The Amazon carries more water than any other river.",
         "question": "Which river carries the most water?", "answers": {"text": ["The Amazon"]}},
        {"title": "Rivers", "context": "The Nile is the longest river in Africa. It flows north.",
         "question": "Is there a river on the moon?", "answers": {"text": []}},  # unanswerable: skipped
        {"title": "Birds", "context": "Penguins cannot fly but swim very well.",
         "question": "What can penguins do well?", "answers": {"text": ["swim"]}},
        {"title": "Stars", "context": "The Sun is a star at the centre of the solar system.",
         "question": "What is at the centre of the solar system?", "answers": {"text": ["The Sun"]}},
    ]
    hotpot = [
        {"question": "Which city hosts the museum founded by Ada?", "answer": "Paris",
         "context": {"title": ["Ada", "Museum"],
                     "sentences": [["Ada founded the Lumen museum. ", "She was a painter."],
                                   ["The Lumen museum is in Paris."]]}},
        {"question": "Who wrote the Blue Book?", "answer": "Tom",
         "context": {"title": ["Blue Book", "Tom"],
                     "sentences": [["The Blue Book was written by Tom."], ["Tom is a writer from Oslo."]]}},
    ]
    paths = {}
    for name, rows in (("squad", squad), ("hotpotqa", hotpot)):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


@pytest.fixture(scope="module")
def res(tiny, essays, qa_files):
    texts = [p.read_text() for p in sorted(essays.glob("*.txt"))]
    return Resources(tiny[1], texts, {k: str(v) for k, v in qa_files.items()})


def _gen(res, task, length=None, index=0, seed=0):
    samples = generate(res, task, length or LENGTH.get(task, 1000), index + 1, seed)
    return samples[index]


def _text(tok, ids):
    return tok.decode(ids)


def _body(tok, sample):
    off = sample.meta["body_offset"]
    return tok.decode(sample.context_ids[off : off + sample.meta["body_tokens"]])


# --- metrics ---------------------------------------------------------------------------------------------------

def test_rulers_metrics_on_hand_made_strings():
    assert string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"]) == 2 / 3
    assert string_match_all("APPLE-Tree and pear", ["apple-tree", "Pear"]) == 1.0  # case-insensitive
    assert string_match_all("nothing here", ["x1"]) == 0.0
    assert string_match_part("It is the Nile.", ["The Amazon", "nile"]) == 1.0
    assert string_match_part("It is the Congo.", ["The Amazon", "nile"]) == 0.0
    # RULER's post-processing: control characters become newlines, then stripped; a reference across them fails
    assert score("all", "\t 12\x0034 \n", ["12", "34"]) == 1.0 and score("all", "12\x0134", ["1234"]) == 0.0
    assert score("part", " Answer: swim", ["swim", "fly"]) == 1.0


# --- haystack mechanics, by hand -------------------------------------------------------------------------------

def test_depths_go_back_to_the_last_sentence_end_and_insert_keeps_order():
    stream = Stream(ids=list(range(100)), starts=[0, 10, 20, 30, 40, 50, 60, 70, 80, 90])
    # depth 33% of 100 tokens = 33 -> back to 30; 5% = 5 -> 0; 100% = 100 -> 90 (the last start); 46% = 46 -> 40
    assert depth_offsets(stream, [33, 5, 100, 46]) == [30, 0, 90, 40]
    body, landed = insert(Stream([1, 2, 3, 4], [0, 2]), [(2, [8, 8]), (0, [9]), (2, [7])])
    assert body == [9, 1, 2, 8, 8, 7, 3, 4] and landed == [3, 0, 5]


def test_zeta_is_pi_squared_over_six():
    assert zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=1e-13, abs=0)
    assert zeta(3.0) == pytest.approx(1.2020569031595942, rel=1e-13, abs=0)


# --- generators ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", SYNTHETIC + ["qa_1", "qa_2"])
def test_every_task_is_exact_seeded_and_holds_its_answer(res, task):
    tok = res.tokenizer
    length = LENGTH.get(task, 1000)
    a, again, other = _gen(res, task, length), _gen(res, task, length), _gen(res, task, length, seed=1)
    budget = TASKS[task].spec.max_new_tokens
    assert a.prompt_tokens == length - budget  # RULER's length: prompt + the task's answer budget
    assert (a.context_ids, a.question_ids, a.answers) == (again.context_ids, again.question_ids, again.answers)
    assert a.context_ids != other.context_ids
    context, question = _text(tok, a.context_ids), _text(tok, a.question_ids)
    for answer in a.answers:
        assert answer.lower() in context.lower()
        assert answer.lower() not in question.lower()
    # the question comes after the context, ends the user turn and opens the assistant's with the answer prefix
    assert question.startswith(a.meta["question"]) and question.endswith(a.meta["answer_prefix"])
    assert "<|im_start|>assistant\n" in question
    assert a.meta["question"] not in context or task == "cwe"  # cwe's worked example asks the same question


def test_niah_single_needle_text_question_and_position(res):
    tok = res.tokenizer
    s = _gen(res, "niah_single_1", 900)
    key, value = s.meta["keys"][0], s.meta["values"][0][0]
    assert re.fullmatch(r"[a-z]+-[a-z]+", key) and re.fullmatch(r"\d{7}", value) and s.answers == [value]
    needle = f"One of the special magic numbers for {key} is: {value}.\n"
    start = s.meta["needle_offsets"][0]
    assert tok.decode(s.context_ids[start : start + len(needle)]) == needle  # bytes: one token each
    assert tok.decode(s.context_ids[:start]).endswith(("again.\n", "afterwards.\n"))  # at a line start
    assert _text(tok, s.context_ids).count(needle) == 1 and "The grass is green. The sky is blue." in _body(tok, s)
    intro = "A special magic number is hidden within the following text."  # RULER's singular wording
    assert intro in _text(tok, s.context_ids)
    assert _text(tok, s.question_ids).startswith(
        f"What is the special magic number for {key} mentioned in the provided text?")
    assert _text(tok, s.question_ids).endswith(f"The special magic number for {key} mentioned in the provided text is")


def test_niah_essay_needles_sit_after_sentence_ends_at_their_depths(res):
    tok = res.tokenizer
    s = _gen(res, "niah_multikey_1", 1600)
    off, body_len = s.meta["body_offset"], s.meta["body_tokens"]
    needle_lens = [len(" " + n) for n in s.meta["needles"]]
    hay_len = body_len - sum(needle_lens)
    for i, (start, depth) in enumerate(zip(s.meta["needle_offsets"], s.meta["depths"])):
        before = tok.decode(s.context_ids[off:start])
        hay_before = start - off - sum(needle_lens[:i])  # haystack tokens before this needle
        assert hay_before <= round(depth / 100 * hay_len)  # at or before its depth ...
        assert hay_before == 0 or before.rstrip()[-1] in ".!?"  # ... just after a sentence end
        assert tok.decode(s.context_ids[start : start + needle_lens[i]]) == " " + s.meta["needles"][i]


def test_multikey_distractors_are_present_and_differ_from_the_queried_key(res):
    tok = res.tokenizer
    for task, pattern in (("niah_multikey_1", r"[a-z]+-[a-z]+"), ("niah_multikey_2", r"[a-z]+-[a-z]+"),
                          ("niah_multikey_3", r"[0-9a-f-]{36}")):
        s = _gen(res, task, 1600)
        context = _text(tok, s.context_ids)
        found = re.findall(rf"One of the special magic (?:numbers|uuids) for ({pattern}) is: ([0-9a-f-]+)\.", context)
        keys = [k for k, _ in found]
        query = s.meta["query"]
        assert keys.count(query) == 1 and len(keys) == len(set(keys)) >= 4, task
        assert [v for k, v in found if k == query] == s.answers
        assert all(v not in s.answers for k, v in found if k != query)
    s = _gen(res, "niah_multikey_3", 1600)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s.answers[0])


def test_multivalue_and_multiquery(res):
    tok = res.tokenizer
    mv = _gen(res, "niah_multivalue", 1600)
    key = mv.meta["query"]
    found = re.findall(rf"for {key} is: (\d+)\.", _text(tok, mv.context_ids))
    assert sorted(found) == sorted(mv.answers) and len(set(found)) == 4
    assert "What are all the special magic numbers for" in _text(tok, mv.question_ids)
    mq = _gen(res, "niah_multiquery", 1600)
    keys = [k for k in mq.meta["keys"]]
    queried = mq.meta["query"].replace(", and ", ", ").split(", ")
    assert len(queried) == 4 and sorted(queried) == sorted(keys) and ", and " in mq.meta["query"]
    values = dict(re.findall(r"for ([a-z]+-[a-z]+) is: (\d+)\.", _text(tok, mq.context_ids)))
    assert mq.answers == [values[k] for k in queried]


def _resolve(lines: list[str]) -> dict[str, str]:
    """A tiny interpreter for the VAR lines: every variable's final value."""
    direct, refs = {}, {}
    for line in lines:
        name, rhs = re.fullmatch(r"VAR (\w+) = (.+?)\s*", line).groups()
        (refs if rhs.startswith("VAR ") else direct)[name] = rhs.removeprefix("VAR ")
    values = dict(direct)
    while refs:
        ready = {n: values[r] for n, r in refs.items() if r in values}
        assert ready, "a variable refers to nothing"
        values.update(ready)
        refs = {n: r for n, r in refs.items() if n not in ready}
    return values


def test_variable_tracking_chain_resolves_to_the_answers(res):
    tok = res.tokenizer
    s = _gen(res, "vt", 2000)
    body = _body(tok, s)
    value = s.meta["query"]
    values = _resolve(re.findall(r"VAR \w+ = (?:VAR \w+|\d+) ?", body))
    assert sorted(n for n, v in values.items() if v == value) == sorted(s.answers) and len(s.answers) == 5
    assert [len(n) for n in s.answers] == [5] * 5
    # the chain is in order: each assignment after the one it reads
    order = [body.index(f"VAR {n} =") for n in s.answers]
    assert order == sorted(order)
    # RULER's worked example precedes the task: its own chain (3-letter names) and its answer
    context = _text(tok, s.context_ids)
    example = context[: context.index("Memorize and track", context.index("they are:"))]
    example_value = re.search(r"assigned the value (\d+) in the text above", example).group(1)
    answer = example.split("they are: ")[-1].split()
    ex_values = _resolve(re.findall(r"VAR \w+ = (?:VAR \w+|\d+) ?", example.split("Question:")[0]))
    assert sorted(answer) == sorted(n for n, v in ex_values.items() if v == example_value) and len(answer) == 5
    # RULER's example fits 500 tokens but keeps at least one noise line per assignment: 5 lines, here (bytes)
    assert example.count("The grass is green.") == 5
    assert _text(tok, s.question_ids).startswith(f"Question: Find all variables that are assigned the value {value}")


def _numbered_words(text: str) -> list[str]:
    items = re.findall(r"(\d+)\. ([a-z]+)", text)
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))  # numbered 1..n without a gap
    return [w for _, w in items]


def test_common_words_counts(res):
    tok = res.tokenizer
    s = _gen(res, "cwe", 2200)
    counts = Counter(_numbered_words(_body(tok, s)))
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(s.answers) and len(s.answers) == 10
    assert all(counts[w] == 6 for w in s.answers)  # RULER below 4096 tokens: 6 repeats, others once
    assert all(c == 1 for w, c in counts.items() if w not in s.answers) and len(counts) > 10
    longest = max(len(f" {i + 1}. {w}") for i, w in enumerate(_numbered_words(_body(tok, s))))
    assert s.meta["pad_tokens"] < longest  # the rest of the list's tokens: less than one more entry
    # the worked example: 20 words, its 10 common ones 3 times each, listed as its answer
    context = _text(tok, s.context_ids)
    example = context[context.index("Below is a numbered list") : context.index("Question:")]
    ex_counts = Counter(_numbered_words(example))
    first_answer = context.index("most often in the list are:")
    answer_text = context[first_answer : context.index("Below is", first_answer)]
    assert sorted(_numbered_words(answer_text)) == sorted(w for w, c in ex_counts.items() if c == 3)
    assert sorted(ex_counts.values()) == [1] * 10 + [3] * 10


def test_common_words_from_4096_use_rulers_30_and_3_repeats(res):
    s = _gen(res, "cwe", 6000)
    counts = Counter(_numbered_words(_body(res.tokenizer, s)))
    assert all(counts[w] == 30 for w in s.answers) and {c for w, c in counts.items() if w not in s.answers} == {3}


def test_frequent_words_follow_the_zeta_counts(res):
    tok = res.tokenizer
    s = _gen(res, "fwe", 1200)
    words = _body(tok, s).split()
    counts = Counter(words)
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[0] == "..." and ranked[1:4] == s.answers
    n = s.meta["num_words"]
    expected = [int(n * k**-2 / (math.pi**2 / 6)) for k in range(1, 6)]
    assert [counts[w] for w in ranked[:5]] == expected
    assert s.meta["vocab_size"] == (1200 - 50) // 50 and all(re.fullmatch(r"[a-z]{6}", w) for w in ranked[1:])


def test_qa_documents(res, qa_files):
    tok = res.tokenizer
    s = _gen(res, "qa_1", 700)
    context = _text(tok, s.context_ids)
    assert s.answers == ["The Nile", "Nile"]
    assert "The Nile is the longest river in Africa. It flows north." in context
    # the other paragraph of the same article is preferred over other articles' ones; all fit here
    assert "The Amazon carries more water" in context
    docs = re.findall(r"Document (\d+):\n", context)
    assert docs == [str(i) for i in range(1, len(docs) + 1)]
    assert _text(tok, s.question_ids).startswith("Answer the question based on the given documents. Only give me "
                                                  "the answer and do not output any other words.\n\nQuestion: "
                                                  "Which river is the longest in Africa?")
    # sample 2 is the third answerable question (the unanswerable one is skipped)
    assert _gen(res, "qa_1", 700, index=2).answers == ["swim"]
    h = _gen(res, "qa_2", 700)
    text = _text(tok, h.context_ids)
    assert h.answers == ["Paris"] and "Ada\nAda founded the Lumen museum. She was a painter." in text
    assert "Museum\nThe Lumen museum is in Paris." in text


def test_qa_official_files_read_as_the_hub_rows(qa_files, tmp_path):
    """RULER downloads dev-v2.0.json and hotpot_dev_distractor_v1.json: they give the same questions and documents
    as the Hub datasets' rows (the .jsonl fixtures)."""
    from swiftkv_train.eval.ruler.qa import load_qa

    rows = [json.loads(line) for line in qa_files["squad"].read_text().splitlines()]
    articles = {}
    for r in rows:
        paragraphs = articles.setdefault(r["title"], {})
        paragraphs.setdefault(r["context"], []).append(
            {"question": r["question"], "answers": [{"text": t} for t in r["answers"]["text"]],
             "is_impossible": not r["answers"]["text"]})
    official = {"data": [{"title": t, "paragraphs": [{"context": c, "qas": q} for c, q in ps.items()]}
                         for t, ps in articles.items()]}
    (tmp_path / "squad.json").write_text(json.dumps(official))
    assert load_qa("squad", str(tmp_path / "squad.json")) == load_qa("squad", str(qa_files["squad"]))
    hot = [json.loads(line) for line in qa_files["hotpotqa"].read_text().splitlines()]
    for r in hot:
        r["context"] = [[t, s] for t, s in zip(r["context"]["title"], r["context"]["sentences"])]
    (tmp_path / "hotpot.json").write_text(json.dumps(hot))
    data = load_qa("hotpotqa", str(tmp_path / "hotpot.json"))
    assert data == load_qa("hotpotqa", str(qa_files["hotpotqa"]))
    assert [q["outputs"] for q in data.questions] == [["Paris"], ["Tom"]] and len(data.docs) == 4


# --- cache -----------------------------------------------------------------------------------------------------

def test_samples_are_cached_on_disk_and_keyed_by_settings(res, tmp_path, monkeypatch):
    monkeypatch.setattr(ruler_data, "_MEMO", {})
    fp = tokenizer_fingerprint(res.tokenizer)
    sources = sources_fingerprint(res.texts, res.qa_sources)
    key = cache_key("niah_single_2", 900, 2, 7, fp, sources)
    first, origin = load_samples(res, "niah_single_2", 900, 2, 7, str(tmp_path), key)
    assert origin == "generated" and len(list(tmp_path.glob("niah_single_2-900-*.jsonl"))) == 1
    monkeypatch.setattr(ruler_data, "_MEMO", {})
    second, origin = load_samples(res, "niah_single_2", 900, 2, 7, str(tmp_path), key)
    assert origin == "cache" and [s.to_json() for s in second] == [s.to_json() for s in first]
    assert cache_key("niah_single_2", 900, 2, 8, fp, sources) != key  # seed
    assert cache_key("niah_single_2", 1000, 2, 7, fp, sources) != key  # length
    assert cache_key("niah_single_2", 900, 2, 7, fp + "x", sources) != key  # tokenizer
    assert cache_key("niah_single_2", 900, 2, 7, fp, {**sources, "haystack": "other"}) != key
    monkeypatch.setattr(ruler_data, "GENERATOR_VERSION", ruler_data.GENERATOR_VERSION + 1)
    assert cache_key("niah_single_2", 900, 2, 7, fp, sources) != key


# --- the suite -------------------------------------------------------------------------------------------------

def test_suite_end_to_end_full_cache_matches_transformers_and_snapkv_compresses_the_context(tiny, essays, tmp_path):
    model, tok = tiny
    ruler = {"tasks": ["niah_single_1", "fwe"], "lengths": [700, 800], "samples": 2, "max_new_tokens": 4,
             "haystack": str(essays), "cache_dir": str(tmp_path / "cache")}
    res = evaluate(model, tok, "ruler", progress=False, ruler=ruler, out_dir=tmp_path / "out",
                   policies={"names": ["snapkv"], "budget": "4x"})
    runs = res["ruler"]
    assert [(r["policy"], r["task"]) for r in runs] == [
        ("full", "niah_single_1"), ("full", "fwe"), ("snapkv@4x", "niah_single_1"), ("snapkv@4x", "fwe")]
    for r in runs:
        assert [(t["length"], t["index"]) for t in r["trials"]] == [(700, 0), (700, 1), (800, 0), (800, 1)]
        for t in r["trials"]:
            assert t["score"] == score(TASKS[r["task"]].spec.metric, t["output"], t["answers"])
            assert t["context_tokens"] + t["question_tokens"] == t["prompt_tokens"]
            assert t["prompt_tokens"] == t["length"] - TASKS[r["task"]].spec.max_new_tokens
        assert r["score"] == pytest.approx(100 * sum(t["score"] for t in r["trials"]) / 4)
        assert r["by_length"]["700"] == pytest.approx(50 * sum(t["score"] for t in r["trials"][:2]))
    full, snap = runs[0], runs[2]
    assert full["compression_ratio"] == 0 and all(t["kv_tokens_held"] == t["context_tokens"] for t in full["trials"])
    # kvpress's ratio: a quarter of the CONTEXT kept (the question is appended after compression)
    for t in snap["trials"]:
        assert t["kv_tokens_held"] == t["context_tokens"] // 4
        assert t["compression_ratio"] == pytest.approx(1 - (t["context_tokens"] // 4) / t["context_tokens"])
    assert snap["nominal_compression_ratio"] == 0.75 and snap["settings"]["policy"]["name"] == "snapkv"
    # the full cache's answer is transformers' own greedy generation on context + question
    sample = ruler_data.generate(Resources(tok, [p.read_text() for p in sorted(essays.glob("*.txt"))]),
                                 "niah_single_1", 700, 1, 42)[0]
    prompt = torch.tensor([sample.context_ids + sample.question_ids])
    reference = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                               pad_token_id=tok.pad_token_id or 0)[0, prompt.shape[1]:]
    assert full["trials"][0]["output"] == tok.decode(reference, skip_special_tokens=True).strip()
    assert (tmp_path / "out" / "ruler_heatmap.png").stat().st_size > 0
    assert (tmp_path / "out" / "ruler_score_vs_ratio.png").stat().st_size > 0
    # one run directory per (model, policy@ratio, task); a second invocation reads them back instead of running
    run = tmp_path / "out" / "model" / "snapkv@4x" / "fwe"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["score"] == pytest.approx(runs[3]["score"]) and metrics["compression_ratio"] > 0.74
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 4
    (run / "metrics.json").write_text(json.dumps({**metrics, "score": 12.5}))  # marks the saved run
    again = evaluate(model, tok, "ruler", progress=False, ruler=ruler, out_dir=tmp_path / "out",
                     policies={"names": ["snapkv"], "budget": "4x"})["ruler"]
    assert [r["score"] for r in again] == [r["score"] for r in runs[:3]] + [12.5]
    assert [t["output"] for t in again[3]["trials"]] == [t["output"] for t in runs[3]["trials"]]


def test_plot_script_reads_results_of_several_runs(tmp_path):
    from importlib import util

    spec = util.spec_from_file_location("plot_ruler", Path(__file__).parents[1] / "scripts" / "plot_ruler.py")
    plot_ruler = util.module_from_spec(spec)
    spec.loader.exec_module(plot_ruler)

    def result(policy, name, ratio, task, s):
        return {"model": "m", "policy": policy, "policy_name": name, "task": task, "score": s,
                "by_length": {"1024": s, "2048": s / 2}, "compression_ratio": ratio}

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps({"ruler": [result("full", "full", 0, "vt", 90),
                                                                      result("h2o@50%", "h2o", 0.5, "vt", 60)]}))
    layout = tmp_path / "b" / "m" / "h2o@4x" / "vt"
    layout.mkdir(parents=True)
    (layout / "metrics.json").write_text(json.dumps(result("h2o@4x", "h2o", 0.75, "vt", 30)))
    (tmp_path / "b" / "other.json").write_text("{}")
    found = plot_ruler.collect([tmp_path])
    assert sorted((r["policy"], r["score"]) for r in found) == [("full", 90), ("h2o@4x", 30), ("h2o@50%", 60)]
    assert plot_ruler.main([str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["ruler_heatmap.png", "ruler_score_vs_ratio.png"]


def test_bad_ruler_settings_fail_before_any_model_runs(tiny, essays, tmp_path):
    model, tok = tiny
    base = {"haystack": str(essays), "cache_dir": None, "samples": 1, "lengths": [800]}
    with pytest.raises(SwiftKVInputError, match="ruler.tasks: unknown \\['niah_single_9'\\]"):
        evaluate(model, tok, "ruler", progress=False, ruler={**base, "tasks": ["niah_single_9"]})
    with pytest.raises(SwiftKVInputError, match="ruler.lengths: 200 is too short for vt"):
        evaluate(model, tok, "ruler", progress=False, ruler={**base, "tasks": ["vt"], "lengths": [200]})
    with pytest.raises(SwiftKVInputError, match="ruler.squad='/no/such.jsonl' does not exist"):
        evaluate(model, tok, "ruler", progress=False, ruler={**base, "tasks": ["qa_1"], "squad": "/no/such.jsonl"})
    with pytest.raises(SwiftKVInputError, match="ruler.lengths: \\[3000\\] exceed"):
        evaluate(model, tok, "ruler", progress=False, ruler={**base, "tasks": ["fwe"], "lengths": [3000]})


# --- the real tokenizer ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_smollm2_tokenizer_lengths_are_exact(smollm2, qa_files):
    _, tok = smollm2
    essays = Path("/work/shared/data/pg_essays")
    if not essays.is_dir():
        pytest.skip("needs /work/shared/data/pg_essays")
    from swiftkv_train.eval.text_source import load_texts

    res = Resources(tok, load_texts(str(essays)), {k: str(v) for k, v in qa_files.items()})
    for task in TASKS:
        for length in (1024, 4096) if task == "cwe" else (1024, 2048):
            s = generate(res, task, length, 1, 0)[0]
            assert s.prompt_tokens == length - TASKS[task].spec.max_new_tokens, (task, length)
            if TASKS[task].args.get("haystack") == "essay":  # BPE sentence ends: needles go after one
                body_start = s.meta["body_offset"]
                for offset in s.meta["needle_offsets"]:
                    before = tok.decode(s.context_ids[body_start:offset]).rstrip()
                    assert offset == body_start or re.search(r"[.!?][\"')\]]*$", before), (task, before[-40:])
            if task == "vt":  # RULER's worked example: at most 500 tokens before its answer
                assert 400 < s.meta["icl_tokens"] <= 500 + len(tok(" " + " ".join(["ABC"] * 5) + "\n").input_ids)
            context = tok.decode(s.context_ids)
            assert all(a.lower() in context.lower() for a in s.answers), (task, length)
