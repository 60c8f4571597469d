"""What the proxy counts, and its Prometheus exposition.

The hot path never touches prometheus-client: a statement costs one regex match for its
class, one dict increment and one bucket increment in plain Python objects of the
worker (``Metrics``). At scrape time every worker hands in a JSON ``snapshot`` of its
counters and live gauges (over the control channel, see ``control.py``); the snapshots
are summed and rendered with prometheus-client's metric families. That is how several
worker processes expose one set of series without an mmap write per increment. A
restarted worker starts from zero, which Prometheus' ``rate()`` treats as a counter reset.

``SERIES`` declares every series: its type, help text and label names. The dashboard
and alert rules in ``conf/`` use only these (a test checks that).
"""

from __future__ import annotations

import re
from bisect import bisect_left

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

STATEMENT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CLASS_CACHE_SIZE = 4096
WAIT_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)
DIRECTORY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

# name: (type, help, label names, buckets for histograms)
SERIES: dict[str, tuple] = {
    "pgproxy_workers": ("gauge", "worker processes that answered this scrape", ()),
    "pgproxy_client_connections": ("gauge", "client connections by state", ("state",)),
    "pgproxy_backend_connections": ("gauge", "backend connections by database pool and state", ("database", "state")),
    "pgproxy_pool_waiting_clients": ("gauge", "clients waiting for a backend connection", ("database",)),
    "pgproxy_pool_wait_seconds": ("histogram", "time clients waited for a backend connection", ("database",),
                                  WAIT_BUCKETS),
    "pgproxy_pool_acquire_timeouts": ("counter", "clients that gave up waiting for a backend connection (53300)",
                                      ("database",)),
    "pgproxy_backend_connects": ("counter", "backend connections opened", ("database",)),
    "pgproxy_auth_attempts": ("counter", "client authentication attempts by method and result", ("method", "result")),
    "pgproxy_statements": ("counter", "statements that reached the database, by class and outcome",
                           ("class", "outcome")),
    "pgproxy_statement_duration_seconds": ("histogram", "statement time from send to completion, by class",
                                           ("class",), STATEMENT_BUCKETS),
    "pgproxy_denials": ("counter", "requests refused by policy (42501/28000), by reason", ("reason",)),
    "pgproxy_audit_queue_depth": ("gauge", "audit records waiting to be written", ()),
    "pgproxy_audit_records": ("counter", "audit records written", ()),
    "pgproxy_audit_write_errors": ("counter", "failed writes of the audit file", ()),
    "pgproxy_jwks_refreshes": ("counter", "fetches of the IdP's signing keys, by result", ("result",)),
    "pgproxy_directory_request_seconds": ("histogram", "LDAP login time (bind, entry and group reads), by result",
                                          ("result",), DIRECTORY_BUCKETS),
    "pgproxy_admin_terminations": ("counter", "sessions ended by an operator through the admin API", ()),
    "pgproxy_revocations_active": ("gauge", "revocations and blocks in force, by kind (block, person, subject, "
                                            "jti), as worker 0 knows them", ("kind",)),
    "pgproxy_pins": ("counter", "transaction-pooled clients pinned to a backend connection by session state, "
                                "by reason and result (pinned or refused)", ("reason", "result")),
    "pgproxy_access_denials": ("counter", "roles an [[access]] rule did not admit at login, by unmet condition "
                                          "and result (refused, or lowered to a fallback role)",
                               ("condition", "result")),
    "pgproxy_sessions_ended": ("counter", "sessions ended because their credential ended (token_expired, "
                                          "account_locked, account_disabled, account_removed, account_denied, "
                                          "group_removed, directory_unavailable)", ("cause",)),
    "pgproxy_sessions_by_credential_end": ("gauge", "logged-in sessions by when their credential ends them "
                                                    "(within 5m, 1h, 24h, later, never)", ("within",)),
    "pgproxy_directory_revalidations": ("counter", "re-checks of a person's directory entry for their open "
                                                   "sessions, by result (ok, locked, disabled, removed, denied, "
                                                   "unavailable)", ("result",)),
    "pgproxy_identity_switches": ("counter", "backend connections switched to another client's identity "
                                             "(person) or settings (settings)", ("kind",)),
    "pgproxy_grants_active": ("gauge", "time-boxed grants of a role in force now", ()),
    "pgproxy_grant_sessions": ("gauge", "client sessions running under a granted role", ()),
    "pgproxy_access_requests_pending": ("gauge", "access requests waiting for an approver", ()),
    "pgproxy_grants": ("counter", "time-boxed grants by event: granted, ended (early, by an operator), expired",
                       ("event",)),
    "pgproxy_access_requests": ("counter", "access requests by result: filed, approved, denied, lapsed, refused "
                                           "(a rule said no: self-approval, not an approver, ...)", ("result",)),
    "pgproxy_grant_sessions_ended": ("counter", "sessions ended because the grant they logged in under ended", ()),
}
GRANT_EVENTS = ("granted", "ended", "expired")
REQUEST_RESULTS = ("filed", "approved", "denied", "lapsed", "refused")
# the label values of the credential series (policy/access.py MESSAGES, revalidation.py)
SESSION_END_CAUSES = ("token_expired", "account_locked", "account_disabled", "account_removed", "account_denied",
                      "group_removed", "directory_unavailable")
ACCESS_CONDITIONS = ("tls", "client_certificate", "network", "amr", "acr", "auth_age", "time", "application",
                     "client_id")
REVALIDATION_RESULTS = ("ok", "locked", "disabled", "removed", "denied", "unavailable")

# With the guard off there is no parse: the first keyword decides the class (pgaudit's
# names), so statements that start with WITH or EXPLAIN count as READ even when they write.
_CLASS_BY_KEYWORD = {
    **dict.fromkeys(("SELECT", "VALUES", "TABLE", "WITH", "SHOW", "EXPLAIN", "FETCH", "MOVE"), "READ"),
    **dict.fromkeys(("INSERT", "UPDATE", "DELETE", "MERGE", "TRUNCATE", "COPY"), "WRITE"),
    **dict.fromkeys(("CREATE", "ALTER", "DROP", "COMMENT", "SECURITY", "REINDEX", "CLUSTER", "REFRESH",
                     "IMPORT"), "DDL"),
    **dict.fromkeys(("GRANT", "REVOKE", "REASSIGN"), "ROLE"),
    **dict.fromkeys(("DO", "CALL"), "FUNCTION"),
}
_FIRST_WORD = re.compile(r"(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/)*\(*\s*([A-Za-z]+)", re.S)


def statement_class(text: str) -> str:
    m = _FIRST_WORD.match(text)
    return _CLASS_BY_KEYWORD.get(m[1].upper(), "MISC") if m else "MISC"


class Histogram:
    """Bucket counts (the last one is +Inf) and the sum: a plain object, cheap to observe."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> list:
        return [self.counts, self.sum]


class Metrics:
    """One worker's counters. Gauges are read from the live objects at snapshot time."""

    def __init__(self) -> None:
        self.counters: dict[tuple, int] = {("pgproxy_admin_terminations",): 0}  # (series, *labels) -> count
        # declared counters show from the start, so rate() and alerts see them before the first event
        self.counters.update({("pgproxy_grant_sessions_ended",): 0,
                              **{("pgproxy_grants", e): 0 for e in GRANT_EVENTS},
                              **{("pgproxy_access_requests", r): 0 for r in REQUEST_RESULTS}})
        self.counters.update({**{("pgproxy_sessions_ended", c): 0 for c in SESSION_END_CAUSES},
                              **{("pgproxy_access_denials", c, "refused"): 0 for c in ACCESS_CONDITIONS},
                              **{("pgproxy_directory_revalidations", r): 0 for r in REVALIDATION_RESULTS}})
        self.histograms: dict[tuple, Histogram] = {}
        self._classes: dict[str, str] = {}           # statement text -> class
        self._durations: dict[str, Histogram] = {}   # class -> its duration histogram

    def count(self, series: str, *labels: str, n: int = 1) -> None:
        key = (series, *labels)
        self.counters[key] = self.counters.get(key, 0) + n

    def observe(self, series: str, value: float, *labels: str) -> None:
        key = (series, *labels)
        histogram = self.histograms.get(key)
        if histogram is None:
            histogram = self.histograms[key] = Histogram(SERIES[series][3])
        histogram.observe(value)

    def statement(self, text: str, seconds: float, outcome: str, verdict=None) -> None:
        """Per statement, on the hot path: kept to dict lookups (≈ 0.5 µs). The guard's
        verdict gives the class; without it (guard off) the first keyword does."""
        if verdict is not None:  # one class per statement: WRITE wins (WITH ... DELETE ... SELECT)
            kind = "WRITE" if "WRITE" in verdict.classes else (verdict.classes or ("MISC",))[0]
        else:
            kind = self._classes.get(text)
        if kind is None:
            kind = statement_class(text)
            if len(self._classes) < CLASS_CACHE_SIZE:  # drivers repeat a few texts; stop growing beyond that
                self._classes[text] = kind
        key = ("pgproxy_statements", kind, outcome)
        counters = self.counters
        counters[key] = counters.get(key, 0) + 1
        histogram = self._durations.get(kind)
        if histogram is None:
            histogram = self._durations[kind] = self.histograms[("pgproxy_statement_duration_seconds", kind)] = \
                Histogram(STATEMENT_BUCKETS)
        histogram.observe(seconds)

    def snapshot(self, gauges: list, extra_histograms: list = ()) -> dict:
        """JSON-ready: [[series, labels, value], ...] for counters and gauges,
        [[series, labels, counts, sum], ...] for histograms."""
        return {"counters": [[k[0], list(k[1:]), v] for k, v in self.counters.items()],
                "gauges": gauges,
                "histograms": [[k[0], list(k[1:]), *h.snapshot()] for k, h in self.histograms.items()]
                + list(extra_histograms)}


def render(snapshots: list[dict]) -> bytes:
    """Sum the workers' snapshots and render the Prometheus text format."""
    values: dict[tuple, float] = {}
    histograms: dict[tuple, list] = {}
    for snap in snapshots:
        for series, labels, value in snap["counters"] + snap["gauges"]:
            key = (series, tuple(labels))
            values[key] = values.get(key, 0) + value
        for series, labels, counts, total in snap["histograms"]:
            key = (series, tuple(labels))
            merged = histograms.setdefault(key, [[0] * len(counts), 0.0])
            merged[0] = [a + b for a, b in zip(merged[0], counts)]
            merged[1] += total
    values[("pgproxy_workers", ())] = len(snapshots)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(values, histograms))
    return generate_latest(registry)


class _Families:
    def __init__(self, values: dict, histograms: dict) -> None:
        self._values, self._histograms = values, histograms

    def collect(self):
        for name, (kind, doc, label_names, *rest) in SERIES.items():
            if kind == "histogram":
                family = HistogramMetricFamily(name, doc, labels=label_names)
                for (series, labels), (counts, total) in sorted(self._histograms.items()):
                    if series == name:
                        family.add_metric(list(labels), _cumulative(rest[0], counts), total)
            else:
                family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc,
                                                                                         labels=label_names)
                for (series, labels), value in sorted(self._values.items()):
                    if series == name:
                        family.add_metric(list(labels), value)
            yield family


def _cumulative(bounds: tuple, counts: list) -> list:
    buckets, running = [], 0
    for bound, n in zip((*map(str, bounds), "+Inf"), counts):
        running += n
        buckets.append((bound, running))
    return buckets
