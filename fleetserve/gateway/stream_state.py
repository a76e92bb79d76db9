"""What the client of one stream has been sent, and how upstream events become client
events. Pure: no I/O, no clock; `StreamSession` feeds it events and sends what it returns.

From a fleetserve replica the gateway asks for token ids (`return_token_ids`); this strips
them from what the client sees unless the client asked too, and keeps the prompt's ids and
every generated id sent so far, which is what a continuation needs. After a migration it
detokenizes the continued ids itself with the replica's own algorithm
(`IncrementalDetokenizer`, replayed over the tokens already sent), so the text is exactly
what one uninterrupted replica would have sent, stop strings across the seam included.
Without a gateway tokenizer the continuation's own text is used.

Invariant: `text_sent[i]` and `generated[i]` are exactly what the client of choice i got.
"""

from __future__ import annotations

import json
from typing import Any

from fleetserve.engine.detokenizer import IncrementalDetokenizer
from fleetserve.gateway.continuation import (
    client_chunk,
    continuation_body,
    rebase_completion_logprobs,
    usage_chunk,
    usage_of,
)
from fleetserve.gateway.upstream import UpstreamError, error_payload, stream_error
from fleetserve.http.sse import DONE, DONE_EVENT, encode_event


class StreamState:
    def __init__(
        self, body: dict, chat: bool, request_id: str, wants_token_ids: bool | None = None
    ) -> None:
        self.body = body
        self.chat = chat
        self.wants_token_ids = (
            bool(body.get("return_token_ids")) if wants_token_ids is None else wants_token_ids
        )
        self.n = int(body.get("n") or 1)
        stream_options = body.get("stream_options")
        stream_options = stream_options if isinstance(stream_options, dict) else {}
        self.include_usage = bool(stream_options.get("include_usage"))
        self.continuous_usage = bool(stream_options.get("continuous_usage_stats"))
        self.prompt_ids: list[int] | None = None
        self.generated: dict[int, list[int]] = {}
        self.text_sent: dict[int, str] = {}
        self.finish: dict[int, str] = {}
        self.stream_id = f"cmpl-{request_id}"
        self.created = 0
        self.model = str(body.get("model") or "")
        self.usage_sent = False
        self.cached_tokens = 0  # of the prompt, on the first replica (from its usage, if any)
        self.continuing = False  # events now come from a continuation
        self.detok: IncrementalDetokenizer | None = None
        self.token_sent = False  # some token or text reached the client
        self.done = False  # [DONE] is among the events returned

    @property
    def can_continue(self) -> bool:
        return self.n == 1 and self.prompt_ids is not None

    @property
    def finished(self) -> bool:
        return self.finish.get(0) is not None

    def on_event(self, data: str) -> list[bytes]:
        """Client events for one upstream event. Raises UpstreamError for an error event, a
        non-JSON event, or a continuation that ends without a finish reason."""
        if data == DONE:
            if self.continuing and not self.finished:
                raise UpstreamError("the continuation ended without a finish reason")
            return self.end_events()
        err = error_payload(data)
        if err is not None:
            raise stream_error(err)
        try:
            obj = json.loads(data)
        except ValueError:
            raise UpstreamError("the replica sent an event that is not JSON") from None
        return self._on_continued(obj) if self.continuing else self._on_chunk(obj)

    def _on_chunk(self, obj: dict) -> list[bytes]:
        """A chunk of the original request: note ids and text, pass it on."""
        keep = self.wants_token_ids
        if self.created == 0:
            self.stream_id = obj.get("id", self.stream_id)
            self.created = obj.get("created", 0)
            self.model = obj.get("model", self.model)
        self._note_prompt(
            obj.get("prompt_token_ids") if keep else obj.pop("prompt_token_ids", None)
        )
        for choice in obj.get("choices") or ():
            idx = choice.get("index", 0)
            p = choice.get("prompt_token_ids") if keep else choice.pop("prompt_token_ids", None)
            self._note_prompt(p)
            ids = choice.get("token_ids") if keep else choice.pop("token_ids", None)
            if ids:
                self.generated.setdefault(idx, []).extend(ids)
                self.token_sent = True
            text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if text:
                self.text_sent[idx] = self.text_sent.get(idx, "") + text
                self.token_sent = True
            if choice.get("finish_reason") is not None:
                self.finish[idx] = choice["finish_reason"]
        usage = obj.get("usage")
        if isinstance(usage, dict):
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                self.cached_tokens = details["cached_tokens"]
            if not obj.get("choices"):
                self.usage_sent = True
        return [encode_event(obj)]

    def _note_prompt(self, ids: Any) -> None:
        if ids is not None and self.prompt_ids is None:
            self.prompt_ids = list(ids)

    def _on_continued(self, obj: dict) -> list[bytes]:
        """A chunk of a continuation: re-wrap it as the client's stream (choice 0)."""
        out: list[bytes] = []
        for choice in obj.get("choices") or ():
            ids = list(choice.get("token_ids") or ())
            finish = choice.get("finish_reason")
            stop_reason = choice.get("stop_reason")
            if self.detok is not None:
                taken = []
                for token in ids:
                    taken.append(token)
                    if self.detok.add_token(token):
                        # a stop string, possibly across the seam
                        finish, stop_reason = "stop", self.detok.stop_reason
                        break
                text = self.detok.take_delta(finished=finish is not None)
            else:
                taken, text = ids, choice.get("text") or ""
            if not (text or taken or finish):
                continue
            out.append(self._emit(text, taken, finish, stop_reason, choice.get("logprobs")))
            if finish is not None:
                out += self.end_events()
                break
        return out

    def _emit(
        self,
        text: str,
        ids: list[int],
        finish: str | None,
        stop_reason: int | str | None = None,
        logprobs: dict | None = None,
    ) -> bytes:
        logprobs = rebase_completion_logprobs(logprobs, len(self.text_sent.get(0, "")), len(ids))
        self.generated.setdefault(0, []).extend(ids)
        if text:
            self.text_sent[0] = self.text_sent.get(0, "") + text
        if text or ids:
            self.token_sent = True
        if finish is not None:
            self.finish[0] = finish
        usage = None
        if self.continuous_usage and self.prompt_ids is not None:
            usage = usage_of(len(self.prompt_ids), len(self.generated[0]), self.cached_tokens)
        chunk = client_chunk(
            chat=self.chat,
            stream_id=self.stream_id,
            created=self.created,
            model=self.model,
            text=text,
            finish_reason=finish,
            stop_reason=stop_reason,
            token_ids=ids if self.wants_token_ids else None,
            logprobs=logprobs,
            top_logprobs=int(self.body.get("top_logprobs") or 0),
            usage=usage,
        )
        return encode_event(chunk)

    def end_events(self) -> list[bytes]:
        """The usage chunk (if asked for and not sent yet) and [DONE]."""
        self.done = True
        events = []
        if self.include_usage and not self.usage_sent and self.prompt_ids is not None:
            completion = sum(len(g) for g in self.generated.values())
            chunk = usage_chunk(
                chat=self.chat,
                stream_id=self.stream_id,
                created=self.created,
                model=self.model,
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=completion,
                cached_tokens=self.cached_tokens,
            )
            events.append(encode_event(chunk))
            self.usage_sent = True
        events.append(DONE_EVENT)
        return events

    def continue_with(self, tokenizer: Any) -> dict | list[bytes]:
        """Switch to continuation mode. Returns the continuation's `/v1/completions` body,
        or, when nothing is left to generate, the events that end the stream."""
        if self.finished:
            return self.end_events()  # only [DONE] was lost
        if not self.continuing:
            self.continuing = True
            self.detok = self._replay_detokenizer(tokenizer)
        body = continuation_body(self.body, self.chat, self.prompt_ids, self.generated.get(0, []))
        if body is None:  # the token budget is spent: only the finish was lost
            held = self.detok.take_delta(finished=True) if self.detok else ""
            return [self._emit(held, [], "length"), *self.end_events()]
        return body

    def _replay_detokenizer(self, tokenizer: Any) -> IncrementalDetokenizer | None:
        """The replica's detokenizer state after the tokens already sent; None without a
        tokenizer or if it disagrees with the text the client got."""
        if tokenizer is None:
            return None
        stop = self.body.get("stop") or ()
        detok = IncrementalDetokenizer(
            tokenizer,
            self.prompt_ids,
            tuple([stop] if isinstance(stop, str) else stop),
            bool(self.body.get("include_stop_str_in_output", False)),
            bool(self.body.get("skip_special_tokens", True)),
        )
        for token in self.generated.get(0, ()):
            detok.add_token(token)
        sent = self.text_sent.get(0, "")
        if not detok.text.startswith(sent):
            return None
        detok.sent = len(sent)
        return detok
