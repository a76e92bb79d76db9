"""`fleetserve profile MODEL`: time the real engine's steps over a grid of batch shapes and
fit a `CostModel` to them.

The grid (`ProfileGrid`): prefill chunks of several sizes, decode batches of several sizes
at several context lengths, and mixed steps (a prefill chunk joining a decoding batch). Each
point is built by feeding the real `EngineCore` requests of random token ids (so nothing hits
the prefix cache) and timing `core.step()` whole: scheduler, model, sampler and update, the
time a replica really spends per step. The prefill steps that build each decode batch are
measured too. Every measured step is kept in the file (`samples`), so a model can be refitted
without the engine.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from fleetserve.cpu import cpu_flags, cpu_model
from fleetserve.engine.core import EngineCore
from fleetserve.engine.request import EngineCoreRequest
from fleetserve.engine.runner import RunnerOutput
from fleetserve.engine.sampling_params import SamplingParams
from fleetserve.engine.scheduler import SchedulerOutput
from fleetserve.perf.cost_model import CostModel, StepSample, StepShape


@dataclass(frozen=True)
class ProfileGrid:
    """Batch shapes to time. The default takes a few minutes for a 135M model on 2 CPU
    cores; `decode_steps` steps are timed at each (batch, context) point."""

    prefill_tokens: tuple[int, ...] = (16, 128, 512, 1024)
    decode_batches: tuple[int, ...] = (1, 8, 32)
    context_lens: tuple[int, ...] = (64, 512)
    decode_steps: int = 3
    mixed_prefill_tokens: tuple[int, ...] = (128,)
    repeats: int = 1

    def __post_init__(self) -> None:
        if min(self.prefill_tokens + self.decode_batches + self.context_lens) < 1:
            raise ValueError("every profile size must be >= 1")
        if self.decode_steps < 1 or self.repeats < 1:
            raise ValueError("decode_steps and repeats must be >= 1")

    @property
    def num_points(self) -> int:
        decode = len(self.decode_batches) * len(self.context_lens)
        return self.repeats * (
            len(self.prefill_tokens) + decode * (1 + len(self.mixed_prefill_tokens))
        )


class _ShapeRecorder:
    """Wraps the core's runner to see each step's batch, and runs it `runs` times: the
    `Runner` contract lets a batch run again with the same result, and the median of a few
    runs is what a step costs on a machine that other work interrupts now and then."""

    def __init__(self, runner, runs: int) -> None:
        self.runner = runner
        self.runs = runs
        self.shape: StepShape | None = None
        self.run_times: list[float] = []

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self.shape = StepShape.of(sched)
        self.run_times = []
        for _ in range(self.runs):
            start = time.perf_counter()
            result = self.runner.execute(sched)
            self.run_times.append(time.perf_counter() - start)
        return result


class Profiler:
    def __init__(self, core: EngineCore, seed: int = 0, runs_per_step: int = 3) -> None:
        self.core = core
        self.recorder = _ShapeRecorder(core.runner, runs_per_step)
        core.runner = self.recorder
        self.rng = np.random.default_rng(seed)
        self.samples: list[StepSample] = []
        self._ids = 0

    def _add(self, prompt_len: int, max_tokens: int, shared: list[int] | None = None) -> str:
        """A request of `prompt_len` tokens: `shared` (a prefix other requests have too),
        then random ids."""
        self._ids += 1
        request_id = f"profile-{self._ids}"
        shared = shared or []
        prompt = shared + self._random_ids(prompt_len - len(shared))
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        self.core.add_request(EngineCoreRequest(request_id, prompt, params))
        return request_id

    def _random_ids(self, n: int) -> list[int]:
        vocab = self.core.vocab_size
        return [int(t) for t in self.rng.integers(min(100, vocab - 1), vocab, n)]

    def _step(self) -> None:
        """One step, timed whole (scheduler and update included) with its model run
        counted once, at the median of its runs."""
        self.recorder.shape = None
        start = time.perf_counter()
        self.core.step()
        seconds = time.perf_counter() - start
        runs = self.recorder.run_times
        if self.recorder.shape is not None and runs:
            seconds += float(np.median(runs)) - sum(runs)
            self.samples.append(StepSample(self.recorder.shape, seconds))

    def _clear(self) -> None:
        ids = list(self.core.scheduler.requests)
        self.core.abort_requests(ids)

    def _fits(self, context: int, extra: int) -> bool:
        return context + extra < self.core.max_model_len

    def prefill(self, tokens: int) -> None:
        if not self._fits(tokens, 1):
            return
        self._add(tokens, 1)
        while self.core.has_unfinished():
            self._step()

    def decode(self, batch: int, context: int, steps: int, mixed: tuple[int, ...]) -> None:
        if not self._fits(context, steps + len(mixed) + 2):
            return
        # The batch shares all but its last block of prompt: building it costs one prefill
        # of `context` tokens, and its decode steps still read `context` tokens each.
        block = self.core.block_size
        shared = self._random_ids(max(context - block, 0) // block * block)
        for _ in range(batch):
            self._add(context, steps + len(mixed) + 2, shared)
        while any(r.is_prefill for r in self.core.scheduler.requests.values()):
            self._step()
        for _ in range(steps):
            self._step()
        for tokens in mixed:
            if self._fits(tokens, 1):
                self._add(tokens, 1)
                self._step()
        self._clear()

    def run(self, grid: ProfileGrid, progress: Callable[[], None] | None = None) -> None:
        self.prefill(min(grid.prefill_tokens))  # warm up: first steps pay one-off costs
        self.samples.clear()
        tick = progress or (lambda: None)
        for _ in range(grid.repeats):
            for tokens in grid.prefill_tokens:
                self.prefill(tokens)
                tick()
            for batch in grid.decode_batches:
                for context in grid.context_lens:
                    self.decode(batch, context, grid.decode_steps, grid.mixed_prefill_tokens)
                    for _ in range(1 + len(grid.mixed_prefill_tokens)):
                        tick()


def hardware() -> dict[str, Any]:
    """The machine a profile describes: CPU model and the flags that decide its speed."""
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or None,
    }
    model, flags = cpu_model(), set(cpu_flags().split())
    if model is not None:
        info["cpu_model"] = model
    if flags:
        wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "fma")
        info["cpu_flags"] = [f for f in wanted if f in flags]
    return info


def profile_core(
    core: EngineCore,
    grid: ProfileGrid,
    meta: dict[str, Any],
    progress: Callable[[], None] | None = None,
    seed: int = 0,
) -> CostModel:
    """Time `core` over `grid` and fit; the model's meta holds `meta`, the engine settings,
    the grid, the measured samples and the fit error."""
    start = time.perf_counter()
    profiler = Profiler(core, seed)
    profiler.run(grid, progress)
    samples = fastest_of_repeats(profiler.samples, grid.repeats)
    scheduler = core.scheduler.config
    engine = {
        "num_blocks": core.kv_cache.num_blocks,
        "block_size": core.block_size,
        "vocab_size": core.vocab_size,
        "max_num_seqs": scheduler.max_num_seqs,
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "max_model_len": scheduler.max_model_len,
        "enable_prefix_caching": core.kv_cache.enable_prefix_caching,
    }
    record = {
        **meta,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": {**hardware(), **meta.get("hardware", {})},
        "engine": engine,
        "profile": {
            **asdict(grid),
            "wall_s": time.perf_counter() - start,
            "steps_timed": len(profiler.samples),
        },
        "samples": [[*asdict(s.shape).values(), s.seconds] for s in samples],
    }
    return CostModel.fit(samples, meta=record)


def fastest_of_repeats(samples: list[StepSample], repeats: int) -> list[StepSample]:
    """Each step of the grid's pass, timed `repeats` times: keep its fastest time. On a
    shared machine other processes only ever add time, so the minimum is the engine's
    own (a contended profile fitted on both passes: held-out error p50 12%, p90 47%; on
    the fastest of the two: 4% and 13%). Passes whose shapes differ are kept whole."""
    if repeats < 2 or len(samples) % repeats:
        return list(samples)
    n = len(samples) // repeats
    passes = [samples[i * n : (i + 1) * n] for i in range(repeats)]
    if any(p[j].shape != passes[0][j].shape for p in passes for j in range(n)):
        return list(samples)
    return [min((p[j] for p in passes), key=lambda s: s.seconds) for j in range(n)]


def samples_of(model: CostModel) -> list[StepSample]:
    """The measured steps a profile file carries."""
    return [StepSample(StepShape(*row[:4]), row[4]) for row in model.meta.get("samples", [])]
