"""The sampler on plain tensors: draws follow the softmax, filters remove what they must,
seeded rows are independent of their batch, greedy rows take the argmax."""

from __future__ import annotations

import math

import pytest
import torch

from fleetserve.engine.request import Request
from fleetserve.engine.sampler import Sampler, keep_nucleus_, seeded_uniform
from fleetserve.engine.sampling_params import SamplingParams

CPU = torch.device("cpu")


def requests(n: int, **params) -> list[Request]:
    sp = SamplingParams(max_tokens=4, **params)
    return [Request(f"r{i}", [1, 2, 3], sp) for i in range(n)]


def draw(logits_row: list[float], n: int, seed: int = 0, **params) -> torch.Tensor:
    """n independent draws from one row of logits, as n rows of one batch."""
    logits = torch.tensor([logits_row] * n)
    out = Sampler(seed, CPU)(logits, requests(n, **params))
    return torch.tensor(out.token_ids)


def test_draws_follow_the_softmax() -> None:
    logits = [0.0, 1.0, 2.0, -1.0, 0.5]
    n = 20_000
    counts = torch.bincount(draw(logits, n, temperature=1.0), minlength=5).double()
    expected = torch.softmax(torch.tensor(logits, dtype=torch.float64), -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.5  # 4 degrees of freedom: p = 0.001


def test_temperature_sharpens_the_distribution() -> None:
    logits = [0.0, 1.0]
    n = 20_000
    frac_hot = float((draw(logits, n, temperature=2.0) == 1).double().mean())
    frac_cold = float((draw(logits, n, temperature=0.5) == 1).double().mean())
    assert frac_hot == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.015)
    assert frac_cold == pytest.approx(1 / (1 + math.exp(-2.0)), abs=0.015)


def test_tokens_of_probability_zero_are_never_drawn() -> None:
    logits = [-math.inf, 0.0, -math.inf, 0.0, -math.inf]
    assert set(draw(logits, 5_000, temperature=1.0).tolist()) == {1, 3}


def test_top_k_keeps_only_the_k_best() -> None:
    logits = [3.0, 2.9, 2.8, 0.0, -1.0]
    assert set(draw(logits, 5_000, temperature=1.0, top_k=2).tolist()) == {0, 1}


def test_top_p_keeps_the_smallest_set_with_that_mass() -> None:
    # probabilities 0.5, 0.3, 0.2: top_p 0.7 keeps 0.5 + 0.3, renormalised
    logits = [math.log(0.5), math.log(0.3), math.log(0.2)]
    drawn = draw(logits, 5_000, temperature=1.0, top_p=0.7)
    assert set(drawn.tolist()) == {0, 1}
    assert float((drawn == 0).double().mean()) == pytest.approx(0.5 / 0.8, abs=0.03)


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    logits = [math.log(0.6), math.log(0.3), math.log(0.1)]
    assert set(draw(logits, 5_000, temperature=1.0, min_p=0.2).tolist()) == {0, 1}


def test_seeded_row_does_not_depend_on_its_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 1000)
    seeded = SamplingParams(max_tokens=4, temperature=1.0, seed=1234)
    alone = Sampler(0, CPU)(logits[2:3].clone(), [Request("s", [1], seeded)]).token_ids[0]
    batch = requests(2, temperature=1.0) + [Request("s", [1], seeded)] + requests(3)
    in_batch = Sampler(99, CPU)(logits[[0, 1, 2, 3, 4, 5]].clone(), batch).token_ids[2]
    assert in_batch == alone


def test_seeded_requests_repeat_and_different_seeds_differ() -> None:
    logits = torch.zeros(1, 50_000)  # uniform: two seeds agreeing by chance is 1 in 50,000

    def first_tokens(seed: int) -> list[int]:
        sampler = Sampler(0, CPU)
        req = Request("s", [1], SamplingParams(max_tokens=4, temperature=1.0, seed=seed))
        return [sampler(logits.clone(), [req]).token_ids[0] for _ in range(5)]

    assert first_tokens(7) == first_tokens(7)
    assert first_tokens(7) != first_tokens(8)


def test_greedy_rows_take_the_argmax_in_a_mixed_batch() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 300)
    batch = requests(2, temperature=0.0) + requests(2, temperature=1.0)
    out = Sampler(0, CPU)(logits.clone(), batch)
    assert out.token_ids[:2] == logits[:2].argmax(-1).tolist()


def reference_nucleus(weights: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p by a full sort: the tokens whose heavier predecessors hold < top_p of the mass."""
    values, _ = weights.sort(descending=True)
    inside = (values.cumsum(0) - values) < top_p * weights.sum()
    lightest = values[int(inside.sum()) - 1]
    return weights >= lightest


@pytest.mark.parametrize("first_k", [4, 32, 1000])
def test_nucleus_matches_a_full_sort_whatever_its_width(first_k: int) -> None:
    torch.manual_seed(3)
    # rows from peaked (nucleus of a few tokens) to flat (hundreds): some need the wider looks
    scales = torch.tensor([16.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.0, 8.0])[:, None]
    logits = torch.randn(8, 1000) * scales
    weights = (logits - logits.amax(-1, keepdim=True)).exp()
    top_p = torch.tensor([0.9, 0.5, 0.95, 0.9, 0.99, 0.8, 0.3, 1.0])
    filtered = weights.clone()
    keep_nucleus_(filtered, top_p, first_k=first_k)
    for row in range(7):
        expected = reference_nucleus(weights[row], float(top_p[row]))
        assert torch.equal(filtered[row] > 0, expected), row
        assert torch.equal(filtered[row][expected], weights[row][expected])  # kept unchanged
    assert torch.equal(filtered[7], weights[7])  # top_p 1: untouched


# ---- rows that would overflow ------------------------------------------------------------

INF, NAN = float("inf"), float("nan")
BROKEN_ROWS = {
    "all nan": [NAN] * 8,
    "all +inf": [INF] * 8,
    "all -inf": [-INF] * 8,
    "mixed": [1.0, 2.0, NAN, 3.0, INF, -INF, 0.0, 0.0],
    "huge": [1e35, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    "normal": [0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0],
}


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.0},
        {"temperature": 1.0},
        {"temperature": 1.0, "seed": 2**64 - 1},
        {"temperature": 1e-5, "top_p": 0.5, "top_k": 3, "min_p": 0.1, "logprobs": 2},
        {"temperature": 1.0, "repetition_penalty": 0.01, "frequency_penalty": -2.0},
    ],
)
def test_non_finite_rows_give_ids_inside_the_vocabulary(params) -> None:
    rows = list(BROKEN_ROWS.values())
    batch = requests(len(rows), **params)
    for r in batch:
        r.append_output_token(4)  # something for the penalties to act on
    out = Sampler(0, CPU)(torch.tensor(rows), batch)
    assert all(0 <= t < 8 for t in out.token_ids), out.token_ids
    names = list(BROKEN_ROWS)
    # Nothing finite to pick: those requests fail; the others get the best token they have.
    assert {names[i] for i in out.errors} == {"all nan", "all -inf"}
    assert out.token_ids[names.index("mixed")] == 4  # +inf beats every finite logit
    assert out.token_ids[names.index("huge")] == 0
    if params.get("logprobs") is not None:
        assert out.logprobs[names.index("all nan")] is None


def test_a_tiny_temperature_does_not_overflow() -> None:
    tokens = draw([3e4, 0.0, -3e4, 1.0], 50, temperature=1e-4)
    assert tokens.tolist() == [0] * 50


def test_a_seeded_draw_depends_on_seed_and_position_only() -> None:
    """A step run again after a failure elsewhere in its batch must draw the same."""
    logits = torch.zeros(1, 1000)
    request = requests(1, temperature=1.0, seed=5)[0]
    sampler = Sampler(0, CPU)
    first = [sampler(logits.clone(), [request]).token_ids[0] for _ in range(3)]
    assert len(set(first)) == 1  # the same position: the same draw, however often
    request.append_output_token(first[0])
    assert sampler(logits.clone(), [request]).token_ids[0] != first[0]  # 1 in 1000 to fail
    assert seeded_uniform(-1, 7) == seeded_uniform(2**64 - 1, 7)  # seeds are taken mod 2**64
    draws = [seeded_uniform(123, k) for k in range(20_000)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert abs(sum(draws) / len(draws) - 0.5) < 0.01


def test_a_top_p_that_underflows_keeps_the_heaviest_token() -> None:
    """top_p 1e-300 is 0 in float32: the nucleus is still the one heaviest token (it used to
    gather index -1 and fail the step)."""
    weights = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]])
    top_p = torch.tensor([1e-300, 5e-324])
    keep_nucleus_(weights, top_p)
    assert (weights > 0).tolist() == [[False, True, False], [True, False, False]]
