"""The shape of a generation request's body, checked before the gateway spends anything on
it: every field the gateway (or a migration) reads has the type it expects, and the work
asked for is within the configured limits. Pure: raises `InvalidBody` naming the field.

Prompt shapes of `/v1/completions` (and `input` of `/v1/embeddings`), as OpenAI's API:
a string, a list of strings, a list of token ids, or a list of lists of token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.tokenizer import estimate_prompt_tokens


class InvalidBody(ValueError):
    """A 400 whose message names the field and what it must be."""


@dataclass(frozen=True)
class BodyShape:
    num_prompts: int  # sequences to prefill; 1 for chat
    n: int  # choices per prompt
    max_tokens: int | None  # as the client set it (None: the replica's default)
    estimated_prompt_tokens: int  # all prompts together, about four characters a token
    single_prompt: bool  # one sequence: the gateway may tokenize it for prefix routing


def charged_tokens(prompt_tokens: int, shape: BodyShape, default_max_tokens: int) -> int:
    """What a request may cost, taken from its key's tokens/min on admission: every prompt
    token plus `max_tokens` for each of the num_prompts x n sequences it decodes."""
    max_tokens = default_max_tokens if shape.max_tokens is None else shape.max_tokens
    return prompt_tokens + shape.num_prompts * shape.n * max_tokens


def check_body(body: Any, endpoint: str, config: GatewayConfig) -> BodyShape:
    if not isinstance(body, dict):
        raise InvalidBody("the body must be a JSON object")
    chat = endpoint == "/v1/chat/completions"
    if chat:
        _check_messages(body.get("messages"))
        num_prompts, tokens = 1, estimate_prompt_tokens(body, chat=True)
    else:
        field = "input" if endpoint == "/v1/embeddings" else "prompt"
        num_prompts = _check_prompt(body.get(field), field)
        tokens = estimate_prompt_tokens({"prompt": body[field]}, chat=False)
    n = _int(body, "n", minimum=1)
    n = 1 if n is None else n
    max_tokens = _int(body, "max_tokens", minimum=0)
    if chat:
        completion = _int(body, "max_completion_tokens", minimum=0)
        max_tokens = completion if completion is not None else max_tokens
    if endpoint == "/v1/embeddings":
        max_tokens = 0
    for name in ("min_tokens", "top_logprobs"):
        _int(body, name, minimum=0)
    for name in ("stream", "return_token_ids", "ignore_eos", "include_stop_str_in_output"):
        _optional(body, name, bool, "true or false")
    _optional(body, "model", str, "a string")
    _optional(body, "stream_options", dict, "an object")
    if body.get("logprobs") is not None and endpoint == "/v1/completions":
        _int(body, "logprobs", minimum=0)
    else:
        _optional(body, "logprobs", bool, "true or false")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise InvalidBody("'stop' must be a string or a list of strings")
    if num_prompts > config.max_prompts_per_request:
        raise InvalidBody(
            f"'prompt' holds {num_prompts} prompts; at most {config.max_prompts_per_request} "
            "per request: split the batch"
        )
    if n > config.max_n:
        raise InvalidBody(f"'n' is {n}; at most {config.max_n}")
    if num_prompts * n > config.max_choices_per_request:
        raise InvalidBody(
            f"{num_prompts} prompts x n={n} asks for {num_prompts * n} sequences; at most "
            f"{config.max_choices_per_request} per request: split the batch or lower 'n'"
        )
    return BodyShape(num_prompts, n, max_tokens, tokens, single_prompt=num_prompts == 1)


def _check_prompt(prompt: Any, field: str) -> int:
    """The number of prompts."""
    expected = (
        f"'{field}' must be a string, a list of strings, a list of token ids or a list of "
        "lists of token ids"
    )
    if isinstance(prompt, str):
        return 1
    if not isinstance(prompt, list) or not prompt:
        raise InvalidBody(f"{expected} (a non-empty one)" if prompt == [] else expected)
    if all(isinstance(p, str) for p in prompt):
        return len(prompt)
    if all(_is_token_id(t) for t in prompt):
        return 1
    if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
        return len(prompt)
    kinds = " and ".join(sorted({type(p).__name__ for p in prompt}))
    raise InvalidBody(f"{expected} (token ids are integers >= 0); got a list of {kinds}")


MAX_MESSAGES = 4096  # the replica's own limit


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidBody("'messages' must be a non-empty list of {'role': ..., 'content': ...}")
    if len(messages) > MAX_MESSAGES:  # before the chat template renders them for routing
        raise InvalidBody(f"'messages' has {len(messages)} messages; at most {MAX_MESSAGES}")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidBody(f"'{where}' must be an object with 'role' and 'content'")
        if not isinstance(m.get("role"), str):
            raise InvalidBody(f"'{where}.role' must be a string")
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise InvalidBody(f"'{where}.content' must be a string or a list of parts")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("text", ""), str):
                raise InvalidBody(
                    f"'{where}.content[{j}]' must be an object whose 'text' is a string"
                )


def _is_token_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _int(body: dict, name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidBody(f"'{name}' must be an integer >= {minimum}, got {value!r:.40}")
    return value


def _optional(body: dict, name: str, kind: type, what: str) -> None:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise InvalidBody(f"'{name}' must be {what}, got {type(value).__name__}")
