"""Start `fleetserve serve` as a child process and wait for it (tests and benchmarks).
The replica picks a free port (--port 0) and prints its URL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from fleetserve.fleet.process import signal_group

LISTENING = "fleetserve: listening on "
READY = "fleetserve: ready: "


class ReplicaExited(RuntimeError):
    pass


def stop_process_group(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM to the process group `proc` leads (started with start_new_session=True), then
    SIGKILL to the whole group if it has not exited within `grace_s`."""
    if proc.poll() is not None:
        return
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


class ReplicaProcess:
    """`fleetserve serve MODEL --port 0 ARGS...` in a child process. Its stdout is parsed for
    the URL; its stderr (logs) goes to `log_path` for a failing test to show."""

    def __init__(
        self,
        model: str | os.PathLike | None,
        *args: str,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self._own_log = log_path is None  # a temporary file, removed after a clean stop
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="fleetserve-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "fleetserve.cli", "serve", "--port", "0", *args]
        if model is not None:  # None: the default model
            cmd.insert(4, str(model))
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            text=True,
        )
        self.url: str | None = None
        self.ready_line: str | None = None
        self._listening = threading.Event()
        self.stdout: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line)
            if line.startswith(LISTENING):
                self.url = line[len(LISTENING) :].split(";")[0].strip()
                self._listening.set()
            elif line.startswith(READY):
                self.ready_line = line
        self._listening.set()  # the process ended: stop waiting

    def wait_listening(self, timeout: float = 60.0) -> str:
        if not self._listening.wait(timeout) or self.url is None:
            raise self._failure("did not start listening")
        return self.url

    def wait_ready(self, timeout: float = 300.0) -> list[int]:
        """Poll /health until 200. Returns the statuses seen on the way (503 while loading)."""
        url = self.wait_listening(timeout)
        deadline = time.monotonic() + timeout
        seen = []
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise self._failure("exited while loading")
                try:
                    status = client.get(url + "/health").status_code
                except httpx.TransportError:
                    status = None
                if status is not None:
                    seen.append(status)
                if status == 200:
                    return seen
                time.sleep(0.05)
        raise self._failure(f"not healthy within {timeout} s")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (drain), then SIGKILL if it takes longer than `timeout`."""
        self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self._log.close()
        if self._own_log and code == 0:
            self.log_path.unlink(missing_ok=True)
        return code

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def _failure(self, what: str) -> ReplicaExited:
        tail = "\n".join(self.log().splitlines()[-40:])
        return ReplicaExited(f"replica {what} (exit code {self.proc.poll()}); log:\n{tail}")
