from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pgproxy.auth import Identity
from pgproxy.config import ConfigError, load_config, parse_config
from pgproxy.roles import map_role
from pgproxy.server import ProxyServer

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"backend": {"user": "pool"}, "auth": {"jwt": {"issuer": "https://idp", "audience": "pgproxy"}},
           "audit": {"file": "/tmp/audit.jsonl"}}


def _problems(table) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(table)
    return info.value.problems


def test_minimal_config_gets_documented_defaults():
    cfg = parse_config(MINIMAL)
    assert cfg.server.listen == ["127.0.0.1:6432"] and cfg.backend.pool_size == 20
    assert cfg.auth.jwt.algorithms == ["RS256", "PS256", "ES256", "EdDSA"]


def test_every_problem_is_reported_with_its_key_path():
    problems = _problems({"backend": {"user": 5, "pool_sise": 3}, "auth": {"jwt": {"issuer": "https://idp"}},
                          "surprise": 1})
    assert "backend.user: expected a string" in problems
    assert "backend.pool_sise: unknown key" in problems
    assert "auth.jwt.audience: required key is missing" in problems
    assert "audit: required key is missing" in problems
    assert "surprise: unknown key" in problems


@pytest.mark.parametrize("jwt_override, expected", [
    ({"algorithms": ["none"]}, "auth.jwt.algorithms[0]: 'none' is not accepted"),
    ({"algorithms": ["HS256"]}, "HS* algorithms need shared_secret_file"),
    ({"shared_secret_env": "X"}, "a shared secret is set but no HS* algorithm is listed"),
    ({"issuer": "idp.example"}, "auth.jwt.issuer: must be an http(s) URL"),
])
def test_jwt_rules(jwt_override, expected):
    table = {**MINIMAL, "auth": {"jwt": {**MINIMAL["auth"]["jwt"], **jwt_override}}}
    assert any(expected in p for p in _problems(table))


def test_type_errors_and_rule_errors_are_reported_together():
    problems = _problems({**MINIMAL, "backend": {"user": "pool", "pool_size": "20"},
                          "auth": {"jwt": {**MINIMAL["auth"]["jwt"], "algorithms": ["none"]}}})
    assert "backend.pool_size: expected an integer" in problems
    assert any(p.startswith("auth.jwt.algorithms[0]: 'none' is not accepted") for p in problems)


def test_role_rules_need_exactly_one_matcher_and_known_placeholders():
    problems = _problems({**MINIMAL, "roles": [{"role": "r"}, {"group": "g", "user": "u", "role": "r"},
                                               {"any": True, "role": "{user}"}]})
    assert "roles[0]: give exactly one of group, user or any = true" in problems
    assert "roles[1]: give exactly one of group, user or any = true" in problems
    assert "roles[2].role: the only placeholder is {username}" in problems


def test_role_mapping_first_match_wins_then_default():
    cfg = parse_config({**MINIMAL, "roles": [{"user": "carol", "role": "dba_readonly"},
                                             {"group": "sales", "role": "sales_reader"},
                                             {"group": "staff", "role": "{username}"}]})
    who = lambda user, *groups: Identity(user, user, "i", tuple(groups), "jwt")  # noqa: E731
    assert map_role(who("carol", "sales"), cfg.roles, "") == "dba_readonly"
    assert map_role(who("dave", "staff", "sales"), cfg.roles, "") == "sales_reader"
    assert map_role(who("erin", "staff"), cfg.roles, "") == "erin"
    assert map_role(who("frank", "guests"), cfg.roles, "") is None
    assert map_role(who("frank", "guests"), cfg.roles, "guest_{username}") == "guest_frank"


def test_secrets_come_from_files_or_the_environment(tmp_path, monkeypatch):
    (tmp_path / "pw").write_text("s3cret\n")
    path = tmp_path / "c.toml"
    path.write_text(f'[backend]\nuser = "pool"\npassword_file = "{tmp_path / "pw"}"\n'
                    '[auth.jwt]\nissuer = "https://idp"\naudience = "a"\n[audit]\nfile = "/tmp/a"\n')
    assert load_config(path).backend_password == "s3cret"
    path.write_text('[backend]\nuser = "pool"\npassword_env = "PGPROXY_TEST_PW"\n'
                    '[auth.jwt]\nissuer = "https://idp"\naudience = "a"\n[audit]\nfile = "/tmp/a"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == ["backend: environment variable PGPROXY_TEST_PW is not set"]
    monkeypatch.setenv("PGPROXY_TEST_PW", "from-env")
    assert load_config(path).backend_password == "from-env"


def test_check_config_cli_names_bad_keys_and_exits_1(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[backend]\nuser = "pool"\nport = "5432"\n[auth.jwt]\nissuer = "https://idp"\naudience = "a"\n'
                   '[audit]\nfile = "/tmp/a"\n')
    result = subprocess.run([sys.executable, "-m", "pgproxy", "check-config", "-c", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "error: backend.port: expected an integer" in result.stderr


def test_the_annotated_example_config_is_valid(monkeypatch):
    monkeypatch.setenv("PGPROXY_BACKEND_PASSWORD", "x")
    result = subprocess.run([sys.executable, "-m", "pgproxy", "check-config", "-c", str(ROOT / "conf/pgproxy.toml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_example_config_documents_every_option():
    import dataclasses
    import typing
    from pgproxy import config
    text = (ROOT / "conf/pgproxy.toml").read_text()
    readme = (ROOT / "README.md").read_text()
    sections, pending = [], [config.Config]
    while pending:  # every section reachable from Config, so a new one cannot be forgotten
        section = pending.pop()
        sections.append(section)
        hints = typing.get_type_hints(section)
        for fld in dataclasses.fields(section):
            inner = [a for a in typing.get_args(hints[fld.name]) if dataclasses.is_dataclass(a)]
            pending += [h for h in [hints[fld.name], *inner] if dataclasses.is_dataclass(h)]
    assert config.HttpSection in sections and config.RoleRule in sections
    for section in sections[1:]:  # Config's own fields are the sections themselves
        for fld in (f for f in dataclasses.fields(section) if f.metadata):
            assert fld.name in text, f"{section.__name__}.{fld.name} missing from conf/pgproxy.toml"
            assert f"`{fld.name}`" in readme, f"{section.__name__}.{fld.name} missing from README"


def test_workers_default_to_the_usable_cpus_and_http_is_validated():
    import os
    cfg = parse_config(MINIMAL)
    assert cfg.server.workers == min(len(os.sched_getaffinity(0)), 64)
    assert parse_config({**MINIMAL, "server": {"workers": 3}}).server.workers == 3
    problems = _problems({**MINIMAL, "server": {"workers": -1}, "http": {"listen": "nowhere",
                          "admin_token_file": "/a", "admin_token_env": "B"}})
    assert "server.workers: must be 1-64" in problems
    assert "http.listen: expected host:port (IPv6 as [addr]:port)" in problems
    assert "http: set admin_token_file or admin_token_env, not both" in problems


def test_a_short_admin_token_is_refused(tmp_path, monkeypatch):
    from pgproxy.config import ConfigError
    monkeypatch.setenv("ADMIN_TOKEN", "short")
    cfg = parse_config({**MINIMAL, "http": {"listen": "127.0.0.1:9187", "admin_token_env": "ADMIN_TOKEN"}})
    with pytest.raises(ConfigError) as info:
        cfg.resolve_secrets()
    assert info.value.problems == ["http.admin_token: use at least 16 characters"]
    assert "short" not in str(info.value)


def test_pool_modes_per_database_and_role_are_validated_and_resolved():
    table = merge_table(MINIMAL, {"backend": {"pool_mode": "statement", "database_pool_modes": {"bi": "txn"},
                                              "role_pool_modes": {"batch": 3}, "session_state": "ignore",
                                              "prepared_statements": 0}})
    problems = _problems(table)
    assert "backend.pool_mode: must be session or transaction" in problems
    assert "backend.database_pool_modes.bi: must be session or transaction" in problems
    assert "backend.role_pool_modes.batch: expected a string" in problems
    assert "backend.session_state: must be pin or refuse" in problems
    assert "backend.prepared_statements: must be at least 1" in problems
    cfg = parse_config(merge_table(MINIMAL, {"backend": {"database_pool_modes": {"bi": "transaction"},
                                                         "role_pool_modes": {"batch": "session"}}}))
    server = ProxyServer.__new__(ProxyServer)
    server.cfg = cfg
    assert server.pool_mode_for("bi", "analyst") == "transaction"
    assert server.pool_mode_for("bi", "batch") == "session"  # the role's mode wins
    assert server.pool_mode_for("other", "analyst") == "session"


def merge_table(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge_table(out.get(key, {}), value) if isinstance(value, dict) and key in out else value
    return out
