"""Command line: serve, check-config, demo, dev-token, admin, hash-secret, identity-key, identity-sql, audit."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pgproxy.config import ConfigError, load_config

log = logging.getLogger("pgproxy")

# A SIGHUP that reaches a worker before its event loop handles signals (see supervisor).
early_sighup = {"pending": False}
# Likewise a SIGUSR1 (reopen the audit file): never the default action, which kills.
early_reopen = {"pending": False}

DEMO_STATE = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / "pgproxy-demo.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgproxy", description="Identity-aware PostgreSQL proxy")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("-c", "--config", required=True)
    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("-c", "--config", required=True)
    demo = sub.add_parser("demo", help="throwaway PostgreSQL + dev token issuer + proxy")
    demo.add_argument("--port", type=int, default=6432, help="proxy port (default 6432)")
    token = sub.add_parser("dev-token", help="mint a token from the running demo's dev issuer")
    token.add_argument("user")
    token.add_argument("--groups", default="", help="comma-separated groups")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    token.add_argument("--issuer", default="", help="dev issuer URL (default: the running demo's)")
    admin = sub.add_parser("admin", help="the running proxy's admin API (http.listen, http.admin_token)")
    admin.add_argument("-c", "--config", required=True)
    admin.add_argument("action", choices=["sessions", "pools", "terminate", "unblock", "grant", "grants",
                                          "end-grant", "revoke", "revocations", "unrevoke"])
    admin.add_argument("user", nargs="?", default="", help="whose sessions (terminate, unblock; filters sessions); "
                                                           "grant: the person; end-grant: the grant's id")
    admin.add_argument("--role", default="", help="grant: the role to grant")
    admin.add_argument("--for", dest="duration", default="", metavar="DURATION",
                       help="grant: how long (3600, 90s, 15m, 1h30m, 2d)")
    admin.add_argument("--reason", default="", help="grant: why (audited)")
    admin.add_argument("--approver", default="", help="grant: who approved it (audited)")
    admin.add_argument("--all", action="store_true", help="grants: also those that ended and decided requests")
    admin.add_argument("--block", type=float, default=0.0, metavar="SECONDS",
                       help="terminate: also refuse the user's logins this long")
    admin.add_argument("--json", action="store_true", help="print the API's JSON answer")
    admin.add_argument("--subject", default="", help="revoke, unrevoke: by the IdP subject ('sub') or DN")
    admin.add_argument("--jti", default="", help="revoke, unrevoke: by the token id ('jti')")
    admin.add_argument("--id", default="", help="unrevoke: the revocation's id (admin revocations lists them)")
    control = sub.add_parser("control", help="the control schema shared by several instances ([control])")
    control.add_argument("control_command", choices=["init", "sql"],
                         help="init: create or update schema pgproxy_control as control.user; sql: print its SQL")
    control.add_argument("-c", "--config", default="", help="the configuration ([control]; needed by init)")
    sub.add_parser("hash-secret", help="hash a service account secret (read from stdin) for the accounts file")
    backend = sub.add_parser("check-backend", help="report database setups that let a person leave their identity")
    backend.add_argument("-c", "--config", required=True)
    ikey = sub.add_parser("identity-key", help="write a new key for signing the identity settings ([identity])")
    ikey.add_argument("file")
    ikey.add_argument("--force", action="store_true", help="replace an existing key file")
    isql = sub.add_parser("identity-sql", help="print the SQL that installs pgproxy.person() for the configured key")
    isql.add_argument("-c", "--config", required=True)
    isql.add_argument("--owner", default=None, metavar="ROLE",
                      help="role to own the schema, key table and functions (default: the one running the SQL)")
    audit = sub.add_parser("audit", help="the audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check the hash chains and signatures of audit files (oldest "
                                                 "first; .gz too); exit 1 on damage")
    verify.add_argument("files", nargs="+", metavar="FILE")
    verify.add_argument("--public-key", action="append", default=[], metavar="FILE",
                        help="trusted public keys (a .pub file or PEM); default: <file>.pub beside the files")
    args = parser.parse_args(argv)
    return {"serve": cmd_serve, "check-config": cmd_check_config, "demo": cmd_demo, "dev-token": cmd_dev_token,
            "admin": cmd_admin, "hash-secret": cmd_hash_secret, "check-backend": cmd_check_backend,
            "identity-key": cmd_identity_key, "identity-sql": cmd_identity_sql, "audit": cmd_audit,
            "control": cmd_control}[args.command](args)


def cmd_control(args) -> int:
    """init: exit 0 once the schema is there, 1 if it could not be made; sql: print it."""
    from pgproxy.control_admin import cmd_control as run
    if args.control_command == "init" and not args.config:
        print("error: control init needs -c FILE", file=sys.stderr)
        return 2
    cfg = _load_or_report(args.config) if args.config else None
    if args.config and cfg is None:
        return 1
    return run(args, cfg)


def cmd_audit(args) -> int:
    """verify: exit 0 when no damage is found, 1 when some is (each printed with its file and
    line), 2 when a file or key cannot be read."""
    from pgproxy.audit_verify import verify
    try:
        report = verify(args.files, args.public_key or None)
    except (OSError, EOFError, ValueError) as exc:  # EOFError: a cut-off .gz
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    return 1 if report.problems else 0


def cmd_check_backend(args) -> int:
    """Exit 0: nothing unsafe; 1: something unsafe (each printed with its fix); 2: cannot check."""
    cfg = _load_or_report(args.config)
    if cfg is None:
        return 2
    from pgproxy.checkbackend import run
    return run(cfg)


def cmd_check_config(args) -> int:
    if _load_or_report(args.config) is None:
        return 1
    print(f"{args.config}: ok")
    return 0


def _load_or_report(path: str):
    """The loaded configuration, or None after printing every problem to stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return None


def cmd_serve(args) -> int:
    from pgproxy.logs import setup_logging
    cfg = _load_or_report(args.config)
    if cfg is None:
        return 1
    setup_logging(cfg.log.level, cfg.log.format)
    signal.signal(signal.SIGUSR1, lambda *_: early_reopen.update(pending=True))  # until the loop handles it
    from pgproxy.notify import sd_notify
    from pgproxy.supervisor import StartupError, Supervisor, check_startup

    def ready(server) -> None:
        addresses = ", ".join(f"{h}:{p}" for h, p in server.addresses)
        sd_notify("READY=1", f"STATUS=listening on {addresses}")

    try:
        check_startup(cfg)  # here, never in a worker: see pgproxy/supervisor.py
        if cfg.server.workers > 1:
            return Supervisor(cfg, args.config).run()
        run_event_loop(serve_until_signalled(cfg, on_ready=ready, config_path=args.config))
    except StartupError as exc:  # the operator's mistake, not ours: one line, no traceback
        log.error(str(exc))
        return 1
    return 0


def run_event_loop(coro) -> None:
    try:
        import uvloop
        uvloop.run(coro)
    except ImportError:  # uvloop is a dependency; this keeps odd platforms working
        asyncio.run(coro)


async def serve_until_signalled(cfg, on_ready=None, worker: tuple[int, int] = (0, 0),
                                config_path: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads ``config_path``.
    ``worker``: (index, supervisor pid) when one of several."""
    from pgproxy.audit_chain import AuditKeyError
    from pgproxy.server import ProxyServer
    from pgproxy.supervisor import StartupError
    try:
        server = ProxyServer(cfg, worker_index=worker[0], group=worker[1])
    except (OSError, AuditKeyError, ConfigError) as exc:  # the audit file, a sink's secrets or TLS files
        raise StartupError(f"cannot start: {exc}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, server.audit.reopen)  # logrotate's postrotate
    if early_reopen["pending"]:
        early_reopen["pending"] = False
        server.audit.reopen()
    if config_path:
        loop.add_signal_handler(signal.SIGHUP, reload_config, server, config_path)
        if early_sighup["pending"]:  # a reload asked for while this process was starting
            early_sighup["pending"] = False
            reload_config(server, config_path)
    try:
        await server.start()
    except OSError as exc:  # the listeners say which address; this is the HTTP port or a socket
        raise StartupError(f"cannot start: {exc}") from None
    from pgproxy import compiled  # by now every hot-path module is imported
    log.info("hot-path modules", extra=compiled.log_fields())
    if on_ready:
        on_ready(server)
    await stop.wait()
    from pgproxy.notify import sd_notify
    if worker[1] == 0:  # the supervisor speaks for its workers
        sd_notify("STOPPING=1", "STATUS=draining sessions")
    await server.shutdown()


def reload_config(server, config_path: str) -> None:
    """SIGHUP: load, validate, apply to new sessions — or keep the running configuration.
    Either way the audit file is reopened if it was moved away (as on SIGUSR1)."""
    from pgproxy.logs import setup_logging
    server.audit.reopen()
    try:
        new = load_config(config_path)
        blocked = server.reload(new)
    except ConfigError as exc:  # server.reload: e.g. a new audit.file that cannot be opened
        log.error("configuration reload rejected; keeping the running one",
                  extra={"reason": "; ".join(exc.problems)})
        return
    if blocked:
        log.error("configuration reload rejected; keeping the running one",
                  extra={"reason": f"needs a restart to change: {', '.join(blocked)}"})
        return
    setup_logging(new.log.level, new.log.format)
    log.info("configuration reloaded", extra={"config": config_path})


def cmd_demo(args) -> int:
    from pgproxy.demo import run_demo
    return run_demo(args.port)


def cmd_dev_token(args) -> int:
    issuer = args.issuer
    if not issuer:
        try:
            issuer = json.loads(DEMO_STATE.read_text())["issuer"]
        except (OSError, ValueError, KeyError):
            print("no running demo found: start `pgproxy demo` or pass --issuer", file=sys.stderr)
            return 1
    query = urllib.parse.urlencode({"user": args.user, "groups": args.groups, "ttl": args.ttl})
    try:
        with urllib.request.urlopen(f"{issuer}/dev/token?{query}", timeout=5) as response:
            print(response.read().decode())
    except OSError as exc:
        print(f"cannot reach the dev issuer at {issuer}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_hash_secret(_args) -> int:
    """The secret comes from stdin (a prompt on a terminal), never from the command line."""
    from pgproxy.auth.service import hash_secret
    if sys.stdin.isatty():
        import getpass
        secret = getpass.getpass("secret: ")
        if getpass.getpass("again: ") != secret:
            print("error: the two entries differ", file=sys.stderr)
            return 1
    else:
        secret = sys.stdin.readline().rstrip("\n")
    if len(secret) < 16:
        print("error: use a secret of at least 16 characters (e.g. `openssl rand -base64 24`)", file=sys.stderr)
        return 1
    print(hash_secret(secret))
    return 0


def cmd_identity_key(args) -> int:
    """A new random key, readable by its owner only; an existing file only with --force."""
    from pgproxy.signed_identity import encode_key, generate_key
    path = Path(args.file)
    if path.exists() and not args.force:
        print(f"error: {path} exists; pass --force to replace it (then install the new key with identity-sql "
              "and reload the proxy)", file=sys.stderr)
        return 1
    # Written under a temporary name (0600 from its creation), then linked into place, so no
    # reader ever sees half a key; without --force link() also keeps a file that appeared meanwhile.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        print(f"error: cannot write {temporary}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(encode_key(generate_key()))
        if args.force:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    except OSError as exc:
        print(f"error: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    finally:
        temporary.unlink(missing_ok=True)
    print(f"wrote a new identity signing key to {path}", file=sys.stderr)
    return 0


def cmd_identity_sql(args) -> int:
    """The install SQL on stdout, for ``| psql -v ON_ERROR_STOP=1 -U postgres -d <database>``."""
    from pgproxy.signed_identity import install_sql
    cfg = _load_or_report(args.config)
    if cfg is None:
        return 1
    if cfg.identity_key is None:
        print("error: identity.signing_key_file is not set (make a key with `pgproxy identity-key FILE`)",
              file=sys.stderr)
        return 1
    try:
        sql = install_sql(cfg.identity_key, args.owner)
    except ValueError as exc:
        print(f"error: --owner: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(sql)
    return 0


def cmd_admin(args) -> int:
    from pgproxy.config import parse_listen
    cfg = _load_or_report(args.config)
    if cfg is None:
        return 1
    if not cfg.http.listen or not cfg.admin_token:
        print("error: the admin API needs http.listen and http.admin_token_file (or _env)", file=sys.stderr)
        return 1
    if args.action in ("terminate", "unblock") and not args.user:
        print(f"error: {args.action} needs a user name", file=sys.stderr)
        return 2
    host, port = parse_listen(cfg.http.listen)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    query = urllib.parse.urlencode({k: v for k, v in (("user", args.user), ("block_s", args.block)) if v})
    method = "POST" if args.action in ("terminate", "unblock") else "GET"
    path = f"/admin/{args.action}"
    if args.action in GRANT_ACTIONS:
        method, path, query = _grant_request(args)
        if method is None:
            print(f"error: {query}", file=sys.stderr)
            return 2
    if args.action in ("revoke", "revocations", "unrevoke"):  # control_admin.py
        from pgproxy.control_admin import admin_request
        try:
            method, fields = admin_request(args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        query = urllib.parse.urlencode(fields)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}{path}?{query}"
    request = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {cfg.admin_token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"error: {exc.code}: {exc.read().decode(errors='replace').strip()}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot reach the admin API at {host}:{port}: {exc}", file=sys.stderr)
        return 1
    if args.json or args.action in ("terminate", "unblock", "grant", "end-grant", "revoke", "revocations",
                                    "unrevoke"):
        print(json.dumps(answer, indent=1))
    elif args.action == "grants":
        _print_table(answer["grants"], GRANT_COLUMNS)
        if answer["requests"]:
            print()
            _print_table(answer["requests"], REQUEST_COLUMNS)
    else:
        _print_table(answer, SESSION_COLUMNS if args.action == "sessions" else POOL_COLUMNS)
    return 0


GRANT_ACTIONS = ("grant", "grants", "end-grant")
GRANT_COLUMNS = ("id", "user", "role", "start", "end", "remaining_s", "approver", "reason")
REQUEST_COLUMNS = ("id", "requester", "role", "duration_s", "filed_at", "state", "decided_by", "reason")


def _grant_request(args) -> tuple[str | None, str, str]:
    """(method, path, query) of a grants action, or (None, "", the problem)."""
    if args.action == "grants":
        return "GET", "/admin/grants", "all=1" if args.all else ""
    if args.action == "end-grant":
        if not args.user:
            return None, "", "end-grant needs the grant's id (pgproxy admin grants lists them)"
        return "POST", "/admin/grants/end", urllib.parse.urlencode({"id": args.user})
    missing = [name for name, value in (("PERSON", args.user), ("--role", args.role), ("--for", args.duration),
                                        ("--reason", args.reason)) if not value]
    if missing:
        return None, "", f"grant needs {', '.join(missing)}"
    return "POST", "/admin/grants", urllib.parse.urlencode(
        {"user": args.user, "role": args.role, "for": args.duration, "reason": args.reason,
         **({"approver": args.approver} if args.approver else {})})


SESSION_COLUMNS = ("user", "role", "client", "application", "since", "state", "database", "worker", "session")
POOL_COLUMNS = ("worker", "database", "size", "idle", "waiting", "acquires", "acquire_timeouts",
                "connections_opened", "connections_closed")


def _print_table(rows: list[dict], columns: tuple) -> None:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    for line in [list(columns)] + cells:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
