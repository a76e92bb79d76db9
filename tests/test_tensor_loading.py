"""Loading a torch model without pickles (TorchScript, torch.export, safetensors + class, HF
folders), the pickle refused without --trust-pickle, a user's handler module, int8, and which
task a MODEL path asks for."""

from __future__ import annotations

import json

import pytest
import torch
from tensor_models import TinyNet, build_bert, tiny_net

from fleetserve.tensor.handlers import BadInput, UserHandler, build_handler
from fleetserve.tensor.loading import LoadOptions, ModelLoadError, load_model
from fleetserve.tensor.task import detect_task, resolve_task

X = torch.tensor([[0.1, -0.2, 0.3, 0.4], [1.0, 0.0, -1.0, 0.5]])


def answers(module) -> torch.Tensor:
    with torch.inference_mode():
        return module(X)


def test_torchscript_export_and_safetensors_load_without_pickles(tmp_path):
    from safetensors.torch import save_file

    net = tiny_net()
    want = answers(net)
    torch.jit.save(torch.jit.script(net), tmp_path / "net.pt")
    program = torch.export.export(net, (X,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "net.pt2")
    save_file(net.state_dict(), tmp_path / "net.safetensors")
    torch.save(net.state_dict(), tmp_path / "state.pth")  # a state dict: weights_only loads it
    for name in ("net.pt", "net.pt2"):
        assert torch.allclose(answers(load_model(str(tmp_path / name), LoadOptions())), want)
    for name in ("net.safetensors", "state.pth"):
        options = LoadOptions(model_class="tensor_models:TinyNet")
        assert torch.allclose(answers(load_model(str(tmp_path / name), options)), want)
    with pytest.raises(ModelLoadError, match="--model-class"):
        load_model(str(tmp_path / "net.safetensors"), LoadOptions())


def test_a_pickled_model_needs_trust_pickle(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(tiny_net(), path)  # the seed's way: the whole module, pickled
    with pytest.raises(ModelLoadError, match="--trust-pickle") as err:
        load_model(str(path), LoadOptions())
    assert "runs any code" in str(err.value)
    loaded = load_model(str(path), LoadOptions(trust_pickle=True))
    assert torch.allclose(answers(loaded), answers(tiny_net()))


def test_missing_file_and_wrong_class_are_named(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(str(tmp_path / "nothing.pt"), LoadOptions())
    save_file({"other.weight": torch.zeros(2, 2)}, tmp_path / "w.safetensors")
    with pytest.raises(ModelLoadError, match="does not fit tensor_models:TinyNet"):
        load_model(
            str(tmp_path / "w.safetensors"), LoadOptions(model_class="tensor_models:TinyNet")
        )
    with pytest.raises(ModelLoadError, match="--model-class nope:X"):
        load_model(str(tmp_path / "w.safetensors"), LoadOptions(model_class="nope:X"))


def test_int8_quantization_swaps_linear_layers_and_stays_close(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    torch.save(net.state_dict(), tmp_path / "mlp.pth")
    torch.jit.save(torch.jit.script(net), tmp_path / "mlp.pt")
    x = torch.randn(16, 64)
    fp32 = load_model(str(tmp_path / "mlp.pt"), LoadOptions())
    torch.save(net, tmp_path / "whole.pt")
    int8 = load_model(
        str(tmp_path / "whole.pt"), LoadOptions(trust_pickle=True, quantization="int8")
    )
    assert "Linear" in type(int8[0]).__name__ and type(int8[0]) is not torch.nn.Linear
    cos = torch.nn.functional.cosine_similarity(fp32(x), int8(x), dim=1)
    assert cos.min() > 0.99
    with pytest.raises(ModelLoadError, match="eager module"):
        load_model(str(tmp_path / "mlp.pt"), LoadOptions(quantization="int8"))


def test_a_users_handler_module_replaces_pre_and_postprocess(tmp_path):
    module = tmp_path / "handler.py"
    module.write_text(
        "import torch\n"
        "def preprocess(data):\n"
        "    if 'features' not in data:\n"
        "        raise KeyError('features')\n"
        "    return torch.tensor(data['features'], dtype=torch.float32)\n"
        "def postprocess(outputs):\n"
        "    return [{'score': float(o.sum())} for o in outputs]\n"
    )
    handler = build_handler(tiny_net(), "net", "tensor", str(module))
    assert isinstance(handler, UserHandler)
    rows = handler.rows_from_json({"features": X.tolist()})
    answer = handler.to_json(handler.predict(rows))
    assert answer[1]["score"] == pytest.approx(float(answers(tiny_net())[1].sum()), abs=1e-6)
    with pytest.raises(BadInput, match="preprocess refused the input: 'features'"):
        handler.rows_from_json({"other": 1})
    with pytest.raises(ModelLoadError, match="no such file"):
        build_handler(tiny_net(), "net", "tensor", str(tmp_path / "none.py"))


def test_detect_task_from_the_model_path(tmp_path):
    bert = build_bert(tmp_path / "bert")
    assert detect_task(str(bert)) == "embed"
    cls = build_bert(tmp_path / "cls", classify=True)
    assert detect_task(str(cls)) == "classify"
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert detect_task(str(llm)) == "generate"
    assert detect_task("x.gguf") == "generate"
    for name in ("m.pt", "m.pt2", "m.safetensors", "m.pth"):
        assert detect_task(name) == "tensor"
    assert resolve_task("embed", "m.pt") == "embed"
    assert resolve_task(None, None) == "generate"
    with pytest.raises(ValueError, match="unknown --task"):
        resolve_task("rank", "m.pt")
    assert TinyNet  # the class the state-dict tests name as tensor_models:TinyNet


def test_an_exported_program_names_its_input_shape_and_dtype_at_the_door(tmp_path):
    net = tiny_net()
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (X,), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "net.pt2")
    path = str(tmp_path / "net.pt2")
    handler = build_handler(load_model(path, LoadOptions()), path, "tensor")
    assert handler.inputs[0].metadata() == {
        "name": "input__0",
        "datatype": "FP32",
        "shape": [-1, 4],
    }
    with pytest.raises(BadInput, match=r"shape \[1, 3\]; this model takes \[-1, 4\]"):
        handler.rows_from_json([[1.0, 2.0, 3.0]])
    rows = handler.rows_from_json(X.tolist())
    assert torch.allclose(torch.stack(handler.predict(rows)), answers(net), atol=1e-6)
    torch.jit.save(torch.jit.script(net), tmp_path / "net.pt")
    scripted = build_handler(
        load_model(str(tmp_path / "net.pt"), LoadOptions()), "net.pt", "tensor"
    )
    assert scripted.inputs[0].shape == (-1,) and not scripted.inputs[0].known_rank
