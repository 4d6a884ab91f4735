"""Haystacks as token streams with the places a needle may go, and needle insertion.

RULER has three haystacks: ``essay`` (the Paul Graham essays, whitespace collapsed; needles go between
sentences, at depths drawn from 40 evenly spaced percentages), ``noise`` (one sentence group repeated, one per
line; needles go before random lines) and ``needle`` (lines that are themselves needles with other keys). Here
each is a stream of token ids truncated to the exact length the body leaves, with ``starts``: the token offsets
where a needle may be inserted (after a sentence end; at a line start).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ...errors import SwiftKVInputError

__all__ = ["NOISE", "DEPTHS", "Stream", "essay_stream", "line_stream", "sample_depths", "depth_offsets",
           "random_starts", "insert", "pad"]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# RULER's needle depths: np.round(np.linspace(0, 100, num=40)).
DEPTHS = [round(100 * i / 39) for i in range(40)]
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s*$")


@dataclass
class Stream:
    ids: list[int]
    starts: list[int]  # sorted offsets where an insertion may go (0 always included)


def essay_tokens(tokenizer, texts: list[str]) -> list[int]:
    """The essays as RULER uses them: joined, every whitespace run collapsed to one space."""
    return tokenizer(re.sub(r"\s+", " ", " ".join(texts)).strip(), add_special_tokens=False).input_ids


def sentence_end_ids(tokenizer, token_ids: list[int]) -> set[int]:
    """The token ids (among ``token_ids``) whose text ends a sentence."""
    unique = sorted(set(token_ids))
    texts = tokenizer.batch_decode([[t] for t in unique])
    return {t for t, text in zip(unique, texts) if _SENTENCE_END.search(text)}


def essay_stream(essay: list[int], ends: set[int], n: int) -> Stream:
    """``n`` essay tokens (the essays repeated if short); insertions go after sentence ends."""
    ids = (essay * (n // len(essay) + 1))[:n]
    return Stream(ids, [0] + [i + 1 for i, t in enumerate(ids[:-1]) if t in ends])


def line_stream(lines, n: int) -> Stream:
    """The first ``n`` tokens of the lines (token id lists, each ending in a newline) from the iterator
    ``lines``; insertions go at line starts."""
    ids: list[int] = []
    starts = []
    for line in lines:
        if len(ids) >= n:
            break
        starts.append(len(ids))
        ids.extend(line)
    return Stream(ids[:n], starts)


def sample_depths(rng: random.Random, count: int) -> list[int]:
    """RULER's essay placement: ``count`` distinct depths (percent) from DEPTHS, sorted."""
    return sorted(rng.sample(DEPTHS, count))


def depth_offsets(stream: Stream, depths: list[int]) -> list[int]:
    """Each depth's token offset (``round(depth% x stream length)``) moved back to the last insertion point
    (sentence end) at or before it."""
    return [max(s for s in stream.starts if s <= round(depth / 100 * len(stream.ids))) for depth in depths]


def random_starts(stream: Stream, rng: random.Random, count: int) -> list[int]:
    """RULER's line placement: ``count`` distinct random line starts, sorted."""
    if count > len(stream.starts):
        raise SwiftKVInputError(f"ruler.lengths: too short, the haystack has {len(stream.starts)} lines for {count} "
                                "inserted lines. Use longer lengths.")
    return sorted(rng.sample(stream.starts, count))


def insert(stream: Stream, pieces: list[tuple[int, list[int]]]) -> tuple[list[int], list[int]]:
    """``pieces`` (offset in the stream, ids) inserted; equal offsets keep their order. Returns the ids and where
    each piece landed (its first token), in the order given."""
    order = sorted(range(len(pieces)), key=lambda i: (pieces[i][0], i))
    out: list[int] = []
    landed = [0] * len(pieces)
    cursor = 0
    for i in order:
        offset, piece = pieces[i]
        out.extend(stream.ids[cursor:offset])
        cursor = offset
        landed[i] = len(out)
        out.extend(piece)
    out.extend(stream.ids[cursor:])
    return out, landed


def pad(body: list[int], budget: int, newline: list[int]) -> tuple[list[int], int]:
    """Fill ``body`` up to ``budget`` tokens with newline tokens (tasks whose body is whole items: list entries,
    coded words); returns the body and how many were added."""
    missing = budget - len(body)
    return body + (newline * missing)[:missing], missing
