"""Turns one step's logits into tokens, per request: penalties, temperature, top-k/p, min-p,
seeded sampling and logprobs.

A seeded request's k-th token draws the k-th number of splitmix64 seeded with its seed: a pure
function of (seed, k), so its output does not depend on what else shares the batch, and a
step that is run again (after a failure elsewhere in its batch, see `EngineCore`) draws the
same number. Greedy rows take the argmax and draw nothing.

Every returned id is in [0, vocab): a row whose logits hold NaN or +inf (an overflowing model)
takes the argmax with NaN ignored, and a row with nothing finite to pick fails its request
alone (`SamplerOutput.errors`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fleetserve.engine.outputs import Logprobs
from fleetserve.engine.request import Request
from fleetserve.engine.sampling_params import MIN_TEMPERATURE

logger = logging.getLogger(__name__)

_MASK64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
# Real models' logits are within +-1e3; 1e30 / MIN_TEMPERATURE is still far below float32's
# 3.4e38, so no finite logit under this bound overflows in the draw.
MAX_LOGIT = 1e30


def seeded_uniform(seed: int, k: int) -> float:
    """The k-th output of splitmix64 seeded with `seed` (any int: taken mod 2**64), as a
    float in [0, 1)."""
    z = (seed + (k + 1) * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) * 2.0**-53


@dataclass
class SamplerOutput:
    token_ids: list[int]  # in [0, vocab); a failed row's entry is meaningless
    logprobs: list[Logprobs | None]  # per row: sampled token first, then the top-N
    errors: dict[int, str] = field(default_factory=dict)  # row -> why it has no token


class Sampler:
    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)  # unseeded rows

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits: (num_rows, vocab), one row per request, in `requests` order. The sampler
        uses float32 logits as its scratch space: the caller must not read them afterwards."""
        logits = logits.float()
        want_logprobs = [r.sampling_params.logprobs is not None for r in requests]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        logits = self._apply_penalties(logits, requests)
        # NaN or +inf anywhere in a row (or a logit so large that dividing it by the
        # temperature overflows) turns its draw into NaNs, and searchsorted then returns
        # vocab; such rows, and rows with nothing above -inf, are decided here. One pass:
        # amax propagates NaN.
        top = logits.amax(dim=-1)
        broken = ~(top <= MAX_LOGIT) | (top == -float("inf"))
        fallback: dict[int, int] = {}
        errors: dict[int, str] = {}
        if bool(broken.any()):
            fallback, errors = _broken_rows(logits, broken, requests)
        greedy = [r.sampling_params.greedy or i in fallback for i, r in enumerate(requests)]
        for i in errors:
            greedy[i] = True  # anything in range; the row's request fails
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, requests, greedy)
        token_list = tokens.tolist()
        for i, token in fallback.items():
            token_list[i] = token
        vocab = logits.shape[1]
        assert all(0 <= t < vocab for t in token_list), token_list

        logprobs: list[Logprobs | None] = [None] * len(requests)
        if raw_logprobs is not None:
            for i, request in enumerate(requests):
                if want_logprobs[i] and i not in errors:
                    logprobs[i] = top_logprobs(
                        raw_logprobs[i], token_list[i], request.sampling_params.logprobs
                    )
        return SamplerOutput(token_list, logprobs, errors)

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
        """Draws a token for every non-greedy row; works in place on `logits`.

        Every pass over the (rows, vocab) matrix is in place: on a CPU a fresh 40 MB tensor
        (batch 200 × a 49k vocabulary) costs more in page faults than the arithmetic on it.
        """
        rows = [i for i, g in enumerate(greedy) if not g]
        params = [requests[i].sampling_params for i in rows]
        device = logits.device
        if len(rows) < len(requests):
            tokens = logits.argmax(dim=-1)  # the greedy rows' answers, before logits change
        else:
            tokens = torch.empty(len(requests), dtype=torch.long, device=device)
        weights = logits if len(rows) == len(requests) else logits[rows]
        # vLLM's floor: below it, logits / temperature overflow float32 for large logits.
        temperatures = [max(p.temperature, MIN_TEMPERATURE) for p in params]
        weights.div_(torch.tensor(temperatures, device=device)[:, None])

        top_k = [p.top_k for p in params]
        if any(k > 0 for k in top_k):
            # topk of the largest k asked for, not a sort of the whole vocabulary.
            largest = min(max(top_k), weights.shape[1])
            best = weights.topk(largest, dim=-1).values
            k = torch.tensor([min(k, largest) if k > 0 else 1 for k in top_k], device=device)
            kth = best.gather(1, (k - 1)[:, None])
            kth[torch.tensor([k <= 0 for k in top_k], device=device)] = -float("inf")
            weights.masked_fill_(weights < kth, -float("inf"))

        # Unnormalised probabilities: exp(x - max), so the best token weighs exactly 1.
        weights.sub_(weights.amax(dim=-1, keepdim=True)).exp_()

        top_p = [p.top_p for p in params]
        if any(p < 1.0 for p in top_p):
            keep_nucleus_(weights, torch.tensor(top_p, device=device))
        min_p = [p.min_p for p in params]
        if any(m > 0 for m in min_p):
            # The best token weighs 1 and no filter above removes it, so min_p is the threshold.
            weights.masked_fill_(weights < torch.tensor(min_p, device=device)[:, None], 0.0)

        # Inverse-CDF draw: one uniform number per row, from the request's own generator when
        # it has a seed, looked up in the row's running sum of weights. One random number per
        # row, not one per vocabulary entry: a draw per entry (Gumbel) cost 17 ms a step at
        # batch 16 over a 49k vocabulary on one CPU thread. The running sum is float32: a token
        # lighter than ~1e-7 of the mass above it rounds to no chance.
        uniform = torch.empty(len(rows), 1, device=device)
        unseeded = [j for j, p in enumerate(params) if p.seed is None]
        if unseeded:
            uniform[unseeded] = torch.rand(
                len(unseeded), 1, device=device, generator=self.generator
            )
        seeded = [j for j, p in enumerate(params) if p.seed is not None]
        if seeded:
            draws = [
                seeded_uniform(params[j].seed, requests[rows[j]].num_output_tokens) for j in seeded
            ]
            uniform[seeded] = torch.tensor(draws, device=device)[:, None]
        cdf = torch.cumsum(weights, dim=-1, out=weights)
        total = cdf[:, -1:]
        # Strictly below the total, so the search never runs past the last token; a token of
        # weight 0 has an empty interval (its cdf equals its predecessor's) and is never hit.
        target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
        picked = torch.searchsorted(cdf, target, right=True).squeeze(1)
        tokens[rows] = picked.to(tokens.dtype)
        return tokens


def _broken_rows(
    logits: torch.Tensor, broken: torch.Tensor, requests: list[Request]
) -> tuple[dict[int, int], dict[int, str]]:
    """Rows with NaN, +inf or huge logits: greedy with NaN ignored (+inf is the most likely
    token, as an overflowed boost means). Rows with nothing but NaN and -inf: an error."""
    fallback, errors = {}, {}
    for i in torch.nonzero(broken).squeeze(1).tolist():
        row = torch.where(torch.isnan(logits[i]), -float("inf"), logits[i])
        best = int(row.argmax())
        if row[best] == -float("inf"):
            errors[i] = "the model's logits for this request are all NaN or -inf"
        else:
            fallback[i] = best
        logger.warning(
            "request %s: non-finite logits; %s",
            requests[i].request_id,
            "failing it" if i in errors else f"taking the argmax ({best})",
        )
    return fallback, errors


def keep_nucleus_(weights: torch.Tensor, top_p: torch.Tensor, first_k: int = 256) -> None:
    """Top-p in place: zeroes every token outside its row's nucleus, the fewest most likely
    tokens whose weights before them sum to less than top_p of the row's total (the token that
    crosses the line is in). Tokens tied with the nucleus' lightest one stay in too.

    A full sort of a 49k vocabulary costs 0.8 s at batch 200 on one CPU thread, and a peaked
    distribution's nucleus is far smaller (~300 tokens at top_p 0.9 for N(0, 4^2) logits), so
    this looks at the `first_k` heaviest of each row (`topk`), and only rows whose nucleus is
    wider look again at 8x as many, then at the whole vocabulary.
    """
    vocab = weights.shape[1]
    mass = top_p[:, None] * weights.sum(dim=-1, keepdim=True)
    threshold = torch.zeros(weights.shape[0], 1, dtype=weights.dtype, device=weights.device)
    pending = torch.nonzero(top_p < 1.0).squeeze(1)
    k = first_k
    while len(pending):
        k = min(k, vocab)
        values = weights[pending].topk(k, dim=-1).values  # heaviest first
        inside = (values.cumsum(dim=-1) - values) < mass[pending]
        decided = ~inside[:, -1] if k < vocab else torch.ones_like(inside[:, -1])
        rows = pending[decided]
        # The heaviest token is always in, even when top_p underflows to 0 in float32.
        last_inside = (inside[decided].sum(dim=-1, keepdim=True) - 1).clamp_(min=0)
        threshold[rows] = values[decided].gather(1, last_inside)
        pending = pending[~decided]
        k = k * 8 if k * 8 <= vocab // 4 else vocab  # past a quarter, one full sort is cheaper
    weights.masked_fill_(weights < threshold, 0.0)


def top_logprobs(row: torch.Tensor, token: int, n: int) -> Logprobs:
    """The sampled token's logprob first, then the top-n (which may repeat it)."""
    result = {token: float(row[token])}
    if n:
        values, ids = row.topk(n)
        for tid, lp in zip(ids.tolist(), values.tolist()):
            result.setdefault(tid, lp)
    return result
