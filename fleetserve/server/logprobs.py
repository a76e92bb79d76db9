"""Logprobs in the two OpenAI shapes. The engine gives, per position, a dict token id ->
logprob with the chosen token first and then the top-N (see `engine.outputs.Logprobs`)."""

from __future__ import annotations

import math
from typing import Any

from fleetserve.engine.outputs import Logprobs


def completion_logprobs(
    tokenizer: Any,
    token_ids: list[int],
    logprobs: list[Logprobs | None],
    text_offset: int,
) -> dict:
    """The legacy completions shape: parallel lists. `text_offset` is where the first token's
    text starts in the choice's text. A position without logprobs (the first prompt token
    under echo) has None."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    logprobs = list(logprobs)[: len(token_ids)]
    logprobs += [None] * (len(token_ids) - len(logprobs))
    for token_id, lps in zip(token_ids, logprobs):
        text = tokenizer.decode([token_id])
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if lps is None:
            token_logprobs.append(None)
            top.append(None)
        else:
            token_logprobs.append(_finite(lps.get(token_id)))
            top.append({tokenizer.decode([t]): _finite(lp) for t, lp in lps.items()})
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(
    tokenizer: Any, token_ids: list[int], logprobs: list[Logprobs], top_n: int
) -> list[dict]:
    """The chat shape: one entry per token, with its `top_n` alternatives."""
    content = []
    for token_id, lps in zip(token_ids, logprobs):
        alternatives = sorted(lps.items(), key=lambda kv: kv[1], reverse=True)[:top_n]
        content.append(
            {
                **_entry(tokenizer, token_id, lps.get(token_id)),
                "top_logprobs": [_entry(tokenizer, t, lp) for t, lp in alternatives],
            }
        )
    return content


def _entry(tokenizer: Any, token_id: int, logprob: float | None) -> dict:
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}


def _finite(x: float | None) -> float | None:
    # JSON has no -inf: clamp like OpenAI's -9999.0 for impossible tokens.
    if x is None or math.isnan(x):
        return None
    return max(float(x), -9999.0)
