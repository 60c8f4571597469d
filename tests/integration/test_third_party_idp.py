"""Tokens from an OIDC provider nobody on the team wrote (oauth2-mock-server, from npm):
discovery, JWKS and token format are theirs."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import psycopg
import pytest

from tests.support.wire import login_error

OIDC_DIR = Path(__file__).resolve().parents[1] / "oidc"


@pytest.fixture(scope="module")
def third_party_idp():
    if not (OIDC_DIR / "node_modules" / "oauth2-mock-server").exists():
        pytest.fail("run `npm ci --prefix tests/oidc` first (.ci/run does)")
    process = subprocess.Popen([shutil.which("node") or "node", str(OIDC_DIR / "server.mjs")],
                               stdout=subprocess.PIPE, text=True)
    issuer = json.loads(process.stdout.readline())["issuer"]
    yield issuer
    process.terminate()
    process.wait(10)
    process.stdout.close()


def _token(issuer: str, user: str, groups: str, audience: str = "pgproxy") -> str:
    data = urllib.parse.urlencode({"grant_type": "client_credentials", "scope": "openid", "pg_user": user,
                                   "pg_groups": groups, "audience": audience}).encode()
    with urllib.request.urlopen(f"{issuer}/token", data=data, timeout=10) as response:
        return json.loads(response.read())["access_token"]


def test_tokens_from_a_third_party_provider_are_accepted(make_proxy, third_party_idp):
    proxy = make_proxy(auth={"jwt": {"issuer": third_party_idp}})  # keys found by OIDC discovery
    with psycopg.connect(proxy.dsn("alice"), password=_token(third_party_idp, "alice", "sales_emea")) as conn:
        assert conn.execute("SELECT current_user, current_setting('pgproxy.user')").fetchone() == ("emea_analyst", "alice")
        assert [r[0] for r in conn.execute("SELECT region FROM orders")] == ["EMEA"] * 3
    error = login_error(proxy.port, "alice", _token(third_party_idp, "alice", "sales_emea", audience="other"))
    assert error["C"] == "28P01"
    assert "InvalidAudienceError" in proxy.log()
