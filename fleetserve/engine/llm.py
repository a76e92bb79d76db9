"""The offline API, with vLLM's names: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm import tqdm

from fleetserve.engine.config import EngineConfig
from fleetserve.engine.core import build_engine_core
from fleetserve.engine.output_processor import OutputProcessor
from fleetserve.engine.outputs import RequestOutput
from fleetserve.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_memory: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        quantization: str | None = None,
        seed: int = 0,
        **kwargs,
    ) -> None:
        from fleetserve.models import load_tokenizer

        self.config = EngineConfig(
            model=model,
            dtype=dtype,
            max_model_len=max_model_len,
            kv_cache_memory=kv_cache_memory,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            quantization=quantization,
            seed=seed,
            **kwargs,
        )
        self.tokenizer = load_tokenizer(self.config.tokenizer or model)
        self.engine = build_engine_core(self.config)
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self._results: dict[str, RequestOutput] = {}  # finished while being added

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """One `RequestOutput` per prompt, in prompt order. Prompts are strings or token-id
        lists; a single prompt may be passed bare."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("sampling_params must be one object or one per prompt")
        order = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            request_id = str(next(self._ids))
            order.append(request_id)
            self._add(request_id, prompt, p, priority[i] if priority else 0)
        return self._run(order, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            for conv in conversations
        ]
        # The template already holds any BOS token: tokenize without adding another.
        token_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(token_ids, sampling_params, use_tqdm=use_tqdm)

    def _add(self, request_id: str, prompt: Prompt, params: SamplingParams, priority: int):
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        for core_request in self.processor.add_request(
            request_id, text, token_ids, params, priority
        ):
            for out in self.engine.add_request(core_request):
                self._results.update({r.request_id: r for r in self._process([out])})

    def _process(self, outputs) -> list[RequestOutput]:
        results, to_abort = self.processor.process(outputs)
        if to_abort:
            self.engine.abort_requests(to_abort)
        return [r for r in results if r.finished]

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done = {rid: r for rid, r in self._results.items() if rid in order}
        bar = tqdm(total=len(order), desc="Generating", disable=not use_tqdm, initial=len(done))
        while len(done) < len(order):
            finished = self._process(self.engine.step())
            for r in finished:
                done[r.request_id] = r
            bar.update(len(finished))
            if not self.engine.has_unfinished() and len(done) < len(order):
                raise RuntimeError("engine stopped with requests unfinished: this is a bug")
        bar.close()
        self._results = {}
        return [done[rid] for rid in order]
