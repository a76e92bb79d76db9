"""Attention time per engine step: the C++ paged kernel ("cpu") against the torch reference.

    flock /tmp/fleetserve-bench.lock .venv/bin/python benchmarks/attention_kernel.py

SmolLM2-135M's shapes (9 query heads, 3 KV heads, head_dim 64, 30 layers, block 16). One
"step" is 30 calls of `backend.forward` (K/V write included), as the model makes them.
Decode: BATCH sequences of CONTEXT tokens each, one new token each. Prefill: one chunk of
CONTEXT new tokens (no cache), and the same chunk after CONTEXT cached tokens. Prints the
median over --repeats timings of --iters steps, the spread, and torch / cpu.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fleetserve.attention import SeqSpec, build_attention_metadata, get_backend

HEADS, KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 9, 3, 64, 30, 16


def step_ms(backend, specs, dtype, iters: int) -> float:
    meta = build_attention_metadata(specs, BLOCK)
    n = meta.query_start_loc[-1]
    num_blocks = 1 + sum(len(s.block_ids) for s in specs)
    cache = torch.randn(2, KV_HEADS, num_blocks, BLOCK, HEAD_DIM).to(dtype)
    q = torch.randn(n, HEADS, HEAD_DIM).to(dtype)
    k, v = (torch.randn(n, KV_HEADS, HEAD_DIM).to(dtype) for _ in range(2))
    backend.forward(q, k, v, cache, meta, 0.125)  # warm-up
    start = time.perf_counter()
    for _ in range(iters * LAYERS):
        backend.forward(q, k, v, cache, meta, 0.125)
    return (time.perf_counter() - start) / iters * 1e3


def seqs(batch: int, computed: int, new: int) -> list[SeqSpec]:
    per = -(-(computed + new) // BLOCK)
    return [
        SeqSpec(computed, new, list(range(1 + i * per, 1 + (i + 1) * per))) for i in range(batch)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    backends = {name: get_backend(name) for name in ("torch", "cpu")}
    cases = [(f"decode b{b} ctx{c}", seqs(b, c, 1)) for b in (1, 8, 64) for c in (128, 512, 1024)]
    cases += [(f"prefill {c}", seqs(1, 0, c)) for c in (128, 512)]
    cases += [(f"prefill {c} after {c} cached", seqs(1, c, c)) for c in (128, 512)]
    print(f"threads {torch.get_num_threads()}; ms per step ({LAYERS} layers), median [min-max]")
    print("| dtype | case | torch | cpu kernel | torch / cpu |")
    print("|---|---|---|---|---|")
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        for label, specs in cases:
            runs = {
                n: [step_ms(b, specs, dtype, args.iters) for _ in range(args.repeats)]
                for n, b in backends.items()
            }
            med = {n: statistics.median(r) for n, r in runs.items()}
            cells = [f"{med[n]:.2f} [{min(r):.2f}-{max(r):.2f}]" for n, r in runs.items()]
            print(
                f"| {str(dtype)[6:]} | {label} | {cells[0]} | {cells[1]} | "
                f"{med['torch'] / med['cpu']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
