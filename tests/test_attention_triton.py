"""The Triton paged-attention kernel against the torch reference, on random steps (decodes and
prefill chunks mixed, GQA, block sizes, partial blocks, prefix sharing within a step): on CUDA
where there is a device, else on CPU in Triton's interpreter; skipped where triton is absent."""

from __future__ import annotations

import random

import pytest
import torch
from attention_backends import HAS_CUDA, TRITON_DEVICE, needs_cuda, needs_triton
from test_attention_cpu import num_blocks, random_step

from fleetserve.attention import SeqSpec, build_attention_metadata, get_backend

DEV = TRITON_DEVICE


def run_backend(name, q, k, v, cache, meta, scale):
    cache = cache.clone()
    out = get_backend(name).forward(q, k, v, cache, meta, scale)
    return out, cache


def random_inputs(rng, specs, block_size, heads, head_dim, dtype=torch.float32):
    num_heads, num_kv_heads = heads
    meta = build_attention_metadata(specs, block_size, DEV)
    n = meta.query_start_loc[-1]
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEV, dtype)

    q, k, v = (
        rand(n, num_heads, head_dim),
        rand(n, num_kv_heads, head_dim),
        rand(n, num_kv_heads, head_dim),
    )
    cache = rand(2, num_kv_heads, num_blocks(block_size), block_size, head_dim)
    return meta, q, k, v, cache


# The interpreter runs each program in numpy: a few shapes on CPU, all of them on CUDA.
CASES = [(16, (9, 3), 64), (4, (6, 2), 16), (1, (4, 4), 16), (32, (8, 1), 64)]
if HAS_CUDA:
    CASES += [(16, (32, 8), 128), (8, (12, 4), 64), (16, (16, 16), 80)]


@needs_triton
@pytest.mark.parametrize(("block_size", "heads", "head_dim"), CASES)
def test_matches_torch_backend_fp32(block_size, heads, head_dim):
    rng = random.Random(block_size * 100 + heads[0] * 10 + head_dim)
    for _ in range(3 if HAS_CUDA else 2):
        specs = random_step(rng, block_size, rng.randint(1, 6))
        meta, q, k, v, cache = random_inputs(rng, specs, block_size, heads, head_dim)
        expected, expected_cache = run_backend("torch", q, k, v, cache, meta, 0.3)
        got, got_cache = run_backend("triton", q, k, v, cache, meta, 0.3)
        torch.testing.assert_close(got_cache, expected_cache, rtol=0, atol=0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_triton
def test_every_output_row_is_written():
    """Poisoned output, all-decode and all-prefill steps: no row is left unwritten."""
    from fleetserve.attention import triton_kernels

    rng = random.Random(5)
    block_size, heads, head_dim = 16, (9, 3), 64
    for num_decodes in (0, 4):
        specs = [SeqSpec(rng.randint(1, 60), 1, [1 + i, 9 + i, 17 + i, 25 + i]) for i in range(4)]
        if not num_decodes:
            specs = [SeqSpec(0, rng.randint(1, 50), s.block_ids) for s in specs]
        meta, q, k, v, cache = random_inputs(rng, specs, block_size, heads, head_dim)
        expected, cache = run_backend("torch", q, k, v, cache, meta, 0.125)
        out = torch.full_like(q, float("nan"))
        qsl = torch.tensor(meta.query_start_loc, device=DEV)
        triton_kernels.paged_attention(
            out,
            q,
            cache,
            meta.block_tables,
            meta.seq_lens_tensor,
            qsl,
            0.125,
            first_seq=0,
            num_seqs=meta.num_seqs,
            max_query_len=max(
                b - a for a, b in zip(meta.query_start_loc, meta.query_start_loc[1:])
            ),
            decode=bool(num_decodes),
        )
        assert not out.isnan().any()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_triton
@needs_cuda
def test_bf16_is_as_close_as_the_reference():
    rng = random.Random(7)
    block_size, heads, head_dim = 16, (9, 3), 64
    specs = random_step(rng, block_size, 6)
    meta, q, k, v, cache = random_inputs(rng, specs, block_size, heads, head_dim)
    bf = [t.bfloat16() for t in (q, k, v, cache)]
    exact, _ = run_backend("torch", *(t.float() for t in bf), meta, 0.125)
    ref, _ = run_backend("torch", *bf, meta, 0.125)
    got, _ = run_backend("triton", *bf, meta, 0.125)
    assert got.dtype == torch.bfloat16
    ref_err = (ref.float() - exact).abs().max().item()
    got_err = (got.float() - exact).abs().max().item()
    assert got_err <= 2 * ref_err + 1e-3, (got_err, ref_err)


@needs_triton
@needs_cuda
def test_decode_replays_in_a_cuda_graph_with_new_lengths():
    """Captured once; block tables and lengths changed in place; replay == eager."""
    rng = random.Random(11)
    block_size, heads, head_dim, n = 16, (9, 3), 64, 5
    width = 6
    table = torch.tensor([rng.sample(range(1, num_blocks(block_size)), width) for _ in range(n)])
    lens = torch.tensor([rng.randint(1, width * block_size) for _ in range(n)])
    specs = [SeqSpec(int(s) - 1, 1, table[i].tolist()) for i, s in enumerate(lens)]
    meta, q, k, v, cache = random_inputs(rng, specs, block_size, heads, head_dim)
    backend = get_backend("triton")
    meta.seq_lens = [width * block_size] * n  # upper bounds, as a graph sees them
    out = backend.forward(q, k, v, cache, meta, 0.2)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, cache, meta, 0.2)
    for _ in range(3):
        new_lens = torch.tensor([rng.randint(1, width * block_size) for _ in range(n)])
        meta.seq_lens_tensor.copy_(new_lens)
        slots = [
            table[i, (s - 1) // block_size] * block_size + (s - 1) % block_size
            for i, s in enumerate(new_lens.tolist())
        ]
        meta.slot_mapping.copy_(torch.tensor(slots))
        q.copy_(torch.randn_like(q))
        graph.replay()
        eager_meta = build_attention_metadata(
            [SeqSpec(int(s) - 1, 1, table[i].tolist()) for i, s in enumerate(new_lens)],
            block_size,
            DEV,
        )
        expected, _ = run_backend("torch", q, k, v, cache, eager_meta, 0.2)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
