"""The README's first command: `pgproxy demo` prints commands that work as printed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from pgproxy.pgcluster import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_demo_prints_working_commands_and_cleans_up(tmp_path):
    port = free_port()
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}  # where dev-token finds the demo
    demo = subprocess.Popen([sys.executable, "-m", "pgproxy", "demo", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while "Press Ctrl-C" not in "".join(lines):
            assert time.monotonic() < deadline and demo.poll() is None, "".join(lines)
            lines.append(demo.stdout.readline())
        commands = [line.strip() for line in lines if line.strip().startswith("PGPASSWORD=")]
        assert len(commands) == 3
        run_env = {**env, "PSQLRC": "/dev/null"}  # the commands exactly as printed
        outputs = [subprocess.run(["bash", "-c", c + " -A -t"], capture_output=True, text=True, env=run_env,
                                  timeout=30, cwd=ROOT) for c in commands]
        for out in outputs:
            assert out.returncode == 0, out.stderr
        alice_rows, bob_rows, whoami = (o.stdout.split() for o in outputs)
        assert len(alice_rows) == 3 and all("|EMEA|" in r for r in alice_rows)
        assert len(bob_rows) == 2 and all("|AMER|" in r for r in bob_rows)
        assert whoami == ["emea_analyst|alice"]
        audit_path = re.search(r"tail -f (\S+)", "".join(lines)).group(1)
        assert '"user": "alice"' in Path(audit_path).read_text()
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(30)
        demo.stdout.close()
        demo.stderr.close()
    assert demo.returncode == 0
    assert not Path(audit_path).parent.exists(), "the demo's temporary data was not removed"
