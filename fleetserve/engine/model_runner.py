"""Runs one scheduled step on the model: builds the flattened batch, calls the model once,
and samples. Owns the KV-cache tensors; knows nothing about queues or HTTP."""

from __future__ import annotations

import logging

import torch

from fleetserve.attention import (
    ForwardContext,
    SeqSpec,
    build_attention_metadata,
    get_backend,
)
from fleetserve.engine.cuda_graphs import DecodeRow
from fleetserve.engine.outputs import Logprobs
from fleetserve.engine.runner import RunnerOutput
from fleetserve.engine.sampler import Sampler, top_logprobs
from fleetserve.engine.scheduler import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


def kv_cache_bytes_per_block(model_config, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * model_config.num_key_value_heads * model_config.head_dim * elem
    return per_token * block_size * model_config.num_hidden_layers


class ModelRunner:
    """The `Runner` of a real model: owns its KV-cache tensors and its sampler."""

    def __init__(
        self,
        model,
        model_config,
        *,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        attention_backend: str = "torch",
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        enforce_eager: bool = False,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.vocab_size = model_config.vocab_size
        self.eos_token_ids = frozenset(model_config.eos_token_ids)
        self.device = device
        self.backend = get_backend(attention_backend)
        self.kv_caches = [
            self.backend.new_kv_cache(
                num_blocks,
                block_size,
                model_config.num_key_value_heads,
                model_config.head_dim,
                dtype,
                device,
            )
            for _ in range(model_config.num_hidden_layers)
        ]
        self.sampler = Sampler(seed, device)
        self._logits_buffer: torch.Tensor | None = None  # see `_widened`
        self.graphs = self._decode_graphs(max_model_len, max_num_seqs, enforce_eager)

    def _decode_graphs(self, max_model_len, max_num_seqs, enforce_eager):
        """CUDA graphs for decode steps where they can run (`cuda_graphs`), else None."""
        if self.device.type != "cuda":
            return None  # CPU: no graphs, --enforce-eager or not
        why_not = (
            "--enforce-eager"
            if enforce_eager
            else f"the {self.backend.name} backend cannot be captured"
            if not self.backend.supports_cuda_graphs
            else "no max_model_len to size the block tables"
            if max_model_len is None
            else None
        )
        if why_not:
            logger.info("CUDA graphs off: %s", why_not)
            return None
        from fleetserve.engine.cuda_graphs import DecodeGraphs

        graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            self.backend,
            block_size=self.block_size,
            max_batch=max_num_seqs,
            max_model_len=max_model_len,
            device=self.device,
        )
        graphs.capture()
        return graphs

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        # Decodes first: the attention backend batches them together.
        batch = sorted(out.scheduled, key=lambda s: not _is_decode(s))
        if self.graphs is not None and self._graph_fits(batch):
            hidden = self.graphs.run(
                [
                    DecodeRow(
                        s.request.all_token_ids[s.num_computed_tokens],
                        s.num_computed_tokens,
                        s.block_ids,
                    )
                    for s in batch
                ]
            )
            query_start_loc = list(range(len(batch) + 1))
        else:
            hidden, query_start_loc = self._eager_forward(batch)

        result = RunnerOutput()
        sampling = [(i, s) for i, s in enumerate(batch) if s.samples]
        if sampling:
            rows = torch.tensor(
                [query_start_loc[i + 1] - 1 for i, _ in sampling], device=self.device
            )
            logits = self._widened(self.model.compute_logits(hidden[rows], float32=False))
            requests = [s.request for _, s in sampling]
            sampled = self.sampler(logits, requests)
            for row, (request, token, lps) in enumerate(
                zip(requests, sampled.token_ids, sampled.logprobs)
            ):
                if row in sampled.errors:
                    result.errors[request.request_id] = sampled.errors[row]
                    continue
                result.sampled[request.request_id] = token
                if lps is not None:
                    result.logprobs[request.request_id] = lps
        for i, s in enumerate(batch):
            if s.request.sampling_params.prompt_logprobs is not None and s.request.is_prefill:
                result.prompt_logprobs[s.request.request_id] = self._prompt_logprobs(
                    s, hidden[query_start_loc[i] : query_start_loc[i + 1]]
                )
        return result

    def _widened(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` in float32, the sampler's scratch space, in a buffer kept from step to
        step: a fresh (rows, vocab) float32 tensor each step (40 MB at 200 rows x a 49k
        vocabulary) costs more in page faults on a CPU than the conversion itself."""
        if logits.dtype == torch.float32:
            return logits
        rows, vocab = logits.shape
        buffer = self._logits_buffer
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != vocab:
            buffer = torch.empty(max(rows, 1), vocab, dtype=torch.float32, device=logits.device)
            self._logits_buffer = buffer
        out = buffer[:rows]
        out.copy_(logits)
        return out

    def _eager_forward(self, batch: list[ScheduledRequest]) -> tuple[torch.Tensor, list[int]]:
        """Hidden states of every new token of the step, and the rows of each sequence."""
        input_ids: list[int] = []
        positions: list[int] = []
        specs = []
        for s in batch:
            start, end = s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens
            input_ids += s.request.all_token_ids[start:end]
            positions += range(start, end)
            specs.append(SeqSpec(start, s.num_new_tokens, s.block_ids))
        meta = build_attention_metadata(specs, self.block_size, self.device)
        ctx = ForwardContext(meta, self.kv_caches, self.backend)
        hidden = self.model(
            torch.tensor(input_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            ctx,
        )
        return hidden, meta.query_start_loc

    def _graph_fits(self, batch: list[ScheduledRequest]) -> bool:
        """A decode-only step within the captured sizes and block-table width."""
        if not all(_is_decode(s) for s in batch):
            return False
        return self.graphs.fits(
            len(batch),
            max(len(s.block_ids) for s in batch),
            max(s.num_computed_tokens for s in batch),
        )

    def _prompt_logprobs(self, s: ScheduledRequest, hidden: torch.Tensor):
        """Logprob of each prompt token computed this step, given the tokens before it."""
        request, start = s.request, s.num_computed_tokens
        n = s.request.sampling_params.prompt_logprobs
        logprobs = torch.log_softmax(self.model.compute_logits(hidden), dim=-1)
        result: list[Logprobs | None] = [None] if start == 0 else []
        # row j predicts the token at position start + j + 1
        for j in range(s.num_new_tokens):
            pos = start + j + 1
            if pos >= request.num_prompt_tokens:
                break
            result.append(top_logprobs(logprobs[j], request.prompt_token_ids[pos], n))
        return result


def _is_decode(s: ScheduledRequest) -> bool:
    return s.num_new_tokens == 1 and s.num_computed_tokens > 0
