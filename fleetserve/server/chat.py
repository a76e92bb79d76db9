"""POST /v1/chat/completions: messages through the model's chat template, then generation."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from fleetserve.engine.outputs import CompletionOutput, RequestOutput
from fleetserve.http.disconnect import ClientDisconnected
from fleetserve.server import inputs, limits
from fleetserve.server.logprobs import chat_logprobs
from fleetserve.server.protocol import ChatCompletionRequest
from fleetserve.server.serving import Generation
from fleetserve.server.state import ServerState


async def create_chat_completion(
    req: ChatCompletionRequest, raw: Request, state: ServerState
) -> Response:
    state.check_model(req.model)
    state.check_ready()
    engine = state.engine
    # Cheap checks first: a request refused here costs no chat template nor tokenizing.
    limits.check_priority(req, state.settings)
    limits.check_request_size(1, req.n, state.settings)
    state.check_queue(req.n)
    limits.check_text_chars(
        limits.chat_chars(req), state.max_token_chars, engine.max_model_len, "messages"
    )
    prompt = await state.run_blocking(inputs.chat_prompt, req, engine.tokenizer, engine.vocab_size)
    max_tokens = req.max_completion_tokens or req.max_tokens
    max_param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    params = inputs.sampling_params(
        req,
        max_tokens=max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        vocab_size=engine.vocab_size,
        names={"logprobs": "top_logprobs", "max_tokens": max_param},
    )
    inputs.check_length(prompt, max_tokens, engine.max_model_len, "messages", max_param)
    gen = ChatGeneration(state, raw, req, [prompt], params)
    if req.stream:
        return gen.stream(gen.chunks, "chat.completion.chunk")
    try:
        finals = await gen.final_outputs()
    except ClientDisconnected:
        return Response(status_code=499)
    # detokenizing logprobs and encoding the JSON on a worker thread (JSONResponse encodes
    # when built)
    return await state.run_blocking(lambda: JSONResponse(gen.response(finals[0])))


class ChatGeneration(Generation):
    def __init__(self, state, raw, req: ChatCompletionRequest, prompts, params) -> None:
        super().__init__(state, raw, req, prompts, params, "chatcmpl")
        self.req = req
        self.tokenizer = state.engine.tokenizer
        self._started: set[int] = set()
        self._done: set[int] = set()

    def _logprobs(self, ids: list[int], lps: list | None) -> dict | None:
        if not self.req.logprobs:
            return None
        top_n = self.req.top_logprobs or 0
        return {"content": chat_logprobs(self.tokenizer, ids, lps or [], top_n)}

    def _extras(self, choice: dict, c: CompletionOutput, ids: list[int], first: bool) -> dict:
        choice["finish_reason"] = c.finish_reason
        choice["stop_reason"] = c.stop_reason
        if self.return_token_ids:
            if first:
                choice["prompt_token_ids"] = self.prompts[0].token_ids
            choice["token_ids"] = ids
        return choice

    def response(self, out: RequestOutput) -> dict:
        choices = [
            self._extras(
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._logprobs(c.token_ids, c.logprobs),
                },
                c,
                c.token_ids,
                first=True,
            )
            for c in out.outputs
        ]
        return {**self._chunk("chat.completion", choices), "usage": self.usage()}

    def chunks(self, i: int, out: RequestOutput) -> Iterator[dict]:
        for c in out.outputs:
            if c.index in self._done:
                continue
            first = c.index not in self._started
            if not (first or c.text_delta or c.token_ids_delta or c.finish_reason):
                continue
            self._started.add(c.index)
            delta = (
                {"role": "assistant", "content": c.text_delta}
                if first
                else {"content": c.text_delta}
            )
            if c.finish_reason:
                self._done.add(c.index)
            yield self._extras(
                {
                    "index": c.index,
                    "delta": delta,
                    "logprobs": self._logprobs(c.token_ids_delta, c.logprobs_delta),
                },
                c,
                c.token_ids_delta,
                first,
            )
