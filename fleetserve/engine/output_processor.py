"""The front end's half of a request: fans out n > 1, detokenizes, applies stop strings and
assembles `RequestOutput`s from the core's token-level outputs. No torch, no model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fleetserve.engine.detokenizer import IncrementalDetokenizer
from fleetserve.engine.outputs import CompletionOutput, EngineCoreOutput, RequestOutput
from fleetserve.engine.request import EngineCoreRequest
from fleetserve.engine.sampling_params import SamplingParams


def child_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


@dataclass
class _Child:
    parent: _Parent
    index: int
    detok: IncrementalDetokenizer
    completion: CompletionOutput


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[_Child]
    prompt_logprobs: list | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    queue_time: float | None = None  # of its first choice to leave the core's queue

    @property
    def finished(self) -> bool:
        return all(c.completion.finished for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.children: dict[str, _Child] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float = 0.0,
    ) -> list[EngineCoreRequest]:
        """Register a request; returns the core requests to send (n of them)."""
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        parent = _Parent(request_id, prompt, list(prompt_token_ids), params, [])
        core_requests = []
        for i in range(params.n):
            cid = child_id(request_id, i, params.n)
            # Mod 2**64: seed + i must stay a uint64 for the wire (msgpack), and the sampler
            # takes seeds mod 2**64 anyway, so this draws what seed + i would.
            seed = None if params.seed is None else (params.seed + i) % 2**64
            child_params = dataclasses.replace(params, n=1, seed=seed)
            detok = IncrementalDetokenizer(
                self.tokenizer,
                prompt_token_ids,
                params.stop,
                params.include_stop_str_in_output,
                params.skip_special_tokens,
            )
            completion = CompletionOutput(
                index=i, logprobs=[] if params.logprobs is not None else None
            )
            child = _Child(parent, i, detok, completion)
            parent.children.append(child)
            self.children[cid] = child
            core_requests.append(
                EngineCoreRequest(cid, list(prompt_token_ids), child_params, priority, arrival_time)
            )
        self.parents[request_id] = parent
        return core_requests

    def child_ids(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        if parent is None:
            return []
        n = len(parent.children)
        return [
            child_id(request_id, c.index, n) for c in parent.children if not c.completion.finished
        ]

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Apply core outputs. Returns the request outputs that changed (each with this
        update's deltas) and the core request ids to abort because a stop string ended them."""
        changed: dict[str, _Parent] = {}
        to_abort: list[str] = []
        for out in outputs:
            child = self.children.get(out.request_id)
            if child is None:
                continue  # finished or aborted here already
            c, parent = child.completion, child.parent
            if out.prompt_logprobs is not None:
                parent.prompt_logprobs = (parent.prompt_logprobs or []) + out.prompt_logprobs
            parent.num_cached_tokens = max(parent.num_cached_tokens, out.num_cached_tokens)
            if parent.queue_time is None:
                parent.queue_time = out.queue_time
            stopped = False
            for k, token in enumerate(out.new_token_ids):
                c.token_ids.append(token)
                c.token_ids_delta.append(token)
                if out.new_logprobs is not None and c.logprobs is not None:
                    c.logprobs.append(out.new_logprobs[k])
                    c.logprobs_delta = (c.logprobs_delta or []) + [out.new_logprobs[k]]
                if child.detok.add_token(token):
                    stopped = True
                    break
            if stopped:
                c.finish_reason, c.stop_reason = "stop", child.detok.stop_reason
                if not out.finished:
                    to_abort.append(out.request_id)
            elif out.finished:
                c.finish_reason = out.finish_reason
                if c.token_ids and c.token_ids[-1] in parent.params.stop_token_ids:
                    c.stop_reason = c.token_ids[-1]  # None when EOS ended it, as in vLLM
                if out.error:
                    parent.error = out.error
            c.text_delta += child.detok.take_delta(c.finished)
            c.text = child.detok.text[: child.detok.sent]
            if c.finished:
                del self.children[out.request_id]
            changed[parent.request_id] = parent
        results = [self._snapshot(p) for p in changed.values()]
        for p in changed.values():
            if p.finished:
                del self.parents[p.request_id]
        return results, to_abort

    def abort(self, request_id: str) -> list[str]:
        """Forget a request (client gone); returns the core ids to abort."""
        ids = self.child_ids(request_id)
        parent = self.parents.pop(request_id, None)
        if parent:
            for c in parent.children:
                self.children.pop(child_id(request_id, c.index, len(parent.children)), None)
        return ids

    def _snapshot(self, parent: _Parent) -> RequestOutput:
        outputs = []
        for child in parent.children:
            c = child.completion
            outputs.append(
                dataclasses.replace(
                    c,
                    token_ids=list(c.token_ids),
                    logprobs=None if c.logprobs is None else list(c.logprobs),
                )
            )
            c.text_delta, c.token_ids_delta, c.logprobs_delta = "", [], None
        return RequestOutput(
            parent.request_id,
            parent.prompt,
            parent.prompt_token_ids,
            outputs,
            finished=parent.finished,
            prompt_logprobs=parent.prompt_logprobs,
            num_cached_tokens=parent.num_cached_tokens,
            error=parent.error,
            queue_time=parent.queue_time,
        )
