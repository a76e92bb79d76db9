"""Decode CUDA graphs (`engine.cuda_graphs`): the sizes, the padding, the packed inputs, and
the whole path through the model runner with an eager stand-in for the graph (any machine):
token for token against transformers."""

from __future__ import annotations

import pytest
import torch
from attention_backends import HAS_CUDA, TRITON_PROBLEM
from test_engine import greedy, hf_greedy, random_prompts
from transformers import AutoModelForCausalLM

from fleetserve import LLM
from fleetserve.engine.cuda_graphs import (
    DecodeGraphs,
    DecodeRow,
    capture_sizes,
    pack_decode_rows,
    padded_size,
)
from fleetserve.engine.kv_cache_manager import NULL_BLOCK_ID


def test_capture_sizes_end_at_the_first_size_holding_the_batch():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(256) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert capture_sizes(200)[-1] == 256
    assert capture_sizes(10_000)[-1] == 512
    with pytest.raises(ValueError, match="max_batch"):
        capture_sizes(0)


@pytest.mark.parametrize(("n", "size"), [(1, 1), (3, 4), (9, 12), (13, 16), (129, 192), (256, 256)])
def test_a_batch_pads_to_the_next_captured_size(n, size):
    assert padded_size(n, capture_sizes(256)) == size


def test_a_batch_larger_than_every_graph_has_none():
    assert padded_size(300, capture_sizes(256)) is None


def test_packed_rows_carry_slots_and_lengths_and_padding_writes_the_null_block():
    rows = [DecodeRow(7, 0, [3]), DecodeRow(8, 17, [5, 9]), DecodeRow(9, 31, [2, 4])]
    packed = pack_decode_rows(rows, 4, block_size=16)
    assert packed.shape == (4, 4 + 2)
    assert packed[:3, :4].tolist() == [
        [7, 0, 3 * 16, 1],
        [8, 17, 9 * 16 + 1, 18],
        [9, 31, 4 * 16 + 15, 32],
    ]
    assert packed[:3, 4:].tolist() == [[3, NULL_BLOCK_ID], [5, 9], [2, 4]]
    # the padding row: token 0 at position 0, slot 0 of the null block, length 1
    assert packed[3].tolist() == [0, 0, NULL_BLOCK_ID * 16, 1, NULL_BLOCK_ID, NULL_BLOCK_ID]


def test_packing_more_rows_than_the_graph_is_an_error():
    with pytest.raises(ValueError, match="do not fit"):
        pack_decode_rows([DecodeRow(1, 0, [1])] * 3, 2, block_size=16)


class EagerRecorder:
    """Replays by running the forward again on the same buffers: what a graph does, slowly."""

    def __init__(self) -> None:
        self.replays = 0

    def new_pool(self):
        return None

    def synchronize(self) -> None:
        pass

    def record(self, forward, pool):
        out = forward().clone()

        def replay():
            self.replays += 1
            out.copy_(forward())

        return replay, out


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param(
            "triton",
            marks=pytest.mark.skipif(
                HAS_CUDA or TRITON_PROBLEM is not None,
                reason="CUDA tests the real graphs" if HAS_CUDA else f"{TRITON_PROBLEM}",
            ),
        ),
    ],
)
def test_decode_through_the_graph_buffers_is_token_exact(tiny_llama, backend):
    llm = LLM(tiny_llama, dtype="float32", attention_backend=backend, device="cpu", max_num_seqs=8)
    runner = llm.engine.runner
    recorder = EagerRecorder()
    runner.graphs = DecodeGraphs(
        runner.model,
        runner.kv_caches,
        runner.backend,
        block_size=runner.block_size,
        max_batch=8,
        max_model_len=llm.engine.max_model_len,
        device=runner.device,
        recorder=recorder,
    )
    runner.graphs.capture()
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    # 5 prompts of 3..40 tokens (tables of 1..4 blocks): graphs of 8 with 3 padding rows,
    # then fewer as requests finish (max_tokens differ).
    prompts = random_prompts(5, llm.engine.vocab_size, seed=9, lo=3, hi=40)
    params = [greedy(max_tokens=n) for n in (12, 9, 12, 5, 16)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert recorder.replays >= 10
    for prompt, p, out in zip(prompts, params, outs):
        expected, _ = hf_greedy(hf, prompt, p.max_tokens)
        assert out.outputs[0].token_ids == expected
