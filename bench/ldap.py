"""Directory logins per second: pgbench -C (a new connection per transaction) through
pgproxy with LDAP passwords against a local slapd, with the login cache on (the default
30 s) and off (every connection binds to the directory)."""

from __future__ import annotations

import sys

from bench.targets import BENCH_ROLE, Bench, Target
from tests.support.directory import PASSWORDS, SUFFIX, Slapd
from tests.support.proxy import ProxyProcess, merge

ARGS = ["-C", "-S", "-M", "simple", "-c", "4", "-j", "2"]


def measure_ldap(bench: Bench, seconds: float, run_pgbench) -> dict:
    directory = Slapd().start()
    results = {}
    try:
        for label, ttl in (("cache_on", 30.0), ("cache_off", 0.0)):
            ldap = {"urls": [directory.url], "user_dn_template": f"uid={{username}},ou=people,{SUFFIX}",
                    "cache_ttl_s": ttl}
            config = merge(bench.pgproxy_config(), {"auth": {"ldap": ldap},
                                                    "roles": [{"user": "alice", "role": BENCH_ROLE}]})
            proxy = ProxyProcess(config)
            try:
                target = Target("pgproxy-ldap", proxy.port, "alice", PASSWORDS["alice"])
                results[label] = run_pgbench(target, ARGS, seconds)["tps"]
            finally:
                proxy.stop()
            print(f"   pgproxy LDAP logins, {label}: {results[label]:.0f} connections/s", file=sys.stderr, flush=True)
    finally:
        directory.stop()
    return results
