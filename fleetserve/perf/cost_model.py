"""`CostModel`: how long one engine step takes, from the shape of its batch.

A step's time on the engine is, to a good approximation, linear in a few counts of its batch
(`StepShape`): a fixed cost (launching the step, Python, the scheduler), the tokens that go
through the model's matmuls, the sequences that sample (one lm_head row and one sampler call
each), the KV tokens that attention reads, and the quadratic attention work of prefill chunks.
`fit` finds non-negative coefficients by least squares on steps measured on the real engine
(`fleetserve profile`) and reports its error on steps it did not see.

Pure: numpy and plain data. The file format (`to_json`/`from_json`) carries where the
measurements came from (hardware, model, dtype, engine settings), because a cost model is
only true of the machine and settings it was measured on.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleetserve.engine.scheduler import SchedulerOutput

FORMAT_VERSION = 1
# Coefficient names, in the order of `StepShape.features`; seconds per unit of each.
TERMS = ("base", "tokens", "sampled", "context_tokens", "prefill_attention_ktok2")
SERVING_TERMS = ("step_s", "token_s")


@dataclass(frozen=True)
class StepShape:
    """The counts of one step that its time depends on.

    - `tokens`: tokens computed this step (prefill chunks plus one per decoding sequence);
    - `sampled`: sequences that sample a token this step (decodes and last prefill chunks);
    - `context_tokens`: KV positions attention reads, summed over the batch (each sequence
      reads everything up to its last new token);
    - `prefill_attention`: sum over prefill chunks of new_tokens x (start + new_tokens), the
      quadratic part of attention (in tokens squared).
    """

    tokens: int
    sampled: int
    context_tokens: int
    prefill_attention: int = 0

    @classmethod
    def of(cls, sched: SchedulerOutput) -> StepShape:
        tokens = sampled = context = attention = 0
        for s in sched.scheduled:
            end = s.num_computed_tokens + s.num_new_tokens
            tokens += s.num_new_tokens
            context += end
            if s.num_new_tokens > 1:
                attention += s.num_new_tokens * end
            if end == s.request.num_tokens:
                sampled += 1
        return cls(tokens, sampled, context, attention)

    def features(self) -> tuple[float, ...]:
        """The regressors, in `TERMS` order."""
        return (1.0, self.tokens, self.sampled, self.context_tokens, self.prefill_attention / 1e3)


@dataclass(frozen=True)
class StepSample:
    """One measured step: its shape and its wall time in seconds."""

    shape: StepShape
    seconds: float


@dataclass(frozen=True)
class CostModel:
    """Step time = sum of `coefficients[term] x feature[term]` (seconds), never below
    `min_step_s`. `meta`: where it came from and how well it fits (see `fit`)."""

    coefficients: dict[str, float]
    min_step_s: float = 1e-4
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    # What serving adds to each step beyond `core.step()` (which `fleetserve profile`
    # times): {"step_s": s, "token_s": t}: the engine-core loop's per-step cost (IPC) and
    # the front end's per-output-token cost (detokenizing, streaming), which share the
    # replica's cores. Fitted against a served replica (`calibrate_serving`); empty: none.
    serving: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.coefficients) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown cost-model terms {sorted(unknown)}; known: {TERMS}")
        for name, value in {**self.coefficients, **self.serving}.items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"cost-model coefficient {name} must be >= 0, got {value}")
        if set(self.serving) - set(SERVING_TERMS):
            raise ValueError(f"unknown serving terms; known: {SERVING_TERMS}")
        if not self.min_step_s > 0:
            raise ValueError(f"min_step_s must be > 0, got {self.min_step_s}")
        c, s = self.coefficients.get, self.serving.get
        # (base, per token, per sampling sequence, per KV token, per prefill-attention
        # token²): `step_time` runs once per simulated step.
        object.__setattr__(
            self,
            "_fast",
            (
                c("base", 0.0) + s("step_s", 0.0),
                c("tokens", 0.0),
                c("sampled", 0.0) + s("token_s", 0.0),
                c("context_tokens", 0.0),
                c("prefill_attention_ktok2", 0.0) / 1e3,
            ),
        )

    @property
    def _vector(self) -> tuple[float, ...]:
        return tuple(self.coefficients.get(t, 0.0) for t in TERMS)

    def step_time(self, shape: StepShape) -> float:
        """Predicted seconds of a step of this shape (with `serving`'s costs)."""
        base, tokens, sampled, context, attention = self._fast
        seconds = (
            base
            + tokens * shape.tokens
            + sampled * shape.sampled
            + context * shape.context_tokens
            + attention * shape.prefill_attention
        )
        return max(seconds, self.min_step_s)

    def with_serving(self, step_s: float, token_s: float) -> CostModel:
        return dataclasses.replace(self, serving={"step_s": step_s, "token_s": token_s})

    # ---- fitting ---------------------------------------------------------------------------

    @classmethod
    def fit(
        cls, samples: Sequence[StepSample], heldout_every: int = 4, meta: dict | None = None
    ) -> CostModel:
        """Least squares with non-negative coefficients on all samples but every
        `heldout_every`-th one, which measure the error (`meta["fit"]`). Relative errors are
        minimized (each row weighted by 1/seconds): a 5 ms decode step matters as much as a
        1 s prefill."""
        if heldout_every < 2:
            raise ValueError("heldout_every must be >= 2 (one sample in that many is held out)")
        train = [s for i, s in enumerate(samples) if i % heldout_every != heldout_every - 1]
        heldout = [s for i, s in enumerate(samples) if i % heldout_every == heldout_every - 1]
        if len(train) < len(TERMS) or not heldout:
            raise ValueError(
                f"need at least {len(TERMS) + 2} measured steps to fit and check a cost model, "
                f"got {len(samples)}"
            )
        coefficients = dict(zip(TERMS, _nnls_relative(train)))
        model = cls(coefficients)
        fit = {
            "train_steps": len(train),
            "heldout_steps": len(heldout),
            "train": model.errors(train),
            "heldout": model.errors(heldout),
        }
        return cls(coefficients, meta={**(meta or {}), "fit": fit})

    def errors(self, samples: Sequence[StepSample]) -> dict[str, float]:
        """Relative errors |predicted - measured| / measured: mean, p50, p90, max."""
        rel = np.array([abs(self.step_time(s.shape) - s.seconds) / s.seconds for s in samples])
        return {
            "mean_rel_error": float(rel.mean()),
            "p50_rel_error": float(np.percentile(rel, 50)),
            "p90_rel_error": float(np.percentile(rel, 90)),
            "max_rel_error": float(rel.max()),
        }

    # ---- files -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "linear",
            "coefficients": dict(self.coefficients),
            "min_step_s": self.min_step_s,
            **({"serving": dict(self.serving)} if self.serving else {}),
            **self.meta,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CostModel:
        if data.get("format_version") != FORMAT_VERSION or data.get("kind") != "linear":
            raise ValueError(
                f"not a fleetserve cost model of format {FORMAT_VERSION} (run fleetserve "
                "profile to make one)"
            )
        meta = {
            k: v
            for k, v in data.items()
            if k not in ("format_version", "kind", "coefficients", "min_step_s", "serving")
        }
        serving = dict(data.get("serving") or {})
        return cls(dict(data["coefficients"]), data.get("min_step_s", 1e-4), meta, serving)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> CostModel:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read cost model {path}: {exc}") from exc


def _nnls_relative(samples: Sequence[StepSample]) -> list[float]:
    """Non-negative least squares of relative errors: solve, drop the terms that came out
    negative, solve again on the rest (enough for five terms that are all costs)."""
    x = np.array([s.shape.features() for s in samples], dtype=float)
    y = np.array([s.seconds for s in samples], dtype=float)
    weights = 1.0 / y
    active = list(range(len(TERMS)))
    while True:
        cols = x[:, active] * weights[:, None]
        solution, *_ = np.linalg.lstsq(cols, y * weights, rcond=None)
        if (solution >= 0).all() or len(active) == 1:
            break
        active = [a for a, v in zip(active, solution) if v > 0] or active[:1]
    result = [0.0] * len(TERMS)
    for a, v in zip(active, solution):
        result[a] = max(float(v), 0.0)
    return result
