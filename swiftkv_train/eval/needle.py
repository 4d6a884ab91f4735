"""Needle-in-a-haystack and passkey retrieval, with prompts assembled from token ids so lengths are exact.

Prompt layout (token ids, each piece tokenized on its own and concatenated):

    [chat prefix + intro] [haystack before] [needle] [haystack after] [question + assistant turn + answer prefix]

The haystack gets exactly ``length - (all other pieces)`` tokens, so every prompt has EXACTLY the requested
length (slack 0). The needle goes after ``round(depth * haystack_tokens)`` haystack tokens; with
``snap_to_sentence`` it moves back to the end of the nearest preceding sentence if one ends within
``snap_window`` tokens (the achieved depth is recorded per trial). The assistant turn is opened and started with
the answer prefix ("The special magic number is"): the real SmolLM2 teacher retrieves reliably in this format
and not without it. Scoring: the first integer in the greedy continuation must equal the needle's number.

Context and question (``query_aware``): by default the prompt is split at the end of the haystack. The CONTEXT
(chat prefix + intro + haystack with the needle) is prefilled and compressed by the cache policy alone; the
QUESTION (question + assistant turn + answer prefix) is then appended to the compressed cache, never evicted and
never scored (`policies.greedy_generate(..., question_ids=...)`): question-independent compression, the field's
convention (kvpress). ``query_aware=true`` compresses the whole prompt, question included (the earlier behaviour,
which flatters query-aware policies). The token ids are the same either way; a fractional budget is a share of
the context in the first case and of the whole prompt in the second.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import SwiftKVInputError
from ..policies import greedy_generate
from .subjects import Subject, max_positions
from .text_source import load_texts

__all__ = ["Variant", "NEEDLE", "PASSKEY", "NeedlePrompt", "build_prompt", "haystack_ids", "score_answer",
           "run_retrieval", "check_config"]

_MARKER = "\u2063SWIFTKV_CONTEXT\u2063"


@dataclass(frozen=True)
class Variant:
    name: str
    intro: str  # text before the haystack, inside the user turn
    needle: str  # with {value}
    question: str
    answer_prefix: str


NEEDLE = Variant(
    name="needle",
    intro="",
    needle=" The special magic number is {value}. ",
    question="What is the special magic number mentioned in the text above?",
    answer_prefix="The special magic number is",
)
PASSKEY = Variant(
    name="passkey",
    intro=("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
           "I will quiz you about the important information there.\n"),
    needle=" The pass key is {value}. Remember it. {value} is the pass key. ",
    question="What is the pass key?",
    answer_prefix="The pass key is",
)
NOISE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclass
class NeedlePrompt:
    input_ids: list[int]
    value: str
    depth: float  # requested
    depth_actual: float  # tokens before the needle / haystack tokens
    tokens_before_needle: int
    haystack_tokens: int
    needle_tokens: int
    context_tokens: int  # input_ids[:context_tokens]: chat prefix + intro + haystack with needle; then the question


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def template_parts(tokenizer, question: str, answer_prefix: str, intro: str) -> tuple[list[int], list[int], bool]:
    """Token ids before and after the context: the chat template split around the user content."""
    content = f"{intro}{_MARKER}\n\n{question}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        chat = True
    else:
        text, chat = f"{content}\n", False
    before, after = text.split(_MARKER)
    return _ids(tokenizer, before), _ids(tokenizer, after + answer_prefix), chat


def haystack_ids(tokenizer, texts: list[str] | None, needed: int) -> list[int]:
    """At least ``needed`` haystack tokens: the essays in order, separated by blank lines, repeated if short;
    or (``texts`` None) the passkey noise sentences repeated."""
    pieces = [_ids(tokenizer, NOISE)] if texts is None else [_ids(tokenizer, t.strip() + "\n\n") for t in texts]
    if not any(pieces):
        raise SwiftKVInputError("the haystack text tokenizes to nothing.")
    ids: list[int] = []
    while len(ids) < needed:
        for piece in pieces:
            ids.extend(piece)
            if len(ids) >= needed:
                break
    return ids[:needed]


def _snap_back(tokenizer, hay: list[int], index: int, window: int) -> int:
    """Move ``index`` back to just after a sentence end within ``window`` tokens (unchanged if none)."""
    for cut in range(index, max(0, index - window) - 1, -1):
        if cut == 0:
            return 0
        if re.search(r"[.!?\n][\"')\]]*\s*$", tokenizer.decode([hay[cut - 1]])):
            return cut
    return index


def build_prompt(tokenizer, variant: Variant, hay_source: list[int], length: int, depth: float, value: str,
                 snap_to_sentence: bool = False, snap_window: int = 40) -> NeedlePrompt:
    """The prompt of exactly ``length`` tokens with the needle at ``depth`` (0..1) of the haystack."""
    if not 0 <= depth <= 1:
        raise SwiftKVInputError(f"needle depth {depth} must be between 0 and 1 (0-100%).")
    before, after, _ = template_parts(tokenizer, variant.question, variant.answer_prefix, variant.intro)
    needle = _ids(tokenizer, variant.needle.format(value=value))
    hay_len = length - len(before) - len(after) - len(needle)
    if hay_len < 1:
        raise SwiftKVInputError(
            f"context length {length} is too short: template, question and needle alone take "
            f"{length - hay_len} tokens. Use lengths above that."
        )
    if len(hay_source) < hay_len:
        raise SwiftKVInputError(f"haystack has {len(hay_source)} tokens, {hay_len} needed")
    hay = hay_source[:hay_len]
    cut = round(depth * hay_len)
    if snap_to_sentence:
        cut = _snap_back(tokenizer, hay, cut, snap_window)
    ids = before + hay[:cut] + needle + hay[cut:] + after
    return NeedlePrompt(ids, value, depth, cut / hay_len, cut, hay_len, len(needle), len(ids) - len(after))


def score_answer(generated: str, value: str) -> bool:
    """Exact match: the first integer in the continuation equals the needle's number."""
    match = re.search(r"\d+", generated)
    return bool(match) and match.group(0) == value


def _value(seed: int, variant: str, length: int, depth: float, sample: int, digits: int) -> str:
    rng = random.Random(f"{seed}/{variant}/{length}/{depth}/{sample}")
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def check_lengths(subject: Subject, lengths, max_new_tokens: int, field: str) -> None:
    limit = max_positions(subject.model)
    if not lengths:
        raise SwiftKVInputError(f"{field}.context_lengths is empty: give at least one length.")
    too_long = [n for n in lengths if limit and n + max_new_tokens > limit]
    if too_long:
        raise SwiftKVInputError(
            f"{field}.context_lengths {too_long} (+{max_new_tokens} answer tokens) exceed what model "
            f"{subject.name!r} supports ({limit} positions): use lengths <= {limit - max_new_tokens}."
        )


def check_config(subject: Subject, variant: Variant, cfg) -> list[str] | None:
    """Validate a retrieval section before any model runs; returns the haystack texts (None for passkey)."""
    field = variant.name
    check_lengths(subject, cfg.context_lengths, cfg.max_new_tokens, field)
    if not cfg.depths or any(not 0 <= float(d) <= 100 for d in cfg.depths):
        raise SwiftKVInputError(f"{field}.depths {list(cfg.depths)} must be percentages between 0 and 100.")
    if cfg.samples < 1 or not 1 <= cfg.digits <= 18 or cfg.max_new_tokens < 1:
        raise SwiftKVInputError(f"{field}.samples and max_new_tokens must be >= 1 and digits in 1..18.")
    texts = None if variant.name == "passkey" else load_texts(cfg.haystack, what=f"{field}.haystack")
    before, after, _ = template_parts(subject.tokenizer, variant.question, variant.answer_prefix, variant.intro)
    needle = _ids(subject.tokenizer, variant.needle.format(value="9" * cfg.digits))
    fixed = len(before) + len(after) + len(needle)
    short = [n for n in cfg.context_lengths if n <= fixed]
    if short:
        raise SwiftKVInputError(
            f"{field}.context_lengths {short} are too short: template, question and needle alone take about "
            f"{fixed} tokens with this tokenizer. Use lengths above that."
        )
    return texts


def run_retrieval(subject: Subject, variant: Variant, cfg, policy=None, policy_name: str = "full",
                  progress: bool = True) -> dict:
    """``cfg``: NeedleConfig (haystack, context_lengths, depths, samples, digits, max_new_tokens, seed, ...)."""
    texts = check_config(subject, variant, cfg)
    field = variant.name
    depths = [float(d) for d in cfg.depths]
    tokenizer = subject.tokenizer
    hay = haystack_ids(tokenizer, texts, max(cfg.context_lengths))
    eos = [t for t in (tokenizer.eos_token_id, getattr(subject.model.generation_config, "eos_token_id", None))
           if t is not None]
    eos = sorted({e for t in eos for e in (t if isinstance(t, list) else [t])})
    cells = [(n, d, s) for n in cfg.context_lengths for d in depths for s in range(cfg.samples)]
    trials = []
    with subject.active() as model:
        for length, depth, sample in tqdm(cells, desc=f"{field} {subject.name}/{policy_name}", disable=not progress,
                                          leave=False):
            value = _value(cfg.seed, variant.name, length, depth, sample, cfg.digits)
            prompt = build_prompt(tokenizer, variant, hay, length, depth / 100, value, cfg.snap_to_sentence)
            ids = torch.tensor([prompt.input_ids], device=model.device)
            context, question = (ids, None) if cfg.query_aware else \
                (ids[:, : prompt.context_tokens], ids[:, prompt.context_tokens :])
            out = greedy_generate(model, context, cfg.max_new_tokens, policy=policy, eos_token_id=eos,
                                  prefill_chunk=cfg.prefill_chunk, question_ids=question)
            text = tokenizer.decode(out.tokens[0], skip_special_tokens=True)
            trials.append({
                "length": length, "depth": depth, "sample": sample, "depth_actual": round(prompt.depth_actual, 4),
                "prompt_tokens": len(prompt.input_ids), "haystack_tokens": prompt.haystack_tokens,
                "tokens_before_needle": prompt.tokens_before_needle, "value": value, "output": text.strip(),
                "correct": score_answer(text, value),
                "context_tokens": context.shape[1], "question_tokens": out.question_tokens,
                "kv_tokens_held": out.tokens_held_after_prefill,
                "kv_context_tokens_held": out.tokens_held_after_context,
                "kv_bytes_per_token": out.cache_bytes_after_prefill / len(prompt.input_ids),
                "kv_peak_bytes": out.cache_bytes_peak, "prefill_s": round(out.prefill_seconds, 5),
            })
    by_length = {str(n): _mean([t["correct"] for t in trials if t["length"] == n]) for n in cfg.context_lengths}
    grid = {str(n): {str(d): _mean([t["correct"] for t in trials if t["length"] == n and t["depth"] == d])
                     for d in depths} for n in cfg.context_lengths}
    return {
        "model": subject.name, "policy": policy_name, "variant": variant.name,
        "accuracy": _mean([t["correct"] for t in trials]), "by_length": by_length, "grid": grid,
        "kv_bytes_per_token": _mean([t["kv_bytes_per_token"] for t in trials]),
        "kv_peak_bytes": max(t["kv_peak_bytes"] for t in trials),
        "prefill_s_by_length": {str(n): _mean([t["prefill_s"] for t in trials if t["length"] == n])
                                for n in cfg.context_lengths},
        "settings": {
            "haystack": None if texts is None else cfg.haystack, "context_lengths": list(cfg.context_lengths),
            "depths_percent": depths, "samples": cfg.samples, "digits": cfg.digits, "seed": cfg.seed,
            "max_new_tokens": cfg.max_new_tokens, "snap_to_sentence": cfg.snap_to_sentence,
            "prefill_chunk": cfg.prefill_chunk, "query_aware": cfg.query_aware,
            "question": variant.question, "answer_prefix": variant.answer_prefix,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)), "length_slack_tokens": 0,
            "policy": policy.settings() if policy is not None else {"name": "full"},
        },
        "trials": trials,
    }


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")
