"""Structure the gateway and the fleet keep (issue 10): read from the source with `ast`,
imports inside functions included, type-checking-only imports aside."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fleetserve

ROOT = Path(fleetserve.__file__).parent


def _imports(module: str) -> set[str]:
    """The fleetserve modules `module` imports anywhere in its file."""
    return _imports_of(ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py"))


def _imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for stmt in ast.walk(tree)
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)
        for node in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name.startswith("fleetserve")}


def test_the_probes_and_kv_events_do_not_import_the_gateway():
    # Not even for type checking: they take the client and callbacks, not the Gateway.
    for name in ("health.py", "kv_events.py"):
        assert "fleetserve.gateway.gateway" not in (ROOT / "gateway" / name).read_text()


def test_the_dispatcher_is_pure():
    imported = _imports("fleetserve.gateway.dispatcher")
    assert "fleetserve.gateway.gateway" not in imported
    source = (ROOT / "gateway" / "dispatcher.py").read_text()
    for line in ("import asyncio", "import time", "import httpx", "from time"):
        assert line not in source


def test_the_replica_server_and_the_fleet_do_not_import_each_other():
    assert not any(m.startswith("fleetserve.fleet") for m in _imports("fleetserve.server.cli"))
    assert not any(
        m.startswith("fleetserve.server") for m in _imports("fleetserve.fleet.replicated")
    )
    assert not any(m.startswith("fleetserve.cli") for m in _imports("fleetserve.fleet.replicated"))
    assert not any(m.startswith("fleetserve.server") for m in _imports("fleetserve.options"))


def test_the_product_does_not_import_its_test_doubles():
    for path in ROOT.rglob("*.py"):
        if "testing" in path.relative_to(ROOT).parts:
            continue
        assert not any(m.startswith("fleetserve.testing") for m in _imports_of(path)), path


def test_the_gateway_the_fleet_and_the_options_load_without_torch():
    code = (
        "import sys, fleetserve.gateway.app, fleetserve.gateway.cli, fleetserve.fleet.replicated, "
        "fleetserve.options, fleetserve.http.sse, fleetserve.http.disconnect, fleetserve.cli; "
        "fleetserve.cli.build_parser(['serve']); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
