"""SIGTERM under load: sessions get the drain period, the rest end with 57P01, and every
statement that was sent is in the audit trail."""

from __future__ import annotations

import signal
import threading
import time

import psycopg


def test_sigterm_under_load_ends_sessions_with_57p01_and_audits_everything(make_proxy, issuer):
    proxy = make_proxy(server={"shutdown_timeout_s": 1}, backend={"pool_size": 8})
    sent: dict[int, list[str]] = {}
    outcomes: list[str] = []
    lock = threading.Lock()
    go = threading.Event()

    def client(n: int) -> None:
        conn = psycopg.connect(proxy.dsn("alice"), password=issuer.mint("alice", ["sales_emea"]), autocommit=True)
        go.wait()
        try:
            for seq in range(10_000):
                text = f"SELECT {n} AS client, {seq} AS seq, pg_sleep({0.5 if seq % 5 == 4 else 0})"
                with lock:
                    sent.setdefault(n, []).append(text)
                conn.execute(text)
        except psycopg.errors.AdminShutdown:
            with lock:
                outcomes.append("57P01")
        except psycopg.OperationalError as exc:
            with lock:
                outcomes.append(f"other: {exc}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    go.set()
    time.sleep(1.5)
    proxy.process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert outcomes == ["57P01"] * 6, outcomes
    assert proxy.process.wait(30) == 0
    audited = {r.get("statement") for r in proxy.audit()}
    # Every statement but each client's last got its result, so it reached the database. The
    # last may have been written after the proxy closed the connection, never reaching it.
    completed = [text for texts in sent.values() for text in texts[:-1]]
    missing = [text for text in completed if text not in audited]
    assert len(completed) > 30 and not missing, f"{len(missing)} of {len(completed)} missing, e.g. {missing[:3]}"
    in_flight = [texts[-1] for texts in sent.values() if texts[-1] in audited]
    assert in_flight, "statements running at shutdown are audited too"
