"""What the mock engine reads from an inference request body, per route.

Prompt tokens are a deterministic estimate: ``ceil(chars / 4) + 3`` per chat
message (or Responses input item, or ``instructions``); ``ceil(chars / 4)`` per
completion prompt or embedding input string; the list length for pre-tokenised
inputs. The request's limit on generated tokens is ``max_completion_tokens`` /
``max_tokens`` / ``max_output_tokens``, whichever the route uses.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["ROUTE_PREP", "BadRequest", "Prepared"]


class BadRequest(Exception):
    """A request the engine answers with 400, naming the field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class Prepared:
    """What a route handler learned from a request body."""

    __slots__ = ("prompt_tokens", "limit", "choices", "marker_texts", "key_source", "extra")

    def __init__(
        self,
        prompt_tokens: int,
        limit: int | None,
        choices: int,
        marker_texts: list[str] | tuple[str, ...],
        key_source: Any,
        extra: Any = None,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        #: The request's cap on generated tokens per choice (None: no cap).
        self.limit = limit
        #: Choices to generate (0 for embeddings, which generate nothing).
        self.choices = choices
        #: The texts scanned for ``[[mock:...]]`` markers.
        self.marker_texts = marker_texts
        #: What identifies the request for ``fail_times`` (its whole prompt).
        self.key_source = key_source
        self.extra = extra


def _text_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def _message_tokens(text: str) -> int:
    return _text_tokens(text) + 3


def _positive_int(body: dict[str, Any], *names: str) -> int | None:
    """The first of ``names`` present in ``body`` (and not null), as an int >= 1."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadRequest(f"'{name}' must be a positive integer", name)
        return value
    return None


def _content_text(content: Any) -> str:
    """Text of a chat message / Responses item ``content`` (string or parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict):
                t = part.get("text")
                if isinstance(t, str):
                    texts.append(t)
        return "\n".join(texts)
    raise BadRequest("message content must be a string or an array of parts", "messages")


def _n_choices(body: dict[str, Any]) -> int:
    n = _positive_int(body, "n")
    if n is None:
        return 1
    if n > 128:
        raise BadRequest("'n' must be at most 128", "n")
    return n


def _prep_chat(body: dict[str, Any]) -> Prepared:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", "messages")
    prompt_tokens = 0
    text = ""
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequest("each message must be an object", "messages")
        text = _content_text(message.get("content"))
        prompt_tokens += _message_tokens(text)
    limit = _positive_int(body, "max_completion_tokens", "max_tokens")
    return Prepared(prompt_tokens, limit, _n_choices(body), (text,), messages)


def _prompt_items(value: Any, param: str) -> list[Any]:
    """Split a completions ``prompt`` / embeddings ``input`` into single items."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        first = value[0]
        if isinstance(first, int) and not isinstance(first, bool):
            return [value]  # one pre-tokenised prompt
        return value
    raise BadRequest(f"'{param}' must be a string, an array of strings or token arrays", param)


def _item_tokens(item: Any, param: str) -> int:
    if isinstance(item, str):
        return _text_tokens(item)
    if isinstance(item, list):
        return len(item)
    raise BadRequest(f"'{param}' must be a string, an array of strings or token arrays", param)


def _prep_completions(body: dict[str, Any]) -> Prepared:
    prompt = body.get("prompt")
    items = _prompt_items(prompt, "prompt")
    tokens = [_item_tokens(item, "prompt") for item in items]
    limit = _positive_int(body, "max_tokens")
    texts = [item for item in items if isinstance(item, str)]
    return Prepared(sum(tokens), limit, _n_choices(body) * len(items), texts, prompt)


def _prep_embeddings(body: dict[str, Any]) -> Prepared:
    value = body.get("input")
    items = _prompt_items(value, "input")
    tokens = sum(_item_tokens(item, "input") for item in items)
    dims = _positive_int(body, "dimensions") or 8
    if dims > 4096:
        raise BadRequest("'dimensions' must be at most 4096", "dimensions")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    texts = [item for item in items if isinstance(item, str)]
    return Prepared(tokens, None, 0, texts, value, (items, dims, fmt))


def _prep_responses(body: dict[str, Any]) -> Prepared:
    value = body.get("input")
    prompt_tokens = 0
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        prompt_tokens += _message_tokens(instructions)
    if isinstance(value, str):
        text = value
        prompt_tokens += _message_tokens(text)
    elif isinstance(value, list) and value:
        text = ""
        for item in value:
            if isinstance(item, str):
                text = item
            elif isinstance(item, dict):
                if "content" in item:
                    text = _content_text(item.get("content"))
                else:
                    out = item.get("output")
                    text = out if isinstance(out, str) else ""
            else:
                raise BadRequest("each input item must be an object", "input")
            prompt_tokens += _message_tokens(text)
    else:
        raise BadRequest("'input' must be a string or a non-empty array", "input")
    limit = _positive_int(body, "max_output_tokens")
    return Prepared(prompt_tokens, limit, 1, (text,), [instructions, value])


#: The inference routes and how each reads its body.
ROUTE_PREP: dict[str, Callable[[dict[str, Any]], Prepared]] = {
    "/v1/chat/completions": _prep_chat,
    "/v1/completions": _prep_completions,
    "/v1/embeddings": _prep_embeddings,
    "/v1/responses": _prep_responses,
}
