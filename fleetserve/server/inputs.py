"""From an API request to engine inputs: prompts as token ids, and `SamplingParams`.
Everything a client can get wrong is a 400 naming the field (`errors.invalid`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleetserve.engine.sampling_params import SamplingParams
from fleetserve.server.errors import APIError, invalid
from fleetserve.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields


@dataclass
class Prompt:
    text: str | None  # None when the client sent token ids
    token_ids: list[int]


def sampling_params(
    req: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    vocab_size: int,
    names: dict[str, str] | None = None,
) -> SamplingParams:
    """`names` maps an engine field to the request field it came from, for error messages."""
    stop = req.stop if req.stop is not None else ()
    kwargs: dict[str, Any] = {
        "n": req.n,
        "max_tokens": max_tokens,
        "stop": [stop] if isinstance(stop, str) else stop,
        "stop_token_ids": req.stop_token_ids or (),
        "ignore_eos": req.ignore_eos,
        "min_tokens": req.min_tokens,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "skip_special_tokens": req.skip_special_tokens,
        "seed": req.seed,
        "cache_salt": req.cache_salt,
    }
    optional = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": None if req.top_k is None else min(req.top_k, vocab_size),
        "min_p": req.min_p,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    bad = next((t for t in kwargs["stop_token_ids"] if t >= vocab_size), None)
    if bad is not None:
        raise invalid(
            f"stop_token_ids: {bad} is not below the vocabulary size {vocab_size}", "stop_token_ids"
        )
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        param = (names or {}).get(field, field) if field in kwargs else None
        raise invalid(str(exc), param) from None


def completion_prompts(req: CompletionRequest, tokenizer: Any, vocab_size: int) -> list[Prompt]:
    """The request's prompts: a string, strings, token ids, or lists of token ids."""
    p = req.prompt
    if isinstance(p, str):
        raw: list[str | list[int]] = [p]
    elif p and isinstance(p[0], int):
        raw = [p]  # one prompt of token ids
    else:
        raw = list(p)
    if not raw:
        raise invalid("prompt must not be empty", "prompt")
    prompts = []
    for item in raw:
        if isinstance(item, str):
            prompts.append(Prompt(item, tokenizer.encode(item)))
        else:
            prompts.append(Prompt(None, list(item)))
    for prompt in prompts:
        check_token_ids(prompt.token_ids, vocab_size, "prompt")
    return prompts


def chat_prompt(req: ChatCompletionRequest, tokenizer: Any, vocab_size: int) -> Prompt:
    """Apply the tokenizer's chat template, ending with the assistant's turn."""
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    if getattr(tokenizer, "chat_template", None) is None:
        raise invalid("this model has no chat template; use /v1/completions", "messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - templates raise anything on odd conversations
        raise invalid(f"the chat template rejected these messages: {exc}", "messages") from None
    # The template already holds any BOS token: tokenize without adding another.
    prompt = Prompt(text, tokenizer.encode(text, add_special_tokens=False))
    check_token_ids(prompt.token_ids, vocab_size, "messages")
    return prompt


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    if not token_ids:
        raise invalid("prompt must contain at least one token", param)
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid(f"token id {bad} is out of range [0, {vocab_size})", param)


def check_length(
    prompt: Prompt, max_tokens: int | None, max_model_len: int, param: str, max_param: str
) -> None:
    """vLLM's rule: the prompt plus the tokens asked for must fit in the context."""
    n = len(prompt.token_ids)
    if n >= max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens, and your prompt "
            f"has {n} tokens, which leaves no room for a completion. Shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is not None and n + max_tokens > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {n + max_tokens} tokens ({n} in the prompt, {max_tokens} for the "
            f"completion). Reduce the prompt or {max_param}.",
            param=max_param,
            code="context_length_exceeded",
        )
