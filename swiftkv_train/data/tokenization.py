"""Render a conversation with the tokenizer's chat template and label only the assistant tokens.

Assistant spans are found in the rendered *text* (by rendering prefixes of the conversation), then
mapped to tokens through the tokenizer's character offsets. Working in text space is what makes this
robust: tokenizing prefixes separately can merge differently at the boundary than the full text does.
"""

from typing import Any

from ..errors import SwiftKVInputError
from .formats import SkipRecord

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and HF's loss) ignores


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):  # older/newer transformers may wrap the text
        text = text[0] if isinstance(text, list) else str(text)
    return text


def check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise SwiftKVInputError(
            f"tokenizer {name!r} has no chat template, which the data pipeline needs to format samples. "
            f"Use an instruct/chat tokenizer or set tokenizer.chat_template."
        )


def assistant_char_spans(tokenizer, messages: list[dict], full_text: str, end_of_turn: str | None) -> list[tuple]:
    """[start, end) character spans of each assistant turn's content plus its end-of-turn marker."""
    spans = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = _span_from_prefixes(tokenizer, messages, i, full_text, cursor)
        if span is None:
            span = _span_from_search(message["content"], full_text, cursor, end_of_turn)
        if span is None:
            raise SkipRecord("assistant content not found in the chat template's output")
        start, end = span
        if end_of_turn:
            # The turn's rendering may continue past its end marker (ChatML adds "\n"): stop at the marker.
            marker = full_text.rfind(end_of_turn, start, end)
            if marker >= 0:
                end = marker + len(end_of_turn)
        spans.append((start, end))
        cursor = end
    return spans


def _span_from_prefixes(tokenizer, messages, i, full_text, cursor):
    """The text the template adds for turn i after the generation prompt, if renders are prefixes of each other."""
    try:
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        through_turn = render(tokenizer, messages[: i + 1])
    except Exception:  # templates may reject partial conversations (e.g. one starting with an assistant turn)
        return None
    if len(prompt) >= cursor and through_turn.startswith(prompt) and full_text.startswith(through_turn):
        return len(prompt), len(through_turn)
    return None


def _span_from_search(content: str, full_text: str, cursor: int, end_of_turn: str | None):
    """Fallback for templates that rewrite earlier turns: find the content itself after the last span."""
    content = content.strip()
    start = full_text.find(content, cursor) if content else -1
    if start < 0:
        return None
    end = start + len(content)
    if end_of_turn and full_text.startswith(end_of_turn, end):
        end += len(end_of_turn)
    return start, end


def tokenize_with_spans(tokenizer, text: str, spans: list[tuple]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and, per token, whether it starts inside one of ``spans``."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        in_span = [any(s <= start < e for s, e in spans) for start, _ in enc["offset_mapping"]]
        return ids, in_span
    # Slow tokenizers have no offsets: tokenize the pieces between span boundaries separately.
    ids, in_span, pos = [], [], 0
    for s, e in [*spans, (len(text), len(text))]:
        for piece, inside in ((text[pos:s], False), (text[s:e], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids.extend(piece_ids)
                in_span.extend([inside] * len(piece_ids))
        pos = e
    return ids, in_span


def tokenize_messages(
    tokenizer, messages: list[dict], max_length: int, mask_inputs: bool, end_of_turn: str | None
) -> dict[str, Any]:
    """input_ids, labels (assistant-only when mask_inputs) and whether the sample was truncated."""
    text = render(tokenizer, messages)
    has_assistant = any(m["role"] == "assistant" for m in messages)
    if mask_inputs and not has_assistant:
        raise SkipRecord("no assistant tokens (no assistant turn)")
    spans = assistant_char_spans(tokenizer, messages, text, end_of_turn) if mask_inputs else []
    input_ids, in_span = tokenize_with_spans(tokenizer, text, spans)
    if mask_inputs:
        labels = [tok if inside else IGNORE_INDEX for tok, inside in zip(input_ids, in_span)]
    else:
        labels = list(input_ids)
    if labels:
        # Nothing inside a sample predicts its first token; masking it also stops a packed row's previous
        # sample from being trained to predict the next sample's start.
        labels[0] = IGNORE_INDEX
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if len(input_ids) == 0:
        raise SkipRecord("empty after applying the chat template")
    if mask_inputs and all(label == IGNORE_INDEX for label in labels):
        reason = "no assistant tokens left after truncation" if truncated else "no assistant tokens"
        raise SkipRecord(reason)
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def tokenize_text(tokenizer, text: str, max_length: int) -> list[dict[str, Any]]:
    """A plain-text document as consecutive windows of at most ``max_length`` tokens, every token trained.

    The document ends with the tokenizer's EOS (so packed documents are separated as in pretraining). Each window's
    first label is masked: inside a window nothing predicts it."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise SkipRecord("empty text")
    windows = []
    for start in range(0, len(ids), max_length):
        window = ids[start : start + max_length]
        if len(window) < 2:  # a lone trailing token has nothing to train
            continue
        windows.append({"input_ids": window, "labels": [IGNORE_INDEX] + window[1:], "truncated": False})
    if not windows:
        raise SkipRecord("text too short (fewer than 2 tokens)")
    return windows
