"""The Triton paged-attention kernel: imported only by `triton_paged` once triton is known to
import (CUDA machines; on CPU, Triton's interpreter under ``TRITON_INTERPRET=1``).

One program computes one KV head of one sequence for a tile of query tokens, with all the
query heads of that KV head's GQA group side by side in its rows:

    rows of a program (BLOCK_Q query tokens x BLOCK_G heads of the group):
        row r -> query token q_tile * BLOCK_Q + r // BLOCK_G, head kv_head * GROUP + r % BLOCK_G

so each K/V row it loads serves every head of the group (read once per group, not once per
head). Keys are walked in tiles of BLOCK_N positions through the block table with an online
softmax (flash attention's running max / sum), fp32 accumulators. A query at absolute
position p sees keys 0..p (causal over the paged cache: earlier chunks and prefix hits included).

Decode is the same program with BLOCK_Q = 1 and the sequence's query row = its index, so a
decode launch reads only tensors (block tables, seq_lens): it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# seq_offset varies with the step (the number of decodes): specializing on it (== 1, a
# multiple of 16) would compile new variants in the middle of serving.
@triton.jit(do_not_specialize=["seq_offset"])
def _paged_attention(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_ptr,
    scale,
    seq_offset,
    block_size,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_ch,
    stride_cb,
    stride_cs,
    stride_bt,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_DECODE: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0) + seq_offset
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int64)
    if IS_DECODE:
        q_start = seq.to(tl.int64)
        q_len = 1
    else:
        q_start = tl.load(query_start_ptr + seq).to(tl.int64)
        q_len = tl.load(query_start_ptr + seq + 1).to(tl.int64) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return

    rows = tl.arange(0, BLOCK_Q * BLOCK_G)
    qi = q_tile * BLOCK_Q + rows // BLOCK_G  # query token of each row, within the sequence
    g = rows % BLOCK_G
    row_ok = (qi < q_len) & (g < GROUP)
    head = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + (q_start + qi)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    pos = seq_len - q_len + qi  # absolute position of each row's query token
    # The tile's last query sees keys up to its position: no key beyond is loaded.
    last = tl.minimum(seq_len, seq_len - q_len + (q_tile + 1) * BLOCK_Q)

    m_i = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], dtype=tl.float32)
    k_base = k_cache_ptr + kv_head.to(tl.int64) * stride_ch
    v_base = v_cache_ptr + kv_head.to(tl.int64) * stride_ch
    for start in range(0, last, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)  # key positions of this tile
        j_ok = j < last
        block = tl.load(block_tables_ptr + seq * stride_bt + j // block_size, mask=j_ok, other=0)
        offs = block.to(tl.int64) * stride_cb + (j % block_size) * stride_cs
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        # Every row sees key 0 in the first tile, so m_new is finite from then on.
        s = tl.where((j[None, :] <= pos[:, None]) & j_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(
        out_ptr + (q_start + qi)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


# Launch shapes, from benchmarks/gpu_bench.py tune on an H200 (bf16, 12/4 heads, head_dim 64).
# Prefill's block_q is in tokens of a group of 4 heads: block_q * 4 rows a program.
DECODE_TUNING = {"block_n": 128, "num_warps": 4, "num_stages": 2}
PREFILL_TUNING = {"block_q": 16, "block_n": 128, "num_warps": 4, "num_stages": 2}


def _pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(n))


def paged_attention(
    out: torch.Tensor,  # (num_tokens, num_heads, head_dim), written for the chosen sequences
    q: torch.Tensor,  # (num_tokens, num_heads, head_dim)
    kv_cache: torch.Tensor,  # (2, num_kv_heads, num_blocks, block_size, head_dim)
    block_tables: torch.Tensor,  # (num_seqs, max_blocks) int
    seq_lens: torch.Tensor,  # (num_seqs,) int
    query_start_loc: torch.Tensor | None,  # (num_seqs + 1,) int; None for decode
    scale: float,
    *,
    first_seq: int,
    num_seqs: int,
    max_query_len: int,
    decode: bool,
    tuning: dict[str, int] | None = None,
) -> None:
    """Attention of sequences [first_seq, first_seq + num_seqs) into `out`. `decode`: every
    one has one query token, at row = its sequence index (`query_start_loc` unused); else
    `max_query_len` bounds their chunk lengths (it sizes the grid). `tuning` overrides
    block_q / block_n / num_warps / num_stages (benchmarks/gpu_bench.py tune)."""
    if num_seqs == 0:
        return
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_cache.shape[1]
    group = num_heads // num_kv_heads
    assert q.stride(2) == 1 and out.stride(2) == 1 and kv_cache.stride(4) == 1
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if decode:
        block_g = _pow2(group, 16)  # tl.dot takes at least 16 rows
        cfg = dict(DECODE_TUNING)
    else:
        block_g = _pow2(group)
        cfg = dict(PREFILL_TUNING)
    cfg.update(tuning or {})
    # at least 16 rows (tl.dot); prefill: block_q tokens of the group, ~block_q * 4 rows
    block_q = 1 if decode else max(cfg["block_q"] * 4 // block_g, -(-16 // block_g), 1)
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _paged_attention[grid](
        out,
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        seq_lens if query_start_loc is None else query_start_loc,
        scale,
        first_seq,
        kv_cache.shape[3],
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        BLOCK_G=block_g,
        BLOCK_Q=block_q,
        BLOCK_N=cfg["block_n"],
        HEAD_DIM=head_dim,
        BLOCK_D=_pow2(head_dim, 16),
        IS_DECODE=decode,
        IEEE=q.dtype == torch.float32,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
