"""fleetserve.models on tiny random checkpoints: logits match transformers for every
architecture, in one prefill, in chunks, in a mixed decode + prefill batch, and from GGUF."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from attention_backends import MODEL_VARIANTS
from checkpoints import TINY_ARCHS, new_kv_caches, prefill_in_chunks, write_gguf
from transformers import AutoModelForCausalLM

from fleetserve.attention import (
    ForwardContext,
    SeqSpec,
    build_attention_metadata,
    get_backend,
)
from fleetserve.models import ModelConfig, load_model, load_tokenizer

ARCHS = list(TINY_ARCHS)
ATOL = 1e-4


def _tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _hf_logits(folder: Path, token_ids: list[int]) -> torch.Tensor:
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return ref(torch.tensor([token_ids])).logits[0].float()


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    """arch -> (tokens, transformers' logits) for a 45-token sequence."""
    out = {}
    for name, folder in tiny_checkpoints.items():
        ids = _tokens(45, 512, seed=len(out))
        out[name] = (ids, _hf_logits(folder, ids))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_matches_transformers(arch, tiny_checkpoints, reference):
    model, config = load_model(tiny_checkpoints[arch])
    ids, expected = reference[arch]
    logits = prefill_in_chunks(model, config, ids, [len(ids)])
    assert logits.dtype == torch.float32 and logits.shape == expected.shape
    assert logits.std() > 1.0  # spread-out logits: the comparison below is not vacuous
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_two_chunk_prefill_matches_transformers(arch, tiny_checkpoints, reference):
    model, config = load_model(tiny_checkpoints[arch])
    ids, expected = reference[arch]
    logits = prefill_in_chunks(model, config, ids, [19, len(ids) - 19])  # 19: mid-block
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("device", "backend_name"), MODEL_VARIANTS)
def test_mixed_decode_and_prefill_batch(tiny_checkpoints, reference, device, backend_name):
    """Seq A decodes its 45th token while seq B prefills 30 tokens, in one forward."""
    model, config = load_model(tiny_checkpoints["qwen3"], device=device)
    ids, expected = reference["qwen3"]
    other = _tokens(30, 512, seed=7)
    other_expected = _hf_logits(tiny_checkpoints["qwen3"], other)
    bs, kv = 8, [c.to(device) for c in new_kv_caches(config, 16, 8)]
    backend = get_backend(backend_name)
    blocks_a, blocks_b = [3, 0, 5, 9, 1, 12], [2, 4, 6, 7]
    with torch.no_grad():
        meta = build_attention_metadata([SeqSpec(0, 44, blocks_a)], bs, device)
        ctx = ForwardContext(meta, kv, backend)
        model(torch.tensor(ids[:44], device=device), torch.arange(44, device=device), ctx)
        meta = build_attention_metadata(
            [SeqSpec(44, 1, blocks_a), SeqSpec(0, 30, blocks_b)], bs, device
        )
        hidden = model(
            torch.tensor(ids[44:] + other, device=device),
            torch.cat([torch.tensor([44]), torch.arange(30)]).to(device),
            ForwardContext(meta, kv, backend),
        )
        logits = model.compute_logits(hidden).cpu()
    torch.testing.assert_close(logits[0], expected[44], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1:], other_expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_matches_transformers(arch, tiny_checkpoints, reference, tmp_path):
    path = write_gguf(tiny_checkpoints[arch], tmp_path / f"{arch}.gguf")
    model, config = load_model(path)
    hf_config = ModelConfig.from_hf_folder(tiny_checkpoints[arch])
    assert config.torch_dtype == "float32"
    assert config.tie_word_embeddings == hf_config.tie_word_embeddings
    assert (config.attention_bias, config.qk_norm) == (hf_config.attention_bias, hf_config.qk_norm)
    assert config.eos_token_ids == (2,)
    ids, expected = reference[arch]
    logits = prefill_in_chunks(model, config, ids, [len(ids)])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_config_flags(tiny_checkpoints):
    configs = {name: ModelConfig.from_hf_folder(p) for name, p in tiny_checkpoints.items()}
    assert configs["llama"].tie_word_embeddings is False
    assert configs["llama_tied_rope3"].tie_word_embeddings is True
    assert configs["llama_tied_rope3"].rope_scaling["rope_type"] == "llama3"
    assert configs["llama"].rope_scaling is None
    assert configs["qwen2"].attention_bias and not configs["qwen2"].o_proj_bias
    assert configs["qwen3"].qk_norm and configs["qwen3"].head_dim == 32
    assert configs["mistral"].architecture == "MistralForCausalLM"
    for c in configs.values():
        assert c.eos_token_ids == (2,) and c.torch_dtype == "float32" and c.vocab_size == 512
        assert (c.num_attention_heads, c.num_key_value_heads) == (4, 2)


def test_tied_model_has_no_lm_head(tiny_checkpoints):
    # packed=False: the model as defined (pack_linears gives a tied model a packed lm_head)
    model, _ = load_model(tiny_checkpoints["llama_tied_rope3"], packed=False)
    assert model.lm_head is None
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any("q_proj" in n or "gate_proj" in n for n in names)


def test_sharded_checkpoint_with_index(tiny_checkpoints, reference, tmp_path):
    src = tiny_checkpoints["qwen2"]
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model, config = load_model(tmp_path)
    ids, expected = reference["qwen2"]
    torch.testing.assert_close(
        prefill_in_chunks(model, config, ids, [len(ids)]), expected, atol=ATOL, rtol=0
    )


def test_dtypes(tiny_checkpoints, reference):
    model, _ = load_model(tiny_checkpoints["llama"], dtype="auto")
    assert next(model.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    model, config = load_model(tiny_checkpoints["llama"], dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.cos_sin_cache.dtype == torch.float32
    ids, expected = reference["llama"]
    logits = prefill_in_chunks(model, config, ids, [len(ids)])
    assert logits.dtype == torch.float32
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()
    model, _ = load_model(tiny_checkpoints["llama"], dtype=torch.float16)
    assert next(model.parameters()).dtype == torch.float16


def test_progress_bar(tiny_llama, capsys):
    load_model(tiny_llama, progress=True)
    assert "tensor" in capsys.readouterr().err


def test_tokenizer(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    assert len(tok) == 512 and tok.eos_token_id == 2
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("Hello world, the model runs fast.")["input_ids"]) == (
        "Hello world, the model runs fast."
    )


# ---- errors the user can cause ----


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model(folder)


def test_missing_config(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(folder)


def test_missing_weights(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"safetensors"):
        load_model(folder)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_index_lists_missing_shard(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load_model(folder)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle fails the test loudly."""
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "x.ckpt"])
def test_pickle_folder_refused_without_opening(name, tiny_llama, tmp_path, no_unpickling):
    folder = _copy(tiny_llama, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / name).write_bytes(b"\x80\x04garbage that is not a pickle" * 10)
    with pytest.raises(ValueError, match="never loads pickles.*safetensors"):
        load_model(folder)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pth"])
def test_pickle_file_refused_without_opening(name, tmp_path, no_unpickling):
    path = tmp_path / name
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="never loads pickles"):
        load_model(path)


def test_pickles_next_to_safetensors_are_ignored(tiny_llama, tmp_path, no_unpickling):
    folder = _copy(tiny_llama, tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(b"garbage")
    load_model(folder)


def test_bad_arguments(tiny_llama):
    with pytest.raises(ValueError, match="quantization 'int4'"):
        load_model(tiny_llama, quantization="int4")
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_model(tiny_llama, dtype="float8")


def test_unsupported_rope_type(tiny_llama, tmp_path):
    folder = _copy(tiny_llama, tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_type 'yarn'.*llama3"):
        load_model(folder)


def test_config_validation_names_the_field(tiny_llama):
    base = json.loads((tiny_llama / "config.json").read_text())
    with pytest.raises(ValueError, match="num_attention_heads"):
        ModelConfig.from_hf_dict({**base, "num_attention_heads": 3})
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf_dict({**base, "hidden_size": 0})
    with pytest.raises(ValueError, match="eos_token_ids"):
        ModelConfig.from_hf_dict({**base, "eos_token_id": 100000})
    legacy = {k: v for k, v in base.items() if k != "rope_parameters"}
    legacy["rope_theta"] = 500000.0
    legacy["rope_scaling"] = {"type": "linear", "factor": 2.0}
    config = ModelConfig.from_hf_dict(legacy, {"eos_token_id": [5, 2]})
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.eos_token_ids == (5, 2)
    no_archs = {k: v for k, v in base.items() if k != "architectures"}
    assert ModelConfig.from_hf_dict(no_archs).architecture == "LlamaForCausalLM"


def test_shape_mismatch_is_clear(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints["llama"], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_model(folder)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
