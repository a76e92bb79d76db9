"""The pure half of migration (continuation requests, re-wrapped chunks), SSE helpers, and
the gateway's tokenizer helpers."""

from __future__ import annotations

import asyncio
import json

import pytest

from fleetserve.gateway.continuation import (
    CARRIED_FIELDS,
    COMPLETION_DEFAULT_MAX_TOKENS,
    chat_logprobs,
    client_chunk,
    continuation_body,
    continuation_seed,
    max_tokens_of,
    owed_max_tokens,
    usage_chunk,
)
from fleetserve.gateway.stream_state import StreamState
from fleetserve.gateway.tokenizer import PromptTokenizer, estimate_prompt_tokens
from fleetserve.gateway.upstream import UpstreamError, error_payload, is_retryable_status
from fleetserve.http.sse import encode_event, iter_sse_data
from fleetserve.testing.fake_replica import ByteTokenizer


def test_continuation_of_a_chat_request():
    original = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10,
        "temperature": 0,
        "stop": ["\n"],
        "min_tokens": 4,
        "logprobs": True,
        "top_logprobs": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 1,
        "tools": [],
    }
    body = continuation_body(original, True, [1, 2, 3], [7, 8, 9])
    assert body == {
        "model": "m",
        "temperature": 0,
        "stop": ["\n"],
        "prompt": [1, 2, 3, 7, 8, 9],
        "stream": True,
        "return_token_ids": True,
        "n": 1,
        "max_tokens": 7,
        "min_tokens": 1,
        "logprobs": 2,
    }


# Every field a fleetserve replica reads, with a value that is not its default.
EVERY_FIELD = {
    "model": "m",
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 5,
    "min_p": 0.05,
    "stop": ["END", "\n\n"],
    "stop_token_ids": [7, 9],
    "ignore_eos": True,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "repetition_penalty": 1.2,
    "skip_special_tokens": False,
    "spaces_between_special_tokens": False,
    "include_stop_str_in_output": True,
    "logit_bias": {"5": 1.0},
    "user": "u1",
    "cache_salt": "tenant-a",
    "priority": 3,
}


@pytest.mark.parametrize("chat", [True, False])
def test_continuation_carries_every_field(chat):
    original = {
        **EVERY_FIELD,
        "seed": 1234,
        "min_tokens": 10,
        "max_tokens": 50,
        "logprobs": True if chat else 2,
        "top_logprobs": 2,
        "echo": True,
        "prompt_logprobs": 1,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "n": 1,
    }
    body = continuation_body(original, chat, [1, 2], [3, 4, 5])
    assert {k: body[k] for k in EVERY_FIELD} == EVERY_FIELD
    assert set(CARRIED_FIELDS) == set(EVERY_FIELD)
    assert body["max_tokens"] == 47 and body["min_tokens"] == 7 and body["logprobs"] == 2
    assert body["seed"] == continuation_seed(1234, 3) != 1234
    assert 0 <= body["seed"] < 2**63 and continuation_seed(1234, 3) == body["seed"]
    assert continuation_seed(1234, 0) == 1234  # nothing sent: the very same draws
    # the prompt went out with the first chunk; the gateway counts usage itself
    assert not {"echo", "prompt_logprobs", "stream_options", "top_logprobs"} & set(body)


def test_continuation_asks_for_exactly_what_is_owed():
    # a chat request without a budget runs to the context length on the replica: so does
    # its continuation (an explicit null: a completion request without one gets only 16)
    chat = continuation_body({"messages": []}, True, [1], [5, 6])
    assert "max_tokens" in chat and chat["max_tokens"] is None
    # a completion request without max_tokens was given 16 by the replica
    assert owed_max_tokens({"prompt": "x"}, False) == COMPLETION_DEFAULT_MAX_TOKENS == 16
    assert continuation_body({"prompt": "x"}, False, [1], [5])["max_tokens"] == 15
    assert continuation_body({"prompt": "x"}, False, [1], [5] * 16) is None
    assert (
        continuation_body({"prompt": "x", "max_tokens": None}, False, [1], [5])["max_tokens"]
        is None
    )
    assert continuation_body({"max_tokens": 3}, False, [1], [5, 6, 7]) is None
    both = {"max_completion_tokens": 5, "max_tokens": 9}
    assert continuation_body(both, True, [1], [5])["max_tokens"] == 4
    assert max_tokens_of(both, True) == 5 and owed_max_tokens(both, True) == 5
    assert max_tokens_of(both, False) == 9
    assert continuation_body({"logprobs": 3}, False, [1], [])["logprobs"] == 3
    spent = continuation_body({"min_tokens": 2, "max_tokens": 9}, False, [1], [5, 6, 7])
    assert spent["min_tokens"] == 0


def test_client_chunks_in_both_formats():
    chat = client_chunk(
        chat=True,
        stream_id="c1",
        created=5,
        model="m",
        text="ab",
        finish_reason=None,
        token_ids=[1, 2],
    )
    assert chat == {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"content": "ab"},
                "logprobs": None,
                "finish_reason": None,
                "stop_reason": None,
                "token_ids": [1, 2],
            }
        ],
    }
    done = client_chunk(
        chat=False, stream_id="c1", created=5, model="m", text="", finish_reason="length"
    )
    assert done["object"] == "text_completion" and done["choices"][0]["text"] == ""
    assert "token_ids" not in done["choices"][0]
    usage = usage_chunk(
        chat=True, stream_id="c1", created=5, model="m", prompt_tokens=3, completion_tokens=4
    )
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 7


def test_completion_logprobs_become_chat_logprobs():
    lp = {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.1, -0.2],
        # the sampled token first, then the top-N, as the replica's completions send them
        "top_logprobs": [{"c": -2.0, "a": -0.1, "d": -3.0}, None],
    }
    out = chat_logprobs(lp, top_n=2)["content"]
    assert out[0]["token"] == "a" and out[0]["logprob"] == -0.1 and out[0]["bytes"] == [97]
    assert [t["token"] for t in out[0]["top_logprobs"]] == ["a", "c"]  # best first, top_n
    assert out[1]["top_logprobs"] == []
    assert chat_logprobs(lp)["content"][0]["top_logprobs"] == []  # logprobs without top
    assert chat_logprobs(None) is None


def test_sse_parsing_and_encoding():
    async def lines():
        for line in ['data: {"a":1}', "", ": comment", "data: x", "data: y", "", "data: [DONE]"]:
            yield line

    async def collect():
        return [d async for d in iter_sse_data(lines())]

    assert asyncio.run(collect()) == ['{"a":1}', "x\ny", "[DONE]"]
    assert encode_event({"a": 1}) == b'data: {"a":1}\n\n'


def test_error_events_and_statuses():
    assert error_payload('{"error": {"message": "engine died"}}') == {"message": "engine died"}
    assert error_payload('{"choices": [{"text": "error"}]}') is None
    assert error_payload("[DONE]") is None
    assert all(is_retryable_status(s) for s in (502, 503, 504, 429, 408))
    assert not any(is_retryable_status(s) for s in (400, 401, 404, 413, 422))
    # a 500 is the request's (passed on, not retried) unless the engine is dead
    assert not is_retryable_status(500, b'{"error": {"message": "boom"}}')
    assert is_retryable_status(500, b'{"error": {"code": "engine_dead"}}')


def test_prompt_tokenizer_mirrors_the_replica():
    tok = PromptTokenizer(ByteTokenizer())
    assert tok.prompt_ids({"prompt": "ab"}, False) == [97, 98]
    assert tok.prompt_ids({"prompt": ["ab"]}, False) == [97, 98]
    assert tok.prompt_ids({"prompt": [5, 6]}, False) == [5, 6]
    assert tok.prompt_ids({"prompt": ["a", "b"]}, False) is None  # a batch
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert bytes(tok.prompt_ids(chat, True)) == b"<|user|>hi\n<|assistant|>"
    assert estimate_prompt_tokens({"prompt": "x" * 40}, False) == 11
    assert estimate_prompt_tokens({"messages": [{"role": "u", "content": "y" * 8}]}, True) == 3


# ---- StreamState: the client's view of one stream, on plain events ----------------------------


def _chunk(text: str, ids: list[int], finish=None, prompt=None, chat=False) -> str:
    choice = {"index": 0, "token_ids": ids, "finish_reason": finish}
    if chat:
        choice["delta"] = {"content": text}
    else:
        choice["text"] = text
    if prompt is not None:
        choice["prompt_token_ids"] = prompt
    return json.dumps({"id": "cmpl-1", "created": 7, "model": "m", "choices": [choice]})


def _decode(events: list[bytes], chat: bool) -> str:
    text = ""
    for e in events:
        data = e.decode()[6:].strip()
        if data != "[DONE]":
            for c in json.loads(data).get("choices", ()):
                text += (c.get("delta") or {}).get("content", "") if chat else c.get("text", "")
    return text


def test_stream_state_strips_ids_and_keeps_them():
    state = StreamState({"prompt": "ab", "max_tokens": 4}, chat=False, request_id="r")
    (event,) = state.on_event(_chunk("x", [120], prompt=[97, 98]))
    assert b"token_ids" not in event and state.prompt_ids == [97, 98]
    state.on_event(_chunk("y", [121], finish="length"))
    assert state.generated[0] == [120, 121] and state.text_sent[0] == "xy" and state.finished
    assert state.on_event("[DONE]")[-1] == b"data: [DONE]\n\n" and state.done
    kept = StreamState({"return_token_ids": True}, chat=False, request_id="r")
    assert b'"token_ids":[120]' in kept.on_event(_chunk("x", [120], prompt=[1]))[0]


def test_stream_state_continues_with_exact_text_and_usage():
    tok = ByteTokenizer()
    body = {"prompt": "hi", "max_tokens": 6, "stream_options": {"include_usage": True}}
    state = StreamState(body, chat=True, request_id="r")
    out = state.on_event(_chunk("ab", [97, 98], prompt=[104, 105], chat=True))
    cont = state.continue_with(tok)
    assert cont["prompt"] == [104, 105, 97, 98] and cont["max_tokens"] == 4
    # the continuation's own text is ignored: the gateway detokenizes its ids
    out += state.on_event(_chunk("IGNORED", [99, 100], prompt=[0]))
    out += state.on_event(_chunk("", [101, 102], finish="length"))
    assert state.done and _decode(out, chat=True) == "abcdef"
    usage = json.loads(out[-2].decode()[6:])["usage"]
    assert usage == {
        "prompt_tokens": 2,
        "completion_tokens": 6,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert all(json.loads(e.decode()[6:])["id"] == "cmpl-1" for e in out[:-1])


def test_stream_state_finds_a_stop_string_across_the_seam():
    state = StreamState({"prompt": "p", "stop": ["cde"]}, chat=False, request_id="r")
    out = state.on_event(_chunk("ab", [97, 98, 99], prompt=[112]))  # "c" held back upstream
    state.continue_with(ByteTokenizer())
    out += state.on_event(_chunk("de", [100, 101, 102]))
    assert _decode(out, chat=False) == "ab" and state.finish[0] == "stop" and state.done


def test_stream_state_budget_spent_or_finish_already_seen():
    state = StreamState({"prompt": "p", "max_tokens": 2}, chat=False, request_id="r")
    state.on_event(_chunk("ab", [97, 98], prompt=[112]))
    events = state.continue_with(ByteTokenizer())
    assert isinstance(events, list) and state.finish[0] == "length" and state.done
    done = StreamState({"prompt": "p"}, chat=False, request_id="r")
    done.on_event(_chunk("a", [97], finish="stop", prompt=[112]))
    assert done.continue_with(None) == [b"data: [DONE]\n\n"]


def test_stream_state_without_agreeing_tokenizer_uses_replica_text():
    state = StreamState({"prompt": "p"}, chat=False, request_id="r")
    state.on_event(_chunk("XY", [97, 98], prompt=[112]))  # text the byte tokenizer won't give
    state.continue_with(ByteTokenizer())
    assert state.detok is None
    assert _decode(state.on_event(_chunk("zz", [122, 122])), chat=False) == "zz"


def test_stream_state_error_events_raise():
    state = StreamState({"prompt": "p"}, chat=False, request_id="r")
    with pytest.raises(UpstreamError):
        state.on_event('{"error": {"message": "engine dead"}}')
    with pytest.raises(UpstreamError):
        state.on_event("not json")
    state.on_event(_chunk("a", [97], prompt=[1]))
    state.continue_with(None)
    with pytest.raises(UpstreamError, match="finish"):
        state.on_event("[DONE]")


def _events(events: list[bytes]) -> list[dict]:
    return [json.loads(e.decode()[6:]) for e in events if e != b"data: [DONE]\n\n"]


def test_migrated_chunks_have_the_replicas_fields_usage_and_offsets():
    """Continued chunks look like the replica's own: stop_reason, continuous usage counted
    over the whole stream, logprobs text offsets in the client's text, one id."""
    body = {
        "prompt": "p",
        "logprobs": 1,
        "stop": ["q"],
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    state = StreamState(body, chat=False, request_id="r")
    state.on_event(_chunk("ab", [97, 98], prompt=[112]))
    assert state.continue_with(ByteTokenizer())["max_tokens"] == 14
    lp = {
        "tokens": ["c", "q", "z"],
        "token_logprobs": [-1.0, -2.0, -3.0],
        "top_logprobs": [{"c": -1.0}, {"q": -2.0}, {"z": -3.0}],
        "text_offset": [0, 1, 2],  # the continuation's own text
    }
    cont = json.loads(_chunk("cqz", [99, 113, 122]))
    cont["choices"][0]["logprobs"] = lp
    chunk, usage = _events(state.on_event(json.dumps(cont)))
    choice = chunk["choices"][0]
    assert choice["text"] == "c" and choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == "q"  # found by the gateway, across the seam
    assert choice["logprobs"]["tokens"] == ["c", "q"]  # the tokens this chunk carries
    assert choice["logprobs"]["text_offset"] == [2, 3]  # "ab" came first
    assert chunk["usage"]["total_tokens"] == 5 and chunk["usage"]["completion_tokens"] == 4
    assert usage["usage"]["completion_tokens"] == 4 and chunk["id"] == usage["id"] == "cmpl-1"


def test_migrated_chat_logprobs_keep_the_clients_top_logprobs():
    body = {"messages": [], "logprobs": True, "top_logprobs": 1}
    state = StreamState(body, chat=True, request_id="r")
    state.on_event(_chunk("a", [97], prompt=[1], chat=True))
    assert state.continue_with(None)["logprobs"] == 1
    cont = json.loads(_chunk("b", [98], finish="length"))
    cont["choices"][0]["logprobs"] = {
        "tokens": ["b"],
        "token_logprobs": [-0.5],
        "top_logprobs": [{"b": -0.5, "x": -0.1}],
    }
    (chunk,) = _events(state.on_event(json.dumps(cont)))
    (entry,) = chunk["choices"][0]["logprobs"]["content"]
    assert entry["token"] == "b" and [t["token"] for t in entry["top_logprobs"]] == ["x"]
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["delta"] == {
        "content": "b"
    }
