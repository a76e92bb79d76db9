"""Circuit breaker, token buckets, admission, the dispatch queue, API keys, the retry
budget, request body checks and charges, on plain data with an injected clock."""

from __future__ import annotations

import math
import re

import pytest

from fleetserve.gateway.admission import AdmissionController
from fleetserve.gateway.api_keys import ApiKey, KeyLimits, hash_key, load_api_keys
from fleetserve.gateway.circuit_breaker import BreakerConfig, BreakerState, CircuitBreaker
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.dispatch_queue import DispatchQueue, QueueFull
from fleetserve.gateway.replica import check_replica_url
from fleetserve.gateway.request_body import InvalidBody, charged_tokens, check_body
from fleetserve.gateway.retry_budget import RetryBudget
from fleetserve.gateway.token_bucket import TokenBucket
from fleetserve.gateway.wait_estimator import WaitEstimator

# ---- circuit breaker ---------------------------------------------------------------------------


def test_breaker_opens_after_threshold_consecutive_failures():
    b = CircuitBreaker(BreakerConfig(failure_threshold=3, cooldown_s=1.0, max_cooldown_s=4.0))
    b.record_failure(0.0)
    b.record_failure(0.1)
    b.record_success(0.2)  # resets the count
    b.record_failure(0.3)
    b.record_failure(0.4)
    assert b.state(0.4) is BreakerState.CLOSED and b.allows(0.4)
    b.record_failure(0.5)
    assert b.state(0.5) is BreakerState.OPEN and not b.allows(1.4)


def test_breaker_half_open_allows_limited_trials_and_closes_on_success():
    b = CircuitBreaker(BreakerConfig(failure_threshold=1, cooldown_s=1.0, max_cooldown_s=4.0))
    b.record_failure(0.0)
    assert b.state(1.0) is BreakerState.HALF_OPEN and b.allows(1.0)
    b.on_dispatch(1.0)
    assert not b.allows(1.1)  # one trial at a time
    b.record_success(1.2)
    assert b.state(1.2) is BreakerState.CLOSED and b.allows(1.2)


def test_breaker_failed_trial_reopens_with_doubled_cooldown_capped():
    b = CircuitBreaker(BreakerConfig(failure_threshold=1, cooldown_s=1.0, max_cooldown_s=3.0))
    b.record_failure(0.0)
    b.on_dispatch(1.0)
    b.record_failure(1.0)  # trial fails: open for 2 s
    assert b.state(2.9) is BreakerState.OPEN and b.state(3.0) is BreakerState.HALF_OPEN
    b.on_dispatch(3.0)
    b.record_failure(3.0)  # open for min(4, 3) s
    assert b.state(5.9) is BreakerState.OPEN and b.state(6.0) is BreakerState.HALF_OPEN
    b.record_success(6.0)
    b.record_failure(6.1)  # cooldown was reset by the success
    assert b.state(7.1) is BreakerState.HALF_OPEN
    assert b.times_opened == 4


def test_breaker_neutral_end_frees_trial_and_open_ignores_late_answers():
    b = CircuitBreaker(BreakerConfig(failure_threshold=1, cooldown_s=1.0))
    b.record_failure(0.0)
    b.record_success(0.5)  # a late answer while open changes nothing
    assert b.state(0.5) is BreakerState.OPEN
    b.on_dispatch(1.0)
    b.record_neutral(1.5)
    assert b.allows(1.5)
    b.force_open(2.0)
    assert not b.allows(2.0)
    b.reset()
    assert b.state(2.0) is BreakerState.CLOSED


def test_breaker_config_validates():
    with pytest.raises(ValueError):
        BreakerConfig(failure_threshold=0)
    with pytest.raises(ValueError):
        BreakerConfig(cooldown_s=5, max_cooldown_s=1)


# ---- token bucket ------------------------------------------------------------------------------


def test_token_bucket_refills_at_rate_up_to_capacity():
    b = TokenBucket(rate=2.0, capacity=4.0, now=0.0)
    assert b.try_take(4, 0.0) == 0.0
    assert b.try_take(1, 0.0) == pytest.approx(0.5)  # refused: 1 token in 0.5 s
    assert b.available(0.0) == 0.0
    assert b.try_take(1, 0.5) == 0.0
    assert b.available(100.0) == 4.0
    assert math.isinf(b.try_take(5, 100.0))
    b.give_back(10, 100.0)
    assert b.available(100.0) == 4.0


def test_token_bucket_rejects_bad_parameters():
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
    with pytest.raises(ValueError):
        TokenBucket(1, 0)


# ---- admission -----------------------------------------------------------------------------------


def test_admission_requests_per_second():
    key = ApiKey("k", KeyLimits(requests_per_s=2))
    adm = AdmissionController()
    assert adm.admit(key, 1, 0.0).admitted
    assert adm.admit(key, 1, 0.0).admitted
    d = adm.admit(key, 1, 0.0)
    assert not d.admitted and d.reason == "requests_per_s" and d.retry_after_s == pytest.approx(0.5)
    assert adm.admit(key, 1, 0.5).admitted


def test_admission_tokens_per_minute_with_refund():
    key = ApiKey("k", KeyLimits(tokens_per_min=600))  # 10 tokens/s
    adm = AdmissionController()
    assert adm.admit(key, 500, 0.0).admitted
    d = adm.admit(key, 200, 0.0)
    assert not d.admitted and d.reason == "tokens_per_min" and d.retry_after_s == pytest.approx(10)
    adm.release(key, charged_tokens=500, used_tokens=100, now=0.0)  # 400 given back
    assert adm.admit(key, 200, 0.0).admitted
    too_big = adm.admit(key, 601, 0.0)
    assert not too_big.admitted and too_big.reason == "too_large"


def test_a_request_that_used_more_than_its_charge_puts_the_key_in_debt():
    """A chat without max_tokens is charged the default (256) but may run to the context:
    the overrun is taken at release, and the key waits for the refill to pay it."""
    key = ApiKey("k", KeyLimits(tokens_per_min=600))  # 10 tokens/s, 600 at most
    adm = AdmissionController()
    assert adm.admit(key, 300, 0.0).admitted
    adm.release(key, charged_tokens=300, used_tokens=1000, now=0.0)  # 700 more than charged
    d = adm.admit(key, 100, 0.0)
    assert not d.admitted and d.reason == "tokens_per_min"
    # 600 - 300 - 700 = -400 in the bucket: 500 tokens to refill before 100 fit
    assert d.retry_after_s == pytest.approx(50)
    assert not adm.admit(key, 100, 49.9).admitted
    assert adm.admit(key, 100, 50.0).admitted


def test_admission_concurrency_and_unlimited_keys():
    key = ApiKey("k", KeyLimits(max_concurrent=1))
    adm = AdmissionController()
    assert adm.admit(key, 1, 0).admitted
    d = adm.admit(key, 1, 0)
    assert not d.admitted and d.reason == "max_concurrent" and d.retry_after_s > 0
    adm.release(key, 1, None, 0)
    assert adm.admit(key, 1, 0).admitted and adm.concurrent(key) == 1
    free = ApiKey("free")
    assert all(adm.admit(free, 10**9, 0).admitted for _ in range(1000))


def test_admission_refusal_takes_nothing():
    key = ApiKey("k", KeyLimits(requests_per_s=1, tokens_per_min=60))
    adm = AdmissionController()
    assert not adm.admit(key, 100, 0.0).admitted  # too large: the request slot is not spent
    assert adm.admit(key, 10, 0.0).admitted


# ---- dispatch queue and wait prediction ---------------------------------------------------


class Item:
    def __init__(self, name: str) -> None:
        self.name = name


def test_queue_serves_by_priority_then_arrival():
    q: DispatchQueue[Item] = DispatchQueue(10)
    items = {n: Item(n) for n in ["low1", "norm1", "high1", "norm2", "low2"]}
    ranks = {"low1": 3, "norm1": 2, "high1": 1, "norm2": 2, "low2": 3}
    for n, it in items.items():
        q.push(it, ranks[n])
    assert q.ahead_of(2) == 3
    q.remove(items["norm2"])
    assert [q.pop().name for _ in range(len(q))] == ["high1", "norm1", "low1", "low2"]


def test_queue_full_displaces_less_urgent_or_refuses():
    q: DispatchQueue[Item] = DispatchQueue(2)
    a, b = Item("a"), Item("b")
    q.push(a, 2)
    q.push(b, 3)
    with pytest.raises(QueueFull):
        q.push(Item("c"), 3)  # not more urgent than the worst
    urgent = Item("u")
    assert q.push(urgent, 1) is b
    assert q.peek() is urgent and len(q) == 2


def test_wait_estimator():
    w = WaitEstimator(initial_service_s=2.0, alpha=0.5)
    assert w.predict_wait(ahead=3, slots=4) == pytest.approx(2.0)
    w.observe(4.0)
    assert w.mean_service_s == pytest.approx(3.0)
    assert math.isinf(w.predict_wait(0, 0))


# ---- API keys ----------------------------------------------------------------------------------


def test_api_keys_file_round_trip(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(
        "keys:\n"
        f"  - name: alice\n    sha256: {hash_key('secret-a')}\n    priority: high\n"
        "    requests_per_s: 5\n    tokens_per_min: 1000\n    max_concurrent: 2\n"
        f"  - name: ops\n    sha256: {hash_key('secret-b').upper()}\n    admin: true\n"
    )
    store = load_api_keys(path)
    alice = store.lookup("secret-a")
    assert alice.name == "alice" and alice.priority_rank == 1 and alice.limits.max_concurrent == 2
    assert store.lookup("secret-b").admin
    assert store.lookup("secret-c") is None and store.lookup("") is None
    assert "secret" not in path.read_text()


@pytest.mark.parametrize(
    "entry, message",
    [
        ("sha256: abc", "64-character"),
        (f"sha256: '{'0' * 64}'\n    priority: urgent", "unknown priority"),
        (f"sha256: '{'0' * 64}'\n    requests_per_s: 0", "requests_per_s"),
    ],
)
def test_api_keys_file_errors_name_the_entry(tmp_path, entry, message):
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - {entry}\n")
    with pytest.raises(ValueError, match=message) as err:
        load_api_keys(path)
    assert "keys[0]" in str(err.value)


# ---- the retry budget, the charge of a request, replica URLs -----------------------------------


def test_retry_budget_allows_min_concurrency_then_a_share_of_active_requests():
    budget = RetryBudget(percent=20, min_concurrency=3)
    for _ in range(10):
        budget.request_started()
    assert [budget.try_start_retry() for _ in range(4)] == [True, True, True, False]
    for _ in range(10):  # 20 active: 20% is 4 retries in flight
        budget.request_started()
    assert budget.try_start_retry() and not budget.try_start_retry()
    budget.retry_ended()
    assert budget.try_start_retry()
    for _ in range(20):
        budget.request_ended()
    budget.request_ended()  # never below zero
    assert budget.active_requests == 0 and budget.limit == 3
    for _ in range(4):
        budget.retry_ended()
    assert budget.active_retries == 0
    with pytest.raises(ValueError):
        RetryBudget(percent=120)
    with pytest.raises(ValueError):
        RetryBudget(min_concurrency=-1)


def test_retry_budget_of_zero_denies_every_retry():
    budget = RetryBudget(percent=0, min_concurrency=0)
    budget.request_started()
    assert not budget.try_start_retry()


def test_charge_counts_prompt_tokens_plus_max_tokens_for_every_prompt_and_choice():
    config = GatewayConfig()
    shape = check_body({"prompt": ["hi"] * 100, "max_tokens": 16}, "/v1/completions", config)
    assert (shape.num_prompts, shape.n, shape.estimated_prompt_tokens) == (100, 1, 100)
    assert charged_tokens(shape.estimated_prompt_tokens, shape, 256) == 100 + 100 * 16
    shape = check_body({"prompt": [[1, 2, 3]] * 4, "n": 3}, "/v1/completions", config)
    assert charged_tokens(12, shape, default_max_tokens=10) == 12 + 4 * 3 * 10
    chat = {"messages": [{"role": "user", "content": "x" * 40}], "max_completion_tokens": 5}
    shape = check_body({**chat, "max_tokens": 99}, "/v1/chat/completions", config)
    assert shape.num_prompts == 1 and shape.max_tokens == 5 and shape.single_prompt
    shape = check_body({"input": ["a", "b"]}, "/v1/embeddings", config)
    assert charged_tokens(2, shape, 256) == 2  # embeddings decode nothing


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ["a"] * 5}, "at most 4 per request"),
        ({"prompt": "a", "n": 3}, "'n'"),
        ({"prompt": ["a", "b"], "n": 2}, "4 sequences"),
        ({"prompt": "a", "max_tokens": True}, "'max_tokens'"),
        ({"prompt": "a", "logprobs": "yes"}, "'logprobs'"),
        ("prompt", "JSON object"),
    ],
)
def test_body_checks_name_the_field(body, field):
    config = GatewayConfig(max_prompts_per_request=4, max_n=2, max_choices_per_request=3)
    with pytest.raises(InvalidBody, match=re.escape(field)):
        check_body(body, "/v1/completions", config)


def test_charge_more_takes_the_rest_or_nothing():
    ctl = AdmissionController()
    key = ApiKey("k", KeyLimits(tokens_per_min=100))
    assert ctl.admit(key, 60, 0.0).admitted
    assert ctl.charge_more(key, 30, 0.0).admitted
    refused = ctl.charge_more(key, 20, 0.0)
    assert not refused.admitted and refused.reason == "tokens_per_min"
    assert ctl.charge_more(key, 200, 0.0).reason == "too_large"
    assert ctl.charge_more(ApiKey("free"), 10**9, 0.0).admitted


@pytest.mark.parametrize(
    "url",
    ["http://u:p@h:1", "ftp://h", "h:1", "http://", "http://h:1/?q=1", "http://h:x", "http://h /"],
)
def test_replica_urls_are_plain_http_base_urls(url):
    with pytest.raises(ValueError):
        check_replica_url(url)


def test_replica_url_keeps_a_path_and_drops_the_trailing_slash():
    assert (
        check_replica_url("https://replica.internal:8443/v/") == "https://replica.internal:8443/v"
    )
