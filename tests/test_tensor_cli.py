"""`fleetserve serve MODEL` picks tensor serving from the file, drains on SIGTERM like the LLM
replica, and exits non-zero naming `--trust-pickle` for a pickled model."""

from __future__ import annotations

import signal
import threading

import httpx
import torch
from gateway_harness import wait_until
from tensor_models import tiny_net

from fleetserve.testing.launcher import ReplicaProcess

# Holds each answer after the model ran, so that the test's SIGTERM finds it in flight.
SLOW_HANDLER = """
import time

def postprocess(outputs):
    time.sleep(1.5)
    return [o.tolist() for o in outputs]
"""


def test_serve_a_torchscript_file_then_sigterm_drains(tmp_path):
    torch.jit.save(torch.jit.script(tiny_net()), tmp_path / "net.pt")
    handler = tmp_path / "slow.py"
    handler.write_text(SLOW_HANDLER)
    replica = ReplicaProcess(
        tmp_path / "net.pt", "--handler", str(handler), log_path=tmp_path / "log"
    )
    try:
        replica.wait_ready(120)
        url = replica.url
        assert "ready: net at" in (replica.ready_line or "")  # net.pt serves as "net"
        assert "/predict" in replica.ready_line
        assert httpx.get(url + "/health").json() == {"status": "ok", "task": "tensor"}
        answers: list[httpx.Response] = []
        slow = threading.Thread(
            target=lambda: answers.append(
                httpx.post(url + "/predict", json={"inputs": [[1, 2, 3, 4]]}, timeout=30)
            )
        )
        slow.start()
        wait_until(lambda: "fleetserve:num_requests" in httpx.get(url + "/metrics").text)
        wait_until(lambda: _in_flight(url) == 0, what="the request reached postprocess")
        replica.signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(url + "/health").status_code == 503, what="draining")
        refused = httpx.post(url + "/predict", json={"inputs": [[1, 2, 3, 4]]})
        assert refused.status_code == 503 and "shutting down" in refused.text
        slow.join(30)
        assert answers and answers[0].status_code == 200
        assert len(answers[0].json()["outputs"][0]) == 3
        assert replica.wait(30) == 0
    finally:
        replica.stop()


def _in_flight(url: str) -> float:
    """Requests waiting or in a batch: 0 once the slow one is past the model."""
    text = httpx.get(url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("fleetserve:num_requests_running", "fleetserve:num_requests_waiting")):
            total += float(line.split()[-1])
    ok = [line for line in text.splitlines() if line.startswith("fleetserve:batch_size_count")]
    return total if ok and float(ok[0].split()[-1]) >= 1 else 1.0


def test_a_pickled_model_without_the_flag_exits_naming_it(tmp_path):
    torch.save(tiny_net(), tmp_path / "whole.pt")
    replica = ReplicaProcess(tmp_path / "whole.pt", log_path=tmp_path / "log")
    try:
        assert replica.wait(120) == 1
        assert "--trust-pickle" in replica.log()
    finally:
        replica.stop()
