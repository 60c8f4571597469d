"""The Helm chart: `helm lint --strict`, `helm template` through Kubernetes' JSON schemas (strict:
unknown fields are errors), the ServiceMonitor through prometheus-operator's types, and the
rendered pgproxy.toml through pgproxy's own configuration checks. No cluster is needed; the
integration test runs pgproxy with the rendered configuration and secrets."""

from __future__ import annotations

import copy
import json
import re
import tomllib

import kubernetes_validate
import pytest

import pgproxy
from pgproxy.config import parse_config
from tests.support.helm import (CHART, FULL_VALUES, ROOT, container, helm, one, pod_spec, render, rendered_config,
                                template, validate_service_monitors)

# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and newer ones.
KUBERNETES_VERSIONS = ["1.25", "1.30", "1.33"]


@pytest.fixture(scope="module")
def default_manifests():
    return render()


@pytest.fixture(scope="module")
def full_manifests():
    return render(FULL_VALUES)


def test_chart_lints_clean_with_default_and_full_values():
    for args in ([], ["-f", str(FULL_VALUES)]):
        result = helm("lint", "--strict", str(CHART), *args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 chart(s) failed" in result.stdout
        assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


def test_chart_version_follows_pgproxy():
    chart = (CHART / "Chart.yaml").read_text()
    assert f'appVersion: "{pgproxy.__version__}"' in chart


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(default_manifests, full_manifests, version):
    kinds = set()
    for manifest in default_manifests + full_manifests:
        kinds.add(manifest["kind"])
        if manifest["kind"] == "ServiceMonitor":
            continue  # a CRD: test_service_monitor_matches_prometheus_operator
        kubernetes_validate.validate(manifest, version, strict=True)
    assert kinds == {"ConfigMap", "Secret", "ServiceAccount", "Service", "Deployment", "PodDisruptionBudget",
                     "HorizontalPodAutoscaler", "ServiceMonitor"}


@pytest.mark.parametrize("mistake", ["misspelled field", "string for an integer", "missing required field"])
def test_schema_validation_catches_mistakes(full_manifests, mistake):
    deployment = copy.deepcopy(one(full_manifests, "Deployment"))
    spec = deployment["spec"]["template"]["spec"]
    if mistake == "misspelled field":
        spec["containers"][0]["readinesProbe"] = spec["containers"][0].pop("readinessProbe")
    elif mistake == "string for an integer":
        spec["terminationGracePeriodSeconds"] = str(spec["terminationGracePeriodSeconds"])
    else:
        del spec["containers"][0]["ports"][0]["containerPort"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_service_monitor_matches_prometheus_operator(default_manifests, full_manifests):
    assert not [m for m in default_manifests if m["kind"] == "ServiceMonitor"]  # off unless asked for
    monitor = one(full_manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["port"] = 9187  # a port name is a string
    del broken["spec"]["selector"]
    good, bad = validate_service_monitors([monitor, broken])
    assert good == {"ok": True}
    assert not bad["ok"] and "selector" in bad["error"] and "port" in bad["error"]
    # It scrapes the Service's http port, whose pods serve /metrics there.
    endpoint, = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert monitor["spec"]["selector"]["matchLabels"] == one(full_manifests, "Service")["spec"]["selector"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def _config(manifests):
    text = rendered_config(manifests)
    return text, tomllib.loads(text)


def test_rendered_configuration_passes_pgproxys_checks(default_manifests, full_manifests):
    for manifests in (default_manifests, full_manifests):
        _, table = _config(manifests)
        parse_config(table)  # raises ConfigError naming every bad key


def test_a_default_table_is_removed_with_null():
    ldap = {"urls": ["ldaps://ldap.example.com"], "user_dn_template": "uid={username},ou=people,dc=example,dc=com"}
    manifests = render({"config": {"auth": {"jwt": None, "ldap": ldap}}, "secrets": {"backendPassword": "pw"}})
    _, table = _config(manifests)
    assert "jwt" not in table["auth"] and table["auth"]["ldap"] == ldap
    cfg = parse_config(table)
    assert cfg.auth.jwt is None and cfg.auth.ldap.urls == ldap["urls"]


def test_whole_numbers_are_toml_integers(full_manifests):
    text, table = _config(full_manifests)
    assert table["backend"]["pool_size"] == 15 and type(table["backend"]["pool_size"]) is int
    assert table["server"]["workers"] == 2 and "workers = 2\n" in text
    assert table["backend"]["lifetime_s"] == 1800.5 and table["server"]["shutdown_timeout_s"] == 12.5
    assert table["policies"][0]["statement_timeout_ms"] == 60000  # inside an array of tables too
    assert ".0\n" not in re.sub(r"\d+\.\d*[1-9]\d*\n", "", text), text
    cfg = parse_config(table)
    assert (cfg.backend.pool_size, cfg.server.workers, cfg.backend.lifetime_s) == (15, 2, 1800.5)


def test_chart_owned_keys(full_manifests):
    _, table = _config(full_manifests)
    assert table["server"]["listen"] == ["0.0.0.0:6432", "0.0.0.0:6433"]
    assert table["http"]["listen"] == "0.0.0.0:9187"
    assert table["audit"]["file"] == "/var/lib/pgproxy/audit.jsonl"
    assert (table["server"]["tls_cert_file"], table["server"]["tls_key_file"]) == \
        ("/run/pgproxy/tls/tls.crt", "/run/pgproxy/tls/tls.key")
    assert table["control"]["database"] == "pgproxy" and table["control"]["max_staleness_s"] == 30


def test_every_secret_file_the_config_names_is_mounted(full_manifests):
    _, table = _config(full_manifests)
    named = {}

    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{path}{key}.")
            elif isinstance(value, str) and value.startswith("/run/pgproxy/secrets/"):
                named[f"{path}{key}"] = value.rsplit("/", 1)[1]
    walk(table, "")
    assert named == {
        "backend.password_file": "backend-password", "http.admin_token_file": "admin-token",
        "identity.signing_key_file": "identity-signing-key", "auth.jwt.shared_secret_file": "jwt-shared-secret",
        "auth.ldap.bind_password_file": "ldap-bind-password", "audit.signing_key_file": "audit-signing-key.pem",
        "control.password_file": "control-password", "control.peer_secret_file": "control-peer-secret"}
    spec = pod_spec(full_manifests)
    source = next(v for v in spec["volumes"] if v["name"] == "secret-source")["secret"]
    assert sorted(item["key"] for item in source["items"]) == sorted(named.values())
    assert source["secretName"] == one(full_manifests, "Secret")["metadata"]["name"]
    assert sorted(one(full_manifests, "Secret")["data"]) == sorted(named.values())
    # The init container copies them where the pgproxy container (only) mounts them.
    init = container(full_manifests, "secrets")
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]} == \
        {"secret-source": "/run/pgproxy/secret-source", "secrets": "/run/pgproxy/secrets"}
    mounts = {m["name"]: m for m in container(full_manifests)["volumeMounts"]}
    assert mounts["secrets"]["mountPath"] == "/run/pgproxy/secrets" and mounts["secrets"]["readOnly"]
    assert "secret-source" not in mounts
    assert next(v for v in spec["volumes"] if v["name"] == "secrets")["emptyDir"]["medium"] == "Memory"


def test_without_secrets_nothing_is_mounted(default_manifests):
    _, table = _config(default_manifests)
    assert "password_file" not in table["backend"] and "identity" not in table
    assert not [m for m in default_manifests if m["kind"] == "Secret"]
    spec = pod_spec(default_manifests)
    assert "initContainers" not in spec
    assert {v["name"] for v in spec["volumes"]} == {"config", "data", "tmp"}


def test_an_existing_secret_is_used_by_its_keys():
    manifests = render({"secrets": {"existingSecret": "pgproxy-credentials",
                                    "existingSecretKeys": ["backend-password", "admin-token"]}})
    assert not [m for m in manifests if m["kind"] == "Secret"]
    _, table = _config(manifests)
    assert table["backend"]["password_file"] == "/run/pgproxy/secrets/backend-password"
    assert table["http"]["admin_token_file"] == "/run/pgproxy/secrets/admin-token"
    source = next(v for v in pod_spec(manifests)["volumes"] if v["name"] == "secret-source")["secret"]
    assert source["secretName"] == "pgproxy-credentials"
    assert [i["key"] for i in source["items"]] == ["admin-token", "backend-password"]
    assert "checksum/secret" not in one(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"]


def test_the_container_runs_what_the_dockerfile_runs(default_manifests):
    dockerfile = (ROOT / "Dockerfile").read_text()
    main = container(default_manifests)
    assert "RUN python -m venv /opt/pgproxy" in dockerfile and 'ENTRYPOINT ["pgproxy"]' in dockerfile
    assert "ENV PATH=/opt/pgproxy/bin:$PATH" in dockerfile
    assert main["command"] == ["/opt/pgproxy/bin/pgproxy"]
    assert 'CMD ["serve", "-c", "/etc/pgproxy/pgproxy.toml"]' in dockerfile
    assert main["args"] == ["serve", "-c", "/etc/pgproxy/pgproxy.toml"]
    config_mount = next(m for m in main["volumeMounts"] if m["name"] == "config")
    assert config_mount["mountPath"] == "/etc/pgproxy" and "install -d -m 0755 /etc/pgproxy" in dockerfile
    uid = int(re.search(r"^USER (\d+)$", dockerfile, re.M)[1])
    assert pod_spec(default_manifests)["securityContext"]["runAsUser"] == uid
    assert "/var/lib/pgproxy" in dockerfile
    assert next(m for m in main["volumeMounts"] if m["name"] == "data")["mountPath"] == "/var/lib/pgproxy"


def test_probes_and_ports_are_pgproxys(default_manifests):
    _, table = _config(default_manifests)
    main = container(default_manifests)
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"postgres": 6432, "http": 9187}
    assert table["server"]["listen"] == [f"0.0.0.0:{ports['postgres']}"]
    assert table["http"]["listen"] == f"0.0.0.0:{ports['http']}"
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    service = one(default_manifests, "Service")
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == \
        {("postgres", 6432, "postgres"), ("http", 9187, "http")}
    assert service["spec"]["selector"] == one(default_manifests, "Deployment")["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("shutdown, grace", [(None, 5 + 30 + 10), (45, 5 + 45 + 10), (12.5, 5 + 13 + 10)])
def test_termination_grace_covers_shutdown_timeout(shutdown, grace):
    values = {} if shutdown is None else {"config": {"server": {"shutdown_timeout_s": shutdown}}}
    manifests = render(values)
    spec = pod_spec(manifests)
    assert spec["terminationGracePeriodSeconds"] == grace
    assert container(manifests)["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    _, table = _config(manifests)
    assert table["server"]["shutdown_timeout_s"] == (30 if shutdown is None else shutdown)


def test_pods_run_unprivileged_on_a_read_only_root(full_manifests):
    spec = pod_spec(full_manifests)
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert one(full_manifests, "ServiceAccount")["automountServiceAccountToken"] is False
    for c in spec["containers"] + spec["initContainers"]:
        context = c["securityContext"]
        assert context["readOnlyRootFilesystem"] and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"] and c["resources"]["limits"]
    # What pgproxy writes is on volumes: the audit directory and /tmp.
    writable = {m["mountPath"] for m in container(full_manifests)["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/var/lib/pgproxy", "/tmp"}


def test_several_replicas_and_autoscaling(default_manifests, full_manifests):
    deployment = one(default_manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert one(default_manifests, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert not [m for m in default_manifests if m["kind"] == "HorizontalPodAutoscaler"]
    spread, = pod_spec(default_manifests)["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    # With autoscaling the HPA owns the replica count.
    assert "replicas" not in one(full_manifests, "Deployment")["spec"]
    hpa = one(full_manifests, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": one(full_manifests, "Deployment")["metadata"]["name"]}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)


def test_a_config_change_rolls_the_pods():
    def checksum(values):
        return one(render(values), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert checksum({}) == checksum({}) != checksum({"config": {"backend": {"pool_size": 7}}})


@pytest.mark.parametrize("values, message", [
    ({"replicas": 3}, "replicas"),  # values.schema.json: no such value (replicaCount)
    ({"ports": {"clients": 70000}}, "clients"),
    ({"secrets": {"adminToken": "short"}}, "adminToken"),
    ({"config": {"server": {"listen": ["0.0.0.0:5432"]}}}, "config.server.listen: set by the chart"),
    ({"config": {"audit": {"file": "/tmp/audit.jsonl"}}}, "config.audit.file: set by the chart"),
    ({"config": {"control": {"database": "x"}}}, "config.control: set by the chart"),
    ({"auditVolume": {"existingClaim": "audit"}}, "existingClaim needs replicaCount 1"),
    ({"replicaCount": 1, "autoscaling": {"enabled": True}, "auditVolume": {"existingClaim": "audit"}},
     "existingClaim needs replicaCount 1 and no autoscaling"),
    ({"secrets": {"jwtSharedSecret": "s"}, "config": {"auth": {"jwt": None, "ldap": {"urls": ["ldap://x"]}}}},
     "jwt-shared-secret is set but config.auth.jwt is not configured"),
    ({"secrets": {"controlPassword": "s"}}, "control-password is set but control.enabled"),
    ({"secrets": {"backendPassword": "s"}, "config": {"backend": {"password_env": "PW"}}},
     "config.backend.password_env: the secret backend-password sets backend.password_file"),
    ({"secrets": {"existingSecret": "x", "existingSecretKeys": ["admin_token"]}},
     'unknown key "admin_token"'),
])
def test_mistakes_in_values_are_refused(values, message):
    result = template(values)
    assert result.returncode != 0, result.stdout
    assert message in result.stderr, result.stderr


def test_a_persistent_audit_volume_is_allowed_for_one_replica():
    manifests = render({"replicaCount": 1, "auditVolume": {"existingClaim": "pgproxy-audit"}})
    assert next(v for v in pod_spec(manifests)["volumes"] if v["name"] == "data") == \
        {"name": "data", "persistentVolumeClaim": {"claimName": "pgproxy-audit"}}
    assert next(v for v in pod_spec(render())["volumes"] if v["name"] == "data") == \
        {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}}


def test_notes_tell_the_connection_budget():
    result = helm("install", "db", str(CHART), "--dry-run=client", "--namespace", "data",
                  "-f", str(FULL_VALUES), check=True)
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "db-pgproxy.data.svc:6432" in notes
    assert "5 pods x 2 workers x 15 connections = 150 backend connections" in notes
    assert "No tls.secretName" not in notes  # the full values configure TLS
    result = helm("install", "db", str(CHART), "--dry-run=client", "--namespace", "data", check=True)
    assert "No tls.secretName" in result.stdout and "control.enabled is false" in result.stdout


def test_values_and_their_schema_name_the_same_keys():
    """values.schema.json refuses unknown top-level keys: it must know every real one."""
    top = {line.split(":")[0] for line in (CHART / "values.yaml").read_text().splitlines()
           if re.match(r"^[a-zA-Z]", line)}
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert top == set(schema["properties"])
