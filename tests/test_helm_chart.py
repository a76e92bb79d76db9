"""The Helm chart in deploy/helm/fleetserve: `helm lint --strict`, `helm template` for every
example values file, every rendered object valid for Kubernetes 1.33 (`kubernetes-validate
--strict`; KEDA's ScaledObject against the subset of its CRD the chart uses), and what the
objects must say: probes that fit loading and draining, a termination grace longer than the
drain, GPUs, zone spread, discovery RBAC, the autoscaler's metric, and arguments our own
command line accepts.

helm comes from `make` (deploy/install_helm.py, into .tools/bin); without it these tests
skip, except under `make test` (FLEETSERVE_REQUIRE_TOOLS=1), where a missing tool fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from fleetserve.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "fleetserve"
EXAMPLES = sorted((ROOT / "deploy" / "helm" / "examples").glob("*.yaml"))
NAMESPACE = "llm"


def helm() -> str:
    found = ROOT / ".tools" / "bin" / "helm"
    path = str(found) if found.exists() else shutil.which("helm")
    if path is None:
        if os.environ.get("FLEETSERVE_REQUIRE_TOOLS"):
            pytest.fail("helm is missing: `make test` installs it (deploy/install_helm.py)")
        pytest.skip("helm is not installed (make test installs it)")
    return path


def render(*values: Path, **sets: str) -> subprocess.CompletedProcess:
    argv = [helm(), "template", "rel", str(CHART), "--namespace", NAMESPACE]
    for v in values:
        argv += ["-f", str(v)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def objects(*values: Path, **sets: str) -> dict[tuple[str, str], dict]:
    out = render(*values, **sets)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def example(name: str) -> Path:
    return ROOT / "deploy" / "helm" / "examples" / f"{name}.yaml"


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.stem if v else "defaults")
def test_the_chart_lints_strictly(values):
    argv = [helm(), "lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    if values is not None:
        argv += ["-f", str(values)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# The fields of KEDA's ScaledObject (keda.sh/v1alpha1, KEDA >= 2.7) the chart writes; unknown
# fields are errors, as a strict apply would make them.
SCALED_OBJECT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"type": "string"},
                        "apiVersion": {"type": "string"},
                    },  # fmt: skip
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "metadata": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("values", EXAMPLES, ids=lambda v: v.stem)
def test_every_rendered_object_is_valid_for_kubernetes_1_33(values, tmp_path):
    out = render(values)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    core = [d for d in docs if d["apiVersion"] != "keda.sh/v1alpha1"]
    for d in docs:
        if d["apiVersion"] == "keda.sh/v1alpha1":
            jsonschema.validate(d, SCALED_OBJECT)
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(core))
    check = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.33", "--quiet",
         str(rendered)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


def replica_pod(objs) -> dict:
    return objs[("Deployment", "rel-fleetserve-replicas")]["spec"]["template"]["spec"]


def gateway_pod(objs) -> dict:
    return objs[("Deployment", "rel-fleetserve-gateway")]["spec"]["template"]["spec"]


def test_replica_pods_fit_loading_and_draining():
    objs = objects(example("cpu"))
    pod = replica_pod(objs)
    (c,) = pod["containers"]
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"  # alive while draining
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = int(next(a for a in c["args"] if a.startswith("--drain-timeout=")).split("=")[1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain
    assert c["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "rel-fleetserve-internal"
    spread = pod["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert pod["automountServiceAccountToken"] is False
    assert ("PodDisruptionBudget", "rel-fleetserve-replicas") in objs
    assert objs[("Deployment", "rel-fleetserve-replicas")]["spec"]["replicas"] == 2
    # what the pod runs is a command line fleetserve accepts
    build_parser(c["args"]).parse_args(c["args"])


def test_the_gateway_discovers_the_replicas_with_a_read_only_account():
    objs = objects()
    pod = gateway_pod(objs)
    args = pod["containers"][0]["args"]
    assert "--discover=kubernetes://llm/rel-fleetserve-replicas" in args
    service = objs[("Service", "rel-fleetserve-replicas")]
    assert service["spec"]["clusterIP"] == "None"  # headless: the gateway routes
    assert service["spec"]["ports"][0]["name"] == "http"  # the port name discovery reads
    role = objs[("Role", "rel-fleetserve-discovery")]
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
         "verbs": ["get", "list", "watch"]}
    ]  # fmt: skip
    assert pod["serviceAccountName"] == "rel-fleetserve-gateway"
    upstream = pod["containers"][0]["env"][0]
    assert upstream["name"] == "FLEETSERVE_UPSTREAM_API_KEY"
    assert upstream["valueFrom"]["secretKeyRef"]["name"] == "rel-fleetserve-internal"
    build_parser(args).parse_args(args)


def test_gpu_replicas_ask_for_their_gpus_and_read_the_model_from_a_volume():
    pod = replica_pod(objects(example("gpu")))
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["limits"]["memory"] == "64Gi"
    assert c["args"][1] == "/models/Llama-3.1-8B-Instruct"
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    claims = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims[0]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_keda_scales_the_replicas_on_the_desired_replicas_metric_down_to_zero():
    objs = objects(example("scale-to-zero"))
    scaled = objs[("ScaledObject", "rel-fleetserve-replicas")]["spec"]
    assert scaled["minReplicaCount"] == 0 and scaled["maxReplicaCount"] == 4
    assert scaled["scaleTargetRef"]["name"] == "rel-fleetserve-replicas"
    (trigger,) = scaled["triggers"]
    assert trigger["metricType"] == "AverageValue" and trigger["metadata"]["threshold"] == "1"
    assert "fleetserve:gateway_desired_replicas" in trigger["metadata"]["query"]
    assert "replicas" not in objs[("Deployment", "rel-fleetserve-replicas")]["spec"]
    args = gateway_pod(objs)["containers"][0]["args"]
    assert "--min-replicas=0" in args and "--scale-to-zero-grace=300" in args
    build_parser(args).parse_args(args)


def test_an_hpa_reads_the_same_metric_as_an_average_value_of_one():
    hpa = objects(example("hpa"))[("HorizontalPodAutoscaler", "rel-fleetserve-replicas")]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"]["name"] == "fleetserve_gateway_desired_replicas"
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}


@pytest.mark.parametrize(
    ("sets", "error"),
    [
        (
            {
                "autoscaling.enabled": "true",
                "autoscaling.scaler": "hpa",
                "autoscaling.minReplicas": "0",
            },
            "an HPA cannot scale to zero",
        ),  # fmt: skip
        ({"autoscaling.enabled": "true", "autoscaling.scaler": "vpa"}, "keda or hpa"),
        ({"model.source": "pvc", "model.path": "/models/m"}, "model.pvc.claimName is required"),
        ({"model.source": "image"}, "model.path is required"),
        ({"model.source": "s3"}, "model.source must be package, image or pvc"),
    ],
)
def test_bad_values_are_refused_with_what_is_wrong(sets, error):
    out = render(**sets)
    assert out.returncode != 0 and error in out.stderr
