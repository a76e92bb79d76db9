"""The Ray backend: each replica is a Ray actor that holds one `fleetserve serve` process on
the node Ray placed it on. Ray brings node membership, placement by resources and failure
detection; fleetserve keeps its own gateway, routing, migration, supervision and autoscaling.

Why an actor that holds a process, not the engine inside the actor: a replica already is a
process tree (HTTP server, engine core) that the gateway reaches over HTTP and that drains on
SIGTERM; run as is, it keeps every behaviour the local backend has (health, metrics, KV
events, token-exact migration) and Ray only decides where it runs. The actor holds the
resources Ray granted it (its GPUs are in `CUDA_VISIBLE_DEVICES`, which the process
inherits), and the process dies with the actor (PDEATHSIG: SIGKILL), so a replica never
outlives its lease.

How one replica starts. `start` asks Ray for an actor with the replica's resources and the
SPREAD strategy (replicas on different nodes where they fit) and returns at once, with the
URL `PENDING_URL` (the gateway lists it as `loading`). `wait_ready` waits for the actor to be
placed: an actor no node has room for stays pending in Ray, which is what Ray's cluster
autoscaler reacts to; it is logged as pending, never counted as a failed start, and placed
when a node with room joins. Once placed, the actor picks a free port on its node, the
replica's config (written here by the fleet: its port, its internal key) is sent to it, and
it starts the process listening on the node's address: that URL goes to the gateway. The
ready timeout counts from then.

A replica is gone when its process exits or its actor dies (its node died: `ActorDiedError`,
or cannot be reached: `ActorUnavailableError`); `wait_exit` returns then and the supervisor
starts the same replica id again, wherever Ray finds room. Its streams migrate through the
gateway as with any replica that dies.

Every node needs fleetserve installed (`pip install fleetserve[ray]`) and the model at the
same path (a shared file system, or a model each node has).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ray
import yaml
from ray.exceptions import ActorUnavailableError, RayActorError

from fleetserve.fleet.backend import (
    OUTPUT_TAIL_LINES,
    FleetBackend,
    ReplicaHandle,
    ReplicaResources,
)
from fleetserve.fleet.local import _pass_through, free_port
from fleetserve.fleet.process import signal_group
from fleetserve.options import API_KEY_ENV, OPERATOR_KEY_ENV

logger = logging.getLogger(__name__)

# The URL of a replica Ray has not placed yet (`.invalid` never resolves: RFC 2606).
PENDING_URL = "http://pending.invalid"
PENDING_NOTICE_S = 5.0  # unplaced this long: logged as pending (no node has room)
HEALTH_POLL_S = 0.25  # poll interval while the model loads
STOP_MARGIN_S = 5.0  # past its grace, how long an actor gets to report before it is killed

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def actor_options(resources: ReplicaResources) -> dict[str, Any]:
    """Options for `ReplicaActor.options(...)`: the replica's resources, spread across nodes."""
    options: dict[str, Any] = {
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "resources": dict(resources.custom),
        "scheduling_strategy": "SPREAD",
        "max_restarts": 0,  # the supervisor restarts the replica, with its backoff
    }
    if resources.memory is not None:
        options["memory"] = resources.memory
    return options


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where Ray placed a replica's actor, and the port it picked there."""

    node_id: str
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Exit:
    """How a replica's process ended: its exit code and its last lines of stderr."""

    code: int
    output_tail: list[str]


def node_config(config_text: str, host: str) -> str:
    """A replica's config file for its node: the fleet's, listening on the node's address
    (the fleet writes 127.0.0.1, which only a replica on its own machine could use)."""
    config = yaml.safe_load(config_text)
    config["host"] = host
    return yaml.safe_dump(config)


def node_argv(argv: list[str], config_path: str, python: str) -> list[str]:
    """The fleet's replica argv (`PYTHON -m fleetserve.cli ... serve --config FILE`) for a
    node: that node's Python, and the config file written there (nodes share no files)."""
    if "--config" not in argv[:-1]:
        raise ValueError(f"a Ray replica's command needs --config FILE: {argv}")
    at = argv.index("--config") + 1
    return [python, *argv[1:at], config_path, *argv[at + 1 :]]


def _die_with_actor() -> None:  # runs in the child between fork and exec
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@ray.remote
class ReplicaActor:
    """Runs on a node: holds one replica process and reports how it ended. An async actor:
    its methods share one event-loop thread that lives as long as the actor, which is the
    thread PDEATHSIG follows."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.folder: str | None = None
        self.tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
        self.exited = asyncio.Event()
        self.reaper: asyncio.Task | None = None  # held: the loop keeps only weak references

    async def place(self) -> Placement:
        host = ray.util.get_node_ip_address()
        return Placement(ray.get_runtime_context().get_node_id(), host, free_port(host))

    async def launch(self, argv: list[str], config_text: str, host: str) -> int:
        """Start the replica process; returns its pid (on this node)."""
        self.folder = tempfile.mkdtemp(prefix="fleetserve-replica-")  # mode 0700
        path = Path(self.folder) / "replica.yaml"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(node_config(config_text, host))
        env = {k: v for k, v in os.environ.items() if k not in (API_KEY_ENV, OPERATOR_KEY_ENV)}
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            node_argv(argv, str(path), sys.executable),
            env=env,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_actor,  # noqa: PLW1509
        )
        threading.Thread(
            target=_pass_through, args=(self.proc.stderr, self.tail), daemon=True
        ).start()
        self.reaper = asyncio.get_running_loop().create_task(self._reap())
        return self.proc.pid

    async def _reap(self) -> None:
        await asyncio.to_thread(self.proc.wait)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.exited.set()

    async def wait(self) -> Exit:
        """Returns once the process has exited (never, if it was never launched)."""
        await self.exited.wait()
        return Exit(self.proc.returncode, list(self.tail))

    async def stop(self, grace_s: float) -> None:
        """SIGTERM (the replica drains), then SIGKILL after `grace_s`; both to its group."""
        if self.proc is None or self.exited.is_set():
            return
        signal_group(self.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.exited.wait(), grace_s)
        except TimeoutError:
            logger.warning(
                "replica pid %d did not stop in %.0fs; killing it", self.proc.pid, grace_s
            )
        signal_group(self.proc.pid, signal.SIGKILL)  # its engine core too, whatever is left
        await self.exited.wait()


@dataclasses.dataclass
class RayReplica:
    """The driver's side of one replica: its actor, a future for its end, and where it runs
    once placed."""

    actor: Any
    exited: asyncio.Future  # -> Exit; raises RayActorError when the actor dies
    placement: Placement | None = None


class RayBackend(FleetBackend):
    name = "ray"

    def __init__(
        self,
        command: Callable[[int], list[str]],
        env: dict[str, str] | None = None,
        health_headers: dict[str, str] | None = None,
        *,
        address: str | None = None,
        resources: ReplicaResources | None = None,
    ) -> None:
        """`command(port)`: the argv of a replica listening on `port`, which names its
        config file (`--config FILE`, read here and written again on the replica's node).
        `env` is not sent: a replica runs in its node's environment, not this machine's.
        `address`: the cluster (`ray.init`'s: None finds one started with `ray start` on
        this machine, or starts one); ignored when this process is connected already."""
        self.command = command
        self.health_headers = health_headers or {}
        self.resources = resources or ReplicaResources()
        if not ray.is_initialized():
            ray.init(address=address)

    async def start(self, index: int) -> ReplicaHandle:
        actor = ReplicaActor.options(**actor_options(self.resources)).remote()
        exited = asyncio.wrap_future(actor.wait.remote().future())
        return ReplicaHandle(index, PENDING_URL, native=RayReplica(actor, exited))

    async def wait_ready(self, handle: ReplicaHandle, timeout_s: float) -> bool:
        replica: RayReplica = handle.native
        placement = await self._placed(handle)
        if placement is None:
            return False
        argv = self.command(placement.port)
        try:
            handle.pid = await replica.actor.launch.remote(argv, _config_of(argv), placement.host)
        except (RayActorError, ActorUnavailableError):
            return False  # its node died under it: `wait_exit` says so
        replica.placement = placement
        handle.url = placement.url
        logger.info(
            "replica %d: node %s, pid %d there, at %s",
            handle.index,
            placement.node_id[:12],
            handle.pid,
            handle.url,
        )
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2.0, headers=self.health_headers) as client:
            while time.monotonic() < deadline and not replica.exited.done():
                try:
                    if (await client.get(f"{handle.url}/health")).status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(HEALTH_POLL_S)
        return False

    async def _placed(self, handle: ReplicaHandle) -> Placement | None:
        """Wait (as long as it takes) for Ray to place the replica's actor; None if the actor
        is gone first. Logs it as pending when no node has had room for a while."""
        replica: RayReplica = handle.native
        placed = asyncio.wrap_future(replica.actor.place.remote().future())
        waiting = {placed, replica.exited}
        done, _ = await asyncio.wait(
            waiting, timeout=PENDING_NOTICE_S, return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            logger.warning(
                "replica %d is pending: no node has room for %s; it starts when one joins",
                handle.index,
                self.resources,
            )
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if placed not in done or placed.exception() is not None:
            placed.cancel()
            return None
        return placed.result()

    async def wait_exit(self, handle: ReplicaHandle) -> int | None:
        replica: RayReplica = handle.native
        try:
            end: Exit = await replica.exited
        except (RayActorError, ActorUnavailableError) as exc:
            logger.warning("replica %d: its actor is gone (%s)", handle.index, type(exc).__name__)
            return None
        finally:
            _kill(replica.actor)  # frees its resources; no-op for a dead actor
        handle.output_tail.extend(end.output_tail)
        return end.code

    async def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        replica: RayReplica = handle.native
        if replica.placement is not None and not replica.exited.done():
            stopped = asyncio.wrap_future(replica.actor.stop.remote(grace_s).future())
            try:
                await asyncio.wait_for(stopped, grace_s + STOP_MARGIN_S)
            except (RayActorError, ActorUnavailableError, TimeoutError):
                pass  # gone, or out of reach: killing the actor kills its process
        _kill(replica.actor)


def _config_of(argv: list[str]) -> str:
    """The text of the config file the fleet wrote for a replica (`--config FILE`)."""
    return Path(argv[argv.index("--config") + 1]).read_text()


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except (RayActorError, ValueError):
        pass
