"""`Registry`: lazy `"module:Attr"` entries, names listed without importing, unknown names
answered with the valid choices; and every registry of fleetserve resolves to what it says."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fleetserve.registry import Registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def plugin_module(tmp_path, monkeypatch) -> str:
    """A module on sys.path, not yet imported; its name."""
    name = "fleetserve_test_plugin"
    (tmp_path / f"{name}.py").write_text("class Thing:\n    pass\n\nimported = []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_names_and_membership_import_nothing(plugin_module):
    registry: Registry[type] = Registry(
        "widget", {"b": f"{plugin_module}:Thing", "a": "no_such_module_anywhere:Thing"}
    )
    assert registry.names() == ["a", "b"]
    assert list(registry) == ["a", "b"] and len(registry) == 2
    assert sorted(registry) == ["a", "b"]  # what argparse `choices=` gets
    assert "a" in registry and "c" not in registry
    assert registry.check("a") == "a"
    assert plugin_module not in sys.modules


def test_get_imports_on_first_use_and_once(plugin_module):
    registry: Registry[type] = Registry("widget", {"thing": f"{plugin_module}:Thing"})
    thing = registry.get("thing")
    assert thing.__name__ == "Thing" and plugin_module in sys.modules
    del sys.modules[plugin_module]
    assert registry.get("thing") is thing  # cached: not imported a second time
    assert plugin_module not in sys.modules


def test_unknown_name_lists_the_choices():
    registry: Registry[type] = Registry("widget", {"b": "m:B", "a": "m:A"})
    for ask in (registry.get, registry.check):
        with pytest.raises(ValueError, match=r"unknown widget 'c'; choose one of \['a', 'b'\]"):
            ask("c")


def test_a_broken_entry_fails_when_asked_for():
    registry: Registry[type] = Registry("widget", {"gone": "no_such_module_anywhere:Thing"})
    with pytest.raises(ModuleNotFoundError):
        registry.get("gone")


@pytest.mark.parametrize("target", ["no_colon", ":Attr", "module:"])
def test_entries_must_be_module_colon_attr(target):
    with pytest.raises(ValueError, match="widget 'x'.*'module:Attr'"):
        Registry("widget", {"x": target})


def test_every_attention_backend_resolves():
    from fleetserve.attention import ATTENTION_BACKENDS, AttentionBackend, get_backend
    from fleetserve.attention.triton_paged import TritonUnavailable, problem

    assert ATTENTION_BACKENDS.names() == ["cpu", "torch", "triton"]
    for name, cls in ATTENTION_BACKENDS.items():
        assert issubclass(cls, AttentionBackend) and cls.name == name
        if name == "triton" and problem() is not None:  # no triton or no CUDA: says which
            with pytest.raises(TritonUnavailable, match=re.escape(problem())):
                get_backend(name)
            continue
        assert isinstance(get_backend(name), cls)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'.*'triton'\]"):
        get_backend("flash")


def test_every_routing_policy_resolves():
    from fleetserve.gateway.policies import POLICIES, RoutingPolicy, make_policy

    for name, cls in POLICIES.items():
        assert issubclass(cls, RoutingPolicy) and cls.name == name
        assert isinstance(make_policy(name, seed=3), cls)


def test_every_fleet_backend_resolves():
    from fleetserve.fleet.backend import FLEET_BACKENDS, FleetBackend

    assert FLEET_BACKENDS.names() == ["local", "ray"]
    for name in FLEET_BACKENDS.names():
        if name == "ray" and importlib.util.find_spec("ray") is None:
            continue  # an optional extra (pip install fleetserve[ray]); make test installs it
        cls = FLEET_BACKENDS.get(name)
        assert issubclass(cls, FleetBackend) and cls.name == name


def test_every_architecture_resolves():
    from torch import nn

    from fleetserve.models.registry import (
        ARCHITECTURES,
        ArchSpec,
        arch_for_gguf,
        arch_for_model_type,
        get_arch_spec,
    )

    for name, spec in ARCHITECTURES.items():
        assert isinstance(spec, ArchSpec) and issubclass(spec.model_cls, nn.Module)
        if spec.model_type:
            assert arch_for_model_type(spec.model_type) == name
    assert arch_for_gguf("qwen2") == "Qwen2ForCausalLM"
    assert arch_for_model_type("gpt2") is None
    with pytest.raises(ValueError, match="unknown architecture 'GPT2LMHeadModel'.*Llama"):
        get_arch_spec("GPT2LMHeadModel")


def test_registries_do_not_import_their_entries():
    """Choosing among policies or backends (CLI choices, config checks) loads none of them."""
    code = (
        "import sys\n"
        "from fleetserve.gateway.policies import POLICIES\n"
        "from fleetserve.fleet.backend import FLEET_BACKENDS\n"
        "assert 'prefix_aware' in POLICIES and 'local' in FLEET_BACKENDS\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('fleetserve.gateway.policies.')\n"
        "                or m == 'fleetserve.fleet.local' or m == 'torch')\n"
        "assert loaded == ['fleetserve.gateway.policies.base'], loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
