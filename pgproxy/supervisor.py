"""Several worker processes that act as one proxy.

The supervisor forks ``server.workers`` processes once the configuration is loaded and
before any thread exists. Each worker binds its own listening sockets with SO_REUSEPORT,
so the kernel spreads new connections across them, and has its own pools (backend
connections in all: workers × pool_size). A cancel request may reach any worker:
cancel keys carry the owner's index in their top bits, and a worker passes a key it
does not own to the owner over a Unix datagram socket (see ProxyServer.cancel).

Signals: SIGHUP is passed to every worker, which reloads the configuration file itself;
SIGUSR1 is passed to every worker, which reopens its audit file (logrotate's postrotate);
SIGTERM and SIGINT are passed to every worker, which shut down gracefully;
the supervisor exits 0 once all have exited cleanly. A worker that dies otherwise is
logged and restarted. A supervisor that dies (SIGKILL, OOM killer) takes its workers with
it: each asks the kernel for SIGTERM when its parent goes (PR_SET_PDEATHSIG), so no orphan
keeps serving on the shared ports, heartbeating in the control schema, or holding backends.

Watchdog: under systemd with WatchdogSec= (WATCHDOG_USEC set), the supervisor pings
every worker over the control channel twice per watchdog period and sends WATCHDOG=1
while it runs. A worker that misses two pings in a row (a stuck event loop) is killed
and restarted, so systemd restarts the whole service only if the supervisor is stuck.

Startup checks (``check_startup``) run once per start, before anything listens — in front
of the supervisor, or of the single process — and never in a worker: a restarted worker's
siblings listen on the same addresses with SO_REUSEPORT, as they should. Each failure is a
``StartupError``: one line for the operator, exit status 1, no traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import time

from pgproxy import control
from pgproxy.config import Config, parse_listen
from pgproxy.notify import sd_notify

log = logging.getLogger("pgproxy.supervisor")

RESTART_DELAY_S = 0.5
WAKE_INTERVAL_S = 0.5  # how often the supervisor looks for dead workers without a signal
MISSED_PINGS_LIMIT = 2
KILL_GRACE_S = 5.0  # on stop: after shutdown_timeout_s and this, workers still alive are killed


class Supervisor:
    def __init__(self, cfg: Config, config_path: str) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.workers: dict[int, int] = {}  # pid -> worker index
        self.stopping = False
        self.failed = False
        self._missed_pings: dict[int, int] = {}  # worker index -> pings in a row without answer
        self._kill_after = float("inf")  # stopping: workers still alive then are killed
        self.pid = os.getpid()

    def run(self) -> int:
        """Call ``check_startup`` first (``cmd_serve`` does)."""
        if self.cfg.server.unix_socket_dir:
            from pgproxy import server
            server.inherited_unix_socket = server.bind_unix_socket(self.cfg)  # the workers inherit it
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle_stop)
        signal.signal(signal.SIGHUP, self.handle_reload)
        signal.signal(signal.SIGUSR1, self.handle_reopen)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the select below
        self._ready_r, self._ready_w = os.pipe()  # each worker writes one byte once it listens
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for index in range(self.cfg.server.workers):
            self._spawn(index)
        log.info("supervisor started", extra={"workers": self.cfg.server.workers})
        self._wait_ready()
        watchdog_s = int(os.environ.get("WATCHDOG_USEC") or 0) / 2e6
        next_ping = time.monotonic() + watchdog_s
        while self._reap():
            select.select([self._wake_r], [], [], WAKE_INTERVAL_S)
            os.set_blocking(self._wake_r, False)
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
            if watchdog_s and time.monotonic() >= next_ping:
                next_ping = time.monotonic() + watchdog_s
                self._ping_workers(min(watchdog_s, control.TIMEOUT_S))
            if self.stopping and time.monotonic() > self._kill_after:
                self._kill_after = float("inf")
                for pid, index in list(self.workers.items()):  # stuck (stopped, or a hung loop)
                    log.error("worker did not stop in time; killing it", extra={"worker": index, "pid": pid})
                    os.kill(pid, signal.SIGKILL)
        if self.cfg.server.unix_socket_dir:
            from pgproxy import server
            server.inherited_unix_socket.close()
            try:
                os.unlink(server.unix_socket_path(self.cfg))
            except OSError:
                pass
        return 1 if self.failed else 0

    def _reap(self) -> bool:
        """Collect exited workers, restarting them unless stopping; False once none is left."""
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            index = self.workers.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                self.failed |= code != 0
                continue
            log.error("worker died; restarting it", extra={"worker": index, "exit_code": code})
            time.sleep(RESTART_DELAY_S)
            self._spawn(index)
        return False

    def _ping_workers(self, timeout: float) -> None:
        if self.stopping:
            return
        for pid, index in list(self.workers.items()):
            try:
                control.ask_blocking(control.control_socket_name(os.getpid(), index), {"op": "ping"}, timeout)
                self._missed_pings[index] = 0
            except (OSError, ValueError):
                missed = self._missed_pings[index] = self._missed_pings.get(index, 0) + 1
                if missed >= MISSED_PINGS_LIMIT:
                    log.error("worker does not answer; killing it", extra={"worker": index, "pid": pid})
                    self._missed_pings[index] = 0
                    os.kill(pid, signal.SIGKILL)  # reaped and restarted by the loop
        sd_notify("WATCHDOG=1")

    def _wait_ready(self) -> None:
        """Tell systemd READY=1 only when every worker accepts connections."""
        pending = self.cfg.server.workers
        while pending > 0 and not self.stopping:
            readable, _, _ = select.select([self._ready_r], [], [], 0.5)
            if readable:
                pending -= len(os.read(self._ready_r, pending))
            elif any(os.waitpid(pid, os.WNOHANG)[0] for pid in list(self.workers)):
                log.error("a worker exited before it was ready")
                self.handle_stop(signal.SIGTERM, None)
                self.failed = True
                return
        if pending <= 0:
            sd_notify("READY=1", f"STATUS={self.cfg.server.workers} workers listening")

    def handle_stop(self, signum, _frame) -> None:
        if not self.stopping:
            sd_notify("STOPPING=1", "STATUS=draining sessions")
            self._kill_after = time.monotonic() + self.cfg.server.shutdown_timeout_s + KILL_GRACE_S
        self.stopping = True
        self._signal_workers(signum)

    def handle_reload(self, signum, _frame) -> None:
        """Each worker loads and checks the file itself; a restarted worker reads it fresh."""
        try:
            from pgproxy.config import load_config
            self.cfg = load_config(self.config_path)
        except Exception as exc:  # the workers log the details
            log.warning("supervisor keeps the last good configuration for restarted workers",
                        extra={"reason": str(exc).replace("\n", "; ")})
        self._signal_workers(signal.SIGHUP)

    def handle_reopen(self, signum, _frame) -> None:
        """Each worker reopens its audit file if it was moved away."""
        self._signal_workers(signal.SIGUSR1)

    def _signal_workers(self, signum: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid:
            self.workers[pid] = index
            self._missed_pings[index] = 0
            return
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            end_with_parent(self.pid)
            from pgproxy import cli, logs
            # Until the worker's loop handles SIGHUP, remember one rather than lose it.
            signal.signal(signal.SIGHUP, lambda *_: cli.early_sighup.update(pending=True))
            signal.signal(signal.SIGUSR1, lambda *_: cli.early_reopen.update(pending=True))
            logs.worker_index = index
            os.close(self._ready_r)
            ready_w = self._ready_w
            from pgproxy.cli import run_event_loop, serve_until_signalled
            run_event_loop(serve_until_signalled(self.cfg, worker=(index, os.getppid()), config_path=self.config_path,
                                                 on_ready=lambda _server: os.write(ready_w, b"r")))
            code = 0
        except StartupError as exc:  # rare: check_startup ran before the fork
            log.error("worker cannot start", extra={"worker": index, "reason": str(exc)})
        except BaseException:
            log.exception("worker failed", extra={"worker": index})
        finally:
            logging.shutdown()
            os._exit(code)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(parent: int) -> None:
    """SIGTERM this process when ``parent`` dies; at once if it already has (it may have
    died between fork and here). Linux only: elsewhere the supervisor's SIGTERM is the way."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def cancel_socket_name(group: int, index: int) -> str:
    """Abstract-namespace Unix socket of one worker's cancel inbox (nothing on disk)."""
    return f"\0pgproxy-{group}-cancel-{index}"


class StartupError(Exception):
    """Why the proxy cannot start, in one line for the operator (logged without a traceback)."""


def check_startup(cfg: Config) -> None:
    """StartupError if a listen address is taken or unusable, or the audit file or its
    signing key cannot be opened (a missing key file is created here, once, before any
    worker exists): found before anything listens, rather than by a worker that dies or, worse, a
    second proxy that shares the port.

    Once per start (see the module header). The Unix socket is checked where it is bound
    (``server.bind_unix_socket``), which also happens only once.
    """
    seen: dict[tuple, tuple[str, str]] = {}  # socket address -> (option, entry)
    for key, entry in [("server.listen", e) for e in cfg.server.listen] + \
            ([("http.listen", cfg.http.listen)] if cfg.http.listen else []) + \
            ([("control.peer_listen", cfg.control.peer_listen)] if cfg.control.peer_listen else []):
        for sockaddr in probe_listen_address(key, entry):
            if sockaddr in seen:
                first_key, first = seen[sockaddr]
                raise StartupError(f"{first} ({first_key}) and {entry} ({key}) are the same address; list it once")
            seen[sockaddr] = (key, entry)
    try:
        os.close(os.open(cfg.audit.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))
    except OSError as exc:
        raise StartupError(f"cannot open the audit file {cfg.audit.file} for appending: {exc.strerror}; "
                           "fix audit.file or its directory's permissions") from None
    if cfg.audit.signing_key_file:
        from pgproxy.audit_chain import AuditKeyError, load_or_create_key
        try:
            load_or_create_key(cfg.audit.signing_key_file)
        except AuditKeyError as exc:
            raise StartupError(f"{exc}; fix audit.signing_key_file") from None


def probe_listen_address(key: str, entry: str) -> list[tuple]:
    """Bind every address ``entry`` resolves to, as the listeners will, but without SO_REUSEPORT.

    Our listeners set SO_REUSEPORT when there are several workers, and so would a second
    pgproxy: the kernel would let it bind beside us and hand it half the logins. Without
    SO_REUSEPORT the bind fails if anyone listens there, while SO_REUSEADDR lets it
    succeed over the TIME_WAIT connections of a run that just stopped. Nothing listens:
    the probe is closed at once. Returns the socket addresses probed.
    """
    host, port = parse_listen(entry)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(bind_failure(key, entry, exc)) from None
    probed = []
    for family, kind, proto, _, sockaddr in dict.fromkeys(infos):  # resolvers repeat themselves
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio binds it: IPv4 is a separate address
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                raise StartupError(bind_failure(key, entry, exc)) from None
        probed.append(sockaddr[:2])
    return probed


def bind_failure(key: str, address: str, exc: OSError) -> str:
    """The operator's line for a listen address that cannot be bound (``key``: its option)."""
    if isinstance(exc, socket.gaierror):
        return f"cannot listen on {address}: the host name does not resolve ({exc.strerror}); fix {key}"
    if exc.errno == errno.EADDRINUSE:
        return f"another process already listens on {address}; stop it or choose another {key} address"
    if exc.errno == errno.EACCES:
        port = address.rsplit(":", 1)[-1]
        why = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" if port.isdigit() and int(port) < 1024 else ""
        return f"no permission to listen on {address}{why}; choose another {key} address"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {address}: no network interface of this machine has that address; fix {key}"
    return f"cannot listen on {address}: {exc.strerror or exc}; fix {key}"
