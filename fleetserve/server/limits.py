"""What one request may ask of the replica, checked before any costly work: how many engine
requests it makes (prompts x n), its priority, and whether its text could possibly fit in the
context. Each refusal is a 400 that names the field and the server option behind the limit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleetserve.server.errors import APIError, invalid
from fleetserve.server.protocol import ChatCompletionRequest, SamplingFields

if TYPE_CHECKING:
    from fleetserve.server.state import ServerSettings


def check_priority(req: SamplingFields, settings: ServerSettings) -> None:
    """Priority reorders the queue and picks who is preempted: a client may not choose it
    unless the operator trusts the caller (a gateway that sets it from the API key)."""
    if req.priority != 0 and not settings.allow_client_priority:
        raise invalid(
            "priority is set by the operator: this server was not started with "
            "--allow-client-priority, so only priority 0 (or none) is accepted",
            "priority",
        )


def count_prompts(prompt: Any) -> int:
    """Prompts in a completions `prompt` field, without looking inside them."""
    if isinstance(prompt, str):
        return 1
    if prompt and isinstance(prompt[0], int):
        return 1  # one prompt of token ids
    return len(prompt)


def check_request_size(num_prompts: int, n: int, settings: ServerSettings) -> None:
    if num_prompts > settings.max_prompts_per_request:
        raise invalid(
            f"prompt holds {num_prompts} prompts; this server takes at most "
            f"{settings.max_prompts_per_request} per request (--max-prompts-per-request); "
            "split them over several requests",
            "prompt",
        )
    if num_prompts * n > settings.max_choices_per_request:
        raise invalid(
            f"{num_prompts} prompts x n={n} asks for {num_prompts * n} completions; this "
            f"server makes at most {settings.max_choices_per_request} per request "
            "(--max-choices-per-request); lower n or split the prompts",
            "n",
        )


def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token of this vocabulary stands for: a text of C characters
    is at least C / max_token_chars tokens. The byte-level form of a token is never shorter
    than its text, so this errs on the long side (a normalizer that deletes characters could
    still make a text shorter in tokens; a prompt made of such characters is refused)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max(1, max((len(t) for t in tokens if t), default=1))


def check_text_chars(num_chars: int, max_token_chars: int, max_model_len: int, param: str) -> None:
    """Refuse a text that cannot fit in the context however it tokenizes, before paying for
    tokenizing it (or rendering a chat template around it)."""
    if num_chars >= max_token_chars * max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens, and your prompt "
            f"has {num_chars} characters, which is more than {max_model_len} tokens of at "
            f"most {max_token_chars} characters each. Shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def chat_chars(req: ChatCompletionRequest) -> int:
    """Characters of the messages' text: the chat template only adds to them."""
    return sum(len(m.text()) + len(m.name or "") for m in req.messages)
