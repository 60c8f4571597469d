"""Declarative, validated configuration.

Each section is a dataclass; each option is a field with a type, a default (or
REQUIRED), a one-line doc and whether SIGHUP may change it. ``parse_config`` checks
the TOML table against these declarations and reports *every* problem with its key
path (``backend.pool_size: expected an integer``). ``Config.resolve_secrets`` is the
separate load step that reads secrets from files or the environment; secrets are
never accepted inline, so a config file can be shared and logged safely.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED: typing.Any = object()


def option(default, doc: str, *, reloadable: bool = True):
    meta = {"doc": doc, "reloadable": reloadable}
    if default is REQUIRED:
        return field(metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


ASYMMETRIC_ALGORITHMS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                         "ES256", "ES384", "ES512", "EdDSA"}
HMAC_ALGORITHMS = {"HS256", "HS384", "HS512"}


@dataclass
class ServerSection:
    listen: list[str] = option(["127.0.0.1:6432"], "host:port addresses to accept clients on", reloadable=False)
    workers: int = option(0, "worker processes sharing the listeners, each with its own pools; 0 = one per CPU",
                          reloadable=False)
    max_clients: int = option(10_000, "client connections held at once; more are refused with 53300")
    max_message_size: int = option(64 * 1024 * 1024, "largest client message accepted (bytes); larger is 08P01",
                                   reloadable=False)
    auth_timeout_s: float = option(30.0, "seconds a client has to finish startup and authentication")
    shutdown_timeout_s: float = option(30.0, "seconds sessions get to finish on SIGTERM before 57P01")
    unix_socket_dir: str = option("", "also listen on <dir>/.s.PGSQL.<port of the first listen address> "
                                      "(psql -h <dir>); empty: no Unix socket", reloadable=False)
    tls_cert_file: str = option("", "PEM certificate chain offered to clients; empty: no TLS (SSLRequest gets N)")
    tls_key_file: str = option("", "PEM private key of tls_cert_file")
    tls_min_version: str = option("TLSv1.2", "oldest TLS version accepted: TLSv1.2 or TLSv1.3")
    tls_client_ca_file: str = option("", "CA bundle that client certificates must chain to")
    tls_client_certificates: str = option("off", "off, optional (checked when sent) or required; with a "
                                                 "certificate, its CN must equal the user name")
    plaintext_networks: list[str] = option(["127.0.0.0/8", "::1/128"],
                                           "client addresses that may send a password or token without TLS "
                                           "(Unix-socket clients always may)")
    proxy_protocol_listeners: list[str] = option([], "listening ports (named as in auth.listener_methods: "
                                                     "\"6440\") whose connections must begin with a PROXY "
                                                     "protocol header (v1 or v2) from one of trusted_proxies; "
                                                     "anything else is refused")
    trusted_proxies: list[str] = option([], "addresses or networks of the load balancers that may send a "
                                            "PROXY header (e.g. \"10.0.0.0/24\")")

    def __post_init__(self) -> None:
        if self.workers == 0:  # the CPUs this process may run on (cgroup/affinity aware), at most 64
            self.workers = min(len(os.sched_getaffinity(0)), 64)


@dataclass
class BackendSection:
    user: str = option(REQUIRED, "login = pool_role: the pool login role, NOINHERIT, granted every mapped role; "
                                 "per_role: only /readyz and check-backend log in as it (grant it nothing)",
                       reloadable=False)
    login: str = option("pool_role", "how backend connections log in: pool_role (as user, then SET ROLE to the "
                                     "mapped role) or per_role (as the mapped role itself, one pool per database "
                                     "and role: SQL past the guard can reach no other role)")
    role_secrets_file: str = option("", "login = per_role: TOML file of role = \"password\" lines (not group- or "
                                        "world-readable), for roles the server asks a password of")
    host: str = option("127.0.0.1", "PostgreSQL host name, address, or Unix-socket directory", reloadable=False)
    port: int = option(5432, "PostgreSQL port", reloadable=False)
    password_file: str = option("", "file holding the pool role's password (first line)")
    password_env: str = option("", "environment variable holding the pool role's password")
    databases: list[str] = option([], "databases clients may ask for; empty allows any")
    pool_size: int = option(20, "backend connections per pool at most: per database (login = pool_role), per "
                                "database and role (per_role)")
    connect_timeout_s: float = option(5.0, "seconds to connect and log in to PostgreSQL")
    acquire_timeout_s: float = option(30.0, "seconds a client waits for a free backend connection (then 53300)")
    idle_timeout_s: float = option(600.0, "idle backend connections older than this are closed")
    lifetime_s: float = option(3600.0, "backend connections are closed after this many seconds of life")
    health_check_after_s: float = option(30.0, "an idle connection older than this is checked before reuse")
    sslmode: str = option("disable", "TLS to PostgreSQL: disable, require, verify-ca or verify-full",
                          reloadable=False)
    sslrootcert: str = option("", "CA bundle for verify-ca and verify-full", reloadable=False)
    sslcert: str = option("", "client certificate offered to PostgreSQL (PEM)", reloadable=False)
    sslkey: str = option("", "its private key", reloadable=False)
    channel_binding: str = option("prefer", "SCRAM-SHA-256-PLUS over TLS: prefer, require or disable",
                                  reloadable=False)
    pool_mode: str = option("session", "session: a client keeps one backend connection; transaction: one per "
                                       "transaction")
    database_pool_modes: dict[str, str] = option({}, "pool_mode per database, e.g. { analytics = \"transaction\" }")
    role_pool_modes: dict[str, str] = option({}, "pool_mode per mapped role; wins over the database's")
    session_state: str = option("pin", "transaction pooling, a statement whose effect outlives the transaction "
                                       "(SET, LISTEN, temp table, ...): pin the client to its connection, or refuse")
    prepared_statements: int = option(100, "transaction pooling: prepared statements kept per backend connection (LRU)")
    idle_in_transaction_timeout_s: float = option(0.0, "transaction pooling: end a client idle this long inside a "
                                                       "transaction (25P03); 0 = never")


@dataclass
class JwtSection:
    issuer: str = option(REQUIRED, "expected 'iss'; also the base of OIDC discovery")
    audience: str = option(REQUIRED, "expected 'aud'")
    jwks_url: str = option("", "JWKS address; empty means OIDC discovery at {issuer}/.well-known/openid-configuration")
    algorithms: list[str] = option(["RS256", "PS256", "ES256", "EdDSA"], "signature algorithms accepted; never 'none'")
    username_claim: str = option("preferred_username", "claim that must equal the startup user name; its value "
                                                       "is the identity")
    username_case_insensitive: bool = option(False, "accept the startup user name in any case; the identity is "
                                                    "then the claim's spelling")
    groups_claim: str = option("groups", "claim holding the list of groups")
    leeway_s: float = option(30.0, "clock skew allowed for exp, nbf and iat")
    shared_secret_file: str = option("", "file with an HMAC secret; only then may HS* algorithms be listed")
    shared_secret_env: str = option("", "environment variable with that HMAC secret")
    ca_file: str = option("", "CA bundle for the IdP's HTTPS; empty uses the system store")
    http_timeout_s: float = option(5.0, "seconds for one discovery or JWKS request")
    jwks_refresh_min_interval_s: float = option(30.0, "the keys are refetched at most this often (unknown 'kid', "
                                                      "failed refresh, a short Cache-Control max-age)")
    jwks_refresh_interval_s: float = option(300.0, "a fetched key set is trusted this long at most (less if the "
                                                   "JWKS's Cache-Control max-age says so), then refetched")
    jwks_failure_grace_s: float = option(300.0, "when refetching fails, the old keys serve this much longer; "
                                                "after that logins with JWTs are refused (28000) (0-3600)")
    max_token_lifetime_s: float = option(0.0, "refuse tokens whose exp - iat exceeds this (iat then required); "
                                              "0: no limit")
    token_cache_size: int = option(10_000, "validated tokens remembered until shortly before they expire")
    databases: list[str] = option([], "databases whose clients may log in with a JWT; empty: all")
    introspection_url: str = option("", "RFC 7662 token introspection endpoint, asked about opaque (non-JWT) "
                                        "access tokens; empty: only JWTs are accepted")
    introspection_client_id: str = option("", "client id pgproxy presents to the introspection endpoint "
                                              "(HTTP Basic, RFC 6749 section 2.3.1)")
    introspection_client_secret_file: str = option("", "file holding that client's secret (first line)")
    introspection_cache_s: float = option(60.0, "an active answer is reused this long at most (never past the "
                                                "token's exp); 0: ask at every login")
    # Filled by Config.resolve_secrets(); never part of the file.
    introspection_client_secret: str | None = field(default=None, repr=False, compare=False)


@dataclass
class LdapSection:
    urls: list[str] = option(REQUIRED, "ldap:// or ldaps:// servers, tried in this order")
    start_tls: bool = option(False, "upgrade ldap:// connections with StartTLS")
    ca_file: str = option("", "CA bundle for ldaps:// and StartTLS; empty uses the system store")
    timeout_s: float = option(5.0, "seconds to connect to one server, and for one operation")
    user_dn_template: str = option("", "simple-bind mode: the user's DN, e.g. uid={username},ou=people,dc=example,dc=org")
    bind_dn: str = option("", "search-then-bind mode: the service account that searches for users")
    bind_password_file: str = option("", "file holding bind_dn's password")
    bind_password_env: str = option("", "environment variable holding bind_dn's password")
    search_base: str = option("", "search-then-bind mode: where users are searched")
    search_filter: str = option("(&(objectClass=inetOrgPerson)(uid={username}))",
                                "search-then-bind mode: finds exactly one user ({username} is escaped)")
    groups: str = option("memberof", "how groups are found: memberof (the user's memberOf attribute) or search")
    group_search_base: str = option("", "groups = search: where groups are searched")
    group_filter: str = option("(|(member={dn})(uniqueMember={dn})(memberUid={username}))",
                               "groups = search: groups of the user ({dn}, {username} are escaped)")
    nested_groups: bool = option(False, "groups = search: also the groups that contain those groups (depth 8)")
    group_name: str = option("cn", "a group's name for [[roles]]: cn or dn")
    deny_filter: str = option("", "users matching this filter are refused, e.g. (employeeType=contractor)")
    username_attribute: str = option("uid", "the entry's attribute holding the user name (sAMAccountName for "
                                            "Active Directory); its value is the identity")
    username_case_insensitive: bool = option(False, "accept the startup user name in any case; the identity is "
                                                    "then the directory's spelling")
    cache_ttl_s: float = option(30.0, "a successful login is reused this long (at most 60 s)")
    failure_cache_s: float = option(2.0, "a failed login is remembered this long (at most 10 s)")
    max_concurrency: int = option(16, "directory operations at once (threads)")
    databases: list[str] = option([], "databases whose clients may log in with a directory password; empty: all")
    revalidate_s: float = option(0.0, "re-check every open directory session this often (as bind_dn: the entry "
                                      "still exists, is not locked or disabled, still maps to its role) and end "
                                      "those that fail (28000); 0: never; needs bind_dn")
    revalidate_grace_s: float = option(0.0, "when the directory cannot be asked, sessions keep running this long "
                                            "past their last good check, then end (fail closed); 0: end at the "
                                            "first failed check")


@dataclass
class ServiceAccountsSection:
    file: str = option(REQUIRED, "TOML file of [[account]] name, role, secret_hash (pgproxy hash-secret)")
    databases: list[str] = option([], "databases service accounts may use; empty: all")


@dataclass
class AuthSection:
    jwt: JwtSection | None = option(None, "OIDC/OAuth2 JWTs as passwords")
    ldap: LdapSection | None = option(None, "LDAP or Active Directory passwords, checked live")
    service_accounts: ServiceAccountsSection | None = option(None, "static secrets for batch jobs")
    default_role: str = option("", "role for identities no [[roles]] rule matches; empty refuses them")
    methods: list[str] = option(["password"], "what clients are asked for, in order of preference: password "
                                              "(a token or directory password as the password) and oauthbearer "
                                              "(SASL OAUTHBEARER, PostgreSQL 18 clients: psql, libpq, pgx); a "
                                              "connection is offered the first that serves its database")
    database_methods: dict[str, str] = option({}, "the one method offered per database, e.g. { analytics = "
                                                  "\"oauthbearer\" }; each one of methods")
    listener_methods: dict[str, str] = option({}, "the one method offered per listening port (\"6433\") or "
                                                  "\"unix\"; wins over database_methods")
    oauth_issuer: str = option("", "the issuer (or its .well-known discovery URL) OAUTHBEARER clients get tokens "
                                   "from; it must equal their oauth_issuer; empty: auth.jwt.issuer")
    oauth_scope: str = option("", "the scopes OAUTHBEARER clients ask the IdP for (space-separated); required "
                                  "with oauthbearer")
    on_token_expiry: str = option("end", "when a JWT or OAUTHBEARER session's token expires (exp + auth.jwt.leeway_s): "
                                         "end (FATAL 28000 at once, an open transaction rolled back) or "
                                         "end_after_transaction (the current transaction may finish first)")


@dataclass
class RoleRule:
    role: str = option(REQUIRED, "database role to SET ROLE to; '{username}' is replaced by the user name")
    group: str = option("", "match identities in this group")
    user: str = option("", "match this user name")
    any: bool = option(False, "match every identity (a catch-all rule)")


@dataclass
class AccessRule:
    """One [[access]] entry: conditions a session must meet to use a role (policy/access.py)."""
    role: str = option("", "the mapped role these conditions guard ('{username}' is replaced by the user name)")
    group: str = option("", "identities in this group; with role, both must match; give role, group or both")
    require_amr: list[str] = option([], "the token's amr must contain one of these, e.g. [\"mfa\"]; directory "
                                        "and service-account logins have none")
    require_acr: list[str] = option([], "the token's acr must be one of these")
    max_auth_age_s: float = option(0.0, "the sign-in (the token's auth_time) is at most this many seconds old at "
                                        "login; 0: any age")
    networks: list[str] = option([], "the client's address (the PROXY protocol's, behind a balancer) is in one "
                                     "of these networks; \"unix\" admits Unix-socket clients; empty: any")
    require_tls: bool = option(False, "the client connection must use TLS")
    require_client_certificate: bool = option(False, "the client must have presented a certificate "
                                                     "(server.tls_client_certificates)")
    days: list[str] = option([], "days allowed, in timezone: mon ... sun, or ranges like mon-fri; empty: every day")
    hours: list[str] = option([], "times of day allowed, in timezone: \"HH:MM-HH:MM\" (may pass midnight); "
                                  "empty: all day")
    timezone: str = option("UTC", "IANA time zone of days and hours, e.g. Europe/Berlin")
    application_names: list[str] = option([], "application_name must match one of these patterns (* and ?, "
                                              "case-sensitive); empty: any")
    client_ids: list[str] = option([], "the token's client (azp or client_id) must match one of these patterns; "
                                       "empty: any")
    fallback_role: str = option("", "instead of refusing, lower the session to this role (its own conditions "
                                    "apply; audited); needs role")


@dataclass
class GuardSection:
    unsafe_disable: bool = option(False, "turn the statement guard off (UNSAFE: clients can then SET ROLE, "
                                         "rewrite identity settings, run DO blocks); logged loudly")
    allowed_functions: list[str] = option([], "functions every role may call besides PostgreSQL's known-safe "
                                              "built-ins: name (any schema) or schema.name (only so qualified)")


@dataclass
class IdentitySection:
    signing_key_file: str = option("", "file with the key (pgproxy identity-key) that signs the identity settings "
                                       "into pgproxy.signature for pgproxy.person(); empty: no signature")


@dataclass
class PolicyRule:
    role: str = option(REQUIRED, "the mapped database role this policy applies to")
    read_only: bool = option(False, "refuse writes, DDL and role changes; transactions are READ ONLY in the "
                                    "database too, so functions cannot write either")
    allow_functions: bool = option(False, "may run DO blocks, create or alter functions, procedures, "
                                          "triggers and extensions, and call any function")
    allowed_functions: list[str] = option([], "functions this role may call besides the built-ins and "
                                              "guard.allowed_functions: name (any schema) or schema.name")
    allowed_classes: list[str] = option([], "statement classes allowed (READ, WRITE, DDL, ROLE, FUNCTION, MISC); "
                                            "empty: all")
    denied_functions: list[str] = option([], "functions this role may not call (names, any schema)")
    denied_relations: list[str] = option([], "tables and views this role may not name (name or schema.name)")
    statement_timeout_ms: int = option(0, "statement_timeout for this role, fixed; 0: the database's")


@dataclass
class AuditSection:
    file: str = option(REQUIRED, "JSON-lines audit file (appended); SIGHUP may move it (audit_file_changed is "
                                 "written in both)")
    parameters: str = option("full", "bound parameters in statement records: full, redacted or off")
    max_parameter_length: int = option(256, "longer parameter values are cut to this many characters")
    max_statement_length: int = option(16_384, "longer statement texts are cut to this many characters")
    queue_size: int = option(100_000, "records waiting for the writer; past it the trail is unavailable (new "
                                      "statements and logins are refused; with on_failure = continue records are "
                                      "dropped)")
    on_failure: str = option("refuse", "while the audit file cannot be written: refuse new statements and logins "
                                       "(58030) until it can, or continue without a trail (UNSAFE: records are "
                                       "dropped past queue_size)")
    durability: str = option("batch", "batch: records are rendered in batches every flush_interval_ms / 2 and "
                                      "written every flush_interval_ms; before_result: a "
                                      "statement's result reaches the client only once its record is written "
                                      "and fsync'ed")
    flush_interval_ms: int = option(20, "durability = batch: the writer appends what is queued this often")
    fsync: str = option("never", "durability = batch: leave flushing to the kernel (never: a killed pgproxy "
                                 "loses nothing written, a crashed machine up to the kernel's writeback) or "
                                 "fsync after each write (batch, measured slower); before_result always fsyncs")
    rotate_size_mb: float = option(0.0, "rename the file to <file>.<UTC time> and start a new one past this "
                                        "size; 0: never (use logrotate and SIGUSR1)")
    rotate_interval_h: float = option(0.0, "rotate the file this often (hours); 0: never")
    checkpoint_records: int = option(1000, "a signed checkpoint after this many records of a writer")
    checkpoint_interval_s: float = option(10.0, "a signed checkpoint after this many seconds with new records")
    signing_key_file: str = option("", "Ed25519 key (PEM, mode 0600) that signs the checkpoints; created at the "
                                       "first start if missing; empty: a new key each start, in memory only. The "
                                       "public key is appended to <file>.pub", reloadable=False)


@dataclass
class LogSection:
    level: str = option("info", "debug, info, warning or error")
    format: str = option("logfmt", "logfmt or json, on stderr")


@dataclass
class AuditSinkRule:
    """One [[audit_sinks]] entry: the audit trail also goes to syslog or a PostgreSQL table
    (pgproxy/audit_sinks.py; the options of the other type stay unset)."""
    type: str = option(REQUIRED, "syslog or postgresql")
    name: str = option("", "the sink's name in logs and metrics; empty: <type>-<index>")
    format: str = option("json", "each record as json (the audit file's line), ocsf (OCSF 1.5 JSON) or cef "
                                 "(ArcSight CEF; syslog only)")
    on_failure: str = option("refuse", "while the sink is unhealthy (queue full, receiver unreachable): refuse "
                                       "(fail closed, as for the audit file) or continue (the file only)")
    queue_size: int = option(10_000, "records waiting for this sink; past it records are dropped for this sink "
                                     "and it is unhealthy")
    instance: str = option("", "this pgproxy's name in every record the sink sends; empty: control.instance "
                               "(<host name>:<port>)")
    timeout_s: float = option(5.0, "seconds to connect, and to deliver one batch")
    transport: str = option("tcp", "syslog: udp, tcp (RFC 6587 octet counting), tls (RFC 5425) or unix "
                                   "(a local datagram socket)")
    address: str = option("", "syslog: host:port for udp, tcp and tls; a socket path for unix (empty: /dev/log)")
    facility: str = option("local0", "syslog: facility name (kern, user, auth, authpriv, audit, local0-local7, ...)")
    severity: str = option("info", "syslog: severity of ordinary records (emerg ... debug)")
    failure_severity: str = option("warning", "syslog: severity of refused logins and statements, failed "
                                              "statements and admin actions")
    app_name: str = option("pgproxy", "syslog: APP-NAME of every message")
    sd_id: str = option("pgproxy@32473", "syslog: SD-ID of the structured data (name@enterprise-number; 32473 is "
                                         "the documentation number, use your own)")
    max_message_size: int = option(65_000, "syslog: longer messages are cut, marked truncated=\"true\" "
                                           "(udp: at most 65507)")
    ca_file: str = option("", "syslog tls: CA bundle the receiver's certificate must chain to; empty: system store")
    cert_file: str = option("", "syslog tls: client certificate (PEM) offered to the receiver")
    key_file: str = option("", "syslog tls: its private key")
    host: str = option("", "postgresql: host name, address or Unix-socket directory")
    port: int = option(5432, "postgresql: port")
    database: str = option("", "postgresql: database holding the table")
    user: str = option("", "postgresql: login role; it needs INSERT on the table and nothing else")
    password_file: str = option("", "postgresql: file holding the role's password (first line)")
    password_env: str = option("", "postgresql: environment variable holding it")
    table: str = option("pgproxy_audit", "postgresql: table (or schema.table) the records are copied into")
    sslmode: str = option("disable", "postgresql: disable, require, verify-ca or verify-full")
    sslrootcert: str = option("", "postgresql: CA bundle for verify-ca and verify-full")


@dataclass
class ControlSection:
    """[control]: revocations, blocks and cancel forwarding shared by several instances (control_plane.py)."""
    database: str = option("", "database holding the pgproxy_control schema (pgproxy control init); empty: no "
                               "control database (revocations and blocks: this instance only, in state_file)",
                           reloadable=False)
    host: str = option("", "control database host, address or Unix-socket directory; empty: backend.host",
                       reloadable=False)
    port: int = option(0, "control database port; 0: backend.port", reloadable=False)
    user: str = option("", "login role for the pgproxy_control schema; required with database", reloadable=False)
    password_file: str = option("", "file holding that role's password (first line)", reloadable=False)
    password_env: str = option("", "environment variable holding that role's password", reloadable=False)
    sslmode: str = option("disable", "TLS to the control database: disable, require, verify-ca or verify-full",
                          reloadable=False)
    sslrootcert: str = option("", "CA bundle for verify-ca and verify-full", reloadable=False)
    connect_timeout_s: float = option(5.0, "seconds to connect and log in, and for one query", reloadable=False)
    sync_interval_s: float = option(10.0, "full re-read of the control schema this often (and at each reconnect): "
                                          "a lost notification delays a change at most this long", reloadable=False)
    max_staleness_s: float = option(30.0, "the last state read from the control database counts this long; "
                                          "past it, new logins follow on_unavailable")
    on_unavailable: str = option("refuse", "logins while the control database has been unreachable past "
                                           "max_staleness_s: refuse (28000, fail closed) or allow (known "
                                           "revocations and blocks still hold)")
    state_file: str = option("", "JSON file keeping known revocations and blocks across restarts; empty: "
                                 "pgproxy-control-state-<port>.json beside audit.file", reloadable=False)
    instance: str = option("", "this instance's name (heartbeats, admin answers, audit records); empty: "
                               "<host name>:<port of the first server.listen>", reloadable=False)
    peer_id: int = option(0, "1-127: this instance's number in its cancel keys, unique behind one load balancer "
                             "(set it on all or none); 0: cancel requests are not forwarded", reloadable=False)
    peer_listen: str = option("", "host:port where other instances forward cancel requests to this one",
                              reloadable=False)
    peer_advertise: str = option("", "host:port others reach peer_listen at (in heartbeats); empty: peer_listen, "
                                     "a wildcard host replaced by the host name", reloadable=False)
    peers: dict[str, str] = option({}, "static peer addresses by peer_id, e.g. { \"2\" = \"10.0.0.2:6500\" }; "
                                       "win over heartbeats", reloadable=False)
    peer_secret_file: str = option("", "file with the secret (at least 32 characters, the same on every "
                                       "instance) that authenticates forwarded cancel requests", reloadable=False)


@dataclass
class HttpSection:
    listen: str = option("", "host:port for /metrics, /healthz, /readyz and /admin; empty: no HTTP port",
                         reloadable=False)
    admin_token_file: str = option("", "file holding the bearer token of the /admin API (first line)")
    admin_token_env: str = option("", "environment variable holding that token")
    admin_remote: bool = option(False, "answer /admin from non-loopback addresses too (TLS is not offered)")


@dataclass
class GrantsSection:
    """[grants]: time-boxed elevation and access requests (grants.py, grants_service.py)."""
    state_file: str = option("", "JSON file holding grants and access requests, shared by the workers and kept "
                                 "across restarts; empty: pgproxy-grants.json beside audit.file", reloadable=False)
    roles: list[str] = option([], "roles that may be granted or requested; empty: any role but backend.user")
    max_duration_s: float = option(28_800.0, "longest grant or request, in seconds")
    approver_groups: list[str] = option([], "groups whose members may approve or deny other people's access "
                                            "requests (with their own IdP token); empty: requests are off")
    request_timeout_s: float = option(86_400.0, "a request nobody decided lapses after this many seconds")
    webhook_url: str = option("", "http(s) URL sent a JSON POST on each new request, decision and grant "
                                  "(Slack-style \"text\" included); empty: none")
    webhook_timeout_s: float = option(5.0, "seconds for one webhook POST; a failure is logged, never retried")


@dataclass
class Config:
    backend: BackendSection = option(REQUIRED, "the PostgreSQL server and its pool")
    auth: AuthSection = option(REQUIRED, "how clients prove who they are")
    audit: AuditSection = option(REQUIRED, "the audit trail")
    server: ServerSection = option(None, "client-facing listeners and limits")
    roles: list[RoleRule] = option([], "identity -> role rules; the first match wins")
    access: list[AccessRule] = option([], "conditions per role or group (MFA, networks, TLS, times, "
                                          "applications), checked at login")
    log: LogSection = option(None, "diagnostic logging")
    http: HttpSection = option(None, "metrics, health and the admin API over HTTP")
    guard: GuardSection = option(None, "the statement guard")
    policies: list[PolicyRule] = option([], "per-role statement policy")
    identity: IdentitySection = option(None, "signed identity settings (pgproxy.person())")
    audit_sinks: list[AuditSinkRule] = option([], "where else the audit trail goes: [[audit_sinks]] "
                                                  "(syslog, postgresql)", reloadable=False)
    control: ControlSection = option(None, "state shared by several instances: revocations, blocks, cancel "
                                           "forwarding")
    grants: GrantsSection = option(None, "time-boxed elevation: grants of a role to one person, access requests")

    # Filled by resolve_secrets(); never part of the file.
    backend_password: str | None = field(default=None, repr=False, compare=False)
    role_passwords: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # role_secrets_file
    jwt_shared_secret: bytes | None = field(default=None, repr=False, compare=False)
    admin_token: str | None = field(default=None, repr=False, compare=False)
    ldap_bind_password: str | None = field(default=None, repr=False, compare=False)
    service_accounts: dict | None = field(default=None, repr=False, compare=False)
    identity_key: bytes | None = field(default=None, repr=False, compare=False)  # signs pgproxy.signature
    control_password: str | None = field(default=None, repr=False, compare=False)  # [control] login
    peer_secret: bytes | None = field(default=None, repr=False, compare=False)     # [control] peer_secret_file
    client_tls: object = field(default=None, repr=False, compare=False)   # ssl.SSLContext, by load_tls()
    backend_tls: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.server = self.server or ServerSection()
        self.log = self.log or LogSection()
        self.http = self.http or HttpSection()
        self.guard = self.guard or GuardSection()
        self.identity = self.identity or IdentitySection()
        self.control = self.control or ControlSection()
        self.grants = self.grants or GrantsSection()

    def resolve_secrets(self) -> None:
        """Read secrets from their files or environment variables (the load step)."""
        problems: list[str] = []
        self.backend_password = _read_secret(self.backend.password_file, self.backend.password_env,
                                             "backend", problems)
        if self.backend.role_secrets_file:
            self.role_passwords = _read_role_secrets(self.backend.role_secrets_file, problems)
        jwt = self.auth.jwt
        if jwt and (jwt.shared_secret_file or jwt.shared_secret_env):
            secret = _read_secret(jwt.shared_secret_file, jwt.shared_secret_env, "auth.jwt.shared_secret", problems)
            self.jwt_shared_secret = secret.encode() if secret else None
        if jwt and jwt.introspection_client_secret_file:
            jwt.introspection_client_secret = _read_secret(jwt.introspection_client_secret_file, "",
                                                           "auth.jwt.introspection_client_secret", problems)
        ldap = self.auth.ldap
        if ldap and (ldap.bind_password_file or ldap.bind_password_env):
            self.ldap_bind_password = _read_secret(ldap.bind_password_file, ldap.bind_password_env,
                                                   "auth.ldap.bind_password", problems)
        if self.auth.service_accounts is not None:
            from pgproxy.auth.service import load_accounts
            self.service_accounts, found = load_accounts(self.auth.service_accounts.file)
            problems += [f"auth.service_accounts.file: {p}" for p in found]
        self.admin_token = _read_secret(self.http.admin_token_file, self.http.admin_token_env,
                                        "http.admin_token", problems)
        if self.admin_token is not None and len(self.admin_token) < 16:
            problems.append("http.admin_token: use at least 16 characters")
        if self.identity.signing_key_file:
            from pgproxy.signed_identity import KeyFileError, load_key
            try:
                self.identity_key = load_key(self.identity.signing_key_file)
            except KeyFileError as exc:
                problems.append(f"identity.signing_key_file: {exc}")
        control = self.control
        if control.database:
            self.control_password = _read_secret(control.password_file, control.password_env, "control.password",
                                                 problems)
        if control.peer_secret_file:
            secret = _read_secret(control.peer_secret_file, "", "control.peer_secret", problems)
            if secret is not None and len(secret) < 32:
                problems.append("control.peer_secret_file: use a secret of at least 32 characters")
            self.peer_secret = secret.encode() if secret else None
        if problems:
            raise ConfigError(problems)


def _read_secret(path: str, env: str, where: str, problems: list[str]) -> str | None:
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            problems.append(f"{where}: cannot read secret file {path!r}: {exc.strerror}")
            return None
        return lines[0] if lines else ""
    if env:
        if env not in os.environ:
            problems.append(f"{where}: environment variable {env} is not set")
            return None
        return os.environ[env]
    return None


def _read_role_secrets(path: str, problems: list[str]) -> dict[str, str]:
    """``role = "password"`` lines. Problems name the file and the role, never a value (a TOML
    parse error names only a line and column)."""
    where = "backend.role_secrets_file"
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_mode & 0o077:
                problems.append(f"{where}: {path!r} must be readable by its owner only (chmod 600)")
                return {}
            table = tomllib.load(fh)
    except OSError as exc:
        problems.append(f"{where}: cannot read {path!r}: {exc.strerror}")
        return {}
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{where}: {path!r} is not valid TOML: {exc}")
        return {}
    passwords = {}
    for role, password in table.items():
        if not isinstance(password, str) or not password:
            problems.append(f"{where}: the password of role {role!r} must be a non-empty string")
        else:
            passwords[role] = password
    return passwords


# --- the declarative engine --------------------------------------------------------

def _build(cls, table, path: str, problems: list[str]):
    if not isinstance(table, dict):
        problems.append(f"{path or '<top>'}: expected a table")
        return None
    hints = typing.get_type_hints(cls)
    declared = {f.name: f for f in dataclasses.fields(cls) if f.metadata}
    for key in table:
        if key not in declared:
            problems.append(f"{_join(path, key)}: unknown key")
    values = {}
    for name, fld in declared.items():
        key_path = _join(path, name)
        if name not in table:
            if fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
                problems.append(f"{key_path}: required key is missing")
            continue
        value = _convert(hints[name], table[name], key_path, problems)
        if value is not None:
            values[name] = value
    try:
        return cls(**values)
    except TypeError:
        return None  # a required key was missing; already reported


def _convert(hint, value, path: str, problems: list[str]):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        inner = [a for a in typing.get_args(hint) if a is not type(None)][0]
        return _convert(inner, value, path, problems)
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a table")
            return None
        items = {k: _convert(item, v, f"{path}.{k}", problems) for k, v in value.items()}
        return items if all(i is not None for i in items.values()) else None
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list")
            return None
        items = [_convert(item, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return items if all(i is not None for i in items) else None
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, problems)
    expected = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[hint]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        problems.append(f"{path}: expected {expected}")
        return None
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- rules beyond types -------------------------------------------------------------

_LISTEN = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})$")


def check_postgres_login(where: str, section, problems: list[str]) -> None:
    """The secret and TLS options every connection of the proxy's own to PostgreSQL has
    (the PostgreSQL audit sink, the control database)."""
    if section.password_file and section.password_env:
        problems.append(f"{where}: set password_file or password_env, not both")
    if section.sslmode not in ("disable", "require", "verify-ca", "verify-full"):
        problems.append(f"{where}.sslmode: must be disable, require, verify-ca or verify-full")
    elif section.sslmode.startswith("verify") and not section.sslrootcert:
        problems.append(f"{where}.sslrootcert: required with sslmode = {section.sslmode}")


def parse_listen(entry: str) -> tuple[str, int]:
    m = _LISTEN.match(entry)
    if not m or not 0 < int(m["port"]) < 65536:
        raise ValueError("expected host:port (IPv6 as [addr]:port)")
    return m["v6"] or m["host"], int(m["port"])


def _check_rules(cfg: Config, problems: list[str]) -> None:
    for i, entry in enumerate(cfg.server.listen):
        try:
            parse_listen(entry)
        except ValueError as exc:
            problems.append(f"server.listen[{i}]: {exc}")
    _check_proxy_protocol(cfg.server, problems)
    positive = [("server.max_clients", cfg.server.max_clients), ("server.max_message_size", cfg.server.max_message_size),
                ("backend.pool_size", cfg.backend.pool_size), ("backend.connect_timeout_s", cfg.backend.connect_timeout_s),
                ("backend.acquire_timeout_s", cfg.backend.acquire_timeout_s),
                ("audit.queue_size", cfg.audit.queue_size)]
    for key, value in positive:
        if value <= 0:
            problems.append(f"{key}: must be greater than zero")
    if not 1 <= cfg.server.workers <= 64:
        problems.append("server.workers: must be 1-64")
    if cfg.server.max_message_size > 1 << 30:
        problems.append("server.max_message_size: at most 1 GiB (PostgreSQL's own limit)")
    modes = {"backend.pool_mode": cfg.backend.pool_mode,
             **{f"backend.database_pool_modes.{k}": v for k, v in cfg.backend.database_pool_modes.items()},
             **{f"backend.role_pool_modes.{k}": v for k, v in cfg.backend.role_pool_modes.items()}}
    for key, mode in modes.items():
        if mode not in ("session", "transaction"):
            problems.append(f"{key}: must be session or transaction")
    _check_tls(cfg, problems)
    from pgproxy.audit_sinks import check_rules as _check_audit_sinks  # the sinks' own rules
    _check_audit_sinks(cfg.audit_sinks, problems)
    _check_grants(cfg, problems)
    from pgproxy.control_plane import check_rules as _check_control  # [control]'s own rules
    _check_control(cfg, problems)
    seen_roles = set()
    for i, policy in enumerate(cfg.policies):
        if policy.role in seen_roles:
            problems.append(f"policies[{i}].role: {policy.role!r} has a policy already")
        seen_roles.add(policy.role)
        unknown = set(policy.allowed_classes) - {"READ", "WRITE", "DDL", "ROLE", "FUNCTION", "MISC"}
        if unknown:
            problems.append(f"policies[{i}].allowed_classes: unknown class {', '.join(sorted(unknown))}")
        if policy.statement_timeout_ms < 0:
            problems.append(f"policies[{i}].statement_timeout_ms: must not be negative")
    if cfg.backend.login not in ("pool_role", "per_role"):
        problems.append("backend.login: must be pool_role or per_role")
    elif cfg.backend.role_secrets_file and cfg.backend.login != "per_role":
        problems.append("backend.role_secrets_file: only used with login = per_role")
    if cfg.backend.session_state not in ("pin", "refuse"):
        problems.append("backend.session_state: must be pin or refuse")
    if cfg.backend.prepared_statements < 1:
        problems.append("backend.prepared_statements: must be at least 1")
    if cfg.backend.idle_in_transaction_timeout_s < 0:
        problems.append("backend.idle_in_transaction_timeout_s: must not be negative")
    if not 0 < cfg.backend.port < 65536:
        problems.append("backend.port: must be 1-65535")
    if cfg.http.listen:
        try:
            parse_listen(cfg.http.listen)
        except ValueError as exc:
            problems.append(f"http.listen: {exc}")
    _one_secret_source("http", "admin_token", cfg.http.admin_token_file, cfg.http.admin_token_env, problems)
    _one_secret_source("backend", "password", cfg.backend.password_file, cfg.backend.password_env, problems)
    jwt = cfg.auth.jwt
    if jwt is None and cfg.auth.ldap is None and cfg.auth.service_accounts is None:
        problems.append("auth: configure at least one authenticator ([auth.jwt], [auth.ldap], "
                        "[auth.service_accounts])")
    if jwt is not None:
        _check_jwt(jwt, problems)
    if cfg.auth.ldap is not None:
        _check_ldap(cfg.auth.ldap, problems)
    for i, rule in enumerate(cfg.roles):
        chosen = [k for k in ("group", "user") if getattr(rule, k)] + (["any"] if rule.any else [])
        if len(chosen) != 1:
            problems.append(f"roles[{i}]: give exactly one of group, user or any = true")
        _check_role_template(rule.role, f"roles[{i}].role", problems)
    if cfg.auth.default_role:
        _check_role_template(cfg.auth.default_role, "auth.default_role", problems)
    from pgproxy.policy.access import check_rules as _check_access  # the conditions' own rules
    _check_access(cfg.access, cfg.backend.user, problems)
    if cfg.auth.on_token_expiry not in ("end", "end_after_transaction"):
        problems.append("auth.on_token_expiry: must be end or end_after_transaction")
    _check_auth_methods(cfg, problems)
    _check_audit(cfg.audit, problems)
    if cfg.log.level not in ("debug", "info", "warning", "error"):
        problems.append("log.level: must be debug, info, warning or error")
    if cfg.log.format not in ("logfmt", "json"):
        problems.append("log.format: must be logfmt or json")


def _check_proxy_protocol(server: ServerSection, problems: list[str]) -> None:
    """A PROXY listener names a port of server.listen (a typo would leave the real port
    open to anyone claiming any address) and comes with the balancers it trusts."""
    ports = set()
    for entry in server.listen:
        try:
            ports.add(str(parse_listen(entry)[1]))
        except ValueError:
            pass  # reported with server.listen
    for i, name in enumerate(server.proxy_protocol_listeners):
        if not (name.isdigit() and 0 < int(name) < 65536):
            problems.append(f"server.proxy_protocol_listeners[{i}]: a port number (\"6440\"); the Unix socket "
                            "cannot take PROXY headers")
        elif name not in ports:
            problems.append(f"server.proxy_protocol_listeners[{i}]: port {name} is not in server.listen")
    for i, network in enumerate(server.trusted_proxies):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            problems.append(f"server.trusted_proxies[{i}]: not an address or network: {network!r}")
    if server.proxy_protocol_listeners and not server.trusted_proxies:
        problems.append("server.trusted_proxies: list the load balancers' addresses (proxy_protocol_listeners "
                        "is set)")


def _check_grants(cfg: Config, problems: list[str]) -> None:
    grants = cfg.grants
    if not 0 < grants.max_duration_s <= 30 * 86_400:
        problems.append("grants.max_duration_s: must be greater than zero and at most 30 days (2592000)")
    if not 0 < grants.request_timeout_s <= 30 * 86_400:
        problems.append("grants.request_timeout_s: must be greater than zero and at most 30 days (2592000)")
    if not 0 < grants.webhook_timeout_s <= 60:
        problems.append("grants.webhook_timeout_s: must be greater than zero and at most 60")
    if grants.webhook_url and not grants.webhook_url.startswith(("https://", "http://")):
        problems.append("grants.webhook_url: must be an http(s) URL")
    if cfg.backend is not None and cfg.backend.user in grants.roles:
        problems.append("grants.roles: the pool role (backend.user) cannot be granted")
    for i, role in enumerate(grants.roles):
        if not role or len(role) > 63 or "{" in role:
            problems.append(f"grants.roles[{i}]: a role name (1-63 characters, no placeholder)")


def _check_tls(cfg: Config, problems: list[str]) -> None:
    server, backend = cfg.server, cfg.backend
    if bool(server.tls_cert_file) != bool(server.tls_key_file):
        problems.append("server.tls_cert_file, server.tls_key_file: give both or neither")
    if server.tls_min_version not in ("TLSv1.2", "TLSv1.3"):
        problems.append("server.tls_min_version: must be TLSv1.2 or TLSv1.3")
    if server.tls_client_certificates not in ("off", "optional", "required"):
        problems.append("server.tls_client_certificates: must be off, optional or required")
    elif server.tls_client_certificates != "off" and not (server.tls_client_ca_file and server.tls_cert_file):
        problems.append("server.tls_client_certificates: needs tls_client_ca_file and a server certificate")
    for i, network in enumerate(server.plaintext_networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            problems.append(f"server.plaintext_networks[{i}]: not an address or network: {network!r}")
    if backend.sslmode not in ("disable", "require", "verify-ca", "verify-full"):
        problems.append("backend.sslmode: must be disable, require, verify-ca or verify-full")
    elif backend.sslmode.startswith("verify") and not backend.sslrootcert:
        problems.append(f"backend.sslrootcert: required with sslmode = {backend.sslmode}")
    if bool(backend.sslcert) != bool(backend.sslkey):
        problems.append("backend.sslcert, backend.sslkey: give both or neither")
    if backend.channel_binding not in ("prefer", "require", "disable"):
        problems.append("backend.channel_binding: must be prefer, require or disable")
    elif backend.channel_binding == "require" and backend.sslmode == "disable":
        problems.append("backend.channel_binding: require needs TLS (sslmode is disable)")


def _check_jwt(jwt: JwtSection, problems: list[str]) -> None:
    known = ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS
    for i, alg in enumerate(jwt.algorithms):
        if alg not in known:
            problems.append(f"auth.jwt.algorithms[{i}]: {alg!r} is not accepted (choose from {', '.join(sorted(known))})")
    if not jwt.algorithms:
        problems.append("auth.jwt.algorithms: list at least one algorithm")
    has_secret = bool(jwt.shared_secret_file or jwt.shared_secret_env)
    hmac_listed = HMAC_ALGORITHMS & set(jwt.algorithms)
    if hmac_listed and not has_secret:
        problems.append("auth.jwt.algorithms: HS* algorithms need shared_secret_file or shared_secret_env")
    if has_secret and not hmac_listed:
        problems.append("auth.jwt: a shared secret is set but no HS* algorithm is listed")
    _one_secret_source("auth.jwt", "shared_secret", jwt.shared_secret_file, jwt.shared_secret_env, problems)
    for key in ("issuer", "jwks_url"):
        url = getattr(jwt, key)
        if url and not url.startswith(("https://", "http://")):
            problems.append(f"auth.jwt.{key}: must be an http(s) URL")
    if jwt.leeway_s < 0 or jwt.leeway_s > 300:
        problems.append("auth.jwt.leeway_s: must be between 0 and 300")
    if jwt.token_cache_size < 0:
        problems.append("auth.jwt.token_cache_size: must not be negative")
    if jwt.jwks_refresh_min_interval_s < 0:
        problems.append("auth.jwt.jwks_refresh_min_interval_s: must not be negative")
    if not 0 < jwt.jwks_refresh_interval_s <= 86_400:
        problems.append("auth.jwt.jwks_refresh_interval_s: must be greater than zero and at most 86400")
    elif jwt.jwks_refresh_interval_s < jwt.jwks_refresh_min_interval_s:
        problems.append("auth.jwt.jwks_refresh_interval_s: must not be less than jwks_refresh_min_interval_s")
    if not 0 <= jwt.jwks_failure_grace_s <= 3600:
        problems.append("auth.jwt.jwks_failure_grace_s: must be between 0 and 3600")
    if jwt.max_token_lifetime_s < 0:
        problems.append("auth.jwt.max_token_lifetime_s: must not be negative")


def _check_auth_methods(cfg: Config, problems: list[str]) -> None:
    auth, known = cfg.auth, ("oauthbearer", "password")
    if not auth.methods or len(set(auth.methods)) != len(auth.methods) or not set(auth.methods) <= set(known):
        problems.append("auth.methods: list oauthbearer and/or password, each once")
    for key, table in (("database_methods", auth.database_methods), ("listener_methods", auth.listener_methods)):
        for name, method in table.items():
            if method not in auth.methods:
                problems.append(f"auth.{key}.{name}: {method!r} is not in auth.methods")
    for name in auth.listener_methods:
        if name != "unix" and not (name.isdigit() and 0 < int(name) < 65536):
            problems.append(f"auth.listener_methods.{name}: a port number (\"6433\") or \"unix\"")
    if "oauthbearer" in auth.methods:
        if auth.jwt is None:
            problems.append("auth.methods: oauthbearer needs [auth.jwt] (its tokens are validated there)")
        if not auth.oauth_scope.strip():
            problems.append("auth.oauth_scope: required with oauthbearer (the scopes clients ask the IdP for)")
    for key, text in (("oauth_issuer", auth.oauth_issuer), ("oauth_scope", auth.oauth_scope)):
        if any(c in text for c in '"\\') or not text.isprintable():
            problems.append(f"auth.{key}: no quotes, backslashes or control characters")
    if auth.oauth_issuer and not auth.oauth_issuer.startswith(("https://", "http://")):
        problems.append("auth.oauth_issuer: must be an http(s) URL")
    jwt = auth.jwt
    if jwt is not None and jwt.introspection_url:
        if not jwt.introspection_url.startswith(("https://", "http://")):
            problems.append("auth.jwt.introspection_url: must be an http(s) URL")
        if not (jwt.introspection_client_id and jwt.introspection_client_secret_file):
            problems.append("auth.jwt.introspection_url: needs introspection_client_id and "
                            "introspection_client_secret_file")
    if jwt is not None and jwt.introspection_cache_s < 0:
        problems.append("auth.jwt.introspection_cache_s: must not be negative")


def _check_ldap(ldap: LdapSection, problems: list[str]) -> None:
    where = "auth.ldap"
    if not ldap.urls:
        problems.append(f"{where}.urls: list at least one server")
    for i, url in enumerate(ldap.urls):
        if not url.startswith(("ldap://", "ldaps://")):
            problems.append(f"{where}.urls[{i}]: must start with ldap:// or ldaps://")
        elif url.startswith("ldaps://") and ldap.start_tls:
            problems.append(f"{where}.urls[{i}]: ldaps:// is TLS already; start_tls is for ldap://")
    # bind_dn alone goes with user_dn_template only to re-validate sessions (revalidate_s)
    search_mode = bool(ldap.search_base or (ldap.bind_dn and not (ldap.user_dn_template and ldap.revalidate_s)))
    if bool(ldap.user_dn_template) == search_mode:
        problems.append(f"{where}: set user_dn_template (simple bind) or search_base and bind_dn (search then "
                        "bind), not both")
    if ldap.revalidate_s < 0 or ldap.revalidate_grace_s < 0:
        problems.append(f"{where}: revalidate_s and revalidate_grace_s must not be negative")
    elif ldap.revalidate_s and not ldap.bind_dn:
        problems.append(f"{where}.revalidate_s: needs bind_dn (the service account reads the entries of open "
                        "sessions; their passwords are not kept)")
    elif ldap.revalidate_s and ldap.user_dn_template and not (ldap.bind_password_file or ldap.bind_password_env):
        problems.append(f"{where}: bind_dn needs bind_password_file or bind_password_env")
    if ldap.user_dn_template and "{username}" not in ldap.user_dn_template:
        problems.append(f"{where}.user_dn_template: must contain {{username}}")
    if search_mode:
        if not (ldap.search_base and ldap.bind_dn):
            problems.append(f"{where}: search-then-bind needs both search_base and bind_dn")
        if not (ldap.bind_password_file or ldap.bind_password_env):
            problems.append(f"{where}: bind_dn needs bind_password_file or bind_password_env")
        if "{username}" not in ldap.search_filter:
            problems.append(f"{where}.search_filter: must contain {{username}}")
    _one_secret_source(where, "bind_password", ldap.bind_password_file, ldap.bind_password_env, problems)
    if ldap.groups not in ("memberof", "search"):
        problems.append(f"{where}.groups: must be memberof or search")
    if ldap.groups == "search" and not ldap.group_search_base:
        problems.append(f"{where}.group_search_base: required when groups = search")
    if ldap.group_name not in ("cn", "dn"):
        problems.append(f"{where}.group_name: must be cn or dn")
    for key, text in (("search_filter", ldap.search_filter), ("group_filter", ldap.group_filter),
                      ("deny_filter", ldap.deny_filter)):
        if text and not (text.startswith("(") and text.endswith(")") and text.count("(") == text.count(")")):
            problems.append(f"{where}.{key}: not an LDAP filter in parentheses")
    if not 0 <= ldap.cache_ttl_s <= 60:
        problems.append(f"{where}.cache_ttl_s: must be between 0 and 60")
    if not 0 <= ldap.failure_cache_s <= 10:
        problems.append(f"{where}.failure_cache_s: must be between 0 and 10")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)+", ldap.username_attribute):
        problems.append(f"{where}.username_attribute: not an attribute name")
    if ldap.timeout_s <= 0 or ldap.max_concurrency <= 0:
        problems.append(f"{where}: timeout_s and max_concurrency must be greater than zero")


def _check_audit(audit: AuditSection, problems: list[str]) -> None:
    choices = {"parameters": ("full", "redacted", "off"), "on_failure": ("refuse", "continue"),
               "durability": ("batch", "before_result"), "fsync": ("batch", "never")}
    for key, allowed in choices.items():
        if getattr(audit, key) not in allowed:
            problems.append(f"audit.{key}: must be {', '.join(allowed[:-1])} or {allowed[-1]}")
    if not 1 <= audit.flush_interval_ms <= 10_000:
        problems.append("audit.flush_interval_ms: must be 1-10000")
    for key in ("rotate_size_mb", "rotate_interval_h"):
        if getattr(audit, key) < 0:
            problems.append(f"audit.{key}: must not be negative")
    if audit.checkpoint_records < 1 or audit.checkpoint_interval_s <= 0:
        problems.append("audit: checkpoint_records and checkpoint_interval_s must be greater than zero")
    if audit.signing_key_file and os.path.abspath(audit.signing_key_file).startswith(
            os.path.abspath(audit.file) + "."):
        problems.append("audit.signing_key_file: keep the key apart from the trail (not <file>.*)")


def _one_secret_source(where: str, name: str, path: str, env: str, problems: list[str]) -> None:
    if path and env:
        problems.append(f"{where}: set {name}_file or {name}_env, not both")


def _check_role_template(template: str, path: str, problems: list[str]) -> None:
    leftover = template.replace("{username}", "")
    if "{" in leftover or "}" in leftover:
        problems.append(f"{path}: the only placeholder is {{username}}")
    if not template.strip():
        problems.append(f"{path}: must not be empty")


def restart_only_changes(old, new, path: str = "") -> list[str]:
    """Key paths of options marked not reloadable whose value differs between two configs."""
    changed = []
    for fld in dataclasses.fields(old):
        if not fld.metadata:
            continue
        key = _join(path, fld.name)
        a, b = getattr(old, fld.name), getattr(new, fld.name)
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
            changed += restart_only_changes(a, b, key)
        elif not fld.metadata["reloadable"] and a != b:
            changed.append(key)
    return changed


def parse_config(table: dict) -> Config:
    problems: list[str] = []
    cfg = _build(Config, table, "", problems)
    if cfg is not None:  # rules too, so one run reports every problem
        _check_rules(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | os.PathLike) -> Config:
    """Read, validate and resolve secrets; raise ConfigError naming every bad key."""
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    cfg = parse_config(table)
    cfg.resolve_secrets()
    from pgproxy.tls import load_tls
    load_tls(cfg)
    return cfg
