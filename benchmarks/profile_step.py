"""Where the time of one decode step goes: matmuls, attention, KV gather, sampling, Python.

    .venv/bin/python benchmarks/profile_step.py --model random-100m --batch 200

Fills the engine with --batch requests of --input-len tokens, runs their prefill, then
profiles --steps decode steps with torch.profiler and sorts every operator into a category.
"Python and framework overhead" is the wall time of a step that no operator accounts for
(scheduling, building the batch, detokenization is not part of it: the core has none).
With --threads 1 it also prints the step's CPU time, the figure to compare before/after on a
machine that other processes share (two OpenMP threads slowed a batch-1 step from ~30 ms to
1.2 s here while other processes held the cores; one thread's CPU time barely moves).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import defaultdict

import torch
from throughput import OUT, build_random_100m, smollm2_path
from torch.profiler import ProfilerActivity, profile

CATEGORIES = [
    (
        "matmuls (linear layers, lm_head)",
        ("aten::mm", "aten::addmm", "aten::_int_mm", "mkldnn::_linear_pointwise"),
    ),
    ("KV gather (paged blocks -> dense)", ("aten::index",)),
    (
        "attention math (bmm, softmax, mask)",
        (
            "aten::bmm",
            "aten::_softmax",
            "aten::masked_fill_",
            "aten::_scaled_dot_product",
            "fleetserve::paged_attention",
        ),
    ),
    ("KV write (index_copy_)", ("aten::index_copy_",)),
    (
        "sampling (argmax, topk, exponential)",
        ("aten::argmax", "aten::topk", "aten::sort", "aten::exponential_", "aten::log_softmax"),
    ),
    (
        "norms, RoPE, SiLU, residual adds",
        (
            "aten::mul",
            "aten::add",
            "aten::pow",
            "aten::rms_norm",
            "aten::_fused_rms_norm",
            "aten::rsqrt",
            "aten::mean",
            "aten::silu",
            "aten::cat",
            "aten::sub",
            "aten::neg",
            "aten::embedding",
            "fleetserve::rms_norm",
            "fleetserve::add_rms_norm",
            "fleetserve::rotary_embedding",
            "fleetserve::silu_and_mul",
        ),
    ),
    ("dtype casts and copies", ("aten::copy_", "aten::_to_copy")),
]


def category(name: str) -> str:
    for label, prefixes in CATEGORIES:
        if name.startswith(prefixes):
            return label
    return "other operators"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="random-100m")
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from fleetserve import LLM, SamplingParams
    from fleetserve.engine.request import EngineCoreRequest

    model = {
        "random-100m": lambda: build_random_100m(OUT / "random-100m"),
        "smollm2": smollm2_path,
    }.get(args.model, lambda: args.model)()
    llm = LLM(model, dtype=args.dtype, max_model_len=1024, num_threads=args.threads)
    engine = llm.engine
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=10_000 // 10, ignore_eos=True)
    for i in range(args.batch):
        prompt = [rng.randrange(100, 40000) for _ in range(args.input_len)]
        engine.add_request(EngineCoreRequest(str(i), prompt, params))
    while engine.scheduler.num_waiting or any(r.is_prefill for r in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()

    walls, cpus = [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.thread_time()
        engine.step()
        walls.append(time.perf_counter() - start)
        cpus.append(time.thread_time() - cpu_start)
    wall = statistics.median(walls)

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        profiled_wall = (time.perf_counter() - start) / args.steps
    per_category: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        per_category[category(event.key)] += event.self_cpu_time_total / 1e6 / args.steps
    ops_total = sum(per_category.values())
    per_category["Python and framework overhead"] = max(profiled_wall - ops_total, 0.0)

    print(
        f"\nmodel {args.model}, decode batch {args.batch}, context ~{args.input_len + 8} "
        f"tokens, {args.dtype}, {torch.get_num_threads()} threads"
    )
    print(
        f"decode step: {wall * 1e3:.1f} ms median unprofiled ({args.batch / wall:.0f} tok/s); "
        f"{profiled_wall * 1e3:.1f} ms under the profiler"
    )
    if torch.get_num_threads() == 1:
        # One thread does all the work: its CPU time is the step's cost, which other
        # processes on a shared machine disturb far less than the wall time.
        print(f"CPU time of the step (one thread): {statistics.median(cpus) * 1e3:.1f} ms median")
    print()
    print("| where | ms / step | share |")
    print("|---|---|---|")
    for label, seconds in sorted(per_category.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {seconds * 1e3:.1f} | {seconds / profiled_wall:.0%} |")


if __name__ == "__main__":
    main()
