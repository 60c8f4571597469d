"""Every error pgproxy sends to a peer, with its SQLSTATE.

Two families, kept apart as h11 does: ClientError is "the peer did something wrong"
(bad packet, bad token, forbidden parameter); ProxyFailure is "we could not do it"
(backend unreachable, pool exhausted). Both carry the SQLSTATE and severity that go
into the ErrorResponse, plus a ``detail_for_log`` that is never sent to the client:
vague to the client, precise in the log. Nothing in here ever holds a secret.
"""

from __future__ import annotations


class PgProxyError(Exception):
    sqlstate = "XX000"
    severity = "ERROR"

    def __init__(self, message: str, *, sqlstate: str | None = None, severity: str | None = None,
                 log_detail: str = "", denial: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.denial = denial  # set when policy refused something: the reason counted in metrics
        if sqlstate:
            self.sqlstate = sqlstate
        if severity:
            self.severity = severity
        self.log_detail = log_detail or message

    @property
    def fatal(self) -> bool:
        return self.severity == "FATAL"


class ClientError(PgProxyError):
    """The client broke a rule; it is told so."""


class ProxyFailure(PgProxyError):
    """pgproxy or something behind it failed; the client gets a vague message."""


# --- named constructors for the errors clients meet most ---------------------------

def protocol_violation(what: str) -> ClientError:
    return ClientError(f"protocol violation: {what}", sqlstate="08P01", severity="FATAL")


def auth_failed(user: str, reason: str) -> ClientError:
    # The client learns only that it failed; the reason goes to the log.
    return ClientError(f'authentication failed for user "{user}"', sqlstate="28P01",
                       severity="FATAL", log_detail=reason)


def no_user_name() -> ClientError:
    return ClientError("no PostgreSQL user name specified in startup packet", sqlstate="28000", severity="FATAL")


def not_allowed(user: str, log_detail: str, denial: str, why: str = "") -> ClientError:
    """28000 at login: the client learns that it may not connect (and ``why`` in general
    terms, when there is one); the precise reason goes to the log."""
    return ClientError(f'user "{user}" is not allowed to connect' + (f": {why}" if why else ""), sqlstate="28000",
                       severity="FATAL", log_detail=log_detail, denial=denial)


def not_authorized(user: str, reason: str) -> ClientError:
    return not_allowed(user, reason, "not_authorized")


def blocked_by_operator(user: str) -> ClientError:
    return not_allowed(user, "blocked by an operator (admin API)", "blocked")


def credential_ended(message: str, log_detail: str) -> ClientError:
    """28000 for a session whose sign-in ended (token expired, directory re-check failed,
    temporary access over): the client is told to sign in again, the log says why."""
    return ClientError(message, sqlstate="28000", severity="FATAL", log_detail=log_detail)


class AuthUnavailable(ProxyFailure):
    """The IdP or the directory could not be asked: the answer is no (fail closed)."""


def auth_unavailable(reason: str) -> AuthUnavailable:
    # 28000 as PostgreSQL answers when its own LDAP server is unreachable: an
    # authentication refusal, which drivers do not retry like a lost connection (08006).
    return AuthUnavailable("authentication service unavailable", sqlstate="28000",
                           severity="FATAL", log_detail=reason)


def forbidden_parameter(name: str) -> ClientError:
    return ClientError(f'startup parameter "{name}" may not be set through pgproxy: '
                       "the role and identity come from your credentials",
                       sqlstate="42501", severity="FATAL", denial="startup_parameter")


def insecure_transport(user: str, reason: str) -> ClientError:
    """Refused before the password is asked for, so it never crosses the network in the clear."""
    return ClientError("connection is not encrypted: pgproxy accepts passwords and tokens from this address "
                       "only over TLS; connect with sslmode=require (or verify-full)", sqlstate="28000",
                       severity="FATAL", log_detail=f'user "{user}": {reason}', denial="plaintext")


def unsupported(what: str) -> ClientError:
    return ClientError(f"not supported by pgproxy: {what}", sqlstate="0A000", severity="FATAL")


def backend_unavailable(reason: str) -> ProxyFailure:
    return ProxyFailure("database connection unavailable", sqlstate="08006", severity="FATAL",
                        log_detail=reason)


def pool_timeout(database: str) -> ProxyFailure:
    return ProxyFailure(f'timed out waiting for a connection to database "{database}"',
                        sqlstate="53300", severity="FATAL")


def too_many_clients() -> ProxyFailure:
    return ProxyFailure("sorry, too many clients already", sqlstate="53300", severity="FATAL")


def shutting_down() -> ProxyFailure:
    return ProxyFailure("terminating connection due to administrator command",
                        sqlstate="57P01", severity="FATAL")


def terminated_by_operator(log_detail: str = "terminated by an operator (admin API)") -> ProxyFailure:
    return ProxyFailure("terminating connection due to administrator command", sqlstate="57P01",
                        severity="FATAL", log_detail=log_detail)


def proxy_protocol_refused(reason: str) -> ClientError:
    """A server.proxy_protocol_listeners port: no valid PROXY header, or not from a trusted
    balancer. One message for every case: which balancers are trusted is not the client's to learn."""
    return ClientError("this port accepts connections only through a trusted load balancer (PROXY protocol)",
                       sqlstate="08P01", severity="FATAL", log_detail=reason)
