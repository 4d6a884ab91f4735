"""The synthetic task families (RULER's scripts/data/synthetic/*.py), written from their definitions.

Each generator gets the task's arguments, the shared `Resources` (tokenizer, haystack, word list), a seeded
``random.Random`` of its own and the length, and returns a `Sample` of exactly ``length - answer budget`` prompt
tokens. Where RULER fits a body by binary search on a word/line/document count and stops at "at most the
length", this fills the rest too: token-level truncation of a haystack (essay, noise and needle lines, as
needle.py does), and for tasks made of whole items (cwe, fwe) the last few tokens are newlines, recorded per
sample as ``pad_tokens``.
"""

from __future__ import annotations

import math
import random
import string
from functools import cached_property

from ...errors import SwiftKVInputError
from .haystack import NOISE, depth_offsets, essay_stream, essay_tokens, insert, line_stream, pad, random_starts, \
    sample_depths, sentence_end_ids
from .prompt import Sample, assemble, chat_parts, frame, ids
from .tasks import FAMILIES, Task
from .words import draw_distinct, hyphenated, random_key, vocabulary

__all__ = ["Resources", "NEEDLE", "niah", "variable_tracking", "common_words", "freq_words", "GENERATORS",
           "zeta"]

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
ICL_TOKENS = 500  # RULER's variable-tracking example is generated at max_seq_length=500


class Resources:
    """What every sample of one tokenizer shares, computed once: chat template pieces, essays, word list."""

    def __init__(self, tokenizer, texts: list[str], qa_sources: dict[str, str] | None = None):
        self.tokenizer = tokenizer
        self.texts = texts
        self.qa_sources = qa_sources or {}
        self.chat = chat_parts(tokenizer)
        self.newline = ids(tokenizer, "\n")
        self._qa: dict = {}

    @cached_property
    def words(self) -> list[str]:
        return vocabulary(self.texts)

    @cached_property
    def text_pairs(self) -> set[str]:
        return hyphenated(self.texts)

    @cached_property
    def essay(self) -> list[int]:
        return essay_tokens(self.tokenizer, self.texts)

    @cached_property
    def sentence_ends(self) -> set[int]:
        return sentence_end_ids(self.tokenizer, self.essay)

    @cached_property
    def noise_line(self) -> list[int]:
        return ids(self.tokenizer, NOISE + "\n")

    def qa(self, dataset: str):
        from .qa import load_qa

        if dataset not in self._qa:
            self._qa[dataset] = load_qa(dataset, self.qa_sources.get(dataset, "hub"))
        return self._qa[dataset]

    def frame(self, family, fields, preamble=""):
        return frame(self.tokenizer, family, fields, preamble, self.chat)

    def batch_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False).input_ids if texts else []


def _room(budget: int, pieces: list[list[int]], task: str, length: int) -> int:
    """Haystack tokens left once the needles are in (at least one line or sentence's worth is needed)."""
    room = budget - sum(map(len, pieces))
    if room < 8:
        raise SwiftKVInputError(f"ruler.lengths: {length} is too short for {task}: its needles alone fill the "
                                "context. Use longer lengths.")
    return room


def _repeat(line):
    while True:
        yield line


def niah(task: Task, res: Resources, rng: random.Random, length: int, index: int) -> Sample:
    a = task.args
    family = FAMILIES["niah"]
    kind_k, kind_v = a["type_needle_k"], a["type_needle_v"]
    num_k, num_v, num_q = max(a["num_needle_k"], a["num_needle_q"]), a["num_needle_v"], a["num_needle_q"]
    taken = set(res.text_pairs)
    keys = draw_distinct(rng, kind_k, num_k, res.words, taken)
    values = [draw_distinct(rng, kind_v, num_v, res.words, taken) for _ in keys]
    needles = [NEEDLE.format(type_needle_v=kind_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    queried = rng.sample(range(num_k), num_q)
    queries = [keys[i] for i in queried]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    answers = [v for i in queried for v in values[i]]
    type_v = kind_v
    if num_q * num_v == 1:  # RULER's singular wording, applied to the template text (never to the haystack)
        family = _singular(family)
        type_v = kind_v[:-1]
    fr = res.frame(family, {"type_needle_v": type_v, "query": query})
    budget = fr.body_budget(length - family.max_new_tokens, task.name, length)
    meta = {"keys": keys, "values": values, "query": query, "haystack": a["haystack"]}
    if a["haystack"] == "essay":
        pieces = [ids(res.tokenizer, " " + n) for n in needles]
        stream = essay_stream(res.essay, res.sentence_ends, _room(budget, pieces, task.name, length))
        meta["depths"] = sample_depths(rng, len(pieces))
        offsets = depth_offsets(stream, meta["depths"])
    else:
        pieces = res.batch_ids([n + "\n" for n in needles])
        hay = _room(budget, pieces, task.name, length)
        if a["haystack"] == "noise":
            stream = line_stream(_repeat(res.noise_line), hay)
        else:  # "needle": every line a needle with another key (distinct from the real ones) and value
            stream = line_stream(_distractors(res, rng, kind_k, kind_v, taken), hay)
        offsets = random_starts(stream, rng, len(pieces))
    body, landed = insert(stream, list(zip(offsets, pieces)))
    meta["needles"] = needles
    meta["needle_offsets"] = [len(fr.prefix) + p for p in landed]
    return assemble(task.name, length, index, fr, body, answers, family.max_new_tokens, meta)


def _singular(family):
    from dataclasses import replace

    def fix(text: str) -> str:
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            text = text.replace(old, new)
        return text

    return replace(family, intro=fix(family.intro), question=fix(family.question),
                   answer_prefix=fix(family.answer_prefix))


def _distractors(res: Resources, rng: random.Random, kind_k: str, kind_v: str, taken: set[str]):
    while True:
        lines = [NEEDLE.format(type_needle_v=kind_v, key=draw_distinct(rng, kind_k, 1, res.words, taken)[0],
                               value=random_key(rng, kind_v, res.words, set())) + "\n" for _ in range(64)]
        yield from res.batch_ids(lines)


def _var_names(rng: random.Random, count: int, letters: int, taken: set[str]) -> list[str]:
    names = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _chains(rng, num_chains: int, num_hops: int, letters: int, taken: set[str]):
    """RULER's chains: ``VAR A = 12345``, then ``VAR B = VAR A `` ... (num_hops links), one value per chain."""
    names = [_var_names(rng, num_hops + 1, letters, taken) for _ in range(num_chains)]
    chains, values = [], []
    for chain in names:
        values.append(str(rng.randint(10000, 99998)))
        chains.append([f"VAR {chain[0]} = {values[-1]}"] + [f"VAR {chain[j + 1]} = VAR {chain[j]} "
                                                             for j in range(num_hops)])
    return names, chains, values


def _vt_icl(res: Resources, rng, num_chains: int, num_hops: int, taken: set[str]) -> str:
    """RULER's one worked example before the task: the same task on noise, at most ICL_TOKENS tokens, with its
    answer (3-letter names, as RULER's randomised example has)."""
    family = FAMILIES["variable_tracking"]
    names, chains, values = _chains(rng, num_chains, num_hops, 3, taken)
    fields = {"query": values[0], "num_v": num_hops + 1}

    def text(lines: int, layout: random.Random) -> str:
        sentences = [NOISE] * lines
        for chain in chains:
            for j, position in enumerate(sorted(layout.sample(range(len(sentences)), len(chain)))):
                sentences.insert(position + j, chain[j])
        return (family.intro + "\n".join(sentences) + family.after + family.question.format(**fields)
                + family.answer_prefix.format(**fields))

    seed = rng.random()
    best = max(1, num_hops + 1)
    for lines in range(best, 200):  # the most noise lines that keep the example within ICL_TOKENS
        if len(ids(res.tokenizer, text(lines, random.Random(seed)))) > ICL_TOKENS:
            break
        best = lines
    return text(best, random.Random(seed)) + " " + " ".join(names[0]) + "\n"


def variable_tracking(task: Task, res: Resources, rng: random.Random, length: int, index: int) -> Sample:
    a = task.args
    family = FAMILIES["variable_tracking"]
    taken: set[str] = set()
    names, chains, values = _chains(rng, a["num_chains"], a["num_hops"], 5, taken)
    icl = _vt_icl(res, rng, a["num_chains"], a["num_hops"], taken)
    fr = res.frame(family, {"query": values[0], "num_v": a["num_hops"] + 1}, preamble=icl)
    budget = fr.body_budget(length - family.max_new_tokens, task.name, length)
    lines = [res.batch_ids([line + "\n" for line in chain]) for chain in chains]
    stream = line_stream(_repeat(res.noise_line), _room(budget, [p for chain in lines for p in chain], task.name,
                                                        length))
    pieces = []
    for chain in lines:
        pieces += list(zip(random_starts(stream, rng, len(chain)), chain))
    body, landed = insert(stream, pieces)
    meta = {"chains": chains, "query": values[0], "icl_tokens": len(ids(res.tokenizer, icl)),
            "chain_offsets": [len(fr.prefix) + p for p in landed]}
    return assemble(task.name, length, index, fr, body, names[0], family.max_new_tokens, meta)


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _word_list(rng, chosen: list[str], common_repeats: int, uncommon_repeats: int, common: int):
    """RULER's cwe list from ``chosen`` distinct words: the first ``common`` repeated ``common_repeats`` times, the
    others ``uncommon_repeats`` times, shuffled."""
    listed = chosen[:common] * common_repeats + chosen[common:] * uncommon_repeats
    rng.shuffle(listed)
    return listed, chosen[:common]


def common_words(task: Task, res: Resources, rng: random.Random, length: int, index: int) -> Sample:
    a = task.args
    family = FAMILIES["common_words_extraction"]
    cn = a["num_cw"]
    # RULER: below 4096 tokens a lighter list (6 / 1 repeats, example 3 / 1), from 4096 on freq_cw / freq_ucw.
    (shot_n, shot_c, shot_u), (freq_c, freq_u) = ((20, 3, 1), (6, 1)) if length < 4096 else \
        ((40, 10, 3), (a["freq_cw"], a["freq_ucw"]))
    shot, shot_answer = _word_list(rng, rng.sample(res.words, shot_n), shot_c, shot_u, cn)
    preamble = (family.intro + _numbered(shot) + family.after + family.question + family.answer_prefix + " "
                + _numbered(shot_answer) + "\n")
    fr = res.frame(family, {}, preamble=preamble)
    budget = fr.body_budget(length - family.max_new_tokens, task.name, length)
    seed = rng.random()
    order = rng.sample(res.words, len(res.words))  # n words = the first n: the list grows with n, one fit search

    def build(num_words: int):
        listed, common = _word_list(random.Random(f"{seed}/{num_words}"), order[:num_words], freq_c, freq_u, cn)
        items = res.batch_ids([f"{i + 1}. {w}" if i == 0 else f" {i + 1}. {w}" for i, w in enumerate(listed)])
        return [t for item in items for t in item], listed, common

    lo, hi = cn + 1, min(len(res.words), budget)  # each entry takes at least one token
    if len(build(lo)[0]) > budget:
        raise SwiftKVInputError(f"ruler.lengths: {length} is too short for cwe (its word list does not fit).")
    while lo < hi:  # the largest word count whose list fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(build(mid)[0]) <= budget else (lo, mid - 1)
    body, listed, common = build(lo)
    if lo == len(res.words) and budget - len(body) > 8:
        raise SwiftKVInputError(
            f"cwe at length {length} needs more distinct words than the haystack texts give ({len(res.words)}): "
            "use a larger ruler.haystack folder or shorter lengths."
        )
    body, padded = pad(body, budget, res.newline)
    meta = {"num_words": lo, "repeats": [freq_c, freq_u], "counts": {w: listed.count(w) for w in common},
            "pad_tokens": padded, "example_words": shot_n}
    return assemble(task.name, length, index, fr, body, common, family.max_new_tokens, meta)


def zeta(s: float, terms: int = 1000) -> float:
    """Riemann zeta for s > 1 (Euler-Maclaurin tail after ``terms`` terms; error far below float64 rounding for
    RULER's alpha = 2)."""
    n = terms
    head = math.fsum(k**-s for k in range(1, n))
    return head + n ** (1 - s) / (s - 1) + n**-s / 2 + s * n ** (-s - 1) / 12


def freq_words(task: Task, res: Resources, rng: random.Random, length: int, index: int) -> Sample:
    a = task.args
    family = FAMILIES["freq_words_extraction"]
    alpha, wordlen = a["alpha"], a["coded_wordlen"]
    vocab_size = (length - family.max_new_tokens) // 50  # RULER's default vocabulary size
    if vocab_size < 5:
        raise SwiftKVInputError(f"ruler.lengths: {length} is too short for fwe (vocabulary of {vocab_size} < 5).")
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=wordlen)))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    vocab[0] = "..."  # RULER: the most frequent "word" is noise, the answers are ranks 2-4
    fr = res.frame(family, {})
    budget = fr.body_budget(length - family.max_new_tokens, task.name, length)
    first = res.batch_ids(vocab)
    spaced = res.batch_ids([" " + w for w in vocab])
    zeta_alpha = zeta(alpha)
    seed = rng.random()

    def counts(num_words: int) -> list[int]:
        return [int(num_words * k**-alpha / zeta_alpha) for k in range(1, vocab_size + 1)]

    def build(num_words: int):
        order = [i for i, c in enumerate(counts(num_words)) for _ in range(c)]
        random.Random(f"{seed}/{num_words}").shuffle(order)
        return ([t for t in first[order[0]]] + [t for i in order[1:] for t in spaced[i]]) if order else []

    lo, hi = 1, budget * 2
    while lo < hi:  # the largest word count whose text fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(build(mid)) <= budget else (lo, mid - 1)
    c = counts(lo)
    if not c[3] > c[4]:
        raise SwiftKVInputError(f"ruler.lengths: {length} is too short for fwe (the top-3 words are not distinct).")
    body, padded = pad(build(lo), budget, res.newline)
    meta = {"num_words": lo, "counts": dict(zip(vocab[:5], c[:5])), "vocab_size": vocab_size, "pad_tokens": padded}
    return assemble(task.name, length, index, fr, body, vocab[1:4], family.max_new_tokens, meta)


def _qa(task: Task, res: Resources, rng: random.Random, length: int, index: int) -> Sample:
    from .qa import generate_qa

    return generate_qa(task, res, rng, length, index)


GENERATORS = {"niah": niah, "variable_tracking": variable_tracking, "common_words_extraction": common_words,
              "freq_words_extraction": freq_words, "qa": _qa}
