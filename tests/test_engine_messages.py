"""The engine contract's codec: every message survives the trip; nothing outside the contract
is built from the wire or sent onto it."""

from __future__ import annotations

import msgpack
import pytest

from fleetserve.engine import messages
from fleetserve.engine.kv_cache_manager import KVEvent
from fleetserve.engine.messages import (
    AbortRequests,
    Failed,
    Outputs,
    Ready,
    Shutdown,
    StatsRequest,
)
from fleetserve.engine.outputs import EngineCoreOutput
from fleetserve.engine.request import EngineCoreRequest
from fleetserve.engine.sampling_params import SamplingParams


def test_every_message_round_trips():
    params = SamplingParams(
        temperature=0.5, seed=2**64 - 1, stop=["x"], stop_token_ids=[3], extra={"k": [1, "v"]}
    )
    output = EngineCoreOutput(
        "r", [4, 5], new_logprobs=[{4: -0.1, 9: -2.0}], finish_reason="length",
        prompt_logprobs=[None, {5: -1.5}], scheduled_time=12.5, queue_time=0.25,
    )  # fmt: skip
    event = KVEvent("stored", (11, 12), 7, ((1, 2), (3, 4)))
    for message in (
        EngineCoreRequest("r", [1, 2, 3], params, priority=-2, arrival_time=1.5),
        AbortRequests(["a", "b"]),
        StatsRequest(),
        Shutdown(),
        Ready(max_model_len=512, block_size=16, vocab_size=100, eos_token_ids=[2], pid=1),
        Failed("OSError: no such file"),
        Outputs([output], [event], {"num_running": 1}),
        Outputs([], [], None),
    ):
        decoded = messages.decode(messages.encode(message))
        assert type(decoded) is type(message)
        if isinstance(message, Outputs) and message.kv_events:
            # msgpack has no tuples: the event comes back with lists, equal field by field.
            (got,) = decoded.kv_events
            assert got.block_hashes == [11, 12] and got.token_ids == [[1, 2], [3, 4]]
            assert decoded.outputs == message.outputs and decoded.stats == message.stats
        else:
            assert decoded == message
    request = messages.decode(messages.encode(EngineCoreRequest("r", [1], params)))
    assert request.sampling_params.extra == {"k": [1, "v"]}


def test_a_user_dict_is_never_taken_for_a_message():
    params = SamplingParams(extra={"__type__": "Shutdown", "0": 1})
    decoded = messages.decode(messages.encode(EngineCoreRequest("r", [1], params)))
    assert decoded.sampling_params.extra == {"__type__": "Shutdown", "0": 1}


def test_only_the_contract_goes_on_the_wire_or_comes_off_it():
    with pytest.raises(TypeError, match="cannot send"):
        messages.encode(AbortRequests([object()]))
    with pytest.raises(TypeError, match="cannot send"):
        messages.encode(SamplingParams(extra={"x": object()}))
    foreign = msgpack.packb(msgpack.ExtType(1, msgpack.packb(["Popen", {"args": ["sh"]}])))
    with pytest.raises(ValueError, match="not an engine message"):
        messages.decode(foreign)
    bad_params = msgpack.ExtType(1, msgpack.packb(["SamplingParams", {"top_p": 7}]))
    with pytest.raises(ValueError, match="top_p"):
        messages.decode(msgpack.packb(bad_params))
