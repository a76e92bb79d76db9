"""EngineConfig refuses an unknown attention backend at once, as a usage error: it was
found only in the engine core process, after the model had loaded, with a traceback."""

from __future__ import annotations

import pytest

from fleetserve.engine.config import ATTENTION_BACKEND_NAMES, EngineConfig


def test_the_config_knows_the_registered_backends():
    from fleetserve.attention import ATTENTION_BACKENDS

    assert set(ATTENTION_BACKEND_NAMES) == {"auto", *ATTENTION_BACKENDS.names()}


def test_an_unknown_attention_backend_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="attention_backend must be one of .*triton"):
        EngineConfig(model="m", attention_backend="bogus")
    assert EngineConfig(model="m", attention_backend="triton").attention_backend == "triton"


def test_the_serve_command_line_refuses_it_before_loading_anything(capsys):
    from fleetserve.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "/nonexistent/model", "--attention-backend", "bogus"])
    assert exc.value.code == 2
    assert "attention_backend must be one of" in capsys.readouterr().err
