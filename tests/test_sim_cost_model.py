"""The cost model: batch shapes, the fit and its held-out error, the file format, and
`fleetserve profile` on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fleetserve.engine.kv_cache_manager import KVCacheManager
from fleetserve.engine.request import Request
from fleetserve.engine.sampling_params import SamplingParams
from fleetserve.engine.scheduler import Scheduler, SchedulerConfig
from fleetserve.perf.cost_model import TERMS, CostModel, StepSample, StepShape
from fleetserve.perf.profile import samples_of

TRUE = {"base": 0.01, "tokens": 2e-4, "sampled": 5e-4, "context_tokens": 3e-6}


def synthetic(n: int, noise: float, seed: int = 0) -> list[StepSample]:
    """Steps of a known linear cost with multiplicative noise."""
    rng = np.random.default_rng(seed)
    truth = CostModel(TRUE)
    samples = []
    for _ in range(n):
        sampled = int(rng.integers(1, 32))
        prefill = int(rng.choice([0, 0, 64, 256]))
        shape = StepShape(
            tokens=sampled + prefill,
            sampled=sampled,
            context_tokens=int(rng.integers(sampled, 64 * sampled)),
            prefill_attention=prefill * prefill,
        )
        samples.append(StepSample(shape, truth.step_time(shape) * (1 + rng.normal(0, noise))))
    return samples


def test_step_shape_counts_a_mixed_batch():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=32, max_model_len=64), kv)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    scheduler.add_request(Request("a", list(range(10, 20)), params))
    first = scheduler.schedule()
    assert StepShape.of(first) == StepShape(10, 1, 10, 100)
    scheduler.update(first, {"a": 7})
    scheduler.add_request(Request("b", list(range(30, 70)), params))
    mixed = scheduler.schedule()  # a decodes (1 token at context 11), b prefills 31 of 40
    assert StepShape.of(mixed) == StepShape(
        tokens=32, sampled=1, context_tokens=11 + 31, prefill_attention=31 * 31
    )


def test_fit_recovers_a_linear_cost_and_reports_held_out_error():
    model = CostModel.fit(synthetic(200, noise=0.02))
    for term, value in TRUE.items():
        assert model.coefficients[term] == pytest.approx(value, rel=0.1)
    fit = model.meta["fit"]
    assert fit["heldout_steps"] == 50 and fit["train_steps"] == 150
    assert fit["heldout"]["p50_rel_error"] < 0.03
    assert fit["heldout"]["p90_rel_error"] < 0.06


def test_held_out_error_measures_what_the_fit_did_not_see():
    """A model fitted on decode steps alone mispredicts prefill: the held-out error says so."""
    decode_only = [s for s in synthetic(400, 0.0) if s.shape.tokens == s.shape.sampled]
    prefill = [s for s in synthetic(400, 0.0) if s.shape.tokens > s.shape.sampled]
    model = CostModel.fit(decode_only)
    assert model.meta["fit"]["heldout"]["max_rel_error"] < 1e-6
    assert model.errors(prefill)["mean_rel_error"] > 0.2


def test_coefficients_are_never_negative():
    samples = synthetic(100, noise=0.3, seed=3)
    model = CostModel.fit(samples)
    assert all(model.coefficients[t] >= 0 for t in TERMS)
    with pytest.raises(ValueError, match="must be >= 0"):
        CostModel({"base": -1.0})
    with pytest.raises(ValueError, match="unknown cost-model terms"):
        CostModel({"flops": 1.0})


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="at least"):
        CostModel.fit(synthetic(4, 0.0))


def test_json_round_trip(tmp_path):
    model = CostModel.fit(synthetic(40, 0.01), meta={"model": "m", "engine": {"block_size": 16}})
    path = tmp_path / "cm.json"
    model.save(path)
    loaded = CostModel.load(path)
    assert loaded == model
    assert loaded.meta["engine"] == {"block_size": 16}
    shape = StepShape(100, 4, 900, 0)
    assert loaded.step_time(shape) == model.step_time(shape)
    path.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="fleetserve profile"):
        CostModel.load(path)


def test_profile_a_tiny_model_writes_a_fitted_cost_model(tiny_llama, tmp_path):
    from fleetserve.cli import main

    out = tmp_path / "cm.json"
    argv = ["profile", str(tiny_llama), "--quick", "--no-progress", "--out", str(out)]
    argv += ["--kv-cache-memory", "8MiB", "--max-model-len", "256", "--num-threads", "1"]
    assert main(argv) == 0
    model = CostModel.load(out)
    meta = model.meta
    assert meta["engine"]["block_size"] == 16 and meta["engine"]["vocab_size"] == 512
    assert meta["engine"]["max_num_batched_tokens"] == 1024  # the server's default
    assert meta["model"] == str(tiny_llama) and meta["dtype"] == "auto"
    assert "cpu_count" in meta["hardware"]
    samples = samples_of(model)
    assert len(samples) == meta["fit"]["train_steps"] + meta["fit"]["heldout_steps"]
    # the grid was covered: prefills of each size and decode batches of 4
    assert {s.shape.tokens for s in samples if s.shape.sampled == 1} >= {8, 32, 64}
    assert any(s.shape.sampled == 4 and s.shape.tokens == 4 for s in samples)
    assert all(s.seconds > 0 for s in samples)
    assert 0 <= meta["fit"]["heldout"]["p50_rel_error"] < float("inf")


def test_serving_costs_add_per_step_and_per_output_token_and_round_trip(tmp_path):
    bare = CostModel({"base": 0.02, "tokens": 1e-4, "sampled": 1e-3})
    served = bare.with_serving(step_s=0.005, token_s=0.002)
    shape = StepShape(tokens=8, sampled=8, context_tokens=800)
    assert served.step_time(shape) == pytest.approx(bare.step_time(shape) + 0.005 + 8 * 0.002)
    path = tmp_path / "served.json"
    served.save(path)
    assert CostModel.load(path).serving == {"step_s": 0.005, "token_s": 0.002}
    assert CostModel.load(path).step_time(shape) == served.step_time(shape)
    with pytest.raises(ValueError, match="token_s"):
        bare.with_serving(step_s=0.0, token_s=-1.0)
    with pytest.raises(ValueError, match="serving terms"):
        CostModel({"base": 0.02}, serving={"per_byte": 1.0})


def test_repeated_passes_keep_each_steps_fastest_time():
    from fleetserve.perf.profile import fastest_of_repeats

    a, b = StepShape(16, 1, 16, 256), StepShape(1, 1, 17, 0)
    passes = [
        StepSample(a, 0.30),
        StepSample(b, 0.05),  # first pass
        StepSample(a, 0.10),
        StepSample(b, 0.09),  # second pass: another process ran during the decode
    ]
    assert fastest_of_repeats(passes, 2) == [StepSample(a, 0.10), StepSample(b, 0.05)]
    assert fastest_of_repeats(passes, 1) == passes
    swapped = passes[:2] + passes[2:][::-1]  # passes of different shapes: all kept
    assert fastest_of_repeats(swapped, 2) == swapped
