"""The engine core: one model on one device, stepping a continuous batch.

    outputs = core.step()  # schedule -> run the model -> sample -> update

Token ids in, token ids out; tokenization and stop strings live in the front end
(`OutputProcessor`). Runs in-process for the offline `LLM` and in its own process behind
the API server (`core_proc`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from fleetserve.engine.config import EngineConfig
from fleetserve.engine.kv_cache_manager import KVCacheManager, KVEvent
from fleetserve.engine.outputs import EngineCoreOutput
from fleetserve.engine.request import EngineCoreRequest, Request, RequestStatus
from fleetserve.engine.runner import Runner, RunnerOutput
from fleetserve.engine.scheduler import (
    RequestUpdate,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)

logger = logging.getLogger(__name__)


def build_engine_core(config: EngineConfig, progress: bool = True) -> EngineCore:
    """Load the model of `config` and size its KV cache: the `EngineCore` of a real model."""
    # torch-heavy; keep `import fleetserve` light
    import torch

    from fleetserve.attention import cpu_extension, triton_paged
    from fleetserve.engine import device as devices
    from fleetserve.engine.model_runner import ModelRunner, kv_cache_bytes_per_block
    from fleetserve.models import load_model

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    elif os.cpu_count():
        torch.set_num_threads(os.cpu_count())
    device = devices.resolve(config.device)
    dtype_name = config.dtype
    checkpoint = devices.checkpoint_dtype(config.model)
    if checkpoint is not None:
        caps = devices.capabilities(device)
        dtype_name, why = devices.choose_dtype(config.dtype, checkpoint, caps)
        logger.info("dtype %s -> %s: %s", config.dtype, dtype_name, why)
    backend, why = devices.choose_attention_backend(
        config.attention_backend, device, cpu_extension.available, triton_paged.problem
    )
    fell_back = config.attention_backend == "auto" and backend == "torch"
    logger.log(
        logging.WARNING if fell_back else logging.INFO,
        "attention backend %s -> %s: %s",
        config.attention_backend,
        backend,
        why,
    )
    model, model_config = load_model(
        config.model,
        dtype=dtype_name,
        device=device,
        quantization=config.quantization,
        progress=progress,
    )
    dtype = devices.kv_dtype(model)
    block_size = config.block_size
    bytes_per_block = kv_cache_bytes_per_block(model_config, block_size, dtype)
    model_len = max_model_len(config.max_model_len, model_config)
    memory = config.kv_cache_memory or devices.default_kv_cache_memory(device)
    # Never more blocks than the batch could ever fill: a tiny model on a large budget
    # would otherwise spend its start-up making millions of bookkeeping objects.
    enough = -(-config.max_num_seqs * model_len // block_size) + 1
    num_blocks = min(memory // bytes_per_block, enough)
    if num_blocks < 2:
        raise ValueError(
            f"kv_cache_memory of {memory} bytes holds no KV block of {bytes_per_block} "
            "bytes; give the cache more memory or use a smaller block_size"
        )
    capacity = (num_blocks - 1) * block_size
    if config.max_model_len is None:
        model_len = min(model_len, capacity)
    runner = ModelRunner(
        model,
        model_config,
        num_blocks=num_blocks,
        block_size=block_size,
        device=device,
        dtype=dtype,
        attention_backend=backend,
        seed=config.seed,
        max_model_len=model_len,
        max_num_seqs=config.max_num_seqs,
        enforce_eager=config.enforce_eager,
    )
    logger.info(
        "KV cache: %d blocks of %d tokens (%.1f MiB), max_model_len %d, device %s",
        num_blocks,
        block_size,
        num_blocks * bytes_per_block / 2**20,
        model_len,
        device,
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=model_len,
    )
    return EngineCore(runner, scheduler_config, config.enable_prefix_caching)


class EngineCore:
    """Schedules and steps a continuous batch on `runner` (a `ModelRunner`, or anything with
    the `Runner` contract). `clock` stamps queue and first-schedule times (monotonic
    seconds)."""

    def __init__(
        self,
        runner: Runner,
        scheduler_config: SchedulerConfig,
        enable_prefix_caching: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.clock = clock
        self.block_size = runner.block_size
        self.vocab_size = runner.vocab_size
        self.eos_token_ids = frozenset(runner.eos_token_ids)
        self.max_model_len = scheduler_config.max_model_len
        self.kv_cache = KVCacheManager(runner.num_blocks, self.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.kv_cache)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # ---- requests --------------------------------------------------------------------------

    def add_request(self, req: EngineCoreRequest) -> list[EngineCoreOutput]:
        """Queue a request. Returns an error output at once if it can never run."""
        if req.sampling_params.n != 1:
            raise ValueError("the engine core takes n=1; the front end fans out n > 1")
        vocab = self.vocab_size
        for what, ids in (
            ("prompt token ids", req.prompt_token_ids),
            ("stop_token_ids", req.sampling_params.stop_token_ids),
        ):
            if any(not (isinstance(t, int) and 0 <= t < vocab) for t in ids):
                error = f"{what} must be in [0, {vocab})"
                return [EngineCoreOutput(req.request_id, [], finish_reason="error", error=error)]
        request = Request(
            req.request_id,
            list(req.prompt_token_ids),
            req.sampling_params,
            arrival_time=req.arrival_time,
            priority=req.priority,
            eos_token_ids=self.eos_token_ids,
            queued_time=self.clock(),
        )
        rejected = self.scheduler.add_request(request)
        return [self._output(rejected)] if rejected else []

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        updates = self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        return [self._output(u) for u in updates]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step --------------------------------------------------------------------------

    def step(self) -> list[EngineCoreOutput]:
        """One step. A request that makes the step fail ends alone with an error; the others
        get exactly the tokens they would have got without it (see `_execute`)."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        now = self.clock()
        for s in sched.scheduled:
            if s.request.scheduled_time is None:
                s.request.scheduled_time = now
        self.prompt_tokens_total += sum(
            s.num_new_tokens for s in sched.scheduled if s.request.is_prefill
        )
        result = self._execute(sched)
        updates = self.scheduler.fail_requests(sched, result.errors) if result.errors else []
        updates += self.scheduler.update(sched, result.sampled)
        scheduled = {s.request.request_id: s.request for s in sched.scheduled}
        outputs = {}
        for u in updates:
            out = self._output(u, scheduled.get(u.request_id))
            out.new_logprobs = (
                [result.logprobs[u.request_id]] if u.request_id in result.logprobs else None
            )
            outputs[u.request_id] = out
            self.generation_tokens_total += len(u.new_token_ids)
        for s in sched.scheduled:  # the requests preempted by `fail_requests` have left it
            request_id = s.request.request_id
            lps = result.prompt_logprobs.get(request_id)
            if lps is not None and request_id not in result.errors and (lps := _unsent(s, lps)):
                if request_id not in outputs:
                    outputs[request_id] = self._output(None, s.request)
                outputs[request_id].prompt_logprobs = lps
        return list(outputs.values())

    def _execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run the step's batch. If the runner raises, run halves of the failing batch, in
        schedule order, until every failing group is one request: those requests get an error
        (`RunnerOutput.errors`), every other one its result.

        Why a rerun gives the same tokens: a failed run changed no request and no scheduler
        state (only `Scheduler.update` moves `num_computed_tokens` and appends tokens); the
        KV slots of the step stay allocated, and the rerun writes the same K/V into them; a
        seeded draw depends on (seed, token index) only. Running the groups in schedule order
        keeps a prefix hit on a block registered earlier in the step after the run that
        writes it; `Scheduler.fail_requests` preempts the requests that read a block whose
        writer failed. Cost: about 2 log2(batch) extra runs per failing request."""
        try:
            return self.runner.execute(sched)
        except Exception as exc:  # noqa: BLE001 - find the requests that cause it
            logger.exception("engine step of %d requests failed", len(sched.scheduled))
            result = RunnerOutput()
            self._isolate(sched.scheduled, exc, result)
            return result

    def _isolate(self, group: list[ScheduledRequest], exc: Exception, result: RunnerOutput):
        if len(group) == 1:
            request_id = group[0].request.request_id
            logger.error("request %s fails the engine step: %r", request_id, exc)
            result.errors[request_id] = f"engine step failed: {type(exc).__name__}: {exc}"
            return
        mid = len(group) // 2
        for half in (group[:mid], group[mid:]):
            try:
                result.merge(self.runner.execute(SchedulerOutput(half)))
            except Exception as half_exc:  # noqa: BLE001
                self._isolate(half, half_exc, result)

    def _output(self, u: RequestUpdate | None, request: Request | None = None) -> EngineCoreOutput:
        """The output of update `u` (None: an output with no tokens for `request`), carrying
        the request's queue times the first time it goes out after its first schedule."""
        if u is None:
            out = EngineCoreOutput(request.request_id, [])
        else:
            out = EngineCoreOutput(
                u.request_id,
                u.new_token_ids,
                finish_reason=u.finish_reason,
                error=u.error,
                num_cached_tokens=u.num_cached_tokens,
            )
        if request is not None and request.scheduled_time is not None:
            if not request.timing_reported:  # once: the front end keeps the first
                request.timing_reported = True
                out.scheduled_time = request.scheduled_time
                out.queue_time = request.scheduled_time - request.queued_time
        return out

    # ---- observability ---------------------------------------------------------------------

    def stats(self) -> dict:
        pc = self.kv_cache.stats
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": self.kv_cache.usage,
            "num_blocks": self.kv_cache.num_usable_blocks,
            "num_free_blocks": self.kv_cache.num_free_blocks,
            "prefix_cache_queries": pc.queries,
            "prefix_cache_hits": pc.hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
        }

    def take_kv_events(self) -> list[KVEvent]:
        return self.kv_cache.take_events()


def _unsent(s: ScheduledRequest, prompt_logprobs: list) -> list:
    """The prompt logprobs of this step not sent before: a preempted request computes its
    prompt again, and each position must go out once. The list of a step that computes
    positions [start, end) starts at position `start + 1` (the previous one predicted
    `start`), or at position 0 (None) when start is 0."""
    request = s.request
    first = 0 if s.num_computed_tokens == 0 else s.num_computed_tokens + 1
    skip = max(0, request.num_prompt_logprobs_sent - first)
    end = first + len(prompt_logprobs)
    request.num_prompt_logprobs_sent = max(request.num_prompt_logprobs_sent, end)
    return prompt_logprobs[skip:]


def max_model_len(asked: int | None, model_config) -> int:
    """The longest sequence the model computes exactly: its positions, and its sliding window
    where it has one (the model does not apply the window, so beyond it outputs would differ
    from the reference). `asked` (`--max-model-len`) may lower it, never raise it: a longer
    sequence would index past the rotary table mid-request."""
    limit = model_config.max_position_embeddings
    what = f"max_position_embeddings {limit}"
    if model_config.sliding_window is not None and model_config.sliding_window < limit:
        limit, what = model_config.sliding_window, f"sliding_window {model_config.sliding_window}"
    if asked is None:
        return limit
    if asked > limit:
        raise ValueError(
            f"max_model_len {asked} is longer than the model supports ({what}); "
            f"use --max-model-len {limit} or less"
        )
    return asked
