"""Attention time per engine step: the C++ paged kernel ("cpu") against the torch reference.

    flock /tmp/fleetserve-bench.lock .venv/bin/python benchmarks/attention_kernel.py

SmolLM2-135M's shapes (9 query heads, 3 KV heads, head_dim 64, 30 layers, block 16). One
"step" is 30 calls of `backend.forward` (K/V write included), as the model makes them.
Decode: BATCH sequences of CONTEXT tokens each, one new token each. Prefill: one chunk of
CONTEXT new tokens after CONTEXT cached ones (a first chunk goes to SDPA in both backends).
The backends alternate within each repeat, so that both see the same machine load. Prints,
per step: the median wall time over --repeats [min-max], the median CPU time of the process
(less disturbed by other processes on a shared machine; with --threads 1 it is the work
itself), and torch / cpu of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fleetserve.attention import SeqSpec, build_attention_metadata, get_backend

HEADS, KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 9, 3, 64, 30, 16


def make_inputs(specs, dtype):
    meta = build_attention_metadata(specs, BLOCK)
    n = meta.query_start_loc[-1]
    num_blocks = 1 + sum(len(s.block_ids) for s in specs)
    cache = torch.randn(2, KV_HEADS, num_blocks, BLOCK, HEAD_DIM).to(dtype)
    q = torch.randn(n, HEADS, HEAD_DIM).to(dtype)
    k, v = (torch.randn(n, KV_HEADS, HEAD_DIM).to(dtype) for _ in range(2))
    return q, k, v, cache, meta


def step_ms(backend, inputs, iters: int) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one step of LAYERS calls, averaged over `iters` steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters * LAYERS):
        backend.forward(*inputs, 0.125)
    return (
        (time.perf_counter() - wall) / iters * 1e3,
        (time.process_time() - cpu) / iters * 1e3,
    )


def seqs(batch: int, computed: int, new: int) -> list[SeqSpec]:
    per = -(-(computed + new) // BLOCK)
    return [
        SeqSpec(computed, new, list(range(1 + i * per, 1 + (i + 1) * per))) for i in range(batch)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--contexts", default="128,512,1024")
    p.add_argument("--prefill", default="128,512", help="chunk lengths after as many cached")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    backends = {name: get_backend(name) for name in ("torch", "cpu")}
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    cases = [
        (f"decode b{b} ctx{c}", seqs(b, c, 1))
        for b in ints(args.batches)
        for c in ints(args.contexts)
    ]
    cases += [(f"chunk {c} after {c} cached", seqs(1, c, c)) for c in ints(args.prefill)]
    print(f"threads {torch.get_num_threads()}; ms per step of {LAYERS} layers")
    print(
        "| dtype | case | torch wall median [min-max] | cpu wall median [min-max] "
        "| torch/cpu wall | torch/cpu CPU time |"
    )
    print("|---|---|---|---|---|---|")
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        for label, specs in cases:
            inputs = make_inputs(specs, dtype)
            for b in backends.values():
                b.forward(*inputs, 0.125)  # warm-up
            wall: dict[str, list[float]] = {n: [] for n in backends}
            cpu: dict[str, list[float]] = {n: [] for n in backends}
            for _ in range(args.repeats):
                for n, b in backends.items():
                    w, c = step_ms(b, inputs, args.iters)
                    wall[n].append(w)
                    cpu[n].append(c)
            med = {n: statistics.median(r) for n, r in wall.items()}
            cpu_med = {n: statistics.median(r) for n, r in cpu.items()}
            cells = [f"{med[n]:.2f} [{min(r):.2f}-{max(r):.2f}]" for n, r in wall.items()]
            print(
                f"| {str(dtype)[6:]} | {label} | {cells[0]} | {cells[1]} | "
                f"{med['torch'] / med['cpu']:.2f} | {cpu_med['torch'] / cpu_med['cpu']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
