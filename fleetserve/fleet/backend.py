"""Where replicas run. A backend starts, watches and stops replica processes; the
`Supervisor` decides when. Adding one (Ray actors, Kubernetes pods) is a file and a line in
`FLEET_BACKENDS`."""

from __future__ import annotations

import abc
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fleetserve.registry import Registry

OUTPUT_TAIL_LINES = 40  # lines of a replica's stderr kept to explain why it failed


@dataclass
class ReplicaHandle:
    index: int
    url: str
    pid: int | None = None
    native: Any = field(default=None, repr=False)  # the backend's own object (a Popen, ...)
    # The last lines the replica wrote to stderr, where the backend can see them.
    output_tail: deque[str] = field(
        default_factory=lambda: deque(maxlen=OUTPUT_TAIL_LINES), repr=False
    )


@dataclass(frozen=True)
class ReplicaResources:
    """What one replica asks a cluster backend (Ray) for: CPUs, GPUs, memory (bytes) and
    custom resources, the labels its nodes were started with (`ray start --resources
    '{"a100": 4}'`). The local backend takes none: a replica there gets what the machine has."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None
    custom: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_cpus", "num_gpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.memory is not None and self.memory <= 0:
            raise ValueError(f"memory must be > 0 bytes, got {self.memory}")
        for label, amount in self.custom.items():
            if not isinstance(label, str) or not label:
                raise ValueError(f"a custom resource needs a name, got {label!r}")
            if isinstance(amount, bool) or not isinstance(amount, int | float) or amount < 0:
                raise ValueError(f"custom resource {label!r} must be a number >= 0, got {amount!r}")


class FleetBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    async def start(self, index: int) -> ReplicaHandle:
        """Launch replica `index` (returns at once; it may still be loading). Raises when it
        cannot even be launched; the supervisor retries with backoff."""

    @abc.abstractmethod
    async def wait_ready(self, handle: ReplicaHandle, timeout_s: float) -> bool:
        """True once it answers `/health` with 200; False if it exited or timed out."""

    @abc.abstractmethod
    async def wait_exit(self, handle: ReplicaHandle) -> int | None:
        """Returns its exit code once it is gone."""

    @abc.abstractmethod
    async def stop(self, handle: ReplicaHandle, grace_s: float) -> None:
        """Ask it to drain and exit; force it after `grace_s`."""


# Backends by name, imported on first use.
FLEET_BACKENDS: Registry[type[FleetBackend]] = Registry(
    "fleet backend",
    {
        "local": "fleetserve.fleet.local:LocalBackend",
        "ray": "fleetserve.fleet.ray_backend:RayBackend",  # pip install fleetserve[ray]
    },
)
