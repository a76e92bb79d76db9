"""What completions and chat completions share: running a request's prompts through the
engine, counting usage, mapping engine failures to HTTP errors, and the SSE loop."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable

from fastapi import Request
from fastapi.responses import StreamingResponse

from fleetserve.engine.async_engine import EngineDeadError, RequestFailedError
from fleetserve.engine.outputs import CompletionOutput, RequestOutput
from fleetserve.engine.sampling_params import SamplingParams
from fleetserve.http.responses import ClosingStreamingResponse
from fleetserve.server.errors import APIError, error_body
from fleetserve.server.inputs import Prompt
from fleetserve.server.protocol import SamplingFields
from fleetserve.server.state import ServerState
from fleetserve.server.streaming import (
    SSE_DONE,
    SSE_HEADERS,
    merge,
    sse,
    unless_disconnected,
)

logger = logging.getLogger(__name__)

# An update that carries more tokens than this (to detokenize, or a prompt to echo) is turned
# into chunks on a worker thread; smaller ones are cheaper than the hop.
HEAVY_TOKENS = 256


class Generation:
    """The engine requests of one API request: one per prompt, each with `n` choices.
    Choice `index` = prompt number * n + completion index, as in OpenAI's API.

    Creating one admits its prompts x n engine requests to the server's queue (429 when they
    do not fit now); each gives its place back at its first token, or when the request ends."""

    def __init__(
        self,
        state: ServerState,
        raw: Request,
        req: SamplingFields,
        prompts: list[Prompt],
        params: SamplingParams,
        id_prefix: str,
    ) -> None:
        self.state = state
        self.raw = raw
        self.request_id: str = raw.state.request_id
        self.response_id = f"{id_prefix}-{self.request_id}"
        self.model = state.settings.served_model_name
        self.created = int(time.time())
        self.prompts = prompts
        self.n = params.n
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.continuous_usage = bool(
            req.stream_options and req.stream_options.continuous_usage_stats
        )
        self.return_token_ids = req.return_token_ids
        self.echo = bool(getattr(req, "echo", False))
        state.reserve_queue(len(prompts) * params.n)
        # Per prompt, the choices still waiting for their first token (their queue places).
        self._waiting = [set(range(params.n)) for _ in prompts]
        self._updated: set[int] = set()  # prompts that had an update
        suffix = secrets.token_hex(4)  # client ids may repeat; engine ids must not
        engine = state.engine
        self.streams = [
            engine.generate(
                p.text if p.text is not None else p.token_ids,
                params,
                f"{self.request_id}.{suffix}.{i}",
                req.priority,
                prompt_token_ids=p.token_ids,
            )
            for i, p in enumerate(prompts)
        ]
        self.num_generated = 0
        self.num_cached = [0] * len(prompts)

    # ---- non-streaming -----------------------------------------------------------------------

    async def final_outputs(self) -> list[RequestOutput]:
        """The last output of every prompt. Raises `APIError` on engine failures and
        `ClientDisconnected` if the client left (its requests are then aborted)."""
        self.state.enter()
        try:
            return await unless_disconnected(self.raw, self._collect())
        except (EngineDeadError, RequestFailedError) as exc:
            raise engine_error(exc) from None
        finally:
            self.release_queue()
            self.state.leave()

    async def _collect(self) -> list[RequestOutput]:
        finals: list[RequestOutput] = [None] * len(self.streams)  # type: ignore[list-item]
        async for i, out in merge(self.streams):
            self._note_started(i, out)
            finals[i] = out
        self.num_generated = sum(len(c.token_ids) for out in finals for c in out.outputs)
        self.num_cached = [out.num_cached_tokens for out in finals]
        return finals

    # ---- streaming ---------------------------------------------------------------------------

    def stream(
        self, chunks: Callable[[int, RequestOutput], Iterable[dict]], object_name: str
    ) -> StreamingResponse:
        """SSE response: `chunks(prompt_index, output)` turns each engine update into zero or
        more chunk bodies (the `choices` part); this adds ids, usage and the final [DONE]."""
        return ClosingStreamingResponse(
            self._sse(chunks, object_name),
            on_close=self.release_queue,  # also if the client left before the body started
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )

    async def _sse(self, chunks, object_name: str) -> AsyncIterator[str]:
        self.state.enter()
        try:
            async for i, out in merge(self.streams):
                first = self._note_started(i, out)
                self.num_cached[i] = out.num_cached_tokens
                work = sum(len(c.token_ids_delta) for c in out.outputs)
                for c in out.outputs:
                    self.num_generated += len(c.token_ids_delta)
                if first and self.echo:
                    work += len(self.prompts[i].token_ids)
                if work > HEAVY_TOKENS:
                    choices = await self.state.run_blocking(list, chunks(i, out))
                else:
                    choices = list(chunks(i, out))
                for choice in choices:
                    chunk = self._chunk(object_name, [choice])
                    if self.continuous_usage:
                        chunk["usage"] = self.usage()
                    yield sse(chunk)
            if self.include_usage:
                yield sse({**self._chunk(object_name, []), "usage": self.usage()})
        except (EngineDeadError, RequestFailedError) as exc:
            yield sse(engine_error(exc).body())
        except Exception:
            logger.exception("stream %s failed", self.request_id)
            yield sse(error_body(500, "internal server error", None, "internal_error"))
        finally:
            self.release_queue()
            self.state.leave()
        yield SSE_DONE

    def _chunk(self, object_name: str, choices: list[dict]) -> dict:
        return {
            "id": self.response_id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    # ---- shared ------------------------------------------------------------------------------

    def _note_started(self, i: int, out: RequestOutput) -> bool:
        """Give back the queue places of prompt `i`'s choices that have now started; True on
        the prompt's first update."""
        first = i not in self._updated
        self._updated.add(i)
        waiting = self._waiting[i]
        started = {c.index for c in out.outputs if c.token_ids or c.finish_reason} & waiting
        if started:
            waiting -= started
            self.state.release_queue(len(started))
        return first

    def release_queue(self) -> None:
        """Give back every queue place still held (the request ended or never ran)."""
        held = sum(len(w) for w in self._waiting)
        for waiting in self._waiting:
            waiting.clear()
        if held:
            self.state.release_queue(held)

    def choice_index(self, prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * self.n + completion.index

    def usage(self) -> dict:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": self.num_generated,
            "total_tokens": prompt_tokens + self.num_generated,
            "prompt_tokens_details": {"cached_tokens": sum(self.num_cached)},
        }


def engine_error(exc: Exception) -> APIError:
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine is unavailable: {exc}", code="engine_dead")
    return APIError(500, f"generation failed: {exc}", code="generation_failed")
