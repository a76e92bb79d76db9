"""Request bodies for the OpenAI chat and completions APIs. Pure.

A multi-turn history is a list of (user text, assistant answer) pairs. On the chat endpoint it
becomes alternating messages; on the completions endpoint everything is joined with spaces into
one prompt (system prompt, then each question and answer, then the new question).
"""

from __future__ import annotations

from typing import Any

from fleetserve.bench.config import TargetConfig

ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def build_input(
    endpoint: str, system: str, history: list[tuple[str, str]], user_text: str
) -> str | list[dict[str, str]]:
    """The `messages` (chat) or `prompt` (completions) of one request."""
    if endpoint == "chat":
        messages = [{"role": "system", "content": system}] if system else []
        for question, answer in history:
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": user_text})
        return messages
    pieces = [system] if system else []
    for question, answer in history:
        pieces += [question, answer]
    pieces.append(user_text)
    return " ".join(p for p in pieces if p)


def build_body(
    target: TargetConfig, request_input: str | list[dict[str, str]], max_tokens: int
) -> dict[str, Any]:
    """A streaming request asking for usage in the last chunk. `ignore_eos` is a vLLM-style
    extra field, sent only when asked for; `target.extra_body` is merged last."""
    key = "messages" if target.endpoint == "chat" else "prompt"
    body: dict[str, Any] = {
        "model": target.model,
        key: request_input,
        "max_tokens": max_tokens,
        "temperature": target.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.ignore_eos:
        body["ignore_eos"] = True
    body.update(target.extra_body)
    return body
