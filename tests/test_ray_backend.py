"""The Ray backend (`--backend ray`): replicas as Ray actors on a cluster. Pure parts first
(resources, the replica's config and argv on its node), then the issue's tests on one
3-node Ray cluster on loopback (head + 2 workers with their own resources), shared by the
module: 2 replicas of a tiny model land on different nodes; the node of one is removed while
20 greedy streams run, every text equals a run without the failure, and the replica comes back
on the remaining node. Then more replicas than fit: one is pending (not a failure) until a node
with room joins, and scaling down frees what it held. Last, `fleetserve serve MODEL --backend
ray --ray-address ADDRESS` as its own process joins the cluster, serves and stops cleanly.

Without Ray installed (`pip install fleetserve[ray]`) the cluster tests skip, except under
`make test` (FLEETSERVE_REQUIRE_TOOLS=1), where they fail. The times measured (cluster start,
placement, recovery) are printed (`pytest -s`), never asserted."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import httpx
import pytest
import yaml
from gateway_harness import ThreadServer, free_port, wait_until

from fleetserve.cli import build_parser
from fleetserve.fleet.backend import ReplicaResources
from fleetserve.fleet.replicated import ReplicaConfigs, backend_options_from_args, wants_fleet
from fleetserve.fleet.supervisor import Supervisor
from fleetserve.gateway.app import create_app
from fleetserve.gateway.config import GatewayConfig
from fleetserve.gateway.gateway import Gateway
from fleetserve.gateway.tokenizer import load_tokenizer
from fleetserve.testing.launcher import stop_process_group

# Ray reads these when it is imported: dial 127.0.0.1 only (not the machine's own address),
# write no token under the home folder, send no usage stats.
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# A dead node is noticed in ~1.2 s instead of ~14 s.
FAST_FAILURE_DETECTION = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
}
LABEL = "tiny-llama"  # the custom resource of the nodes that may hold a replica
LATE = "late-node"  # one that only a node added later has

if importlib.util.find_spec("ray") is None:
    if os.environ.get("FLEETSERVE_REQUIRE_TOOLS"):
        raise RuntimeError("Ray is not installed: make test installs it (fleetserve[ray])")
    pytest.skip("Ray is not installed (pip install fleetserve[ray])", allow_module_level=True)
os.environ.update(RAY_ENV)

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from fleetserve.fleet.ray_backend import (  # noqa: E402
    PENDING_URL,
    Placement,
    RayBackend,
    actor_options,
    node_argv,
    node_config,
)

# ---- pure parts ----------------------------------------------------------------------------


def test_resources_become_actor_options_spread_across_nodes():
    options = actor_options(ReplicaResources(2, 1, 4 << 30, {"a100": 1}))
    assert options == {
        "num_cpus": 2,
        "num_gpus": 1,
        "memory": 4 << 30,
        "resources": {"a100": 1},
        "scheduling_strategy": "SPREAD",
        "max_restarts": 0,
    }
    assert "memory" not in actor_options(ReplicaResources())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_cpus": -1},
        {"num_gpus": -0.5},
        {"memory": 0},
        {"custom": {"a100": -1}},
        {"custom": {"a100": "one"}},
        {"custom": {"": 1}},
    ],
)
def test_bad_resources_are_refused(kwargs):
    with pytest.raises(ValueError):
        ReplicaResources(**kwargs)


def test_a_replica_listens_on_its_node_with_its_own_copy_of_the_config():
    text = yaml.safe_dump({"host": "127.0.0.1", "port": 8123, "operator-key": "k"})
    assert yaml.safe_load(node_config(text, "10.0.0.7")) == {
        "host": "10.0.0.7",
        "port": 8123,
        "operator-key": "k",
    }
    argv = ["/here/python", "-m", "fleetserve.cli", "serve", "--config", "/here/r.yaml"]
    assert node_argv(argv, "/there/r.yaml", "/there/python") == [
        "/there/python", "-m", "fleetserve.cli", "serve", "--config", "/there/r.yaml",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="--config"):
        node_argv(["python", "-m", "fleetserve.cli", "serve"], "/there/r.yaml", "python")


def test_placement_url_brackets_ipv6():
    assert Placement("n", "10.0.0.7", 80).url == "http://10.0.0.7:80"
    assert Placement("n", "fd00::7", 80).url == "http://[fd00::7]:80"


def _args(*argv: str):
    return build_parser(list(argv)).parse_args(list(argv))


def test_the_ray_flags_of_serve_and_gateway():
    args = _args(
        "serve", "m", "--backend", "ray", "--ray-address", "10.0.0.1:6379", "--replica-cpus", "2",
        "--replica-gpus", "1", "--replica-memory", "8GiB", "--replica-resources", '{"a100": 1}',
    )  # fmt: skip
    assert wants_fleet(args)  # one replica on Ray still runs behind the gateway
    assert backend_options_from_args(args) == {
        "address": "10.0.0.1:6379",
        "resources": ReplicaResources(2, 1, 8 << 30, {"a100": 1}),
    }
    args = _args("gateway", "--backend", "ray", "--model", "m")
    assert backend_options_from_args(args) == {"address": None, "resources": ReplicaResources()}
    assert backend_options_from_args(_args("serve", "m", "--replicas", "2")) == {}
    with pytest.raises(ValueError, match="--replica-gpus needs --backend ray"):
        backend_options_from_args(_args("serve", "m", "--replicas", "2", "--replica-gpus", "1"))
    with pytest.raises(SystemExit):
        _args("serve", "m", "--backend", "ray", "--replica-resources", "[1]")


# ---- a 3-node cluster on loopback ----------------------------------------------------------


def _node_args(**extra) -> dict:
    return {"node_ip_address": "127.0.0.1", "include_dashboard": False, **extra}


def _worker_args(slots: int) -> dict:
    """A node with room for `slots` replicas (each asks for 1 CPU and 1 `LABEL`)."""
    return _node_args(num_cpus=2 * slots, resources={LABEL: slots})


@pytest.fixture(scope="module")
def ray_cluster():
    # A folder of its own (short: Ray's socket paths live there), where Ray also writes the
    # address file it would otherwise put in /tmp/ray.
    root = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    temp_dir = os.path.join(root, "ray")
    os.mkdir(temp_dir)
    os.environ["RAY_TMPDIR"] = root
    started = time.monotonic()
    cluster = Cluster(
        initialize_head=True,
        head_node_args=_node_args(
            num_cpus=0,  # the head holds the gateway, no replica
            temp_dir=temp_dir,
            _system_config=FAST_FAILURE_DETECTION,
        ),
    )
    workers = [cluster.add_node(**_worker_args(2)) for _ in range(2)]
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    print(f"\nray: 3-node cluster started in {time.monotonic() - started:.1f}s")
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        del os.environ["RAY_TMPDIR"]
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def long_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama with room for 2048 positions (its rotary table is computed, its weights
    random either way): streams long enough to be running when a node's processes die."""
    folder = tmp_path_factory.mktemp("long") / "llama"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    return folder


class Fleet:
    """A gateway (in a thread of this process) and a supervisor of `num` replicas of the tiny
    model on the Ray backend, as `fleetserve serve --backend ray` runs them."""

    def __init__(self, model, num: int, label: str = LABEL) -> None:
        key = secrets.token_urlsafe(16)
        options = {"model": str(model), "max_model_len": 2048, "kv_cache_memory": "32MiB"}
        self.configs = ReplicaConfigs({**options, "num_threads": 1}, key)
        config = GatewayConfig(probe_interval_s=0.2, stall_timeout_s=5.0, retry_backoff_s=0.05)
        self.gateway = Gateway(config, tokenizer=load_tokenizer(model), upstream_api_key=key)
        self.front = ThreadServer(create_app(self.gateway)).start()
        self.backend = RayBackend(
            self.command,
            health_headers={"Authorization": f"Bearer {key}"},
            resources=ReplicaResources(num_cpus=1, custom={label: 1}),
        )
        self.supervisor = Supervisor(self.backend, self.gateway, num, stop_grace_s=10)
        self.front.call(self.supervisor.start)

    def command(self, port: int) -> list[str]:
        config = self.configs.write(port)
        return [sys.executable, "-m", "fleetserve.cli", "serve", "--config", str(config)]

    def placement(self, index: int) -> Placement | None:
        handle = self.supervisor.handles.get(index)
        return handle.native.placement if handle is not None else None

    def ready(self, *ids: str) -> bool:
        replicas = self.gateway.replicas
        return all(rid in replicas and replicas[rid].ready for rid in ids)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.supervisor.stop(), self.front.loop).result(60)
        self.front.stop()
        self.configs.close()


def _alive_nodes() -> dict[str, dict]:
    return {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}


def _body(i: int) -> dict:
    return {
        "model": "llama",
        "prompt": f"request {i} says",
        "max_tokens": 1000,  # still streaming when the removed node's processes die (~1 s)
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


async def _stream(client: httpx.AsyncClient, url: str, i: int, progress: list[int]) -> str:
    text = ""
    async with client.stream("POST", f"{url}/v1/completions", json=_body(i)) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += "".join(c["text"] for c in chunk["choices"])
                progress[i] += 1
    return text


async def _twenty_streams(url: str, while_running=None) -> list[str]:
    n = 20
    progress = [0] * n
    async with httpx.AsyncClient(timeout=180) as client:
        tasks = [asyncio.create_task(_stream(client, url, i, progress)) for i in range(n)]
        if while_running is not None:
            deadline = time.monotonic() + 120
            while min(progress) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(while_running)
        return list(await asyncio.gather(*tasks))


def _complete(url: str) -> str:
    body = {**_body(0), "stream": False, "max_tokens": 50}
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone too
    except FileNotFoundError:
        return False


def _migrations(gateway: Gateway) -> float:
    return sum(
        sample.value
        for metric in gateway.metrics.registry.collect()
        if metric.name.endswith("gateway_migrations")
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_replicas_on_two_nodes_survive_losing_one_node(ray_cluster, long_llama):
    cluster, workers = ray_cluster
    started = time.monotonic()
    fleet = Fleet(long_llama, 2)
    try:
        wait_until(lambda: fleet.ready("r0", "r1"), 180, 0.1, "2 replicas ready")
        print(f"ray: 2 replicas placed and ready in {time.monotonic() - started:.1f}s")
        nodes = _alive_nodes()
        homes = [fleet.placement(0).node_id, fleet.placement(1).node_id]
        assert homes[0] != homes[1]  # SPREAD
        assert all(nodes[h]["Resources"].get(LABEL) == 2 for h in homes)  # workers, not the head
        assert {w.node_id for w in workers} == set(homes)

        before = _complete(fleet.front.url)
        began = time.monotonic()
        reference = asyncio.run(_twenty_streams(fleet.front.url))
        print(f"ray: 20 streams took {time.monotonic() - began:.1f}s without a failure")
        assert all(len(t) > 0 for t in reference)
        victim = next(w for w in workers if w.node_id == homes[0])
        survivor = homes[1]
        removed_at = []

        victim_pid = fleet.supervisor.handles[0].pid  # on this machine too: loopback nodes

        def remove_node():
            removed_at.append(time.monotonic())
            cluster.remove_node(victim, allow_graceful=False)
            # the replica dies with its node (its actor's worker): no orphan keeps serving
            wait_until(lambda: not _alive(victim_pid), 30, 0.01, "the victim replica gone")
            gone = time.monotonic() - removed_at[0]
            print(f"ray: the removed node's replica process gone {gone:.1f}s after removal")

        texts = asyncio.run(_twenty_streams(fleet.front.url, remove_node))
        assert texts == reference
        assert _migrations(fleet.gateway) >= 1

        def back_on_survivor() -> bool:
            placement = fleet.placement(0)
            return fleet.ready("r0") and placement is not None and placement.node_id == survivor

        wait_until(back_on_survivor, 120, 0.1, "r0 placed again on the remaining node")
        print(f"ray: r0 serving again {time.monotonic() - removed_at[0]:.1f}s after node removal")
        assert victim.node_id not in _alive_nodes()
        assert fleet.supervisor.restarts == 1
        assert _complete(fleet.front.url) == before
    finally:
        fleet.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_replicas_beyond_the_room_are_pending_until_a_node_joins(ray_cluster, long_llama, caplog):
    """Replicas that ask for a label no node has yet: pending, never failed, until a node
    with room for one joins; the other stays pending."""
    cluster, _ = ray_cluster
    caplog.set_level(logging.INFO, logger="fleetserve.fleet.ray_backend")
    fleet = Fleet(long_llama, 2, label=LATE)  # the Fleet serves 2048 positions
    try:
        wait_until(lambda: caplog.text.count("is pending") == 2, 60, 0.1, "2 pending replicas")
        for rid in ("r0", "r1"):
            replica = fleet.gateway.replicas[rid]
            assert (replica.state, replica.url) == ("loading", PENDING_URL)
        assert fleet.supervisor.failed == {} and fleet.supervisor.restarts == 0

        joined = time.monotonic()
        node = cluster.add_node(**_node_args(num_cpus=2, resources={LATE: 1}))
        wait_until(lambda: fleet.ready("r0") or fleet.ready("r1"), 180, 0.1, "one placed, ready")
        print(f"ray: a pending replica ready {time.monotonic() - joined:.1f}s after a node joined")
        placed, waiting = (0, 1) if fleet.ready("r0") else (1, 0)
        assert fleet.placement(placed).node_id == node.node_id
        assert fleet.gateway.replicas[f"r{waiting}"].url == PENDING_URL  # no room for it
        assert fleet.supervisor.failed == {} and fleet.supervisor.restarts == 0
        body = {"model": "llama", "prompt": "hello", "max_tokens": 4}
        assert httpx.post(f"{fleet.front.url}/v1/completions", json=body).status_code == 200
    finally:
        fleet.close()
    # stopped: the placed actor gave its room back, the pending one was withdrawn
    wait_until(lambda: ray.available_resources().get(LATE) == 1, 30, 0.1, "room given back")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fleetserve_serve_backend_ray_joins_the_cluster(ray_cluster, tiny_llama, tmp_path):
    """The command the README shows, as its own process (its own Ray driver)."""
    cluster, _ = ray_cluster
    wait_until(lambda: ray.available_resources().get(LABEL, 0) >= 1, 60, 0.1, "room left")
    operator = {"Authorization": "Bearer ray-test-operator"}
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "fleetserve.cli", "serve", str(tiny_llama),
            "--backend", "ray", "--ray-address", cluster.address, "--replicas", "1",
            "--replica-resources", json.dumps({LABEL: 1}), "--port", str(port),
            "--max-model-len", "512", "--kv-cache-memory", "32MiB", "--drain-timeout", "5",
        ],
        start_new_session=True,
        env={**os.environ, "FLEETSERVE_OPERATOR_KEY": operator["Authorization"][7:]},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def replicas() -> list[dict]:
        assert proc.poll() is None, "the fleet exited"
        try:
            return httpx.get(f"{url}/admin/replicas", headers=operator, timeout=2).json()
        except httpx.HTTPError:
            return []

    try:
        wait_until(lambda: [r["state"] for r in replicas()] == ["ready"], 180, 0.2, "ready")
        (replica,) = replicas()
        assert replica["url"] != PENDING_URL
        body = {"model": "llama", "prompt": "hello", "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
        assert ray.available_resources().get(LABEL, 0) < cluster_total(LABEL)
    finally:
        stop_process_group(proc, grace_s=30)
    assert proc.returncode == 0
    # its actor is gone: the resources it held are free again
    wait_until(
        lambda: ray.available_resources().get(LABEL, 0) == cluster_total(LABEL),
        30,
        0.1,
        "the replica's resources released",
    )


def cluster_total(label: str) -> float:
    return ray.cluster_resources().get(label, 0)
