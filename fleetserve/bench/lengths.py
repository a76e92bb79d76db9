"""Sampling token counts from a `LengthSpec`. Pure: the caller passes the seeded RNG."""

from __future__ import annotations

import math

import numpy as np

from fleetserve.bench.config import LengthSpec


def sample_lengths(spec: LengthSpec, rng: np.random.Generator, n: int) -> list[int]:
    """`n` token counts drawn from `spec`, rounded and clipped to [spec.min, spec.max]."""
    if spec.std > 0:
        values = rng.normal(spec.mean, spec.std, n)
    elif spec.range_ratio > 0:
        low = spec.mean * (1 - spec.range_ratio)
        high = spec.mean * (1 + spec.range_ratio)
        values = rng.uniform(low, high, n)
    elif spec.lognormal_sigma > 0:
        # E[lognormal(mu, sigma)] = exp(mu + sigma^2 / 2): choose mu so the mean is spec.mean.
        mu = math.log(spec.mean) - spec.lognormal_sigma**2 / 2
        values = rng.lognormal(mu, spec.lognormal_sigma, n)
    else:
        values = np.full(n, float(spec.mean))
    upper = spec.max if spec.max is not None else np.inf
    return [int(v) for v in np.clip(np.rint(values), spec.min, upper)]
