"""SamplingParams: validated on construction, each bad field named in the error."""

from __future__ import annotations

import dataclasses

import pytest

from fleetserve.engine.sampling_params import SamplingParams


def test_defaults_are_valid_and_match_vllm():
    p = SamplingParams()
    assert p.n == 1
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == -1
    assert p.max_tokens == 16
    assert p.min_tokens == 0
    assert p.stop == ()
    assert p.stop_token_ids == ()
    assert p.ignore_eos is False
    assert p.cache_salt is None
    assert p.greedy is False


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("n", -1),
        ("n", 1.5),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", -0.5),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", 1e-40),  # divides a logit of 5 past float32's range
        ("repetition_penalty", 10.01),
        ("temperature", 100.01),
        ("temperature", float("inf")),
        ("seed", 2**64),  # no longer a uint64: msgpack cannot carry it to the core
        ("seed", -(2**63) - 1),
        ("max_tokens", 2**63),
        ("min_tokens", 2**63),
        ("top_k", 2**63),
        ("presence_penalty", 2.01),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 2.01),
        ("frequency_penalty", -2.01),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 3.0),
        ("min_tokens", -1),
        ("min_tokens", 1.5),
        ("logprobs", -1),
        ("logprobs", 21),
        ("prompt_logprobs", -1),
        ("prompt_logprobs", 21),
        ("seed", 1.5),
        ("seed", "42"),
        ("stop", ("",)),
        ("stop", ("ok", "")),
        ("stop", (3,)),
        ("stop_token_ids", (-1,)),
        ("stop_token_ids", (1, "2")),
    ],
)
def test_invalid_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_names_min_tokens():
    with pytest.raises(ValueError, match=r"^min_tokens must be <= max_tokens \(4\), got 5$"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_error_message_says_what_was_given():
    with pytest.raises(ValueError, match=r"^temperature must be in \[0, 100\], got -1\.0$"):
        SamplingParams(temperature=-1.0)


def test_nan_temperature_is_rejected():
    with pytest.raises(ValueError, match=r"^temperature "):
        SamplingParams(temperature=float("nan"))


def test_nan_repetition_penalty_is_rejected():
    with pytest.raises(ValueError, match=r"^repetition_penalty "):
        SamplingParams(repetition_penalty=float("nan"))


@pytest.mark.parametrize("field", ["top_p", "min_p", "presence_penalty", "frequency_penalty"])
def test_nan_range_checked_fields_are_rejected(field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplingParams(**{field: float("nan")})


def test_boundary_values_are_accepted():
    p = SamplingParams(
        temperature=0.0,
        top_p=1.0,
        top_k=1,
        min_p=1.0,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        max_tokens=1,
        min_tokens=1,
        logprobs=20,
        prompt_logprobs=0,
        seed=0,
        stop_token_ids=(0,),
    )
    assert p.max_tokens == 1
    assert SamplingParams(max_tokens=None, min_tokens=1000).max_tokens is None
    assert SamplingParams(top_p=1e-9).top_p == 1e-9
    for seed in (2**64 - 1, -(2**63)):
        assert SamplingParams(seed=seed).seed == seed
    for penalty in (0.01, 10.0):
        assert SamplingParams(repetition_penalty=penalty).repetition_penalty == penalty
    assert SamplingParams(temperature=100.0, max_tokens=2**63 - 1).temperature == 100.0


def test_stop_string_becomes_a_one_element_tuple():
    assert SamplingParams(stop="###").stop == ("###",)


def test_stop_list_becomes_a_tuple_and_none_becomes_empty():
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == ()


def test_stop_token_ids_list_or_none_becomes_a_tuple():
    assert SamplingParams(stop_token_ids=[5, 6]).stop_token_ids == (5, 6)
    assert SamplingParams(stop_token_ids=None).stop_token_ids == ()


def test_params_are_frozen_and_hashable():
    p = SamplingParams(stop=["x"], stop_token_ids=[1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5
    assert hash(p) == hash(SamplingParams(stop=("x",), stop_token_ids=(1,)))


def test_top_k_zero_means_disabled():
    assert SamplingParams(top_k=0).top_k == -1


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [
        ({"temperature": 0.0}, True),
        ({"temperature": 1e-6}, True),
        ({"temperature": 1e-5}, False),
        ({"temperature": 0.7}, False),
        ({"top_k": 1}, True),
        ({"top_k": 2}, False),
        ({"top_k": 0}, False),
        ({"top_k": -1}, False),
    ],
)
def test_greedy(kwargs, greedy):
    assert SamplingParams(**kwargs).greedy is greedy
