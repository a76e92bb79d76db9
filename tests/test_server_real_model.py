"""The README's promise: `fleetserve serve` with no model argument serves SmolLM2-135M-Instruct,
and it knows the capital of France."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from fleetserve.testing.launcher import ReplicaProcess

DEFAULT_NAME = "SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_default_model_knows_paris(smollm2_gguf, tmp_path):
    assert smollm2_gguf.exists()
    # No MODEL argument: the default. Small KV cache and one thread keep the test quick.
    replica = ReplicaProcess(
        None, "--num-threads", "1", "--kv-cache-memory", "256MiB", log_path=tmp_path / "log"
    )
    try:
        replica.wait_ready(timeout=300)
        assert f"ready: {DEFAULT_NAME} at " in replica.ready_line
        client = openai.OpenAI(base_url=replica.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == [DEFAULT_NAME]
        answer = client.chat.completions.create(
            model=DEFAULT_NAME,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=32,
        )
        assert "Paris" in answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop"
        check_readme_examples(replica.url)
    finally:
        assert replica.stop() == 0, replica.log()[-3000:]


def check_readme_examples(url: str) -> None:
    """The README's curl and SDK examples work as written (on this replica's port)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    examples = re.findall(r"```(sh|python)\n(.*?)```", readme, re.DOTALL)
    blocks: dict[str, str] = {}
    for kind, code in examples:  # the first of each kind: the README's opening examples
        if "127.0.0.1:8000/v1" in code:
            blocks.setdefault(kind, code)
    assert set(blocks) == {"sh", "python"}
    port = url.rsplit(":", 1)[1]
    sdk = subprocess.run(
        [sys.executable, "-c", blocks["python"].replace("8000", port)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "Paris" in sdk.stdout
    if shutil.which("curl"):
        curl = subprocess.run(
            blocks["sh"].replace("8000", port), shell=True, capture_output=True, text=True,
            timeout=120, check=True,
        )  # fmt: skip
        assert "Paris" in curl.stdout
