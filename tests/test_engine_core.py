"""`EngineCore.step` on a runner that is not a model: scheduler, KV manager, stop handling and
outputs (with queue times on a fake clock) on plain data, without torch or a checkpoint; and
the core process's loop speaking the typed contract over ZMQ, in a thread."""

from __future__ import annotations

import threading

import zmq

from fleetserve.engine import messages
from fleetserve.engine.core import EngineCore
from fleetserve.engine.core_proc import CoreLoop
from fleetserve.engine.messages import AbortRequests, Outputs, Shutdown
from fleetserve.engine.outputs import EngineCoreOutput
from fleetserve.engine.request import EngineCoreRequest
from fleetserve.engine.runner import RunnerOutput
from fleetserve.engine.sampling_params import SamplingParams
from fleetserve.engine.scheduler import SchedulerConfig, SchedulerOutput

TOKEN = 7
EOS = 99


class FixedRunner:
    """Samples `TOKEN` for every request, or EOS for those named in `eos_after` once they
    have that many output tokens. Records each batch as (request id, new tokens, samples)."""

    num_blocks = 9  # 8 usable blocks of 4 tokens
    block_size = 4
    vocab_size = 100
    eos_token_ids = frozenset({EOS})

    def __init__(self, eos_after: dict[str, int] | None = None) -> None:
        self.eos_after = eos_after or {}
        self.batches: list[list[tuple[str, int, bool]]] = []

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self.batches.append(
            [(s.request.request_id, s.num_new_tokens, s.samples) for s in sched.scheduled]
        )
        out = RunnerOutput()
        for s in sched.scheduled:
            if s.samples:
                r = s.request
                eos = self.eos_after.get(r.request_id) == r.num_output_tokens
                out.sampled[r.request_id] = EOS if eos else TOKEN
        return out


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_core(runner: FixedRunner, clock: FakeClock, **config) -> EngineCore:
    config.setdefault("max_num_seqs", 2)
    config.setdefault("max_num_batched_tokens", 16)
    config.setdefault("max_model_len", 32)
    return EngineCore(runner, SchedulerConfig(**config), clock=clock)


def add(core: EngineCore, request_id: str, prompt_len: int, max_tokens: int) -> None:
    """A prompt of its own (no prefix-cache hit on another's) with tokens from `first`."""
    params = SamplingParams(max_tokens=max_tokens)
    first = sum(map(ord, request_id)) % 50
    prompt = list(range(first, first + prompt_len))
    assert core.add_request(EngineCoreRequest(request_id, prompt, params)) == []


def by_id(outputs: list[EngineCoreOutput]) -> dict[str, EngineCoreOutput]:
    return {o.request_id: o for o in outputs}


def test_step_with_a_fixed_runner_schedules_stops_frees_and_times_the_queue():
    runner, clock = FixedRunner(eos_after={"eos": 1}), FakeClock(100.0)
    core = make_core(runner, clock)
    add(core, "a", prompt_len=6, max_tokens=3)
    add(core, "eos", prompt_len=5, max_tokens=10)
    add(core, "late", prompt_len=3, max_tokens=1)  # max_num_seqs=2: waits for a place
    assert core.stats()["num_waiting"] == 3

    clock.now = 101.0
    first = by_id(core.step())
    assert runner.batches[-1] == [("a", 6, True), ("eos", 5, True)]
    assert set(first) == {"a", "eos"}
    for out in first.values():
        assert out.new_token_ids == [TOKEN] and not out.finished
        assert (out.scheduled_time, out.queue_time) == (101.0, 1.0)

    clock.now = 102.5
    second = by_id(core.step())
    assert runner.batches[-1] == [("a", 1, True), ("eos", 1, True)]
    assert second["a"].new_token_ids == [TOKEN] and not second["a"].finished
    assert second["eos"].new_token_ids == [EOS] and second["eos"].finish_reason == "stop"
    # Queue times go out once, with the first output after the first schedule.
    assert all(o.queue_time is None and o.scheduled_time is None for o in second.values())

    clock.now = 104.0
    third = by_id(core.step())
    assert runner.batches[-1] == [("a", 1, True), ("late", 3, True)]
    assert third["a"].new_token_ids == [TOKEN] and third["a"].finish_reason == "length"
    assert third["late"].finish_reason == "length"
    assert (third["late"].scheduled_time, third["late"].queue_time) == (104.0, 4.0)

    assert not core.has_unfinished() and core.step() == []
    stats = core.stats()
    assert stats["prompt_tokens_total"] == 6 + 5 + 3
    assert stats["generation_tokens_total"] == 3 + 2 + 1
    assert stats["num_free_blocks"] == stats["num_blocks"] == 8
    assert stats["kv_cache_usage"] == 0
    # Each full block was registered for reuse: "a" filled two (9 tokens), "eos" one.
    stored = [h for e in core.take_kv_events() if e.kind == "stored" for h in e.block_hashes]
    assert len(stored) == 3


def test_a_chunked_prefill_reports_its_queue_time_with_its_first_token():
    runner, clock = FixedRunner(), FakeClock(10.0)
    core = make_core(runner, clock, max_num_batched_tokens=4)
    add(core, "long", prompt_len=10, max_tokens=2)
    clock.now = 11.0
    assert core.step() == []  # 4 of 10 prompt tokens: nothing to report yet
    clock.now = 12.0
    assert core.step() == []
    clock.now = 13.0
    (out,) = core.step()
    assert runner.batches == [[("long", 4, False)], [("long", 4, False)], [("long", 2, True)]]
    assert out.new_token_ids == [TOKEN]
    assert (out.scheduled_time, out.queue_time) == (11.0, 1.0)  # its first schedule


def test_rejects_and_aborts_come_back_as_outputs_and_free_their_blocks():
    runner, clock = FixedRunner(), FakeClock(0.0)
    core = make_core(runner, clock)
    bad = EngineCoreRequest("bad", [1, 100], SamplingParams(max_tokens=2))
    (rejected,) = core.add_request(bad)
    assert rejected.finish_reason == "error" and "[0, 100)" in rejected.error
    add(core, "gone", prompt_len=6, max_tokens=20)
    core.step()
    assert core.stats()["num_free_blocks"] < 8
    (aborted,) = core.abort_requests(["gone", "never-added"])
    assert aborted.request_id == "gone" and aborted.finish_reason == "abort"
    assert not core.has_unfinished() and core.stats()["num_free_blocks"] == 8


def test_a_runner_that_raises_ends_only_the_request_that_makes_it_raise():
    class Poisoned(FixedRunner):
        def execute(self, sched: SchedulerOutput) -> RunnerOutput:
            if any(s.request.request_id == "poison" for s in sched.scheduled):
                raise IndexError("index out of range in self")
            return super().execute(sched)

    core = make_core(Poisoned(), FakeClock(0.0))
    add(core, "poison", prompt_len=3, max_tokens=4)
    add(core, "fine", prompt_len=3, max_tokens=2)
    outs = by_id(core.step())
    assert outs["poison"].finish_reason == "error" and "IndexError" in outs["poison"].error
    assert outs["fine"].new_token_ids == [TOKEN]
    (last,) = core.step()
    assert last.request_id == "fine" and last.finish_reason == "length"
    assert core.stats()["num_free_blocks"] == 8


def test_the_core_loop_speaks_the_contract_and_survives_garbage():
    ctx = zmq.Context()
    to_core, inbox = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    inbox.bind("inproc://to-core")
    to_core.connect("inproc://to-core")
    outbox, from_core = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    from_core.bind("inproc://from-core")
    outbox.connect("inproc://from-core")
    loop = CoreLoop(make_core(FixedRunner(), FakeClock(5.0)), inbox, outbox)
    thread = threading.Thread(target=loop.run, daemon=True)
    try:
        to_core.send(b"\xc1 not msgpack")
        to_core.send(messages.encode(Outputs([], [])))  # a core message, the wrong way
        to_core.send(messages.encode(AbortRequests(["never-added"])))
        request = EngineCoreRequest("r", [1, 2, 3], SamplingParams(max_tokens=2))
        to_core.send(messages.encode(request))
        thread.start()
        ticks: list[Outputs] = []
        while not any(o.finished for t in ticks for o in t.outputs):
            assert from_core.poll(10_000), "no tick from the core loop"
            ticks.append(messages.decode(from_core.recv()))
        to_core.send(messages.encode(Shutdown()))
        thread.join(10)
        assert not thread.is_alive()
    finally:
        for sock in (to_core, inbox, outbox, from_core):
            sock.close(linger=0)
        ctx.term()
    assert all(isinstance(t, Outputs) for t in ticks)
    outs = [o for t in ticks for o in t.outputs]
    assert [(o.request_id, o.new_token_ids) for o in outs] == [("r", [TOKEN]), ("r", [TOKEN])]
    assert outs[-1].finish_reason == "length" and outs[0].queue_time == 0.0
    assert any(t.stats is not None for t in ticks) and not loop.live
