"""`AsyncEngine` and the engine-core process without HTTP: bad messages do not kill the core,
closing a stream aborts it and frees its blocks, n > 1 fans out, KV events flow."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from fleetserve.engine.async_engine import AsyncEngine, RequestFailedError
from fleetserve.engine.block_hash import hash_block_chain
from fleetserve.engine.config import EngineConfig
from fleetserve.engine.messages import AbortRequests, Failed
from fleetserve.engine.sampling_params import SamplingParams


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


async def wait_idle(engine: AsyncEngine) -> dict:
    for _ in range(200):
        stats = await engine.fresh_stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.stats()}")


def test_async_engine(tiny_llama):
    config = EngineConfig(
        model=str(tiny_llama), dtype="float32", num_threads=1, kv_cache_memory=32 * 2**20
    )

    async def run() -> None:
        engine = AsyncEngine(config)
        await engine.start()
        try:
            assert engine.check_health() and engine.max_model_len == 512
            await bad_input_is_survived(engine)
            await a_request_that_cannot_be_sent_is_not_counted(engine)
            await closing_a_stream_aborts_it(engine)
            await n_fans_out_and_kv_events_flow(engine)
        finally:
            await engine.shutdown()
        assert not engine.check_health()

    asyncio.run(run())


def ext(name: str, fields: dict) -> msgpack.ExtType:
    """A dataclass as `messages` puts it on the wire, built by hand (so it can be wrong)."""
    return msgpack.ExtType(1, msgpack.packb([name, fields]))


async def bad_input_is_survived(engine: AsyncEngine) -> None:
    send = engine.core.send_encoded
    send(b"\xc1 not msgpack")
    send(msgpack.packb(["frobnicate", None]))  # a loose list is not a message
    send(msgpack.packb(ext("Frobnicate", {})))  # nor is a class outside the contract
    send(msgpack.packb(ext("EngineCoreRequest", {"request_id": "no-fields"})))
    bad_params = ext("SamplingParams", {"top_p": 7})
    bad = {"request_id": "bad", "prompt_token_ids": [5], "sampling_params": bad_params}
    send(msgpack.packb(ext("EngineCoreRequest", bad)))
    engine.core.send(Failed("a core message sent the wrong way"))
    engine.core.send(AbortRequests(["never-added"]))
    outs = [o async for o in engine.generate([5, 6, 7], greedy(5), "good")]
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 5
    assert sum(len(o.outputs[0].token_ids_delta) for o in outs) == 5
    # An id already in flight is refused up front.
    first = engine.generate([5, 6], greedy(50), "twice")
    await anext(first)
    with pytest.raises(ValueError, match="already in use"):
        await anext(engine.generate([5, 6], greedy(5), "twice"))
    await first.aclose()
    assert engine.check_health()


async def a_request_that_cannot_be_sent_is_not_counted(engine: AsyncEngine) -> None:
    unsendable = greedy(5, n=3, extra={"not msgpack": object()})
    with pytest.raises(ValueError, match="cannot be sent"):
        await anext(engine.generate([5, 6], unsendable, "unsendable"))
    assert engine.num_in_flight == 0 and not engine._processor.parents
    # The same id is free again, and seeds near 2**64 - 1 fan out (seed + i wraps).
    params = SamplingParams(n=3, temperature=1.0, seed=2**64 - 1, max_tokens=3, ignore_eos=True)
    final = [o async for o in engine.generate([5, 6], params, "unsendable")][-1]
    assert [len(c.token_ids) for c in final.outputs] == [3, 3, 3]
    assert engine.num_in_flight == 0


async def closing_a_stream_aborts_it(engine: AsyncEngine) -> None:
    before = (await wait_idle(engine))["generation_tokens_total"]
    stream = engine.generate(list(range(3, 40)), greedy(400), "long")
    await anext(stream)
    assert engine.num_in_flight == 1
    await stream.aclose()
    assert engine.num_in_flight == 0
    stats = await wait_idle(engine)
    assert stats["kv_cache_usage"] == 0
    assert stats["generation_tokens_total"] - before < 400
    # abort() from elsewhere ends the consumer's iteration with an error.
    other = engine.generate([7, 8, 9], greedy(400), "aborted")
    await anext(other)
    engine.abort("aborted")
    with pytest.raises(RequestFailedError):
        async for _ in other:
            pass
    assert (await wait_idle(engine))["kv_cache_usage"] == 0


async def n_fans_out_and_kv_events_flow(engine: AsyncEngine) -> None:
    sub = engine.subscribe_kv_events()
    prompt = list(range(100, 140))  # two full blocks of 16
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=4, ignore_eos=True)
    final = [o async for o in engine.generate(prompt, params, "fan")][-1]
    assert [c.index for c in final.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 4 for c in final.outputs)
    want = hash_block_chain(prompt, engine.block_size)
    stored: list[int] = []
    while not set(want) <= set(stored):
        batch = await asyncio.wait_for(anext(sub), 10)
        stored += [h for e in batch if e["kind"] == "stored" for h in e["block_hashes"]]
    sub.close()
