"""The chart's pod, short of a cluster: the volumes the rendered Deployment mounts are laid out
under a directory as the kubelet would (ConfigMap and Secret files with their modes, emptyDirs),
the init container's own script copies the secrets, and pgproxy runs the rendered
pgproxy.toml against the test PostgreSQL, its paths moved under that directory and its
listeners onto free loopback ports. The Deployment's probes, a login, the admin command that
NOTES.txt gives, the audit file on the data volume and a SIGTERM stop within the grace period
are then checked the way Kubernetes and a person would."""

from __future__ import annotations

import base64
import secrets
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from pgproxy.demo import POOL_ROLE
from pgproxy.pgcluster import free_port
from tests.support.helm import container, one, pod_spec, render
from tests.support.ops import http_get
from tests.support.proxy import wait_for_port

ADMIN_TOKEN = "chart-admin-token-0123456789"
# The roots the chart mounts volumes below (templates/_helpers.tpl).
POD_ROOTS = ("/etc/pgproxy", "/run/pgproxy", "/var/lib/pgproxy")


class Pod:
    """The rendered pod's files under ``root``: every path the chart uses, moved."""

    def __init__(self, manifests: list[dict], root: Path) -> None:
        self.manifests, self.root = manifests, root
        self.spec = pod_spec(manifests)
        self.volumes = {v["name"]: v for v in self.spec["volumes"]}

    def path(self, inside: str) -> Path:
        assert inside.startswith(POD_ROOTS), inside
        return self.root / inside.lstrip("/")

    def moved(self, text: str) -> str:
        for prefix in POD_ROOTS:
            text = text.replace(prefix + "/", f"{self.root}{prefix}/").replace(f'"{prefix}"', f'"{self.root}{prefix}"')
        return text

    def mount(self, container_spec: dict) -> None:
        """What the kubelet does for this container's volumeMounts (the kinds the chart uses)."""
        for mount in container_spec["volumeMounts"]:
            if mount["mountPath"] == "/tmp":
                continue  # the machine's /tmp stands in for the pod's
            target = self.path(mount["mountPath"])
            volume = self.volumes[mount["name"]]
            target.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                data = one(self.manifests, "ConfigMap")["data"]
                for key, text in data.items():
                    (target / key).write_text(text)
                    (target / key).chmod(volume["configMap"].get("defaultMode", 0o644))
            elif "secret" in volume:
                secret = one(self.manifests, "Secret")
                assert volume["secret"]["secretName"] == secret["metadata"]["name"]
                for item in volume["secret"]["items"]:
                    file = target / item["path"]
                    file.write_bytes(base64.b64decode(secret["data"][item["key"]]))
                    file.chmod(volume["secret"]["defaultMode"])
            else:
                assert "emptyDir" in volume, volume


@pytest.fixture
def pod(database, issuer, tmp_path):
    values = {
        "config": {
            "backend": {"host": database.host, "port": database.port, "user": POOL_ROLE, "pool_size": 4},
            "auth": {"jwt": {"issuer": issuer.url, "audience": "pgproxy", "jwks_refresh_min_interval_s": 0.5}},
            "roles": [{"group": "sales_emea", "role": "emea_analyst"}],
            "server": {"shutdown_timeout_s": 3},
        },
        "secrets": {"backendPassword": database.pool_password, "adminToken": ADMIN_TOKEN,
                    "identitySigningKey": secrets.token_hex(32)},
    }
    return Pod(render(values), tmp_path / "pod")


def run_init_container(pod: Pod) -> None:
    init = container(pod.manifests, "secrets")
    pod.mount(init)
    command = [pod.moved(part) for part in init["command"]]
    assert command[:2] == ["/bin/sh", "-c"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def start_pgproxy(pod: Pod) -> tuple[subprocess.Popen, dict[int, int], Path]:
    """pgproxy as the container runs it; returns the process, container port -> local port, and
    the configuration file it reads."""
    main = container(pod.manifests)
    pod.mount(main)
    ports = {p["containerPort"]: free_port() for p in main["ports"]}
    config = pod.path(main["args"][2])
    text = pod.moved(config.read_text())
    for inside, local in ports.items():
        text = text.replace(f'"0.0.0.0:{inside}"', f'"127.0.0.1:{local}"')
    config.write_text(text)
    assert main["command"][0].endswith("/pgproxy") and main["args"][:2] == ["serve", "-c"]
    log = open(pod.root / "pgproxy.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "pgproxy", *main["args"][:2], str(config)],
                               stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return process, ports, config


def port_of(pod: Pod, name: str) -> int:
    return next(p["containerPort"] for p in container(pod.manifests)["ports"] if p["name"] == name)


def test_pod_serves_with_the_rendered_config_and_secrets(pod, issuer):
    run_init_container(pod)
    copied = pod.path("/run/pgproxy/secrets")
    for item in pod.volumes["secret-source"]["secret"]["items"]:
        source, target = pod.path("/run/pgproxy/secret-source") / item["path"], copied / item["path"]
        assert stat.S_IMODE(source.stat().st_mode) == 0o440  # as the Secret volume has them
        assert stat.S_IMODE(target.stat().st_mode) == 0o600 and target.read_bytes() == source.read_bytes()

    process, ports, config = start_pgproxy(pod)
    log = pod.root / "pgproxy.log"
    try:
        wait_for_port(ports[port_of(pod, "postgres")], process)
        main = container(pod.manifests)
        probes = {kind: main[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
        for probe in probes.values():
            assert probe["port"] == "http"
        http = ports[port_of(pod, "http")]
        wait_for_port(http, process)  # the operations port may open just after the clients' port
        assert http_get(http, probes["livenessProbe"]["path"]) == (200, b"ok\n")
        deadline = time.monotonic() + 20  # the IdP's keys and a PostgreSQL login with the mounted password
        while (status := http_get(http, probes["readinessProbe"]["path"]))[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status[0] == 200, status

        token = issuer.mint("alice", ["sales_emea"])
        with psycopg.connect(host="127.0.0.1", port=ports[port_of(pod, "postgres")], user="alice",
                             password=token, dbname="demo", connect_timeout=10) as conn:
            row = conn.execute("SELECT current_user, current_setting('pgproxy.user'), "
                               "current_setting('pgproxy.signature', true)").fetchone()
            assert row[:2] == ("emea_analyst", "alice")
            assert row[2], "identity.signing_key_file from the Secret signs the settings"
            # NOTES.txt: kubectl exec ... pgproxy admin -c /etc/pgproxy/pgproxy.toml sessions
            admin = subprocess.run([sys.executable, "-m", "pgproxy", "admin", "-c", str(config), "sessions", "--json"],
                                   capture_output=True, text=True, timeout=30)
            assert admin.returncode == 0, admin.stderr
            assert '"user": "alice"' in admin.stdout
        audit = pod.path("/var/lib/pgproxy/audit.jsonl")
        deadline = time.monotonic() + 5
        while '"alice"' not in (audit.read_text() if audit.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert '"alice"' in audit.read_text()
        assert ADMIN_TOKEN not in log.read_text() and token not in log.read_text()

        # The kubelet's stop: SIGTERM after the preStop pause, SIGKILL at the grace period's end.
        grace = pod.spec["terminationGracePeriodSeconds"]
        pause = int(main["lifecycle"]["preStop"]["exec"]["command"][1])
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(grace - pause) == 0, log.read_text()[-2000:]
        assert time.monotonic() - started < grace - pause
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_without_the_init_containers_copy_pgproxy_refuses_the_keys(pod):
    """Why the init container exists: the Secret volume's files are group-readable (0440, and
    root's in a cluster), and pgproxy refuses key files like that."""
    pod.mount(container(pod.manifests, "secrets"))  # the Secret volume only, no copy
    config = pod.path("/etc/pgproxy/pgproxy.toml")
    pod.mount(container(pod.manifests))
    text = pod.moved(config.read_text()).replace("/run/pgproxy/secrets/", "/run/pgproxy/secret-source/")
    config.write_text(text)
    result = subprocess.run([sys.executable, "-m", "pgproxy", "check-config", "-c", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "identity.signing_key_file" in result.stderr and "group or others" in result.stderr
