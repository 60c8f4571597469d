"""backend.login and backend.role_secrets_file: validated choices, and role passwords read at
load from a file only its owner may read, never shown in an error or a repr."""

from __future__ import annotations

import pytest

from pgproxy.config import ConfigError, load_config, parse_config

MINIMAL = {"backend": {"user": "pool"}, "auth": {"jwt": {"issuer": "https://idp", "audience": "pgproxy"}},
           "audit": {"file": "/tmp/audit.jsonl"}}
SECRET = "Hunter2-never-shown"


def _problems(**backend) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, "backend": {"user": "pool", **backend}})
    return info.value.problems


def _config_file(tmp_path, secrets_text: str | None, mode: int = 0o600, login: str = "per_role"):
    secrets = tmp_path / "role-secrets.toml"
    if secrets_text is not None:
        secrets.write_text(secrets_text)
        secrets.chmod(mode)
    path = tmp_path / "pgproxy.toml"
    path.write_text(f'[backend]\nuser = "pool"\nlogin = "{login}"\nrole_secrets_file = "{secrets}"\n'
                    '[auth.jwt]\nissuer = "https://idp"\naudience = "a"\n[audit]\nfile = "/tmp/a"\n')
    return path


def test_login_defaults_to_pool_role_and_accepts_only_the_two_modes():
    cfg = parse_config(MINIMAL)
    assert cfg.backend.login == "pool_role" and cfg.backend.role_secrets_file == "" and cfg.role_passwords == {}
    assert parse_config({**MINIMAL, "backend": {"user": "pool", "login": "per_role"}}).backend.login == "per_role"
    assert "backend.login: must be pool_role or per_role" in _problems(login="per_user")


def test_role_secrets_need_per_role():
    assert "backend.role_secrets_file: only used with login = per_role" in _problems(role_secrets_file="/x")


def test_role_passwords_are_loaded_and_kept_out_of_repr(tmp_path):
    cfg = load_config(_config_file(tmp_path, f'emea_analyst = "{SECRET}"\n"odd role" = "x"\n'))
    assert cfg.role_passwords == {"emea_analyst": SECRET, "odd role": "x"}
    assert SECRET not in repr(cfg)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_a_secrets_file_others_may_access_is_refused(tmp_path, mode):
    with pytest.raises(ConfigError) as info:
        load_config(_config_file(tmp_path, f'emea_analyst = "{SECRET}"\n', mode=mode))
    assert info.value.problems == [f"backend.role_secrets_file: '{tmp_path / 'role-secrets.toml'}' must be "
                                   "readable by its owner only (chmod 600)"]


@pytest.mark.parametrize("text, expected", [
    (f'emea_analyst = 5\namer_analyst = ""\nok = "{SECRET}"\n',
     ["the password of role 'emea_analyst' must be a non-empty string",
      "the password of role 'amer_analyst' must be a non-empty string"]),
    (f'emea_analyst = {SECRET}\n', ["is not valid TOML"]),
    (None, ["cannot read"]),
])
def test_bad_secrets_files_name_the_role_never_the_value(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_config(_config_file(tmp_path, text))
    problems = info.value.problems
    assert len(problems) == len(expected)
    for problem, part in zip(problems, expected):
        assert problem.startswith("backend.role_secrets_file: ") and part in problem
        assert SECRET not in problem
