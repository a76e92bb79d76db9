"""Scheduler with hand-built requests and a fake model: budgets, chunking, priorities,
preemption, aborts and stop conditions, with exact assertions."""

from __future__ import annotations

import random

import pytest

from fleetserve.engine.kv_cache_manager import NULL_BLOCK_ID, KVCacheManager
from fleetserve.engine.request import Request, RequestStatus
from fleetserve.engine.sampling_params import SamplingParams
from fleetserve.engine.scheduler import (
    RequestUpdate,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)

BS = 4
VOCAB = 1000
EOS = 999


def make_request(
    request_id: str,
    prompt,
    max_tokens: int | None = 16,
    *,
    priority: int = 0,
    arrival_time: float = 0.0,
    **params,
) -> Request:
    return Request(
        request_id,
        list(prompt),
        SamplingParams(max_tokens=max_tokens, **params),
        arrival_time=arrival_time,
        priority=priority,
        eos_token_ids=frozenset({EOS}),
    )


def make_scheduler(num_blocks: int = 65, **config) -> Scheduler:
    config.setdefault("max_model_len", 64)
    config.setdefault("max_num_batched_tokens", 64)
    return Scheduler(SchedulerConfig(**config), KVCacheManager(num_blocks, BS))


def next_token(request: Request) -> int:
    """The fake model: a deterministic function of the last token (never EOS)."""
    return (request.all_token_ids[-1] * 7 + 1) % (VOCAB - 1)


def shape(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    """(request id, first position computed, tokens computed, samples) per scheduled request,
    as `step` recorded it before `update` (`ScheduledRequest.samples` reads the live request,
    so it changes once `update` appends the sampled token)."""
    return out.test_shape


class FakeModel:
    """Stands in for the model runner. It "writes K/V" by storing each new token id in its
    (block, offset) slot, then checks that every position a scheduled request attends to holds
    that request's token: a wrong block table, a bad prefix-cache hit or a lost token shows up
    as a mismatch. All writes of a step come before its reads, as in the attention backend."""

    def __init__(self, block_size: int = BS) -> None:
        self.block_size = block_size
        self.slots: dict[tuple[int, int], int] = {}

    def _slot(self, s, pos: int) -> tuple[int, int]:
        return s.block_ids[pos // self.block_size], pos % self.block_size

    def execute(self, out: SchedulerOutput) -> None:
        for s in out.scheduled:
            for pos in range(s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens):
                self.slots[self._slot(s, pos)] = s.request.all_token_ids[pos]
        for s in out.scheduled:
            end = s.num_computed_tokens + s.num_new_tokens
            seen = [self.slots.get(self._slot(s, pos)) for pos in range(end)]
            assert seen == s.request.all_token_ids[:end], s.request.request_id


def step(sched: Scheduler, tokens: dict[str, int] | None = None, model: FakeModel | None = None):
    """One engine step with the fake model; `tokens` overrides the sampled token per id."""
    out = sched.schedule()
    out.test_shape = [
        (s.request.request_id, s.num_computed_tokens, s.num_new_tokens, s.samples)
        for s in out.scheduled
    ]
    if model is not None:
        model.execute(out)
    sampled = {
        s.request.request_id: (tokens or {}).get(s.request.request_id, next_token(s.request))
        for s in out.scheduled
        if s.samples
    }
    return out, sched.update(out, sampled)


def check_invariants(sched: Scheduler, out: SchedulerOutput) -> None:
    kv = sched.kv_cache
    assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
    assert len(out.scheduled) <= sched.config.max_num_seqs
    assert sched.num_running <= sched.config.max_num_seqs
    ids = [s.request.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids))
    for s in out.scheduled:
        assert s.num_new_tokens >= 1
        assert NULL_BLOCK_ID not in s.block_ids
        assert len(s.block_ids) >= kv.blocks_needed(s.num_computed_tokens + s.num_new_tokens)
    # Every usable block is either free or held (possibly shared), never both or neither.
    held = {b.block_id for blocks in kv.req_blocks.values() for b in blocks}
    assert held.isdisjoint(kv.free_queue)
    assert kv.num_free_blocks + len(held) == kv.num_usable_blocks
    assert set(kv.req_blocks) == {r.request_id for r in sched.running}
    for r in sched.running:
        assert 0 <= r.num_computed_tokens <= r.num_tokens


def run_to_completion(sched: Scheduler, requests: list[Request], max_steps: int = 2000):
    """Add every request, step until done; returns (tokens, finish reason) per request id."""
    for r in requests:
        assert sched.add_request(r) is None
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    reasons: dict[str, str] = {}
    model = FakeModel(sched.kv_cache.block_size)
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        out, updates = step(sched, model=model)
        check_invariants(sched, out)
        assert not out.is_empty  # something always makes progress
        for u in updates:
            assert u.request_id not in reasons
            tokens[u.request_id] += u.new_token_ids
            if u.finish_reason is not None:
                reasons[u.request_id] = u.finish_reason
    else:
        raise AssertionError("scheduler did not finish")
    return tokens, reasons


def expected_tokens(prompt, n: int) -> list[int]:
    r = make_request("x", prompt)
    for _ in range(n):
        r.append_output_token(next_token(r))
    return r.output_token_ids


# ---- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_num_seqs", "max_num_batched_tokens", "max_model_len"])
def test_config_fields_below_one_raise_naming_the_field(field):
    with pytest.raises(ValueError, match=rf"^{field} must be >= 1, got 0$"):
        SchedulerConfig(**{field: 0})


def test_config_without_chunking_needs_a_budget_for_a_whole_context():
    with pytest.raises(ValueError, match=r"^max_num_batched_tokens \(100\) must be >= "):
        SchedulerConfig(max_num_batched_tokens=100, max_model_len=200, enable_chunked_prefill=False)
    SchedulerConfig(max_num_batched_tokens=200, max_model_len=200, enable_chunked_prefill=False)


def test_max_model_len_larger_than_the_cache_raises():
    with pytest.raises(ValueError, match=r"^max_model_len \(65\) does not fit in the KV cache "):
        Scheduler(SchedulerConfig(max_model_len=65), KVCacheManager(17, BS))
    Scheduler(SchedulerConfig(max_model_len=64), KVCacheManager(17, BS))  # exactly fits


def test_duplicate_request_id_raises():
    sched = make_scheduler()
    sched.add_request(make_request("a", [1, 2]))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("a", [3]))


# ---- admission, budget and chunked prefill ------------------------------------------------


def test_prompt_that_can_never_fit_is_rejected_with_an_error():
    sched = make_scheduler(max_model_len=16, num_blocks=5)
    req = make_request("long", range(16))
    update = sched.add_request(req)
    assert update == RequestUpdate("long", [], "error", req.error)
    assert "16 tokens" in req.error
    assert req.status == RequestStatus.FINISHED_ERROR
    assert not sched.has_unfinished()
    assert sched.schedule().is_empty


def test_prompt_one_shorter_than_the_context_gets_one_token():
    sched = make_scheduler(max_model_len=16, num_blocks=5)
    tokens, reasons = run_to_completion(sched, [make_request("r", range(15), max_tokens=None)])
    assert tokens == {"r": expected_tokens(range(15), 1)}
    assert reasons == {"r": "length"}


def test_single_request_prefill_then_decode():
    sched = make_scheduler()
    req = make_request("a", [5, 6, 7], max_tokens=3)
    sched.add_request(req)
    assert sched.num_waiting == 1
    out, updates = step(sched)
    assert shape(out) == [("a", 0, 3, True)]
    assert out.scheduled[0].block_ids == [1]
    assert updates == [RequestUpdate("a", [50], None, num_cached_tokens=0)]
    assert (sched.num_waiting, sched.num_running) == (0, 1)
    assert req.status == RequestStatus.RUNNING
    out, updates = step(sched)
    assert shape(out) == [("a", 3, 1, True)]
    assert updates == [RequestUpdate("a", [351], None)]
    out, updates = step(sched)
    assert shape(out) == [("a", 4, 1, True)]
    assert out.scheduled[0].block_ids == [1, 2]
    assert updates == [RequestUpdate("a", [460], "length")]
    assert req.output_token_ids == [50, 351, 460]
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert not sched.has_unfinished()
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_usable_blocks


def test_long_prompt_is_prefilled_in_chunks_and_samples_only_at_the_end():
    sched = make_scheduler(max_num_batched_tokens=4)
    req = make_request("a", range(10), max_tokens=2)
    sched.add_request(req)
    chunks = []
    for _ in range(3):
        out, updates = step(sched)
        chunks.append((shape(out), updates))
    assert chunks == [
        ([("a", 0, 4, False)], []),
        ([("a", 4, 4, False)], []),
        ([("a", 8, 2, True)], [RequestUpdate("a", [next_token(make_request("x", [9]))], None)]),
    ]
    out, updates = step(sched)
    assert shape(out) == [("a", 10, 1, True)]
    assert updates[0].finish_reason == "length"


def test_token_budget_is_respected_and_running_requests_go_first():
    sched = make_scheduler(max_num_batched_tokens=10)
    for i, rid in enumerate("abc"):
        sched.add_request(make_request(rid, range(10 * i, 10 * i + 6), max_tokens=5))
    out, _ = step(sched)
    assert shape(out) == [("a", 0, 6, True), ("b", 0, 4, False)]
    assert out.num_batched_tokens == 10
    out, _ = step(sched)  # running first: a decodes, b finishes its prompt, then c starts
    assert shape(out) == [("a", 6, 1, True), ("b", 4, 2, True), ("c", 0, 6, True)]
    assert out.num_batched_tokens == 9
    out, _ = step(sched)
    assert shape(out) == [("a", 7, 1, True), ("b", 6, 1, True), ("c", 6, 1, True)]


def test_running_requests_take_the_budget_before_a_waiting_prompt():
    sched = make_scheduler(max_num_batched_tokens=4)
    sched.add_request(make_request("a", [1, 2, 3], max_tokens=5))
    sched.add_request(make_request("b", [4, 5, 6], max_tokens=5))
    out, _ = step(sched)
    assert shape(out) == [("a", 0, 3, True), ("b", 0, 1, False)]
    sched.add_request(make_request("c", range(8), max_tokens=5))
    out, _ = step(sched)
    assert shape(out) == [("a", 3, 1, True), ("b", 1, 2, True), ("c", 0, 1, False)]


def test_prefill_and_decode_share_a_step():
    sched = make_scheduler()
    sched.add_request(make_request("a", [1, 2, 3], max_tokens=5))
    step(sched)
    sched.add_request(make_request("b", range(20), max_tokens=5))
    out, updates = step(sched)
    assert shape(out) == [("a", 3, 1, True), ("b", 0, 20, True)]
    assert [u.request_id for u in updates] == ["a", "b"]


def test_without_chunking_a_prompt_that_does_not_fit_the_budget_waits():
    sched = make_scheduler(max_num_batched_tokens=64, enable_chunked_prefill=False)
    sched.add_request(make_request("a", range(40), max_tokens=3))
    sched.add_request(make_request("b", range(100, 130), max_tokens=3))
    out, _ = step(sched)
    assert shape(out) == [("a", 0, 40, True)]
    out, _ = step(sched)
    assert shape(out) == [("a", 40, 1, True), ("b", 0, 30, True)]


def test_max_num_seqs_limits_running_requests():
    sched = make_scheduler(max_num_seqs=2)
    sched.add_request(make_request("a", [1], max_tokens=1))
    sched.add_request(make_request("b", [2], max_tokens=3))
    sched.add_request(make_request("c", [3], max_tokens=3))
    out, updates = step(sched)
    assert shape(out) == [("a", 0, 1, True), ("b", 0, 1, True)]
    assert updates[0].finish_reason == "length"
    out, _ = step(sched)  # a finished, so c gets the free seat
    assert shape(out) == [("b", 1, 1, True), ("c", 0, 1, True)]
    assert sched.num_running == 2


def test_waiting_requests_are_admitted_by_priority_then_arrival():
    sched = make_scheduler(max_num_seqs=1)
    sched.add_request(make_request("low", [1], max_tokens=1, priority=2, arrival_time=0.0))
    sched.add_request(make_request("late", [1], max_tokens=1, priority=0, arrival_time=2.0))
    sched.add_request(make_request("high", [1], max_tokens=1, priority=0, arrival_time=1.0))
    sched.add_request(make_request("mid", [1], max_tokens=1, priority=1, arrival_time=0.5))
    order = []
    while sched.has_unfinished():
        out, _ = step(sched)
        order += [s.request.request_id for s in out.scheduled]
    assert order == ["high", "late", "mid", "low"]


def test_prefix_cache_hit_is_reported_and_skipped():
    sched = make_scheduler()
    sched.add_request(make_request("a", range(10), max_tokens=1))
    step(sched)
    sched.add_request(make_request("b", range(10), max_tokens=1))
    out, updates = step(sched)
    assert shape(out) == [("b", 8, 2, True)]
    assert updates[0].num_cached_tokens == 8
    assert sched.kv_cache.stats.hits == 8


# ---- preemption ---------------------------------------------------------------------------


def test_preemption_frees_the_newest_and_requeues_it_ahead_of_later_arrivals():
    sched = make_scheduler(num_blocks=5, max_model_len=16)  # 4 usable blocks
    a = make_request("a", range(4), max_tokens=6, arrival_time=0.0)
    b = make_request("b", range(10, 14), max_tokens=6, arrival_time=1.0)
    c = make_request("c", range(20, 24), max_tokens=6, arrival_time=2.0)
    for r in (a, b, c):
        sched.add_request(r)
    out, _ = step(sched)
    assert shape(out) == [("a", 0, 4, True), ("b", 0, 4, True), ("c", 0, 4, True)]
    assert sched.kv_cache.num_free_blocks == 1
    d = make_request("d", range(30, 33), max_tokens=2, arrival_time=3.0)
    sched.add_request(d)
    out, _ = step(sched)
    # a takes the last block; b needs one, so c (newest) is preempted; d must wait.
    assert shape(out) == [("a", 4, 1, True), ("b", 4, 1, True)]
    assert out.preempted_ids == ["c"]
    assert c.status == RequestStatus.PREEMPTED
    assert c.num_computed_tokens == 0
    assert c.num_preemptions == 1
    assert sched.num_preemptions == 1
    assert sched.kv_cache.block_ids("c") == []
    assert c.output_token_ids == [next_token(make_request("x", range(20, 24)))]
    assert (sched.num_waiting, sched.num_running) == (2, 2)

    tokens = {"c": list(c.output_token_ids), "a": [], "b": [], "d": []}
    admitted = []
    while sched.has_unfinished():
        out, updates = step(sched)
        check_invariants(sched, out)
        admitted += [rid for rid, start, _, _ in shape(out) if start == 0]
        for u in updates:
            tokens[u.request_id] += u.new_token_ids
    assert admitted == ["c", "d"]  # c kept its place ahead of the later d
    assert c.num_preemptions == 1
    assert tokens["c"] == expected_tokens(range(20, 24), 6)
    assert tokens["d"] == expected_tokens(range(30, 33), 2)
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_usable_blocks


def test_preempted_request_recomputes_prompt_and_outputs_then_samples():
    sched = make_scheduler(num_blocks=3, max_model_len=8)  # 2 usable blocks
    a = make_request("a", range(4), max_tokens=4, arrival_time=0.0)
    b = make_request("b", range(10, 14), max_tokens=4, arrival_time=1.0)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    out, _ = step(sched)
    assert shape(out) == [("a", 4, 1, True)]
    assert out.preempted_ids == ["b"]
    step(sched)
    out, _ = step(sched)
    assert shape(out) == [("a", 6, 1, True)]
    out, _ = step(sched)  # a finished last step; b is recomputed from scratch
    assert shape(out) == [("b", 0, 5, True)]
    assert b.num_tokens == 6
    assert b.output_token_ids == expected_tokens(range(10, 14), 2)


def test_preempted_request_reuses_its_surviving_head_blocks():
    sched = make_scheduler(num_blocks=4, max_model_len=12)  # 3 usable blocks
    a = make_request("a", range(4), max_tokens=4, arrival_time=0.0)
    b = make_request("b", range(10, 18), max_tokens=4, arrival_time=1.0)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    out, _ = step(sched)
    assert out.preempted_ids == ["b"]  # its tail block is evicted first, for a
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    out, updates = step(sched)
    assert shape(out) == [("b", 4, 5, True)]
    assert updates[0].num_cached_tokens == 0  # reports the hit of its first admission


def test_lowest_priority_is_preempted_before_newer_requests():
    sched = make_scheduler(num_blocks=5, max_model_len=16)
    a = make_request("a", range(4), max_tokens=6, arrival_time=0.0, priority=0)
    b = make_request("b", range(10, 14), max_tokens=6, arrival_time=1.0, priority=5)
    c = make_request("c", range(20, 24), max_tokens=6, arrival_time=2.0, priority=0)
    for r in (a, b, c):
        sched.add_request(r)
    step(sched)
    assert [r.request_id for r in sched.running] == ["a", "c", "b"]
    out, _ = step(sched)
    # a takes the last block; c needs one: b has the lowest priority.
    assert shape(out) == [("a", 4, 1, True), ("c", 4, 1, True)]
    assert out.preempted_ids == ["b"]


def test_victim_is_lowest_priority_even_if_already_scheduled_this_step():
    sched = make_scheduler(num_blocks=4, max_model_len=12)  # 3 usable blocks
    low = make_request("low", range(5), max_tokens=8, priority=1, arrival_time=0.0)
    sched.add_request(low)
    step(sched)  # low: 6 tokens in 2 blocks
    high = make_request("high", range(10, 14), max_tokens=8, priority=0, arrival_time=1.0)
    sched.add_request(high)
    step(sched)  # high: 5 tokens in 1 block; the cache is full
    assert sched.kv_cache.num_free_blocks == 0
    out, _ = step(sched)  # low fits its 7th token; high needs a second block
    assert out.preempted_ids == ["low"]
    assert shape(out) == [("high", 4, 1, True)]


def test_victim_among_equal_arrival_times_is_the_newest_admitted():
    sched = make_scheduler(num_blocks=3, max_model_len=8)  # 2 usable blocks
    a = make_request("a", range(4), max_tokens=4)
    b = make_request("b", range(10, 14), max_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    out, _ = step(sched)
    assert out.preempted_ids == ["b"]
    assert shape(out) == [("a", 4, 1, True)]


def test_preempted_request_goes_ahead_of_later_added_requests_with_equal_arrival():
    sched = make_scheduler(num_blocks=3, max_model_len=8)  # 2 usable blocks
    a = make_request("a", range(4), max_tokens=4, arrival_time=0.0)
    b = make_request("b", range(10, 14), max_tokens=4, arrival_time=1.0)
    c = make_request("c", range(20, 23), max_tokens=4, arrival_time=1.0)  # added after b
    for r in (a, b, c):
        sched.add_request(r)
    step(sched)
    out, _ = step(sched)
    assert out.preempted_ids == ["b"]
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    out, _ = step(sched)  # b (5 tokens) needs both blocks, c (3 tokens) one: only one fits
    assert shape(out) == [("b", 0, 5, True)]


# ---- nothing lost under memory pressure ---------------------------------------------------


PRESSURE_WORKLOAD = [  # (prompt, max_tokens, priority)
    (list(range(1, 13)), 30, 0),
    (list(range(1, 9)) + [77, 78], 25, 1),  # shares a block with the first
    ([5] * 17, 20, 0),
    (list(range(40, 45)), 40, 2),
    (list(range(100, 121)), 12, 0),
    ([3, 1, 4, 1, 5, 9, 2, 6], 33, 1),
    (list(range(1, 13)), 18, 0),  # same prompt as the first
    ([8], 50, 0),
]


def workload(equal_arrivals: bool) -> list[Request]:
    return [
        make_request(
            f"r{i}",
            prompt,
            max_tokens,
            priority=prio,
            arrival_time=0.0 if equal_arrivals else float(i),
        )
        for i, (prompt, max_tokens, prio) in enumerate(PRESSURE_WORKLOAD)
    ]


@pytest.mark.parametrize("equal_arrivals", [False, True])
def test_every_request_finishes_with_the_same_tokens_under_memory_pressure(equal_arrivals):
    roomy = make_scheduler(num_blocks=129, max_model_len=64)
    tokens_roomy, reasons_roomy = run_to_completion(roomy, workload(equal_arrivals))
    assert roomy.num_preemptions == 0

    tight = make_scheduler(num_blocks=17, max_model_len=64, max_num_batched_tokens=16)
    tokens_tight, reasons_tight = run_to_completion(tight, workload(equal_arrivals))
    assert tight.num_preemptions > 0

    for (prompt, max_tokens, _), rid in zip(PRESSURE_WORKLOAD, tokens_roomy):
        assert tokens_roomy[rid] == expected_tokens(prompt, max_tokens)
    assert tokens_tight == tokens_roomy
    assert reasons_tight == reasons_roomy == {rid: "length" for rid in tokens_roomy}
    for sched in (roomy, tight):
        assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_usable_blocks
        assert sched.requests == {}


@pytest.mark.parametrize("seed", range(40))
def test_random_workloads_with_aborts_lose_nothing(seed):
    """Seeded random traffic: shared prefixes, staggered arrivals, priorities, aborts, tight
    caches and budgets, chunking on and off. Every request that is not aborted finishes with
    exactly the tokens the fake model implies, and the cache is empty at the end."""
    rng = random.Random(seed)
    max_model_len = rng.choice([16, 32, 64])
    chunked = rng.random() < 0.7
    budget = rng.choice([4, 8, 16, 64]) if chunked else 64
    sched = make_scheduler(
        num_blocks=max_model_len // BS + 1 + rng.randint(0, 8),
        max_model_len=max_model_len,
        max_num_batched_tokens=budget,
        max_num_seqs=rng.choice([1, 2, 4, 256]),
        enable_chunked_prefill=chunked,
    )
    prefixes = [[rng.randrange(900) for _ in range(rng.randint(1, 12))] for _ in range(3)]
    arrivals: dict[int, list[Request]] = {}
    for i in range(rng.randint(1, 10)):
        prompt = rng.choice(prefixes) + [rng.randrange(900) for _ in range(rng.randint(0, 8))]
        request = make_request(
            f"r{i}",
            prompt[:max_model_len],  # may be too long: rejected
            rng.choice([None, 1, 3, 10, 40]),
            priority=rng.randint(0, 2),
            arrival_time=float(rng.randint(0, 5)),
        )
        arrivals.setdefault(rng.randint(0, 15), []).append(request)
    requests = [r for batch in arrivals.values() for r in batch]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    reasons: dict[str, str] = {}
    model = FakeModel()
    for t in range(1000):
        for request in arrivals.get(t, []):
            rejected = sched.add_request(request)
            if rejected is not None:
                reasons[rejected.request_id] = rejected.finish_reason
        if sched.requests and rng.random() < 0.03:
            victim = rng.choice(sorted(sched.requests))
            (update,) = sched.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
            reasons[victim] = update.finish_reason
        if t > 15 and not sched.has_unfinished():
            break
        out, updates = step(sched, model=model)
        check_invariants(sched, out)
        for u in updates:
            tokens[u.request_id] += u.new_token_ids
            if u.finish_reason is not None:
                reasons[u.request_id] = u.finish_reason
    else:
        raise AssertionError("scheduler did not finish")
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_usable_blocks
    assert sorted(reasons) == sorted(tokens)
    for r in requests:
        if r.num_prompt_tokens >= max_model_len:
            assert reasons[r.request_id] == "error"
        elif reasons[r.request_id] != "abort":
            room = max_model_len - r.num_prompt_tokens
            n = min(r.sampling_params.max_tokens or room, room)
            assert tokens[r.request_id] == expected_tokens(r.prompt_token_ids, n)
            assert reasons[r.request_id] == "length"


def test_a_request_alone_in_a_full_cache_runs_to_max_model_len():
    sched = make_scheduler(num_blocks=5, max_model_len=16)
    tokens, reasons = run_to_completion(sched, [make_request("r", range(3), max_tokens=None)])
    assert tokens == {"r": expected_tokens(range(3), 13)}
    assert reasons == {"r": "length"}


# ---- abort --------------------------------------------------------------------------------


def test_abort_running_request_frees_its_blocks_at_once():
    sched = make_scheduler()
    kv = sched.kv_cache
    req = make_request("a", range(9))
    sched.add_request(req)
    step(sched)
    assert kv.num_free_blocks == kv.num_usable_blocks - 3
    updates = sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert updates == [RequestUpdate("a", [], "abort", num_cached_tokens=0)]
    assert kv.num_free_blocks == kv.num_usable_blocks
    assert req.status == RequestStatus.FINISHED_ABORTED
    assert not sched.has_unfinished()
    assert sched.schedule().is_empty


def test_abort_waiting_request_removes_it_from_the_queue():
    sched = make_scheduler(max_num_seqs=1)
    sched.add_request(make_request("a", [1], max_tokens=5))
    sched.add_request(make_request("b", [2], max_tokens=5))
    sched.add_request(make_request("c", [3], max_tokens=5))
    step(sched)
    updates = sched.finish_requests(["b", "nope"], RequestStatus.FINISHED_ABORTED)
    assert updates == [RequestUpdate("b", [], "abort", num_cached_tokens=0)]
    assert sched.num_waiting == 1
    assert sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED) == []
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    out, _ = step(sched)
    assert shape(out) == [("c", 0, 1, True)]


def test_abort_preempted_request():
    sched = make_scheduler(num_blocks=3, max_model_len=8)
    sched.add_request(make_request("a", range(4), max_tokens=4, arrival_time=0.0))
    sched.add_request(make_request("b", range(10, 14), max_tokens=4, arrival_time=1.0))
    step(sched)
    out, _ = step(sched)
    assert out.preempted_ids == ["b"]
    assert sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)[0].finish_reason == "abort"
    assert sched.num_waiting == 0
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_usable_blocks


def test_abort_between_schedule_and_update_drops_that_request_from_the_update():
    sched = make_scheduler()
    sched.add_request(make_request("a", [1, 2], max_tokens=5))
    sched.add_request(make_request("b", [3, 4], max_tokens=5))
    out = sched.schedule()
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert sched.kv_cache.block_ids("a") == []
    updates = sched.update(out, {"a": 7, "b": 8})
    assert updates == [RequestUpdate("b", [8], None)]
    assert [r.request_id for r in sched.running] == ["b"]


# ---- stop conditions ----------------------------------------------------------------------


def run_with_tokens(request: Request, tokens: list[int], **config) -> list[RequestUpdate]:
    sched = make_scheduler(**config)
    sched.add_request(request)
    updates = []
    for token in tokens:
        if not sched.has_unfinished():
            break
        updates += step(sched, {request.request_id: token})[1]
    return updates


def reasons_of(updates: list[RequestUpdate]) -> list[str | None]:
    return [u.finish_reason for u in updates]


def test_eos_stops():
    req = make_request("r", [1, 2], max_tokens=10)
    updates = run_with_tokens(req, [5, 6, EOS, 7])
    assert reasons_of(updates) == [None, None, "stop"]
    assert req.output_token_ids == [5, 6, EOS]
    assert req.status == RequestStatus.FINISHED_STOPPED


def test_ignore_eos_keeps_going_until_max_tokens():
    req = make_request("r", [1, 2], max_tokens=3, ignore_eos=True)
    updates = run_with_tokens(req, [EOS, EOS, EOS, EOS])
    assert reasons_of(updates) == [None, None, "length"]
    assert req.output_token_ids == [EOS, EOS, EOS]


def test_stop_token_ids_stop_even_with_ignore_eos():
    req = make_request("r", [1], max_tokens=10, ignore_eos=True, stop_token_ids=[42])
    updates = run_with_tokens(req, [5, 42, 6])
    assert reasons_of(updates) == [None, "stop"]
    assert req.output_token_ids == [5, 42]


def test_min_tokens_suppresses_eos_and_stop_tokens_until_reached():
    req = make_request("r", [1], max_tokens=10, min_tokens=3, stop_token_ids=[42])
    updates = run_with_tokens(req, [EOS, 42, EOS, 5])
    assert reasons_of(updates) == [None, None, "stop"]
    assert req.output_token_ids == [EOS, 42, EOS]


def test_max_tokens_gives_length_and_eos_on_the_last_token_gives_stop():
    req = make_request("r", [1], max_tokens=2)
    assert reasons_of(run_with_tokens(req, [5, 6, 7])) == [None, "length"]
    req = make_request("r", [1], max_tokens=2)
    assert reasons_of(run_with_tokens(req, [5, EOS])) == [None, "stop"]


def test_context_length_gives_length():
    req = make_request("r", range(13), max_tokens=None)
    updates = run_with_tokens(req, [5, 6, 7, 8, 9], max_model_len=16, num_blocks=5)
    assert reasons_of(updates) == [None, None, "length"]
    assert req.num_tokens == 16


def test_finished_request_frees_its_blocks_in_update():
    sched = make_scheduler()
    sched.add_request(make_request("r", range(9), max_tokens=1))
    _, updates = step(sched)
    assert updates[0].finish_reason == "length"
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_usable_blocks
    assert sched.num_running == 0
    assert sched.requests == {}
