"""Mid-stream migration, the pure half: the request that continues a broken stream on
another replica, and its chunks rewritten into the stream the client started.

The continuation is a `/v1/completions` request whose prompt is the original prompt's token
ids plus every token already sent. It asks for exactly what the client is still owed: the
token budget the replica gave the original request (`owed_max_tokens`) minus the tokens
sent, `min_tokens` minus the tokens sent, and every other sampling, stopping and
cache field as the client sent it (`CARRIED_FIELDS`). Its chunks are re-wrapped in the
client's format (chat or completion), under the original id, created time and model, so the
client sees one stream. With greedy decoding the continued text equals an uninterrupted run.

What a continuation cannot reproduce, without replica support, in a sampled (temperature > 0)
stream: a seeded request's random draws restart on the new replica, so the continuation
gets a seed derived from the client's seed and the tokens sent (`continuation_seed`:
reproducible, and no draw is reused); and frequency/presence penalties count the migrated
tokens as prompt, not output, from then on.
"""

from __future__ import annotations

import hashlib
from typing import Any

# The replica's max_tokens when a completion request leaves it out (server/protocol.py,
# CompletionRequest.max_tokens, as in OpenAI's API). A chat request without one, or any
# request with an explicit null, may generate up to the context length.
COMPLETION_DEFAULT_MAX_TOKENS = 16

# Fields copied as they are from the original request to its continuation. `priority` is
# whatever the gateway forwarded with the original request.
CARRIED_FIELDS = (
    "model",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
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
    "cache_salt",
    "priority",
)
# Set by `continuation_body` itself: prompt, stream, return_token_ids, n, max_tokens,
# min_tokens, seed, logprobs. Left out on purpose: echo and prompt_logprobs (the prompt went
# out with the first chunk), stream_options (the gateway counts usage itself), the chat-only
# fields (the prompt is token ids already).


def max_tokens_of(body: dict, chat: bool) -> int | None:
    """The max_tokens the client set (chat: max_completion_tokens first); None if unset."""
    if chat and body.get("max_completion_tokens") is not None:
        return int(body["max_completion_tokens"])
    value = body.get("max_tokens")
    return None if value is None else int(value)


def owed_max_tokens(body: dict, chat: bool) -> int | None:
    """The token budget a fleetserve replica gives `body`, as it reads it: the client's
    max_tokens, else 16 for a completion request that leaves the field out, else None (up
    to the context length: a chat request without one, or an explicit null)."""
    value = max_tokens_of(body, chat)
    if value is None and not chat and "max_tokens" not in body:
        return COMPLETION_DEFAULT_MAX_TOKENS
    return value


def continuation_seed(seed: int, sent: int) -> int:
    """The seed of a continuation after `sent` tokens: a pure function of both, so a
    migrated seeded stream is reproducible, and different from `seed`, so the new replica
    does not replay the random draws the first `sent` tokens used."""
    if sent == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{sent}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # below 2**63: a valid seed everywhere


def continuation_body(
    original: dict, chat: bool, prompt_token_ids: list[int], generated: list[int]
) -> dict | None:
    """The `/v1/completions` body that continues `original`; None when nothing is left to
    generate (the token budget is spent)."""
    sent = len(generated)
    body: dict[str, Any] = {k: original[k] for k in CARRIED_FIELDS if k in original}
    body["prompt"] = list(prompt_token_ids) + list(generated)
    body["stream"] = True
    body["return_token_ids"] = True
    body["n"] = 1
    max_tokens = owed_max_tokens(original, chat)
    if max_tokens is not None and max_tokens - sent <= 0:
        return None
    # Explicit, null included: a completion request without max_tokens gets only 16.
    body["max_tokens"] = None if max_tokens is None else max_tokens - sent
    if original.get("min_tokens"):
        body["min_tokens"] = max(int(original["min_tokens"]) - sent, 0)
    if original.get("seed") is not None:
        body["seed"] = continuation_seed(int(original["seed"]), sent)
    if chat:
        if original.get("logprobs"):
            body["logprobs"] = int(original.get("top_logprobs") or 0)
    elif original.get("logprobs") is not None:
        body["logprobs"] = original["logprobs"]
    return body


def chat_logprobs(completion_logprobs: dict | None, top_n: int = 0) -> dict | None:
    """Completions-style logprobs ({tokens, token_logprobs, top_logprobs}) in chat style, with
    the `top_n` best alternatives per token, as the replica's chat endpoint sends them (its
    completions endpoint puts the sampled token among them too)."""
    if not completion_logprobs:
        return None
    tokens = completion_logprobs.get("tokens") or []
    values = completion_logprobs.get("token_logprobs") or []
    tops = completion_logprobs.get("top_logprobs") or [None] * len(tokens)
    content = []
    for token, logprob, top in zip(tokens, values, tops, strict=False):
        best = sorted((top or {}).items(), key=lambda kv: kv[1], reverse=True)[:top_n]
        content.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()) if isinstance(token, str) else None,
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in best
                ],
            }
        )
    return {"content": content}


def rebase_completion_logprobs(logprobs: dict | None, text_offset: int, count: int) -> dict | None:
    """A continuation's completions-style logprobs for its first `count` tokens, with
    `text_offset` counted in the client's text (which starts `text_offset` characters
    earlier than the continuation's own), the way the replica counts it."""
    if not logprobs:
        return logprobs
    tokens = list(logprobs.get("tokens") or [])[:count]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token) if isinstance(token, str) else 0
    return {
        "tokens": tokens,
        "token_logprobs": list(logprobs.get("token_logprobs") or [])[:count],
        "top_logprobs": list(logprobs.get("top_logprobs") or [])[:count],
        "text_offset": offsets,
    }


def client_chunk(
    *,
    chat: bool,
    stream_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    stop_reason: int | str | None = None,
    token_ids: list[int] | None = None,
    logprobs: dict | None = None,
    top_logprobs: int = 0,
    usage: dict | None = None,
) -> dict:
    """One chunk of the client's stream, choice 0, in the client's format, with the fields
    the replica's own chunks have. `logprobs` is completions-style (`top_logprobs`: how many
    alternatives a chat client asked for); `token_ids` is included only when the client
    asked for token ids, `usage` only when it asked for continuous usage stats."""
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["delta"] = {"content": text} if text else {}
        choice["logprobs"] = chat_logprobs(logprobs, top_logprobs)
    else:
        choice["text"] = text
        choice["logprobs"] = logprobs
    choice["finish_reason"] = finish_reason
    choice["stop_reason"] = stop_reason
    if token_ids is not None:
        choice["token_ids"] = token_ids
    chunk = {
        "id": stream_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def usage_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """Usage in the replica's shape. `cached_tokens`: prompt tokens the first replica found
    in its prefix cache, as far as the gateway saw (its usage reports), else 0."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def usage_chunk(
    *,
    chat: bool,
    stream_id: str,
    created: int,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> dict:
    return {
        "id": stream_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_of(prompt_tokens, completion_tokens, cached_tokens),
    }
