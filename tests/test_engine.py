"""The engine against transformers on the same fp32 weights: token for token."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from attention_backends import ENGINE_VARIANTS
from transformers import AutoModelForCausalLM

from fleetserve import LLM, SamplingParams

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def hf_models():
    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return get


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens by full recomputation, and the log-softmax at each generated step."""
    ids = list(prompt)
    out, logprobs = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            lp = torch.log_softmax(logits, dim=-1)
            token = int(logits.argmax())
            out.append(token)
            logprobs.append(lp)
            ids.append(token)
    return out, logprobs


def random_prompts(num: int, vocab: int, seed: int = 0, lo: int = 3, hi: int = 60):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(num)]


def greedy(max_tokens=MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, dtype="float32", max_num_seqs=64, seed=0)


def assert_all_blocks_free(llm: LLM) -> None:
    kv = llm.engine.kv_cache
    assert kv.num_free_blocks == kv.num_usable_blocks
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize(("device", "backend", "eager"), ENGINE_VARIANTS)
def test_each_architecture_matches_transformers(
    tiny_checkpoints, hf_models, device, backend, eager
):
    for arch, path in tiny_checkpoints.items():
        llm = LLM(
            path,
            dtype="float32",
            attention_backend=backend,
            device=device,
            enforce_eager=eager,
            max_num_seqs=16,  # graphs of 1..16: a short capture
        )
        hf = hf_models(path)
        vocab = llm.engine.vocab_size
        prompts = random_prompts(3, vocab, seed=1)
        # Together: a decode batch of 3 (a CUDA graph of 4, one padding row).
        outs = llm.generate(prompts, greedy(), use_tqdm=False)
        for prompt, out in zip(prompts, outs):
            expected, _ = hf_greedy(hf, prompt, MAX_TOKENS)
            got = out.outputs[0].token_ids
            assert got == expected, f"{arch}: {got} != {expected}"


def test_batch_of_32_mixed_lengths_matches_single_requests(llm, tiny_llama, hf_models):
    hf = hf_models(tiny_llama)
    vocab = llm.engine.vocab_size
    prompts = random_prompts(32, vocab, seed=2, lo=2, hi=90)
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    for prompt, out in zip(prompts, outs):
        expected, _ = hf_greedy(hf, prompt, MAX_TOKENS)
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].finish_reason == "length"
    assert_all_blocks_free(llm)


def test_logprobs_match_transformers(llm, tiny_llama, hf_models):
    hf = hf_models(tiny_llama)
    prompt = random_prompts(1, llm.engine.vocab_size, seed=3)[0]
    out = llm.generate([prompt], greedy(max_tokens=5, logprobs=3), use_tqdm=False)[0]
    expected, ref = hf_greedy(hf, prompt, 5)
    completion = out.outputs[0]
    assert completion.token_ids == expected
    assert len(completion.logprobs) == 5
    for token, lps, ref_lp in zip(completion.token_ids, completion.logprobs, ref):
        assert next(iter(lps)) == token
        assert abs(lps[token] - float(ref_lp[token])) < 1e-4
        top = ref_lp.topk(3).indices.tolist()
        for tid in top:
            assert abs(lps[tid] - float(ref_lp[tid])) < 1e-4


def test_prompt_logprobs_match_transformers(llm, tiny_llama, hf_models):
    hf = hf_models(tiny_llama)
    prompt = random_prompts(1, llm.engine.vocab_size, seed=4, lo=20, hi=20)[0]
    out = llm.generate([prompt], greedy(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        assert abs(out.prompt_logprobs[pos][prompt[pos]] - float(ref[pos - 1, prompt[pos]])) < 1e-4
    # Again, with the prompt's blocks in the prefix cache: still every position.
    again = llm.generate([prompt], greedy(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    assert again.prompt_logprobs == out.prompt_logprobs


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {"max_num_batched_tokens": 16},  # chunked prefill: prompts span several steps
        {"block_size": 4, "max_model_len": 64, "kv_blocks": 40},  # preemption
    ],
    ids=["chunked_prefill", "preemption"],
)
@pytest.mark.parametrize(("device", "backend", "eager"), ENGINE_VARIANTS)
def test_greedy_output_unchanged_by_chunking_and_preemption(
    tiny_llama, hf_models, engine_kwargs, device, backend, eager
):
    from fleetserve.engine.model_runner import kv_cache_bytes_per_block
    from fleetserve.models import load_model

    kwargs = dict(engine_kwargs)
    num_blocks = kwargs.pop("kv_blocks", None)
    if num_blocks:
        _, config = load_model(tiny_llama, dtype="float32")
        per_block = kv_cache_bytes_per_block(config, kwargs["block_size"], torch.float32)
        kwargs["kv_cache_memory"] = per_block * num_blocks
    llm = LLM(
        tiny_llama,
        dtype="float32",
        attention_backend=backend,
        device=device,
        enforce_eager=eager,
        **kwargs,
    )
    hf = hf_models(tiny_llama)
    prompts = random_prompts(12, llm.engine.vocab_size, seed=5, lo=20, hi=40)
    outs = llm.generate(prompts, greedy(max_tokens=16, prompt_logprobs=1), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        expected, _ = hf_greedy(hf, prompt, 16)
        assert out.outputs[0].token_ids == expected
        # One entry per prompt position, even for a prompt computed again after preemption.
        assert len(out.prompt_logprobs) == len(prompt)
        assert [next(iter(lp)) for lp in out.prompt_logprobs[1:]] == prompt[1:]
    if num_blocks:
        assert llm.engine.kv_cache.num_usable_blocks == num_blocks - 1
        assert llm.engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(llm)


def test_prefix_cache_hits_leave_output_unchanged(llm, tiny_llama, hf_models):
    hf = hf_models(tiny_llama)
    vocab = llm.engine.vocab_size
    system = random_prompts(1, vocab, seed=6, lo=48, hi=48)[0]
    prompts = [system + tail for tail in random_prompts(4, vocab, seed=7, lo=3, hi=9)]
    hits_before = llm.engine.kv_cache.stats.hits
    first = llm.generate(prompts[:1], greedy(), use_tqdm=False)
    rest = llm.generate(prompts[1:], greedy(), use_tqdm=False)
    assert llm.engine.kv_cache.stats.hits - hits_before >= 3 * 48
    assert rest[0].num_cached_tokens == 48
    for prompt, out in zip(prompts, first + rest):
        expected, _ = hf_greedy(hf, prompt, MAX_TOKENS)
        assert out.outputs[0].token_ids == expected
    assert_all_blocks_free(llm)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    vocab = llm.engine.vocab_size
    prompt = random_prompts(1, vocab, seed=8)[0]
    params = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=10, ignore_eos=True
    )
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    others = random_prompts(7, vocab, seed=9)
    unseeded = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    batch = llm.generate([prompt] + others, [params] + [unseeded] * 7, use_tqdm=False)
    assert batch[0].outputs[0].token_ids == alone
    other_seed = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=10, ignore_eos=True
    )
    assert llm.generate([prompt], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_completions_share_prompt_and_differ(llm):
    prompt = random_prompts(1, llm.engine.vocab_size, seed=10, lo=40, hi=40)[0]
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # Siblings admitted in the same step reuse the two full prompt blocks of the first.
    assert out.num_cached_tokens == 32
    assert_all_blocks_free(llm)


def test_stop_strings_cut_text_even_across_tokens(llm):
    prompt = random_prompts(1, llm.engine.vocab_size, seed=11)[0]
    full = llm.generate([prompt], greedy(max_tokens=20), use_tqdm=False)[0].outputs[0]
    text = full.text
    assert len(text) > 6
    # A stop string that starts inside one token's text and ends in a later one.
    stop = text[3:7]
    out = llm.generate([prompt], greedy(max_tokens=20, stop=[stop]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[: text.find(stop)]
    assert_all_blocks_free(llm)


def test_stop_token_ids_and_min_tokens(llm):
    prompt = random_prompts(1, llm.engine.vocab_size, seed=12)[0]
    tokens = llm.generate([prompt], greedy(max_tokens=10), use_tqdm=False)[0].outputs[0].token_ids
    stop_at = tokens[4]
    first = tokens.index(stop_at)
    out = llm.generate([prompt], greedy(max_tokens=10, stop_token_ids=[stop_at]), use_tqdm=False)[
        0
    ].outputs[0]
    assert out.token_ids == tokens[: first + 1] and out.finish_reason == "stop"
    assert out.stop_reason == stop_at


def test_abort_frees_every_block(llm):
    engine = llm.engine
    from fleetserve.engine.request import EngineCoreRequest

    for i in range(4):
        engine.add_request(EngineCoreRequest(f"abort-{i}", [5, 6, 7, 8] * 10, greedy(50)))
    engine.step()
    engine.step()
    assert engine.kv_cache.num_free_blocks < engine.kv_cache.num_usable_blocks
    outs = engine.abort_requests([f"abort-{i}" for i in range(4)])
    assert [o.finish_reason for o in outs] == ["abort"] * 4
    assert_all_blocks_free(llm)


def test_prompt_too_long_is_an_error_not_a_hang(tiny_llama):
    llm = LLM(tiny_llama, dtype="float32", max_model_len=32)
    out = llm.generate([[5] * 40], greedy(), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "error"
    assert "context length" in out.error


def test_invalid_sampling_params_name_the_field():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_smollm2_gguf_matches_transformers_gguf_loading(smollm2_gguf):
    """The default model, from its GGUF file, against transformers' own GGUF loading."""
    llm = LLM(str(smollm2_gguf), dtype="float32", max_model_len=512)
    hf = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    questions = [
        "What is the capital of France?",
        "Name three primary colors.",
        "Write a haiku about the sea.",
    ]
    outs = llm.chat(
        [[{"role": "user", "content": q}] for q in questions], greedy(16), use_tqdm=False
    )
    for out in outs:
        expected, _ = hf_greedy(hf, out.prompt_token_ids, 16)
        assert out.outputs[0].token_ids == expected
    assert "Paris" in outs[0].outputs[0].text


def test_out_of_vocab_ids_are_errors_not_crashes(llm):
    vocab = llm.engine.vocab_size
    bad_prompt = llm.generate([[1, 2, vocab]], greedy(), use_tqdm=False)[0]
    assert bad_prompt.outputs[0].finish_reason == "error" and "prompt token ids" in bad_prompt.error
    params = greedy(min_tokens=2, stop_token_ids=[vocab + 5])
    bad_stop = llm.generate([[1, 2, 3]], params, use_tqdm=False)[0]
    assert bad_stop.outputs[0].finish_reason == "error" and "stop_token_ids" in bad_stop.error
    assert_all_blocks_free(llm)


# ---- a request that makes its step fail ends alone -----------------------------------------


def poisoned(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, extra={"poison": True})


def is_poison(request) -> bool:
    return request.sampling_params.extra.get("poison", False)


def poison_runner(monkeypatch, llm: LLM, after_tokens: int) -> list[int]:
    """Make every step that schedules a poison request with `after_tokens` or more output
    tokens raise before the model runs. Returns the sizes of the batches the runner saw."""
    runner = llm.engine.runner
    execute = runner.execute
    sizes: list[int] = []

    def failing_execute(out):
        sizes.append(len(out.scheduled))
        for s in out.scheduled:
            if is_poison(s.request) and s.request.num_output_tokens >= after_tokens:
                raise IndexError("index out of range in self")
        return execute(out)

    monkeypatch.setattr(runner, "execute", failing_execute)
    return sizes


def test_a_request_that_fails_its_step_ends_alone_and_the_rest_are_token_exact(llm, monkeypatch):
    prompts = random_prompts(7, llm.engine.vocab_size, seed=20)
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True)
    params = [greedy(30)] * 6 + [seeded]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    sizes = poison_runner(monkeypatch, llm, after_tokens=2)
    outs = llm.generate([[9, 10, 11]] + prompts, [poisoned(greedy(30))] + params, use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error"
    assert "IndexError" in outs[0].error
    assert len(outs[0].outputs[0].token_ids) == 2  # what it had before it went bad
    assert [o.outputs[0].token_ids for o in outs[1:]] == alone
    assert all(o.error is None for o in outs[1:])
    assert max(sizes) == 8 and 1 in sizes  # it failed in a full batch and was bisected out
    assert_all_blocks_free(llm)


def test_blocks_a_failed_step_did_not_write_are_never_reused(llm, monkeypatch):
    """The poison shares two full blocks of prompt with the victim. Admitted in the same
    step, the victim takes the poison's blocks as prefix hits before they are computed; the
    victim must then be recomputed. Failing alone, the poison must leave no cached block."""
    base = random_prompts(1, llm.engine.vocab_size, seed=21, lo=40)[0][:32]
    victim, poison = base + [7, 8, 9], base + [10, 11]
    expected = llm.generate([victim], greedy(16), use_tqdm=False)[0].outputs[0].token_ids
    for together in (True, False):
        llm.engine.kv_cache.reset_prefix_cache()  # the victim must not find its own blocks
        with monkeypatch.context() as m:
            poison_runner(m, llm, after_tokens=0)
            prompts, params = [poison, victim], [poisoned(greedy(16)), greedy(16)]
            if not together:
                prompts, params = prompts[:1], params[:1]
            outs = llm.generate(prompts, params, use_tqdm=False)
        assert outs[0].outputs[0].finish_reason == "error"
        assert_all_blocks_free(llm)
        again = llm.generate([victim], greedy(16), use_tqdm=False)[0]
        assert again.outputs[0].token_ids == expected
        if together:
            assert outs[1].outputs[0].token_ids == expected
        else:
            assert again.num_cached_tokens == 0  # the poison's blocks were withdrawn


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_of_one_request_leave_the_others_exact(llm, monkeypatch, value):
    prompts = random_prompts(3, llm.engine.vocab_size, seed=22)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(), use_tqdm=False)]
    sampler = llm.engine.runner.sampler

    def crafted(logits, requests):  # the poison's row of logits is `value` everywhere
        for i, r in enumerate(requests):
            if is_poison(r):
                logits[i] = value
        return sampler(logits, requests)

    monkeypatch.setattr(llm.engine.runner, "sampler", crafted)
    params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    outs = llm.generate([[5, 6, 7]] + prompts, [poisoned(params)] + [greedy()] * 3, use_tqdm=False)
    bad = outs[0].outputs[0]
    if value == float("inf"):  # every token is infinitely likely: the first one wins
        assert bad.finish_reason == "length" and set(bad.token_ids) == {0}
    else:  # nothing to pick
        assert bad.finish_reason == "error" and "NaN or -inf" in outs[0].error
    assert [o.outputs[0].token_ids for o in outs[1:]] == alone
    assert_all_blocks_free(llm)


def test_max_model_len_is_capped_by_positions_and_sliding_window():
    from types import SimpleNamespace

    from fleetserve.engine.core import max_model_len

    plain = SimpleNamespace(max_position_embeddings=2048, sliding_window=None)
    assert max_model_len(None, plain) == 2048
    assert max_model_len(512, plain) == 512
    with pytest.raises(ValueError, match=r"^max_model_len 4096 is longer than the model .*2048"):
        max_model_len(4096, plain)
    windowed = SimpleNamespace(max_position_embeddings=32768, sliding_window=4096)
    assert max_model_len(None, windowed) == 4096
    with pytest.raises(ValueError, match="sliding_window 4096"):
        max_model_len(8192, windowed)


def test_engine_refuses_max_model_len_beyond_the_models_positions(tiny_llama):
    from fleetserve.models.config import ModelConfig

    positions = ModelConfig.from_hf_folder(tiny_llama).max_position_embeddings
    with pytest.raises(ValueError, match=f"max_position_embeddings {positions}"):
        LLM(tiny_llama, dtype="float32", max_model_len=positions + 1)
