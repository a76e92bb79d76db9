"""Turns one step's logits into tokens, per request: penalties, temperature, top-k/p, min-p,
seeded sampling and logprobs.

A seeded request draws from its own generator, so its output depends on its seed alone,
not on what else shares the batch. Greedy rows take the argmax and draw nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fleetserve.engine.outputs import Logprobs
from fleetserve.engine.request import Request


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprobs | None]  # per row: sampled token first, then the top-N


class Sampler:
    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._request_generators.pop(request_id, None)

    def _generator(self, request: Request) -> torch.Generator:
        seed = request.sampling_params.seed
        if seed is None:
            return self.generator
        gen = self._request_generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._request_generators[request.request_id] = gen
        return gen

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits: (num_rows, vocab) float32, one row per request, in `requests` order."""
        logits = logits.float()
        want_logprobs = [r.sampling_params.logprobs is not None for r in requests]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        logits = self._apply_penalties(logits, requests)
        greedy = [r.sampling_params.greedy for r in requests]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, requests, greedy)
        token_list = tokens.tolist()

        logprobs: list[Logprobs | None] = [None] * len(requests)
        if raw_logprobs is not None:
            for i, request in enumerate(requests):
                if want_logprobs[i]:
                    logprobs[i] = top_logprobs(
                        raw_logprobs[i], token_list[i], request.sampling_params.logprobs
                    )
        return SamplerOutput(token_list, logprobs)

    def _apply_penalties(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        for i, request in enumerate(requests):
            p = request.sampling_params
            row = logits[i]
            if request.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids) + (
                    [] if p.ignore_eos else list(request.eos_token_ids)
                )
                if banned:
                    row[torch.tensor(banned, device=row.device)] = -float("inf")
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(request.all_token_ids)), device=row.device)
                vals = row[seen]
                row[seen] = torch.where(
                    vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                )
            if (p.presence_penalty or p.frequency_penalty) and request.output_token_ids:
                out = torch.tensor(request.output_token_ids, device=row.device)
                counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        return logits

    def _sample(self, logits: torch.Tensor, requests: list[Request], greedy: list[bool]):
        tokens = logits.argmax(dim=-1)
        rows = [i for i, g in enumerate(greedy) if not g]
        sub = logits[rows]
        temps = torch.tensor(
            [requests[i].sampling_params.temperature for i in rows], device=logits.device
        )
        sub = sub / temps[:, None]
        top_k = [requests[i].sampling_params.top_k for i in rows]
        if any(k > 0 for k in top_k):
            k = torch.tensor([k if k > 0 else sub.shape[1] for k in top_k], device=sub.device)
            kth = sub.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
            sub = sub.masked_fill(sub < kth, -float("inf"))
        probs = sub.softmax(dim=-1)
        top_p = [requests[i].sampling_params.top_p for i in rows]
        if any(p < 1.0 for p in top_p):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each
            p = torch.tensor(top_p, device=sub.device)[:, None]
            sorted_probs = sorted_probs.masked_fill(before >= p, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        min_p = [requests[i].sampling_params.min_p for i in rows]
        if any(m > 0 for m in min_p):
            m = torch.tensor(min_p, device=sub.device)[:, None]
            probs = probs.masked_fill(probs < m * probs.max(dim=-1, keepdim=True).values, 0.0)
        # Gumbel-style draw: argmax(p / q) with q ~ Exp(1), from each request's generator.
        for j, i in enumerate(rows):
            q = torch.empty_like(probs[j]).exponential_(generator=self._generator(requests[i]))
            tokens[i] = (probs[j] / q).argmax()
        return tokens


def top_logprobs(row: torch.Tensor, token: int, n: int) -> Logprobs:
    """The sampled token's logprob first, then the top-n (which may repeat it)."""
    result = {token: float(row[token])}
    if n:
        values, ids = row.topk(n)
        for tid, lp in zip(ids.tolist(), values.tolist()):
            result.setdefault(tid, lp)
    return result
