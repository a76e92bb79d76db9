"""POST /v1/completions: prompts as text or token ids, n, echo, logprobs, streaming."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from fleetserve.engine.outputs import CompletionOutput, RequestOutput
from fleetserve.http.disconnect import ClientDisconnected
from fleetserve.server import inputs, limits
from fleetserve.server.logprobs import completion_logprobs
from fleetserve.server.protocol import CompletionRequest
from fleetserve.server.serving import Generation
from fleetserve.server.state import ServerState


async def create_completion(req: CompletionRequest, raw: Request, state: ServerState) -> Response:
    state.check_model(req.model)
    state.check_ready()
    engine = state.engine
    # Cheap checks first: a request refused here costs no tokenizing.
    limits.check_priority(req, state.settings)
    num_prompts = limits.count_prompts(req.prompt)
    limits.check_request_size(num_prompts, req.n, state.settings)
    state.check_queue(num_prompts * req.n)
    texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    for text in texts:
        if isinstance(text, str):
            limits.check_text_chars(
                len(text), state.max_token_chars, engine.max_model_len, "prompt"
            )
    prompts = await state.run_blocking(
        inputs.completion_prompts, req, engine.tokenizer, engine.vocab_size
    )
    # Echo with logprobs needs the prompt's logprobs too (lm-eval's log-likelihood).
    prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    params = inputs.sampling_params(
        req,
        max_tokens=req.max_tokens,
        logprobs=req.logprobs,
        prompt_logprobs=prompt_logprobs if prompt_logprobs is not None else req.prompt_logprobs,
        vocab_size=engine.vocab_size,
    )
    for prompt in prompts:
        inputs.check_length(prompt, req.max_tokens, engine.max_model_len, "prompt", "max_tokens")
    gen = CompletionGeneration(state, raw, req, prompts, params)
    if req.stream:
        return gen.stream(gen.chunks, "text_completion")
    try:
        finals = await gen.final_outputs()
    except ClientDisconnected:
        return Response(status_code=499)
    # Detokenizing echo and logprobs, and encoding the JSON (29 MB for 128 choices of echoed
    # prompts with logprobs), happen on a worker thread: JSONResponse encodes when built.
    return await state.run_blocking(lambda: JSONResponse(gen.response(finals)))


class CompletionGeneration(Generation):
    def __init__(self, state, raw, req: CompletionRequest, prompts, params) -> None:
        super().__init__(state, raw, req, prompts, params, "cmpl")
        self.req = req
        self.tokenizer = state.engine.tokenizer
        self._offsets: dict[int, int] = {}  # choice index -> characters sent so far
        self._done: set[int] = set()  # choices whose finish_reason went out

    def _choice(
        self, i: int, out: RequestOutput, c: CompletionOutput, text: str, ids: list[int], lps
    ) -> dict:
        """One choice (or its chunk): `text`, `ids` and `lps` are what this message adds;
        the first message of a choice carries the echoed prompt and the prompt token ids."""
        index = self.choice_index(i, c)
        first = index not in self._offsets
        prompt = self.prompts[i]
        if first and self.req.echo:
            text = self._prompt_text(i) + text
            prompt_lps = list(out.prompt_logprobs or [])[: len(prompt.token_ids)]
            prompt_lps += [None] * (len(prompt.token_ids) - len(prompt_lps))
            lp_ids, lp_values = prompt.token_ids + ids, prompt_lps + lps
        else:
            lp_ids, lp_values = ids, lps
        choice: dict = {"index": index, "text": text, "logprobs": None}
        if self.req.logprobs is not None:
            offset = self._offsets.get(index, 0)
            choice["logprobs"] = completion_logprobs(self.tokenizer, lp_ids, lp_values, offset)
        self._offsets[index] = self._offsets.get(index, 0) + len(text)
        choice["finish_reason"] = c.finish_reason
        choice["stop_reason"] = c.stop_reason
        if self.return_token_ids:
            if first:
                choice["prompt_token_ids"] = prompt.token_ids
            choice["token_ids"] = ids
        if c.finish_reason:
            self._done.add(index)
        return choice

    def _prompt_text(self, i: int) -> str:
        p = self.prompts[i]
        return p.text if p.text is not None else self.tokenizer.decode(p.token_ids)

    def response(self, finals: list[RequestOutput]) -> dict:
        choices = [
            self._choice(i, out, c, c.text, c.token_ids, list(c.logprobs or []))
            for i, out in enumerate(finals)
            for c in out.outputs
        ]
        return {**self._chunk("text_completion", choices), "usage": self.usage()}

    def chunks(self, i: int, out: RequestOutput) -> Iterator[dict]:
        for c in out.outputs:
            index = self.choice_index(i, c)
            if index in self._done:
                continue
            first = index not in self._offsets
            if first or c.text_delta or c.token_ids_delta or c.finish_reason:
                yield self._choice(
                    i, out, c, c.text_delta, c.token_ids_delta, list(c.logprobs_delta or [])
                )
