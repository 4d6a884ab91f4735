"""Needle keys and values, and word lists, without a download.

RULER draws word keys as ``adjective-noun`` pairs and the common-words task's words from the wonderwords
package's noun/adjective/verb lists (with a downloaded English word list past them). Here every word comes from
the haystack texts themselves (the Paul Graham essays by default): their lowercase alphabetic words of 3-12
letters, deduplicated and sorted, so the list is the same on every machine. Keys are ``word-word`` pairs from it
(not adjective-noun: there is no part-of-speech list offline) that never occur in the texts. The words are thus
ordinary English a model has seen, as RULER's are, but drawn from a different (smaller, essay-flavoured) list.
"""

from __future__ import annotations

import random
import re
import uuid

from ...errors import SwiftKVInputError

__all__ = ["vocabulary", "hyphenated", "random_number", "random_uuid", "random_key", "draw_distinct"]

_WORD = re.compile(r"\b[a-z]{3,12}\b")
_HYPHENATED = re.compile(r"[a-z]+-[a-z]+")


def vocabulary(texts: list[str]) -> list[str]:
    """Sorted distinct lowercase words of 3-12 letters that appear in ``texts`` written in lowercase."""
    words = sorted({w for text in texts for w in _WORD.findall(text)})
    if len(words) < 50:
        raise SwiftKVInputError(
            f"the haystack texts have only {len(words)} distinct words: the RULER suite draws keys and word lists "
            "from them; use a larger ruler.haystack folder."
        )
    return words


def hyphenated(texts: list[str]) -> set[str]:
    """``word-word`` pairs that occur in ``texts`` (never used as keys, so a key is never found in the haystack)."""
    return {m.lower() for text in texts for m in _HYPHENATED.findall(text.lower())}


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_key(rng: random.Random, kind: str, words: list[str], taken: set[str]) -> str:
    """One value of ``kind`` (numbers, words, uuids); ``words`` pairs avoid ``taken`` (e.g. the texts' pairs)."""
    if kind == "numbers":
        return random_number(rng)
    if kind == "uuids":
        return random_uuid(rng)
    if kind == "words":
        while True:
            key = f"{rng.choice(words)}-{rng.choice(words)}"
            if key not in taken:
                return key
    raise SwiftKVInputError(f"needle type {kind!r}: use numbers, words or uuids.")


def draw_distinct(rng: random.Random, kind: str, count: int, words: list[str], taken: set[str]) -> list[str]:
    """``count`` distinct values of ``kind``, none in ``taken`` (which they are added to)."""
    out = []
    while len(out) < count:
        value = random_key(rng, kind, words, taken)
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out
