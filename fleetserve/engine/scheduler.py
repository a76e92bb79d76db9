"""Continuous batching: which requests run in the next step, and how many tokens each.

Pure Python: no torch, no I/O, no clock. One token budget per step; running requests first
(decodes and unfinished chunked prefills), then waiting ones in priority order. When blocks
run out, the lowest-priority, newest running request is preempted: its blocks are freed and
it goes back to the queue to be recomputed later. Nothing is dropped for lack of memory.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from fleetserve.engine.kv_cache_manager import KVCacheManager
from fleetserve.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_model_len ({self.max_model_len}) when chunked prefill is off"
            )


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    num_computed_tokens: int  # before this step: the first position computed now
    block_ids: list[int]

    @property
    def samples(self) -> bool:
        """Whether this step produces the request's next token (its prefill is complete)."""
        return self.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class RequestUpdate:
    """What one step did to one request: the token it sampled (if any), and how it ended."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.requests: dict[str, Request] = {}
        self.running: list[Request] = []  # in admission order: the newest is last
        self._waiting: list[tuple[int, float, int, Request]] = []  # heap
        self._counter = itertools.count()
        self.num_preemptions = 0
        max_tokens_in_cache = kv_cache.num_usable_blocks * kv_cache.block_size
        if config.max_model_len > max_tokens_in_cache:
            raise ValueError(
                f"max_model_len ({config.max_model_len}) does not fit in the KV cache "
                f"({max_tokens_in_cache} tokens): lower max_model_len or give the cache "
                "more memory"
            )

    # ---- queue -----------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.running or self._waiting)

    def _push_waiting(self, request: Request) -> None:
        # Preempted requests keep their arrival time, so they go ahead of later arrivals.
        key = (request.priority, request.arrival_time, request.seq, request)
        heapq.heappush(self._waiting, key)

    def add_request(self, request: Request) -> RequestUpdate | None:
        """Queue a request; returns a finished update instead if it can never run."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_prompt_tokens >= self.config.max_model_len:
            request.status = RequestStatus.FINISHED_ERROR
            request.error = (
                f"prompt has {request.num_prompt_tokens} tokens; this model's context length "
                f"is {self.config.max_model_len}, which must also leave room for at least one "
                "generated token"
            )
            return RequestUpdate(request.request_id, [], "error", request.error)
        self.requests[request.request_id] = request
        request.seq = next(self._counter)
        self._push_waiting(request)
        return None

    def finish_requests(self, request_ids, status: RequestStatus) -> list[RequestUpdate]:
        """Abort (or otherwise end) requests now; their blocks are free when this returns."""
        updates = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self._waiting = [w for w in self._waiting if w[3] is not request]
                heapq.heapify(self._waiting)
            request.status = status
            self._free(request)
            updates.append(
                RequestUpdate(
                    request_id,
                    [],
                    status.finish_reason,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                )
            )
        return updates

    def _free(self, request: Request) -> None:
        self.kv_cache.free(request)
        del self.requests[request.request_id]

    # ---- one step --------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch. Takes KV blocks for it; `update` must follow."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # Highest priority first, so that whoever is still unscheduled when blocks run out is
        # the right victim, and no work already given out this step is taken back.
        self.running.sort(key=_rank)
        scheduled: set[int] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.config.enable_chunked_prefill and num_new < (
                request.num_tokens - request.num_computed_tokens
            ):
                break
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = self._pick_victim(scheduled)
                if self.running.index(victim) < i:  # it was given work earlier this step
                    i -= 1
                budget += self._preempt(victim, out)
                if victim is request:
                    break
            else:
                self._emit(out, request, num_new, request.num_computed_tokens)
                scheduled.add(id(request))
                budget -= num_new
                i += 1
                continue
            # `request` itself was preempted; running shifted left, so `i` already points on.

        while (
            self._waiting
            and budget > 0
            and not out.preempted_ids
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self._waiting[0][3]
            computed_blocks, num_cached = self.kv_cache.get_computed_blocks(request)
            num_new = request.num_tokens - num_cached
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.kv_cache.allocate_slots(request, num_new, computed_blocks):
                break
            heapq.heappop(self._waiting)
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._emit(out, request, num_new, num_cached)
            budget -= num_new
        return out

    def _emit(self, out: SchedulerOutput, request: Request, num_new: int, start: int) -> None:
        assert 0 <= start < start + num_new <= request.num_tokens, (start, num_new)
        out.scheduled.append(
            ScheduledRequest(request, num_new, start, self.kv_cache.block_ids(request.request_id))
        )

    def _pick_victim(self, scheduled: set[int]) -> Request:
        """Lowest priority first (highest value), then the newest arrival. Requests already
        given work in this step are spared while any other candidate exists."""
        candidates = [r for r in self.running if id(r) not in scheduled] or self.running
        return max(candidates, key=_rank)

    def _preempt(self, request: Request, out: SchedulerOutput) -> int:
        """Free the request's blocks and requeue it; returns the tokens it had been given
        in this step (now back in the budget)."""
        self.running.remove(request)
        returned = 0
        for s in [s for s in out.scheduled if s.request is request]:
            out.scheduled.remove(s)
            returned += s.num_new_tokens
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._push_waiting(request)
        out.preempted_ids.append(request.request_id)
        return returned

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[RequestUpdate]:
        """Apply a step's results: advance computed tokens, append sampled tokens, check
        stop conditions (EOS, stop token ids, max_tokens, context length) and free the blocks
        of finished requests. Stop *strings* are checked by the detokenizing front end, which
        aborts the request. `sampled` maps request id -> token for requests that sampled.

        Invariant: a step advances a request here and nowhere else, exactly once; between
        `schedule` and `update` a request keeps its tokens and `num_computed_tokens` (a prefix
        hit of a newly admitted request excepted, see `fail_requests`), so a runner that
        raised can be run again on the same `out`."""
        updates = []
        for s in out.scheduled:
            request = s.request
            if request.finished or request.status != RequestStatus.RUNNING:
                continue  # aborted meanwhile
            request.num_computed_tokens = s.num_computed_tokens + s.num_new_tokens
            if not s.samples:
                continue
            token = sampled[request.request_id]
            request.append_output_token(token)
            status = self._check_stop(request, token)
            if status is not None:
                request.status = status
                self.running.remove(request)
                self._free(request)
            updates.append(
                RequestUpdate(
                    request.request_id,
                    [token],
                    status.finish_reason if status else None,
                    num_cached_tokens=request.num_cached_tokens,
                )
            )
        return updates

    def fail_requests(self, out: SchedulerOutput, errors: dict[str, str]) -> list[RequestUpdate]:
        """End the requests of `errors` (request id -> message) with an error, in a step whose
        runner did not compute them; call it before `update`, which then skips them.

        Invariant: a block in the prefix cache holds the K/V of its tokens, or the step in
        flight computes it. `schedule` registers the full blocks of a step before the step
        runs, and may give them to a request admitted later in the same step (a prefix hit).
        So the failed requests' registrations of this step are withdrawn, and a request of
        this step that took one of those blocks (or, in turn, one of that request's blocks)
        read K/V that was never written: it is preempted, to be recomputed from scratch, and
        its result of this step is dropped (it leaves `out.scheduled`)."""
        steps = {s.request.request_id: s for s in out.scheduled}

        def registered(request_id: str) -> list:
            s = steps[request_id]
            end = s.num_computed_tokens + s.num_new_tokens
            return self.kv_cache.blocks_registered_for(request_id, s.num_computed_tokens, end)

        tainted = [rid for rid in steps if rid in errors]
        unwritten = {b.block_id for rid in tainted for b in registered(rid)}
        grew = True
        while grew:
            grew = False
            for rid in steps:
                if rid not in tainted and unwritten.intersection(self.kv_cache.block_ids(rid)):
                    tainted.append(rid)
                    unwritten.update(b.block_id for b in registered(rid))
                    grew = True
        for rid in tainted:
            self.kv_cache.uncache(registered(rid))
        updates = []
        for rid in tainted:
            request = steps[rid].request
            if rid not in errors:
                self._preempt(request, out)
                continue
            self.running.remove(request)
            request.status = RequestStatus.FINISHED_ERROR
            request.error = errors[rid]
            self._free(request)
            cached = max(request.num_cached_tokens, 0)
            updates.append(RequestUpdate(rid, [], "error", errors[rid], num_cached_tokens=cached))
        return updates

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        n = request.num_output_tokens
        if n >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and n >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None


def _rank(request: Request) -> tuple[int, float, int]:
    """Service order: priority (lower first), then arrival, then admission order."""
    return request.priority, request.arrival_time, request.seq
