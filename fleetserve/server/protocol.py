"""Request bodies of the OpenAI API, as pydantic models (they also make `/openapi.json`).

Unknown fields are ignored, as OpenAI clients send fields of newer API versions. The engine's
own sampling fields (top_k, min_p, ignore_eos, ...) are accepted as in vLLM, and so is the
`return_token_ids` extension. Values the engine cannot take are refused here or by
`SamplingParams` with a 400 naming the field; limits here keep one request from costing the
whole replica (n, stop strings, seed range). They are the hard ceilings; the server's
settings bound prompts per request and prompts x n lower (`fleetserve.server.limits`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from fleetserve.engine import sampling_params as limits

MAX_N = 128  # OpenAI's ceiling
MAX_STOP = 16
MAX_STOP_CHARS = 512  # a stop string is held back from the stream while it may be starting
MAX_PROMPTS = 2048  # prompts in one completions request: OpenAI's ceiling for prompt arrays
MAX_MESSAGES = 4096
MAX_SALT_CHARS = 1024
INT32_MAX = 2**31 - 1

TokenIds = list[Annotated[int, Field(ge=0)]]


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]
StopText = Annotated[Text, Field(max_length=MAX_STOP_CHARS)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(_Model):
    """Fields shared by completions and chat completions."""

    model: Text | None = Field(None, description="a name from /v1/models; default: the first")
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(
        None, ge=0, le=limits.MAX_TEMPERATURE, description="0 = greedy; default 1"
    )
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="0 or -1 = off")
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(
        None, ge=limits.MIN_REPETITION_PENALTY, le=limits.MAX_REPETITION_PENALTY
    )
    seed: int | None = Field(None, ge=limits.MIN_SEED, le=limits.MAX_SEED)
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: TokenIds | None = Field(None, max_length=MAX_STOP)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=INT32_MAX)  # beyond, the engine's wire format fails
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    priority: int = Field(
        0,
        ge=-(2**31),
        le=INT32_MAX,
        description="lower is served first; non-zero only on a server run with "
        "--allow-client-priority",
    )
    cache_salt: Text | None = Field(None, max_length=MAX_SALT_CHARS)
    return_token_ids: bool = Field(
        False, description="add prompt_token_ids and token_ids to each choice (or chunk)"
    )


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
                {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 4, "n": 2, "logprobs": 1},
            ]
        }
    )
    prompt: (
        Text
        | Annotated[list[Text], Field(max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS)]
    )
    max_tokens: int | None = Field(16, ge=1, le=limits.MAX_COUNT)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("prompt", mode="before")
    @classmethod
    def _few_enough_prompts(cls, value: object) -> object:
        # Before the union: its members' errors would drown this one.
        if isinstance(value, list) and value and not isinstance(value[0], int):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"{len(value)} prompts; at most {MAX_PROMPTS} per request")
        return value


class TextPart(_Model):
    type: Literal["text"]
    text: Text


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "max_completion_tokens": 16,
                    "temperature": 0,
                    "stream": True,
                }
            ]
        }
    )
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(
        None, ge=1, le=limits.MAX_COUNT, description="deprecated: max_completion_tokens"
    )
    max_completion_tokens: int | None = Field(None, ge=1, le=limits.MAX_COUNT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
