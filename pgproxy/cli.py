"""Command line: serve, check-config, demo, dev-token."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from pgproxy.config import ConfigError, load_config

log = logging.getLogger("pgproxy")

# A SIGHUP that reaches a worker before its event loop handles signals (see supervisor).
early_sighup = {"pending": False}

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
    args = parser.parse_args(argv)
    return {"serve": cmd_serve, "check-config": cmd_check_config, "demo": cmd_demo,
            "dev-token": cmd_dev_token}[args.command](args)


def cmd_check_config(args) -> int:
    try:
        load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    print(f"{args.config}: ok")
    return 0


def cmd_serve(args) -> int:
    from pgproxy.logs import setup_logging
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    setup_logging(cfg.log.level, cfg.log.format)
    if cfg.server.workers > 1:
        from pgproxy.supervisor import Supervisor
        return Supervisor(cfg, args.config).run()
    from pgproxy.notify import sd_notify

    def ready(server) -> None:
        addresses = ", ".join(f"{h}:{p}" for h, p in server.addresses)
        sd_notify("READY=1", f"STATUS=listening on {addresses}")

    run_event_loop(serve_until_signalled(cfg, on_ready=ready, config_path=args.config))
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
    from pgproxy.server import ProxyServer
    server = ProxyServer(cfg, worker_index=worker[0], group=worker[1])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config_path:
        loop.add_signal_handler(signal.SIGHUP, reload_config, server, config_path)
        if early_sighup["pending"]:  # a reload asked for while this process was starting
            early_sighup["pending"] = False
            reload_config(server, config_path)
    await server.start()
    if on_ready:
        on_ready(server)
    await stop.wait()
    from pgproxy.notify import sd_notify
    if worker[1] == 0:  # the supervisor speaks for its workers
        sd_notify("STOPPING=1", "STATUS=draining sessions")
    await server.shutdown()


def reload_config(server, config_path: str) -> None:
    """SIGHUP: load, validate, apply to new sessions — or keep the running configuration."""
    from pgproxy.logs import setup_logging
    try:
        new = load_config(config_path)
    except ConfigError as exc:
        log.error("configuration reload rejected; keeping the running one",
                  extra={"reason": "; ".join(exc.problems)})
        return
    blocked = server.reload(new)
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
