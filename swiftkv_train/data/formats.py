"""Turn a raw record of any supported layout into a chat ``messages`` list of {role, content}."""

from dataclasses import dataclass

from ..errors import SwiftKVInputError
from .config import SourceConfig

# Field names per instruction format: (prompt, optional input, response).
DEFAULT_FIELDS: dict[str, tuple[str, str | None, str]] = {
    "alpaca": ("instruction", "input", "output"),
    "gsm8k": ("question", None, "answer"),
    "prompt_response": ("prompt", None, "response"),
}
# Chat columns tried in order: OpenAI style first, then ShareGPT style.
CHAT_FIELDS = ("messages", "conversations")
# The column of plain-text records (the Hub convention, and what .txt files load as).
TEXT_FIELD = "text"
# ShareGPT speaker names (and common variants) mapped to chat-template roles.
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}


class SkipRecord(Exception):
    """A record that cannot become a training sample; the reason is counted and logged, not raised."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RecordMapper:
    """Maps one record to messages; built once per source by :func:`resolve_mapper`."""

    format: str
    messages_field: str | None = None
    prompt_field: str | None = None
    input_field: str | None = None
    response_field: str | None = None
    system_field: str | None = None
    system_prompt: str | None = None
    text_field: str | None = None

    def text(self, record: dict) -> str:
        """The document of a ``text`` format record."""
        return _required_text(record, self.text_field)

    def __call__(self, record: dict) -> list[dict[str, str]]:
        if self.format == "chat":
            messages = self._chat_messages(record)
        else:
            messages = self._instruction_messages(record)
        system = record.get(self.system_field) if self.system_field else None
        if not (isinstance(system, str) and system.strip()):
            system = self.system_prompt
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + messages
        return messages

    def _instruction_messages(self, record: dict) -> list[dict[str, str]]:
        prompt = _required_text(record, self.prompt_field)
        response = _required_text(record, self.response_field)
        extra = record.get(self.input_field) if self.input_field else None
        if isinstance(extra, str) and extra.strip():
            # Alpaca's optional context goes under the instruction, as in the original Alpaca prompt.
            prompt = f"{prompt}\n\n{extra}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]

    def _chat_messages(self, record: dict) -> list[dict[str, str]]:
        turns = record.get(self.messages_field)
        if not isinstance(turns, list) or len(turns) == 0:
            raise SkipRecord(f"missing field '{self.messages_field}'")
        return [_chat_turn(turn) for turn in turns]


def _required_text(record: dict, field: str) -> str:
    value = record.get(field)
    if value is None or (isinstance(value, str) and value.strip() == ""):
        raise SkipRecord(f"missing field '{field}'")
    return value if isinstance(value, str) else str(value)


def _chat_turn(turn) -> dict[str, str]:
    """Accept {role, content} and ShareGPT {from, value} turns (Arrow fills absent keys with None)."""
    if not isinstance(turn, dict):
        raise SkipRecord("malformed message: expected {role, content} or {from, value}")
    if turn.get("role") is not None and turn.get("content") is not None:
        role, content = turn["role"], turn["content"]
    elif turn.get("from") is not None and turn.get("value") is not None:
        role, content = turn["from"], turn["value"]
    else:
        raise SkipRecord("malformed message: expected {role, content} or {from, value}")
    if not isinstance(content, str):
        raise SkipRecord("malformed message: content is not text")
    return {"role": ROLE_ALIASES.get(str(role).lower(), str(role)), "content": content}


def detect_format(columns: list[str]) -> str | None:
    """The format whose fields all appear among ``columns``, or None."""
    if any(c in columns for c in CHAT_FIELDS):
        return "chat"
    for fmt, (prompt, _, response) in DEFAULT_FIELDS.items():
        if prompt in columns and response in columns:
            return fmt
    if TEXT_FIELD in columns:
        return "text"
    return None


def resolve_mapper(source: SourceConfig, columns: list[str]) -> RecordMapper:
    """Pick the format and field names for a source, checking the fields exist in its columns."""
    fmt = source.format
    if fmt == "auto":
        if source.messages_field:
            fmt = "chat"
        elif source.prompt_field and source.response_field:
            fmt = "prompt_response"
        elif source.text_field:
            fmt = "text"
        else:
            fmt = detect_format(columns)
        if fmt is None:
            raise SwiftKVInputError(
                f"data source {source.path!r}: cannot tell the record format from its columns {columns}. "
                f"Set format (chat, alpaca, gsm8k, prompt_response, text) and the field names "
                f"(messages_field, prompt_field/response_field, or text_field)."
            )
    if fmt == "text":
        field = source.text_field or TEXT_FIELD
        required = [field]
        mapper = RecordMapper("text", text_field=field)
    elif fmt == "chat":
        field = source.messages_field or next((c for c in CHAT_FIELDS if c in columns), CHAT_FIELDS[0])
        required = [field]
        mapper = RecordMapper("chat", messages_field=field, system_field=source.system_field,
                              system_prompt=source.system_prompt)
    else:
        prompt, extra, response = DEFAULT_FIELDS[fmt]
        mapper = RecordMapper(
            fmt,
            prompt_field=source.prompt_field or prompt,
            input_field=source.input_field or extra,
            response_field=source.response_field or response,
            system_field=source.system_field,
            system_prompt=source.system_prompt,
        )
        required = [mapper.prompt_field, mapper.response_field]
    absent = [f for f in required + ([source.system_field] if source.system_field else []) if f not in columns]
    if absent:
        raise SwiftKVInputError(
            f"data source {source.path!r} ({fmt} format) has no field {absent[0]!r}; its columns are {columns}. "
            f"Set the matching *_field option (e.g. prompt_field/response_field/messages_field/text_field) or the "
            f"format."
        )
    return mapper
