"""The container image and the host install stay one and the same, and the image lints clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_runtime_dependency_is_pinned_for_the_image():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {_normal(re.split(r"[<>=\[ ]", dep)[0]) for dep in project["dependencies"]}
    pins = {}
    for line in (ROOT / "conf/constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line}"
            pins[_normal(name)] = version
    assert required <= set(pins), f"unpinned: {required - set(pins)}"


def test_image_host_and_unit_use_the_same_install():
    dockerfile = (ROOT / "Dockerfile").read_text()
    unit = (ROOT / "systemd/pgproxy.service").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "python -m venv /opt/pgproxy" in dockerfile and "python3 -m venv /opt/pgproxy" in readme
    assert "/opt/pgproxy/bin/pip install" in dockerfile and "/opt/pgproxy/bin/pip install" in readme
    assert "ExecStart=/opt/pgproxy/bin/pgproxy serve -c /etc/pgproxy/pgproxy.toml" in unit
    assert 'CMD ["serve", "-c", "/etc/pgproxy/pgproxy.toml"]' in dockerfile
    assert re.search(r"^USER 10001$", dockerfile, re.M) and "HEALTHCHECK" in dockerfile
