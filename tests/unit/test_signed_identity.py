"""The signing of identity settings: the key file, the signature, the install SQL, config and CLI."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat

import pytest

from pgproxy import signed_identity as si
from pgproxy.cli import main
from pgproxy.config import ConfigError, parse_config
from tests.support.proxy import to_toml

MINIMAL = {"backend": {"user": "pool"}, "auth": {"jwt": {"issuer": "https://idp", "audience": "pgproxy"}},
           "audit": {"file": "/tmp/audit.jsonl"}}


def _key_file(tmp_path, content: str, mode: int = 0o600):
    path = tmp_path / "identity.key"
    path.write_text(content)
    path.chmod(mode)
    return path


def test_the_signature_is_hmac_sha256_over_the_fields_and_the_pid():
    key = si.generate_key()
    expected = hmac.new(key, 'alice\x1f{"sales","staff"}\x1fjwt\x1f4711'.encode(), hashlib.sha256).hexdigest()
    assert si.sign(key, "alice", '{"sales","staff"}', "jwt", 4711) == expected
    assert expected == expected.lower() and len(expected) == 64


def test_every_field_changes_the_signature():
    key = si.generate_key()
    base = si.sign(key, "alice", "{}", "jwt", 100)
    variants = [si.sign(key, "bob", "{}", "jwt", 100), si.sign(key, "alice", '{"x"}', "jwt", 100),
                si.sign(key, "alice", "{}", "ldap", 100), si.sign(key, "alice", "{}", "jwt", 101),
                si.sign(si.generate_key(), "alice", "{}", "jwt", 100)]
    assert base not in variants and len(set(variants)) == len(variants)


def test_non_ascii_fields_are_signed_as_utf8():
    key = si.generate_key()
    assert si.sign(key, "jürgen", '{"ventes é"}', "ldap", 7) == hmac.new(
        key, 'jürgen\x1f{"ventes é"}\x1fldap\x1f7'.encode("utf-8"), hashlib.sha256).hexdigest()


@pytest.mark.parametrize("fields", [("al\x1fice", "{}", "jwt"), ("alice", '{"a\x1fb"}', "jwt"),
                                    ("alice", "{}", "jwt\x1f")])
def test_a_field_holding_the_separator_is_not_signed(fields):
    # Else "a\x1fb", "c" and "a", "b\x1fc" would share one signature.
    with pytest.raises(ValueError, match="separator"):
        si.sign(si.generate_key(), *fields, 1)


def test_the_padded_keys_give_the_same_hmac_as_the_library():
    # The SQL computes sha256(outer || sha256(inner || message)) from these two pads.
    key = si.generate_key()
    inner, outer = si.pads(key)
    assert len(inner) == len(outer) == 64
    msg = si.message("alice", '{"a"}', "jwt", 12345)
    by_pads = hashlib.sha256(outer + hashlib.sha256(inner + msg).digest()).digest()
    assert by_pads == hmac.new(key, msg, hashlib.sha256).digest()


def test_generated_keys_are_32_random_bytes():
    keys = {si.generate_key() for _ in range(8)}
    assert len(keys) == 8 and all(len(k) == 32 for k in keys)


def test_a_key_file_round_trips(tmp_path):
    key = si.generate_key()
    assert si.load_key(_key_file(tmp_path, si.encode_key(key))) == key


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660])
def test_a_key_file_others_may_read_is_refused(tmp_path, mode):
    path = _key_file(tmp_path, si.encode_key(si.generate_key()), mode)
    with pytest.raises(si.KeyFileError) as info:
        si.load_key(path)
    assert str(path) in str(info.value) and f"{mode:04o}" in str(info.value) and "chmod 600" in str(info.value)


@pytest.mark.parametrize("content", ["", "not hex at all", "ab" * 31, "ab" * 33, "zz" * 32])
def test_a_key_file_without_32_hex_bytes_is_refused(tmp_path, content):
    path = _key_file(tmp_path, content)
    with pytest.raises(si.KeyFileError, match="32 bytes in hex") as info:
        si.load_key(path)
    assert str(path) in str(info.value)


def test_a_missing_key_file_is_refused_and_a_symlink_is_judged_by_its_target(tmp_path):
    with pytest.raises(si.KeyFileError, match="cannot read key file"):
        si.load_key(tmp_path / "absent")
    key = si.generate_key()
    real = _key_file(tmp_path, si.encode_key(key))
    link = tmp_path / "link.key"
    link.symlink_to(real)  # a symlink's own mode is 0777; the file read is what counts
    assert si.load_key(link) == key
    real.chmod(0o644)
    with pytest.raises(si.KeyFileError, match="0644"):
        si.load_key(link)
    with pytest.raises(si.KeyFileError, match="not a regular file"):
        si.load_key(tmp_path)


def test_install_sql_holds_the_pads_not_the_key_and_fixes_search_path():
    key = si.generate_key()
    sql = si.install_sql(key)
    inner, outer = si.pads(key)
    assert inner.hex() in sql and outer.hex() in sql and key.hex() not in sql
    assert sql.count("SECURITY DEFINER") == 2 and sql.count("SET search_path = pg_catalog, pg_temp") == 2
    assert "REVOKE ALL ON TABLE pgproxy.signing_key FROM PUBLIC" in sql
    assert "pgcrypto" not in sql and "hmac(" not in sql.lower()
    assert sql.lstrip().startswith("--") and sql.rstrip().endswith("COMMIT;")


def test_install_sql_quotes_the_owner():
    sql = si.install_sql(si.generate_key(), 'odd "admin"')
    assert 'OWNER TO "odd ""admin"""' in sql
    assert "SET LOCAL pgproxy.install_owner = E'odd \"admin\"';" in sql
    assert "install_owner = E'it''s \\\\ here'" in si.install_sql(si.generate_key(), "it's \\ here")
    assert "OWNER TO CURRENT_USER" in si.install_sql(si.generate_key())
    with pytest.raises(ValueError):
        si.install_sql(si.generate_key(), "")


def test_config_loads_the_key_or_names_the_file(tmp_path):
    assert parse_config(MINIMAL).identity.signing_key_file == ""
    cfg = parse_config(MINIMAL)
    cfg.resolve_secrets()
    assert cfg.identity_key is None
    key = si.generate_key()
    path = _key_file(tmp_path, si.encode_key(key))
    cfg = parse_config({**MINIMAL, "identity": {"signing_key_file": str(path)}})
    cfg.resolve_secrets()
    assert cfg.identity_key == key
    assert key.hex() not in repr(cfg)
    path.chmod(0o644)
    cfg = parse_config({**MINIMAL, "identity": {"signing_key_file": str(path)}})
    with pytest.raises(ConfigError) as info:
        cfg.resolve_secrets()
    (problem,) = info.value.problems
    assert problem.startswith("identity.signing_key_file: ") and str(path) in problem


def test_config_rejects_unknown_identity_keys():
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, "identity": {"signing_key": "x"}})
    assert "identity.signing_key: unknown key" in info.value.problems


def test_identity_key_command_writes_a_private_key_and_keeps_an_existing_one(tmp_path, capsys):
    path = tmp_path / "identity.key"
    assert main(["identity-key", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = si.load_key(path)
    assert main(["identity-key", str(path)]) == 1
    assert "--force" in capsys.readouterr().err
    assert si.load_key(path) == first
    assert main(["identity-key", str(path), "--force"]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and si.load_key(path) != first
    assert sorted(os.listdir(tmp_path)) == ["identity.key"]  # no temporary file left behind


def test_identity_sql_command_prints_the_sql_for_the_configured_key(tmp_path, capsys):
    key = si.generate_key()
    path = _key_file(tmp_path, si.encode_key(key))
    config = tmp_path / "pgproxy.toml"
    config.write_text(to_toml({**MINIMAL, "identity": {"signing_key_file": str(path)}}))
    assert main(["identity-sql", "-c", str(config), "--owner", "pgproxy_admin"]) == 0
    assert capsys.readouterr().out == si.install_sql(key, "pgproxy_admin")
    config.write_text(to_toml(MINIMAL))
    assert main(["identity-sql", "-c", str(config)]) == 1
    assert "identity.signing_key_file is not set" in capsys.readouterr().err
    path.chmod(0o644)
    config.write_text(to_toml({**MINIMAL, "identity": {"signing_key_file": str(path)}}))
    assert main(["identity-sql", "-c", str(config)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "error: identity.signing_key_file:" in captured.err
