"""A model-free stand-in for a fleetserve replica, for gateway tests and benchmarks.

It speaks the replica's HTTP API and extensions (streams with token ids, `X-Request-Id`,
`/v1/kv_events`, `/health`, `/metrics`) over a byte-level "tokenizer". Its next token is a
pure function of the whole sequence so far, so a continuation from prompt + generated
tokens produces exactly the tokens an uninterrupted run would: the property greedy decoding
gives a real model. It keeps a real prefix cache of hashed blocks (LRU, KV events on store
and evict) and charges `prefill_s_per_token` for every uncached prompt token, so routing
with and without prefix awareness differs measurably. `POST /fake/control` injects failures.

Decode cost. With `per_seq_s = 0` each stream sleeps `token_delay_s` per token on its own, so
the batch is free. With `per_seq_s > 0` the replica behaves like an engine with continuous
batching: one step clock (`StepClock`) advances every running stream by one token per step,
and a step costs `token_delay_s + per_seq_s x (streams running)`, so a replica gets slower
per token as it takes more streams (what makes scaling out worth anything). `load_delay_s`
keeps /health at 503 for that long after start, like a replica loading its model.

    python -m fleetserve.testing.fake_replica --port 8101 --token-delay 0.01
    python -m fleetserve.testing.fake_replica --port 8101 --token-delay 0.02 --per-seq-delay 0.004
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fleetserve.engine.block_hash import hash_block_chain
from fleetserve.engine.detokenizer import IncrementalDetokenizer
from fleetserve.http.disconnect import ClientDisconnected, unless_disconnected
from fleetserve.http.sse import DONE_EVENT, encode_event

logger = logging.getLogger(__name__)

ALPHABET = b"etaoin shrdlu cmfwyp vbgkqjxz "


class ByteTokenizer:
    """Token id = byte of UTF-8. Enough of the transformers interface for the gateway."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        return_dict: bool = False,
    ) -> list[int] | str:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>"
        return self.encode(text) if tokenize else text


def next_token(seq: list[int]) -> int:
    """The 'model': a pure function of the last tokens and the length."""
    key = f"{len(seq)}:{seq[-8:]}".encode()
    return ALPHABET[zlib.crc32(key) % len(ALPHABET)]


class StepClock:
    """One decode step at a time for all the streams of a replica, as an engine's batch.

    `next_step()` returns when the step under way ends (a stream that asks mid-step gets its
    token at that step's end, as if it had been scheduled into it). A step starts when a
    stream asks for one and none is under way, and lasts `cost(running())` seconds, read at
    its start: every stream on the replica counts, as in a batch. Safe to cancel a waiter:
    the step goes on for the others. `sleep` is injected so that tests need no wall time."""

    def __init__(
        self,
        running: Callable[[], int],
        cost: Callable[[int], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._running = running
        self._cost = cost
        self._sleep = sleep
        self._step_done = asyncio.Event()
        self._asked = 0  # streams waiting for the step under way
        self._task: asyncio.Task | None = None
        self.steps = 0  # steps completed (tests)

    async def next_step(self) -> None:
        self._asked += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="fake-step-clock")
        await self._step_done.wait()

    async def _run(self) -> None:
        # Streams ask again only after their token is out: when none has by a step's end,
        # the clock stops and the next ask starts it (no step is charged to nobody).
        while self._asked:
            await self._sleep(self._cost(max(1, self._running())))
            done, self._step_done, self._asked = self._step_done, asyncio.Event(), 0
            self.steps += 1
            done.set()


@dataclass
class FakeSettings:
    block_size: int = 4
    num_blocks: int = 4096
    token_delay_s: float = 0.002
    # > 0: one step clock for all streams, a step costs token_delay_s + per_seq_s x running
    per_seq_s: float = 0.0
    prefill_s_per_token: float = 0.0
    load_delay_s: float = 0.0  # /health answers 503 for this long after start (loading)
    max_concurrent: int = 256  # beyond this, requests wait (shows as waiting)
    max_model_len: int = 32768  # the context: prompt plus generated tokens
    # failure injection (POST /fake/control)
    die_after_tokens: int | None = None  # streams break (connection reset) after k tokens
    stall_after_tokens: int | None = None  # streams go silent after k tokens
    # streams end with an in-stream error event of this `code` after k tokens, as the real
    # server's do when a generation fails ("generation_failed") or its engine dies
    # ("engine_dead")
    error_after_tokens: int | None = None
    error_code: str = "generation_failed"
    # answer this status to the next `fail_count` requests (health probes excepted)
    fail_status: int | None = None
    fail_count: int = 0
    health_status: int = 200


class FakeReplica:
    def __init__(self, settings: FakeSettings | None = None, model: str = "fake") -> None:
        self.s = settings or FakeSettings()
        self.model = model
        self.tokenizer = ByteTokenizer()
        self.cache: OrderedDict[int, None] = OrderedDict()  # block hash -> (LRU order)
        self.subscribers: set[asyncio.Queue] = set()
        self.running = 0
        self.waiting = 0
        self.aborted = 0
        self.finished = 0
        self.queries = 0
        self.hits = 0
        self.request_ids: list[str] = []
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []  # of each generation request
        self._slots: asyncio.Semaphore | None = None
        self.clock = StepClock(lambda: self.running, self.step_cost)
        self.ready_at = time.monotonic() + self.s.load_delay_s

    def step_cost(self, running: int) -> float:
        """Seconds of one decode step with `running` streams (read from the settings at each
        step, so /fake/control can change them)."""
        return self.s.token_delay_s + self.s.per_seq_s * running

    async def _decode_step(self) -> None:
        if self.s.per_seq_s > 0:
            await self.clock.next_step()
        else:
            await asyncio.sleep(self.s.token_delay_s)

    # ---- the prefix cache -------------------------------------------------------------------

    def _lookup_and_store(self, ids: list[int]) -> int:
        hashes = hash_block_chain(ids, self.s.block_size)
        hit = 0
        for h in hashes:
            if h not in self.cache:
                break
            hit += 1
        for h in hashes[:hit]:
            self.cache.move_to_end(h)
        new = hashes[hit:]
        for h in new:
            self.cache[h] = None
        evicted = []
        while len(self.cache) > self.s.num_blocks:
            evicted.append(self.cache.popitem(last=False)[0])
        events = []
        if new:
            events.append(
                {"kind": "stored", "block_hashes": new, "parent_hash": 0, "token_ids": []}
            )
        if evicted:
            events.append({"kind": "removed", "block_hashes": evicted})
        if events:
            self._publish(events)
        self.queries += len(ids)
        self.hits += hit * self.s.block_size
        return hit * self.s.block_size

    def _publish(self, events: list[dict]) -> None:
        batch = {"block_size": self.s.block_size, "events": events}
        for q in list(self.subscribers):
            q.put_nowait(batch)

    # ---- generation ---------------------------------------------------------------------------

    async def generate(
        self, prompt_ids: list[int], max_tokens: int, stop: tuple[str, ...]
    ) -> AsyncIterator[tuple[list[int], str, str | None]]:
        """(new token ids, text delta, finish reason) per step."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.s.max_concurrent)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        done = False
        try:
            cached = self._lookup_and_store(prompt_ids)
            if self.s.prefill_s_per_token:
                await asyncio.sleep(self.s.prefill_s_per_token * (len(prompt_ids) - cached))
            seq = list(prompt_ids)
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, stop)
            for i in range(max_tokens):
                if self.s.stall_after_tokens is not None and i >= self.s.stall_after_tokens:
                    await asyncio.sleep(3600)
                if self.s.die_after_tokens is not None and i >= self.s.die_after_tokens:
                    raise ConnectionResetError("fake replica: injected death")
                await self._decode_step()
                token = next_token(seq)
                seq.append(token)
                stopped = detok.add_token(token)
                finish = "stop" if stopped else ("length" if i == max_tokens - 1 else None)
                yield [token], detok.take_delta(finish is not None), finish
                if finish:
                    break
            self._lookup_and_store(seq)
            self.finished += 1
            done = True
        finally:
            self.running -= 1
            self._slots.release()
            if not done:
                self.aborted += 1

    # ---- HTTP ---------------------------------------------------------------------------------

    def app(self) -> FastAPI:
        app = FastAPI(title="fake fleetserve replica")
        app.state.fake = self

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._handle(request, chat=True)

        @app.get("/v1/models")
        async def models() -> Response:
            return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model"}]})

        @app.get("/health")
        async def health() -> Response:
            if time.monotonic() < self.ready_at:
                return Response(status_code=503)  # still "loading its model"
            return Response(status_code=self.s.health_status)

        @app.get("/metrics")
        async def metrics() -> Response:
            lines = [
                f"fleetserve:num_requests_running {self.running}",
                f"fleetserve:num_requests_waiting {self.waiting}",
                f"fleetserve:kv_cache_usage_perc {len(self.cache) / self.s.num_blocks}",
                f"fleetserve:prefix_cache_queries_total {self.queries}",
                f"fleetserve:prefix_cache_hits_total {self.hits}",
                f"fleetserve:request_success_total {self.finished}",
                f"fleetserve:request_aborted_total {self.aborted}",
            ]
            return Response("\n".join(lines) + "\n", media_type="text/plain")

        @app.get("/v1/kv_events")
        async def kv_events() -> Response:
            queue: asyncio.Queue = asyncio.Queue()
            self.subscribers.add(queue)

            async def stream() -> AsyncIterator[bytes]:
                try:
                    yield b": subscribed\n\n"
                    while True:
                        batch = await queue.get()
                        yield encode_event(batch)
                finally:
                    self.subscribers.discard(queue)

            return StreamingResponse(stream(), media_type="text/event-stream")

        @app.post("/fake/control")
        async def control(request: Request) -> Response:
            for k, v in (await request.json()).items():
                if not hasattr(self.s, k):
                    return JSONResponse({"error": f"unknown setting {k}"}, 400)
                setattr(self.s, k, v)
            return JSONResponse(vars(self.s))

        return app

    async def _handle(self, request: Request, chat: bool) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        body = await request.json()
        self.request_ids.append(rid)
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        if self.s.fail_status and self.s.fail_count > 0 and not rid.startswith("probe"):
            self.s.fail_count -= 1
            return JSONResponse({"error": {"message": "injected"}}, self.s.fail_status)
        # The replica's budget: a chat request without max tokens, or an explicit null, runs
        # to the context length; a completion request without the field gets 16.
        if chat:
            prompt_ids = self.tokenizer.apply_chat_template(body["messages"])
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        else:
            prompt = body.get("prompt", "")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
                prompt = prompt[0]
            prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            max_tokens = body.get("max_tokens", 16)
        room = self.s.max_model_len - len(prompt_ids)
        if room < 1:
            return JSONResponse({"error": {"message": "prompt longer than the context"}}, 400)
        max_tokens = room if max_tokens is None else min(int(max_tokens), room)
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        with_ids = bool(body.get("return_token_ids"))
        headers = {"X-Request-Id": rid}
        common = {"id": f"cmpl-{rid}", "created": int(time.time()), "model": self.model}
        gen = self.generate(list(prompt_ids), int(max_tokens), stop)
        if not body.get("stream"):
            text, ids, finish = "", [], None

            async def collect() -> None:
                nonlocal text, ids, finish
                async for new, delta, last in gen:
                    ids += new
                    text += delta
                    finish = last

            try:
                await unless_disconnected(request, collect())
            except ClientDisconnected:
                return Response(status_code=499)
            choice = {"index": 0, "finish_reason": finish}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            if with_ids:
                choice["token_ids"] = ids
            out = {
                **common,
                "object": "chat.completion" if chat else "text_completion",
                "choices": [choice],
                "usage": {
                    "prompt_tokens": len(prompt_ids),
                    "completion_tokens": len(ids),
                    "total_tokens": len(prompt_ids) + len(ids),
                },
            }
            if with_ids:
                out["prompt_token_ids"] = prompt_ids
            return JSONResponse(out, headers=headers)
        obj = "chat.completion.chunk" if chat else "text_completion"
        usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def stream() -> AsyncIterator[bytes]:
            n = 0
            first = True
            if chat:
                head = {
                    **common,
                    "object": obj,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                        }
                    ],
                }
                if with_ids:  # like the real server: in the first chunk's choice
                    head["choices"][0]["prompt_token_ids"] = prompt_ids
                    head["choices"][0]["token_ids"] = []
                first = False
                yield encode_event(head)
            async for new, delta, finish in gen:
                if self.s.error_after_tokens is not None and n >= self.s.error_after_tokens:
                    message = f"injected {self.s.error_code}"
                    error = {"message": message, "type": "internal_error", "param": None}
                    yield encode_event({"error": {**error, "code": self.s.error_code}})
                    yield DONE_EVENT
                    return
                n += len(new)
                choice = {"index": 0, "finish_reason": finish}
                if chat:
                    choice["delta"] = {"content": delta} if delta else {}
                else:
                    choice["text"] = delta
                if with_ids:
                    choice["token_ids"] = new
                chunk = {**common, "object": obj, "choices": [choice]}
                if first and with_ids:
                    chunk["prompt_token_ids"] = prompt_ids
                first = False
                yield encode_event(chunk)
            if usage:
                yield encode_event(
                    {
                        **common,
                        "object": obj,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": len(prompt_ids),
                            "completion_tokens": n,
                            "total_tokens": len(prompt_ids) + n,
                        },
                    }
                )
            yield DONE_EVENT

        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, FakeSettings]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-delay", type=float, default=0.002, help="seconds per step")
    parser.add_argument(
        "--per-seq-delay",
        type=float,
        default=0.0,
        help="seconds each running stream adds to a step (0: streams cost nothing together)",
    )
    parser.add_argument("--prefill-s-per-token", type=float, default=0.0)
    parser.add_argument(
        "--load-delay", type=float, default=0.0, help="seconds /health answers 503 after start"
    )
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--num-blocks", type=int, default=4096)
    parser.add_argument("--max-model-len", type=int, default=32768)
    args = parser.parse_args(argv)
    settings = FakeSettings(
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        token_delay_s=args.token_delay,
        per_seq_s=args.per_seq_delay,
        prefill_s_per_token=args.prefill_s_per_token,
        load_delay_s=args.load_delay,
        max_model_len=args.max_model_len,
    )
    return args, settings


def main(argv: list[str] | None = None) -> None:
    args, settings = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    uvicorn.run(
        FakeReplica(settings).app(),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
