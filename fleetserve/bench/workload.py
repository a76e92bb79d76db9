"""Workload generation: the sessions a benchmark sends. Pure given a seed and a `TextSource`.

A session is what one arrival starts: one request, or for `multi-turn` a conversation whose
turn k+1 is sent after the answer to turn k arrives and carries that answer in its history.

- `random`: one prompt of `input_len` tokens, `output_len` max tokens.
- `sharegpt-like`: the same with long-tailed (lognormal) lengths, the shape of chat traffic;
  the lognormal sigma lives in the `LengthSpec` (the CLI sets it).
- `shared-prefix`: session i belongs to group i % num_groups; every session of a group starts
  with the same `prefix_len`-token system prompt, followed by its own question.
- `multi-turn`: `turns` user texts of `input_len` tokens each.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fleetserve.bench.config import WorkloadConfig
from fleetserve.bench.lengths import sample_lengths
from fleetserve.bench.tokenizer import TextSource

# Independent RNG streams, so that e.g. changing the prefix length leaves the questions alone.
_STREAM_LENGTHS, _STREAM_TEXT, _STREAM_PREFIX = 1, 2, 3


@dataclass(frozen=True)
class Turn:
    """One user message: its text, its length in tokens, and the max_tokens of its answer."""

    text: str
    input_len: int
    output_len: int


@dataclass(frozen=True)
class Session:
    """One arrival. `system` is a shared system prompt ("" if none); `group` its group."""

    index: int
    turns: tuple[Turn, ...]
    system: str = ""
    group: int | None = None


def generate_sessions(
    config: WorkloadConfig, text_source: TextSource, seed: int, purpose: int = 0
) -> Iterator[Session]:
    """An endless, deterministic stream of sessions: the same (config, seed, purpose) gives
    the same sessions. `purpose` separates streams of one seed (0: measured run, 1: warmup)."""
    length_rng = np.random.default_rng((seed, purpose, _STREAM_LENGTHS))
    text_rng = np.random.default_rng((seed, purpose, _STREAM_TEXT))
    prefixes: list[str] = []
    if config.kind == "shared-prefix":
        prefix_rng = np.random.default_rng((seed, purpose, _STREAM_PREFIX))
        prefixes = [
            text_source.make_text(config.prefix_len, prefix_rng) for _ in range(config.num_groups)
        ]
    turns_per_session = config.turns if config.kind == "multi-turn" else 1
    index = 0
    while True:
        input_lens = sample_lengths(config.input_len, length_rng, turns_per_session)
        output_lens = sample_lengths(config.output_len, length_rng, turns_per_session)
        turns = tuple(
            Turn(text_source.make_text(n_in, text_rng), n_in, n_out)
            for n_in, n_out in zip(input_lens, output_lens)
        )
        if prefixes:
            group = index % config.num_groups
            yield Session(index, turns, system=prefixes[group], group=group)
        else:
            yield Session(index, turns)
        index += 1
