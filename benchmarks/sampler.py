"""Time of one sampler call per batch size and sampling setting, on this CPU.

The sampler runs once per engine step over (batch, vocabulary) logits, so its cost adds to
every step's time per output token. Greedy is the floor it is compared against, measured in
the same run. Each timing is the median of --repeats calls on a fresh copy of the logits
(the copy is made outside the timed region, as the engine's logits are fresh each step).

    .venv/bin/python benchmarks/sampler.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fleetserve.engine.request import Request
from fleetserve.engine.sampler import Sampler
from fleetserve.engine.sampling_params import SamplingParams

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "temperature 1": dict(temperature=1.0),
    "top_k 50": dict(temperature=1.0, top_k=50),
    "top_p 0.9": dict(temperature=1.0, top_p=0.9),
    "min_p 0.05": dict(temperature=1.0, min_p=0.05),
    "seeded": dict(temperature=1.0, seed=1),
}


def time_call(sampler: Sampler, logits: torch.Tensor, requests: list[Request], repeats: int):
    times = []
    for _ in range(repeats + 1):  # the first call warms up and is dropped
        fresh = logits.clone()
        start = time.perf_counter()
        sampler(fresh, requests)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 200])
    parser.add_argument("--vocab", type=int, default=49_152, help="SmolLM2's vocabulary")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"vocab {args.vocab}, {args.threads} thread(s), median of {args.repeats} calls (ms)\n")
    print("| setting | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
    print("|---|" + "---:|" * len(args.batches))
    for name, params in SETTINGS.items():
        cells = []
        for batch in args.batches:
            logits = torch.randn(batch, args.vocab) * 4
            sp = SamplingParams(max_tokens=16, **params)
            requests = [Request(f"r{i}", [1], sp) for i in range(batch)]
            ms = time_call(Sampler(0, torch.device("cpu")), logits, requests, args.repeats)
            cells.append(f"{ms:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
