"""Per-request sampling parameters, with vLLM's names, validated once on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

# Bounds of the sampling fields. Each keeps one request's arithmetic finite in float32 (an
# inf or NaN logit used to turn a draw into an id outside the vocabulary), and none is
# stricter than a real client needs:
# - temperature: >= 0 as in vLLM (OpenAI stops at 2); 100 already flattens any distribution
#   to uniform, and the sampler raises temperatures below MIN_TEMPERATURE to it, as vLLM does.
# - repetition_penalty: vLLM and HF only ask > 0, but 1e-40 divides a logit of 5 into 5e40,
#   past float32's 3.4e38. Useful values are 1.0-2.0; [0.01, 10] scales a logit by at most
#   100, so a logit overflows only if it was already beyond 3e36.
# - presence/frequency penalties: OpenAI's [-2, 2]. logprobs: vLLM's default max of 20.
# - seed: what the API and the wire (msgpack) carry, int64 or uint64.
MAX_TEMPERATURE = 100.0
MIN_TEMPERATURE = 1e-2
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 10.0
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
# Counts travel to the core process as msgpack integers: past int64 they cannot be sent.
MAX_COUNT = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    Invalid values raise `ValueError` naming the field, so that a server can turn them
    into a 400 without guessing.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (plus the sampled one)
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Extra keys folded into prefix-cache block hashes (e.g. an adapter id).
    cache_salt: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # Accept a single stop string or lists from JSON; store tuples so the object stays
        # hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == 0:
            object.__setattr__(self, "top_k", -1)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # also catches NaN
            bad("temperature", f"must be in [0, {MAX_TEMPERATURE:g}]")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or not -1 <= self.top_k <= MAX_COUNT:
            bad("top_k", f"must be -1 (disabled) or an integer in [1, {MAX_COUNT}]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            bad(
                "repetition_penalty",
                f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1 = off)",
            )
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= MAX_COUNT
        ):
            bad("max_tokens", f"must be an integer in [1, {MAX_COUNT}]")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= MAX_COUNT:
            bad("min_tokens", f"must be an integer in [0, {MAX_COUNT}]")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", "must be in [0, 20]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            bad("prompt_logprobs", "must be in [0, 20]")
        if self.seed is not None and (
            not isinstance(self.seed, int) or not MIN_SEED <= self.seed <= MAX_SEED
        ):
            bad("seed", f"must be an integer in [{MIN_SEED}, {MAX_SEED}]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1
