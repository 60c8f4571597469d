"""TLS contexts for both sides, built in the load step so a bad file fails the load (or
the SIGHUP reload) with its key path, never a handshake later.

* Clients: the configured chain and key, TLS 1.2 at least, ALPN ``postgresql`` (direct
  TLS, PostgreSQL 17), optional client certificates checked against a CA.
* PostgreSQL: libpq's sslmode meanings — ``require`` encrypts without checking the
  certificate, ``verify-ca`` checks the chain, ``verify-full`` the chain and the host name.
* SCRAM-SHA-256-PLUS binds the login to the server's certificate
  (``tls-server-end-point``, RFC 5929): the certificate's hash, with SHA-256 in place of
  MD5 and SHA-1.
"""

from __future__ import annotations

import hashlib
import ipaddress
import ssl

from pgproxy.config import Config, ConfigError

ALPN = "postgresql"
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def load_tls(cfg: Config) -> None:
    problems: list[str] = []
    cfg.client_tls = _client_context(cfg, problems)
    cfg.backend_tls = _backend_context(cfg, problems)
    if problems:
        raise ConfigError(problems)


def _client_context(cfg: Config, problems: list[str]) -> ssl.SSLContext | None:
    server = cfg.server
    if not server.tls_cert_file:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS.get(server.tls_min_version, ssl.TLSVersion.TLSv1_2)
    ctx.set_alpn_protocols([ALPN])
    try:
        ctx.load_cert_chain(server.tls_cert_file, server.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        problems.append(f"server.tls_cert_file: cannot load certificate and key: {exc}")
        return None
    if server.tls_client_certificates != "off":
        try:
            ctx.load_verify_locations(server.tls_client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"server.tls_client_ca_file: {exc}")
            return None
        ctx.verify_mode = ssl.CERT_REQUIRED if server.tls_client_certificates == "required" else ssl.CERT_OPTIONAL
    return ctx


def _backend_context(cfg: Config, problems: list[str]) -> ssl.SSLContext | None:
    backend = cfg.backend
    return postgres_context(backend.sslmode, backend.sslrootcert, "backend", problems, backend.sslcert,
                            backend.sslkey)


def postgres_context(sslmode: str, sslrootcert: str, at: str, problems: list[str], sslcert: str = "",
                     sslkey: str = "") -> ssl.SSLContext | None:
    """A client context for a connection to PostgreSQL with libpq's sslmode meanings: the
    pools', the PostgreSQL audit sink's and the control database's. Problems name ``at``."""
    if sslmode == "disable":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if sslmode == "require":  # encrypted, not verified
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.check_hostname = sslmode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(sslrootcert)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"{at}.sslrootcert: {exc}")
            return None
    if sslcert:
        try:
            ctx.load_cert_chain(sslcert, sslkey)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"{at}.sslcert: cannot load certificate and key: {exc}")
    return ctx


def plaintext_allowed(address: str, networks: list[str]) -> bool:
    """May a client at ``address`` (an IP, or "unix") send a password without TLS?"""
    from pgproxy.policy.access import in_networks  # the one address matcher ([[access]] networks too)
    return in_networks(address, tuple(ipaddress.ip_network(n, strict=False) for n in networks), unix=True)


def server_end_point(der_certificate: bytes) -> bytes:
    """tls-server-end-point channel-binding data for a DER certificate."""
    from cryptography import x509  # already installed: PyJWT's RSA and EC algorithms need it
    algorithm = x509.load_der_x509_certificate(der_certificate).signature_hash_algorithm
    name = algorithm.name if algorithm is not None else "sha256"
    if name in ("md5", "sha1"):
        name = "sha256"
    return hashlib.new(name, der_certificate).digest()


def certificate_common_name(peercert: dict | None) -> str | None:
    """The subject CN of a verified client certificate (ssl's getpeercert() form)."""
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def feed_protocol(protocol, data: bytes) -> None:
    """Hand bytes already read to a (buffered) protocol, as its transport would have."""
    if hasattr(protocol, "get_buffer"):
        view = memoryview(data)
        while view:
            buffer = protocol.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]
    else:
        protocol.data_received(data)
