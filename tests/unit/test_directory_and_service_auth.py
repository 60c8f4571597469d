"""Directory and service-account rules without a directory: configuration checks, the
account-state checks on an entry, and the service-account secret hashes and file."""

from __future__ import annotations

import asyncio

import pytest

from pgproxy.auth.ldap import LdapAuthenticator
from pgproxy.auth.service import hash_secret, load_accounts, secret_matches
from pgproxy.config import ConfigError, LdapSection, parse_config

BASE = {"backend": {"user": "pool"}, "audit": {"file": "/tmp/a.jsonl"}}


def _problems(ldap: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "auth": {"ldap": ldap}})
    return info.value.problems


def test_ldap_configuration_mistakes_are_named():
    assert "auth.ldap.urls[0]: must start with ldap:// or ldaps://" in _problems(
        {"urls": ["http://dc1"], "user_dn_template": "uid={username},dc=x"})
    assert any("not both" in p for p in _problems(
        {"urls": ["ldap://dc1"], "user_dn_template": "uid={username}", "search_base": "dc=x", "bind_dn": "cn=s"}))
    assert "auth.ldap: bind_dn needs bind_password_file or bind_password_env" in _problems(
        {"urls": ["ldap://dc1"], "search_base": "dc=x", "bind_dn": "cn=s"})
    assert "auth.ldap.cache_ttl_s: must be between 0 and 60" in _problems(
        {"urls": ["ldap://dc1"], "user_dn_template": "uid={username}", "cache_ttl_s": 600})
    assert "auth.ldap.deny_filter: not an LDAP filter in parentheses" in _problems(
        {"urls": ["ldap://dc1"], "user_dn_template": "uid={username}", "deny_filter": "disabled=TRUE"})
    cfg = parse_config({**BASE, "auth": {"ldap": {"urls": ["ldaps://dc1"], "user_dn_template": "uid={username}"}}})
    assert cfg.auth.ldap.cache_ttl_s == 30 and cfg.auth.jwt is None


def _authenticator() -> LdapAuthenticator:
    return LdapAuthenticator(LdapSection(urls=["ldap://127.0.0.1:1"], user_dn_template="uid={username}"), None)


@pytest.mark.parametrize("entry, refused", [
    ({"userAccountControl": [512]}, None),                         # AD: a normal account
    ({"userAccountControl": [514]}, "disabled"),                   # AD: ACCOUNTDISABLE set
    ({"pwdAccountLockedTime": ["000001010000Z"]}, "locked"),       # OpenLDAP ppolicy
    ({"memberOf": ["cn=a,dc=x"]}, None),
])
def test_disabled_and_locked_accounts_are_refused(entry, refused):
    auth = _authenticator()
    try:
        if refused is None:
            auth._check_account(None, "alice", "uid=alice", entry)
        else:
            with pytest.raises(Exception) as info:
                auth._check_account(None, "alice", "uid=alice", entry)
            assert info.value.sqlstate == "28000" and refused in info.value.log_detail
    finally:
        auth.close()


def test_empty_password_and_control_characters_are_refused_before_any_bind():
    auth = _authenticator()  # its only server does not exist: reaching it would be "unavailable" (28000)
    try:
        for user, password in (("alice", ""), ("ali\0ce", "pw"), ("x" * 300, "pw"), (" alice", "pw"),
                               ("alice ", "pw"), ("alice\u3000", "pw"), ("", "pw")):
            with pytest.raises(Exception) as info:
                asyncio.run(auth.authenticate(user, password))
            assert info.value.sqlstate == "28P01"
    finally:
        auth.close()


def test_service_secrets_are_salted_scrypt_hashes():
    first, second = hash_secret("correct horse battery"), hash_secret("correct horse battery")
    assert first != second and first.startswith("scrypt$16384$8$1$")
    assert secret_matches("correct horse battery", first)
    assert not secret_matches("correct horse batterY", first)


def test_the_accounts_file_is_checked_entry_by_entry(tmp_path):
    path = tmp_path / "accounts.toml"
    good = hash_secret("a-long-enough-secret")
    path.write_text(f'[[account]]\nname = "etl"\nrole = "etl_writer"\nsecret_hash = "{good}"\n'
                    f'[[account]]\nname = "etl"\nrole = "x"\nsecret_hash = "{good}"\n'
                    '[[account]]\nname = "bad name"\nrole = "r"\nsecret_hash = "plaintext"\n')
    accounts, problems = load_accounts(str(path))
    assert list(accounts) == ["etl"] and accounts["etl"].role == "etl_writer"
    assert "account[1].name: 'etl' appears twice" in problems
    assert "account[2].name: letters, digits, _ - . only" in problems
    assert "account[2].secret_hash: not a `pgproxy hash-secret` hash" in problems
