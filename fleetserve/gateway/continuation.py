"""Mid-stream migration, the pure half: the request that continues a broken stream on
another replica, and its chunks rewritten into the stream the client started.

The continuation is a `/v1/completions` request whose prompt is the original prompt's token
ids plus every token already sent, with `max_tokens` (and `min_tokens`) reduced by those
tokens. Its chunks are re-wrapped in the client's format (chat or completion), under the
original id, created time and model, so the client sees one stream. With greedy decoding
the continued text equals an uninterrupted run. Sampling with temperature > 0 continues
correctly but not reproducibly (the RNG state is not carried over), and frequency/presence
penalties see the migrated tokens as prompt from then on.
"""

from __future__ import annotations

from typing import Any

# Fields copied as they are from the original request to its continuation.
CARRIED_FIELDS = (
    "model",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "logit_bias",
    "user",
)


def max_tokens_of(body: dict, chat: bool) -> int | None:
    if chat and body.get("max_completion_tokens") is not None:
        return int(body["max_completion_tokens"])
    value = body.get("max_tokens")
    return None if value is None else int(value)


def continuation_body(
    original: dict, chat: bool, prompt_token_ids: list[int], generated: list[int]
) -> dict | None:
    """The `/v1/completions` body that continues `original`; None when nothing is left to
    generate (the token budget is spent)."""
    body: dict[str, Any] = {k: original[k] for k in CARRIED_FIELDS if k in original}
    body["prompt"] = list(prompt_token_ids) + list(generated)
    body["stream"] = True
    body["return_token_ids"] = True
    body["n"] = 1
    max_tokens = max_tokens_of(original, chat)
    if max_tokens is not None:
        remaining = max_tokens - len(generated)
        if remaining <= 0:
            return None
        body["max_tokens"] = remaining
    if original.get("min_tokens"):
        body["min_tokens"] = max(int(original["min_tokens"]) - len(generated), 0)
    if chat:
        if original.get("logprobs"):
            body["logprobs"] = int(original.get("top_logprobs") or 0)
    elif original.get("logprobs") is not None:
        body["logprobs"] = original["logprobs"]
    return body


def chat_logprobs(completion_logprobs: dict | None) -> dict | None:
    """Completions-style logprobs ({tokens, token_logprobs, top_logprobs}) in chat style."""
    if not completion_logprobs:
        return None
    tokens = completion_logprobs.get("tokens") or []
    values = completion_logprobs.get("token_logprobs") or []
    tops = completion_logprobs.get("top_logprobs") or [None] * len(tokens)
    content = []
    for token, logprob, top in zip(tokens, values, tops, strict=False):
        content.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()) if isinstance(token, str) else None,
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode())}
                    for t, lp in (top or {}).items()
                ],
            }
        )
    return {"content": content}


def client_chunk(
    *,
    chat: bool,
    stream_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    token_ids: list[int] | None = None,
    logprobs: dict | None = None,
) -> dict:
    """One chunk of the client's stream, choice 0, in the client's format. `token_ids` is
    included only when the client asked for token ids."""
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "delta": {"content": text} if text else {},
            "logprobs": chat_logprobs(logprobs),
            "finish_reason": finish_reason,
        }
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {
        "id": stream_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(
    *,
    chat: bool,
    stream_id: str,
    created: int,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict:
    return {
        "id": stream_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
