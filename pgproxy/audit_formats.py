"""Audit records in the shapes security tools read: OCSF, ArcSight CEF, RFC 5424 syslog.

Pure: a record (the dict pgproxy writes as one JSON line) in, a dict, str or bytes out.
The sinks in ``audit_sinks`` do the I/O.

Which OCSF class a record becomes (schema 1.5.0):

    event                            OCSF class                      activity
    statement, denied, pin, other    6005 Datastore Activity         Query/Write/Update/Create/Delete/Other
    session_start, auth_failure,     3002 Authentication             Logon (Success / Failure)
    access_denied
    session_end                      3002 Authentication             Logoff
    admin_*                          6003 API Activity               Other ("terminate", "unblock")

Logins are Authentication, not Datastore Activity "Connect": a SIEM's failed-logon and
brute-force detections look for 3002, and 3002 has the fields a login has (auth protocol,
logon type, is_remote). Members the mapping does not use go to ``unmapped``, so nothing
in the record is lost.

Statement records name only their session, person and role; ``SessionContext`` adds
what that session's session_start said (client address, database, groups, subject), so
every OCSF or CEF record carries its source endpoint and database.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections import OrderedDict
from datetime import datetime

from pgproxy import __version__

OCSF_VERSION = "1.5.0"

# --- severity, shared by every format ------------------------------------------------

INFORMATIONAL, LOW, MEDIUM = 0, 1, 2
_FAILED_OUTCOMES = {"error", "connection_lost"}


def level(record: dict) -> int:
    """How much a record matters: INFORMATIONAL (the normal trail), LOW (a statement that
    failed, a refused session state), MEDIUM (a refused login or statement, an admin action)."""
    event = record.get("event")
    if event in ("auth_failure", "denied") or str(event).startswith("admin_") or _access_refused(record):
        return MEDIUM
    if (record.get("outcome") in _FAILED_OUTCOMES or record.get("result") == "refused" or record.get("render_error")
            or record.get("event") == "access_denied"):
        return LOW
    return INFORMATIONAL


def failed(record: dict) -> bool:
    return (record.get("event") in ("auth_failure", "denied") or record.get("outcome") in _FAILED_OUTCOMES
            or record.get("result") == "refused")


def _access_refused(record: dict) -> bool:
    """A login an [[access]] condition refused (a lowered one is a LOW, successful logon)."""
    return record.get("event") == "access_denied" and record.get("result") != "lowered"


# --- session context -------------------------------------------------------------------

class SessionContext:
    """What each session's session_start record said, added to that session's later records.

    Bounded: past ``limit`` sessions the oldest is forgotten (its records then go out
    without a client address); session_end forgets its session."""

    FIELDS = ("client", "database", "application_name", "groups", "subject", "issuer", "auth_method")

    def __init__(self, limit: int = 100_000) -> None:
        self._limit = limit
        self._sessions: OrderedDict[str, dict] = OrderedDict()

    def enrich(self, record: dict) -> dict:
        session = record.get("session")
        if not session:
            return record
        event = record.get("event")
        if event == "session_start":
            known = {k: record[k] for k in self.FIELDS if record.get(k) not in (None, "")}
            known["session_started"] = record.get("ts")
            self._sessions[session] = known
            if len(self._sessions) > self._limit:
                self._sessions.popitem(last=False)
            return record
        known = self._sessions.pop(session, None) if event == "session_end" else self._sessions.get(session)
        return {**known, **record} if known else record

    def __len__(self) -> int:
        return len(self._sessions)


# --- shared helpers ----------------------------------------------------------------

def epoch_ms(ts) -> int:
    """ISO-8601 (as pgproxy writes ``ts``) to milliseconds since the epoch; now if unreadable."""
    try:
        return int(datetime.fromisoformat(ts).timestamp() * 1000)
    except (TypeError, ValueError):
        return int(time.time() * 1000)


def split_client(client) -> tuple[str | None, int | None]:
    """``"10.0.0.5:51234"`` / ``"::1:51234"`` -> (ip, port); ``"unix"`` or junk -> (None, None)."""
    if not isinstance(client, str) or ":" not in client:
        return None, None
    host, _, port = client.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None, None
    return host, int(port) if port.isdigit() and int(port) < 65536 else None


def _first_word(text) -> str:
    return text.split(None, 1)[0].upper() if isinstance(text, str) and text.strip() else ""


# --- OCSF --------------------------------------------------------------------------------

DATASTORE_ACTIVITY, API_ACTIVITY, AUTHENTICATION = 6005, 6003, 3002
_CLASSES = {DATASTORE_ACTIVITY: ("Datastore Activity", 6, "Application Activity"),
            API_ACTIVITY: ("API Activity", 6, "Application Activity"),
            AUTHENTICATION: ("Authentication", 3, "Identity & Access Management")}
_DATASTORE_ACTIVITIES = {0: "Unknown", 1: "Read", 2: "Update", 3: "Connect", 4: "Query", 5: "Write", 6: "Create",
                         7: "Delete", 8: "List", 99: "Other"}
_BY_COMMAND = {"SELECT": 4, "FETCH": 4, "SHOW": 4, "TABLE": 4, "VALUES": 4, "WITH": 4, "INSERT": 5, "UPDATE": 2,
               "MERGE": 2, "DELETE": 7, "TRUNCATE": 7, "DROP": 7, "CREATE": 6}
_SEVERITY = {INFORMATIONAL: (1, "Informational"), LOW: (2, "Low"), MEDIUM: (3, "Medium")}
_AUTH_PROTOCOLS = {"ldap": (12, "LDAP"), "jwt": (99, "JWT"), "service": (99, "pgproxy service account"),
                   "oauthbearer": (99, "OAUTHBEARER (SASL, RFC 7628)")}
_ACTIVITY_NAMES = {"pin": "Pin session", "denied": "Denied"}


def to_ocsf(record: dict) -> dict:
    """One OCSF 1.5.0 event for one audit record (see the module docstring for the classes)."""
    event = str(record.get("event") or "unknown")
    if event in ("session_start", "auth_failure", "session_end", "access_denied"):
        out, used = _authentication(record, event)
    elif event.startswith("admin_"):
        out, used = _api_activity(record, event)
    else:
        out, used = _datastore(record, event)
    severity_id, severity = _SEVERITY[level(record)]
    ok = not failed(record)
    out.update({"time": epoch_ms(record.get("ts")), "severity_id": severity_id, "severity": severity,
                "status_id": 1 if ok else 2, "status": "Success" if ok else "Failure",
                "metadata": _metadata(record)})
    if record.get("sqlstate"):
        out["status_code"] = str(record["sqlstate"])
    if record.get("reason") or not ok:
        out["status_detail"] = str(record.get("reason") or record.get("outcome") or event)
    name, category_uid, category = _CLASSES[out["class_uid"]]
    out.update({"class_name": name, "category_uid": category_uid, "category_name": category,
                "type_uid": out["class_uid"] * 100 + out["activity_id"],
                "type_name": f"{name}: {out['activity_name']}"})
    used |= {"ts", "event", "sqlstate", "reason", "instance", "id", "seq", "session", "user", "client",
             "subject", "issuer", "groups", "session_started"}
    unmapped = {k: v for k, v in record.items() if k not in used}
    if unmapped:
        out["unmapped"] = unmapped
    return out


def _datastore(record: dict, event: str) -> tuple[dict, set]:
    statement = record.get("statement")
    if event in ("statement", "denied"):
        word = _first_word(record.get("command")) or _first_word(statement)
        activity = _BY_COMMAND.get(word, 99)
        if word == "COPY":
            activity = 5 if "WRITE" in (record.get("classes") or ()) else 4
    else:
        activity = 99
    out = {"class_uid": DATASTORE_ACTIVITY, "activity_id": activity,
           "activity_name": _DATASTORE_ACTIVITIES[activity] if activity != 99
           else _ACTIVITY_NAMES.get(event, event.replace("_", " ").capitalize()),
           "actor": _actor(record), "src_endpoint": _src_endpoint(record),
           "database": {"name": str(record.get("database") or "unknown"), "type_id": 1, "type": "Relational",
                        "desc": "PostgreSQL"},
           "type_id": 1, "type": "Database"}
    used = {"database"}
    if isinstance(statement, str):
        query = {"query_string": statement}
        if record.get("parameters") is not None:
            query["data"] = {"parameters": record["parameters"]}
        out["query_info"] = query
        used |= {"statement", "parameters"}
    relations = record.get("relations")
    if isinstance(relations, list) and len(relations) == 1:
        out["table"] = {"name": str(relations[0])}
    if isinstance(record.get("duration_ms"), (int, float)):
        out["duration"] = int(round(record["duration_ms"]))
        used.add("duration_ms")
    if event == "statement":
        out["message"] = f"{record.get('user')} ran {record.get('command') or word or 'a statement'} " \
                         f"as {record.get('role')}: {record.get('outcome')}"
    elif event == "denied":
        out["message"] = f"statement of {record.get('user')} refused: {record.get('reason')}"
    _add_dst(out, record)
    return out, used


def _authentication(record: dict, event: str) -> tuple[dict, set]:
    activity, activity_name = (2, "Logoff") if event == "session_end" else (1, "Logon")
    out = {"class_uid": AUTHENTICATION, "activity_id": activity, "activity_name": activity_name,
           "user": _user(record), "src_endpoint": _src_endpoint(record),
           "service": {"name": "pgproxy", "version": __version__},
           "logon_type_id": 3, "logon_type": "Network", "is_remote": record.get("client") != "unix"}
    if record.get("session"):
        out["session"] = _session(record)
    method = record.get("auth_method")
    if method:
        out["auth_protocol_id"], out["auth_protocol"] = _AUTH_PROTOCOLS.get(method, (99, str(method)))
    verb = {"session_start": "logged in", "auth_failure": "failed to log in", "session_end": "logged off",
            "access_denied": "was lowered to a weaker role by an access condition" if record.get("result") == "lowered"
            else "was refused by an access condition"}[event]
    out["message"] = f"{record.get('user') or 'unknown'} {verb}" + \
        (f" to database {record['database']}" if record.get("database") else "")
    if isinstance(record.get("duration_s"), (int, float)):
        out["duration"] = int(record["duration_s"] * 1000)
    _add_dst(out, record)
    return out, {"auth_method", "duration_s"}


def _api_activity(record: dict, event: str) -> tuple[dict, set]:
    operation = event[len("admin_"):] or event
    out = {"class_uid": API_ACTIVITY, "activity_id": 99, "activity_name": operation.capitalize(),
           "actor": {"app_name": "pgproxy admin API"}, "src_endpoint": _src_endpoint(record),
           "api": {"operation": operation, "service": {"name": "pgproxy admin API", "version": __version__}}}
    if record.get("target_user"):
        out["resources"] = [{"name": str(record["target_user"]), "type": "user"}]
        out["message"] = f"admin {operation} of user {record['target_user']}"
    _add_dst(out, record)
    return out, {"target_user"}


def _metadata(record: dict) -> dict:
    meta = {"version": OCSF_VERSION, "log_name": "pgproxy audit",
            "product": {"name": "pgproxy", "vendor_name": "pgproxy", "version": __version__}}
    uid = record.get("id", record.get("seq"))
    if uid is not None:
        meta["uid"] = str(uid)
    if record.get("session"):
        meta["correlation_uid"] = str(record["session"])
    return meta


def _user(record: dict) -> dict:
    name = record.get("user")
    user = {"name": str(name) if name else "unknown", "type_id": 1, "type": "User"}
    if isinstance(name, str) and name.startswith("svc:"):
        user["type_id"], user["type"] = 99, "Service account"
    if record.get("subject"):
        user["uid"] = str(record["subject"])
    if isinstance(record.get("groups"), list):
        user["groups"] = [{"name": str(g)} for g in record["groups"]]
    return user


def _session(record: dict) -> dict:
    session = {"uid": str(record["session"]), "is_remote": record.get("client") != "unix"}
    if record.get("issuer"):
        session["issuer"] = str(record["issuer"])
    started = record.get("session_started") or (record.get("ts") if record.get("event") == "session_start" else None)
    if started:
        session["created_time"] = epoch_ms(started)
    return session


def _actor(record: dict) -> dict:
    actor = {"user": _user(record)}
    if record.get("session"):
        actor["session"] = _session(record)
    return actor


def _src_endpoint(record: dict) -> dict:
    client = record.get("client")
    ip, port = split_client(client)
    if ip:
        return {"ip": ip, "port": port} if port is not None else {"ip": ip}
    return {"name": "unix socket" if client == "unix" else "unknown"}


def _add_dst(out: dict, record: dict) -> None:
    if record.get("instance"):
        out["dst_endpoint"] = {"hostname": str(record["instance"]), "svc_name": "pgproxy"}


# --- CEF -----------------------------------------------------------------------------------

_CEF_NAMES = {"statement": "SQL statement", "denied": "Statement refused", "session_start": "Logon",
              "session_end": "Logoff", "auth_failure": "Logon failed", "pin": "Session pinned",
              "access_denied": "Logon refused by an access condition",
              "admin_terminate": "Admin terminated sessions", "admin_unblock": "Admin unblocked a user"}
_CEF_SEVERITY = {INFORMATIONAL: 1, LOW: 3, MEDIUM: 5}
# (our member, CEF key, label for custom fields): the order they appear in.
_CEF_FIELDS = (("statement", "cs1", "statement"), ("session", "cs2", "session"), ("database", "cs3", "database"),
               ("sqlstate", "cs4", "sqlstate"), ("groups", "cs5", "groups"), ("relations", "cs6", "relations"),
               ("rows", "cn1", "rows"), ("backend_pid", "cn2", "backend_pid"),
               ("duration_ms", "cfp1", "duration_ms"), ("auth_method", "flexString1", "auth_method"),
               ("parameters", "flexString2", "parameters"))


def cef_header_escape(value) -> str:
    """Pipes and backslashes escaped; a header field cannot hold a line break."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def cef_value_escape(value) -> str:
    """Backslash, equals sign and line breaks escaped (a pipe needs none in the extension)."""
    return (str(value).replace("\\", "\\\\").replace("=", "\\=").replace("\r\n", "\\n")
            .replace("\n", "\\n").replace("\r", "\\r"))


def to_cef(record: dict) -> str:
    """``CEF:0|pgproxy|pgproxy|version|signature|name|severity|extension`` for one record."""
    event = str(record.get("event") or "unknown")
    header = ["CEF:0", "pgproxy", "pgproxy", __version__, event,
              _CEF_NAMES.get(event, event.replace("_", " ")), str(_CEF_SEVERITY[level(record)])]
    ext: list[tuple[str, object]] = [("rt", epoch_ms(record.get("ts"))), ("cat", event)]
    if record.get("user"):
        ext.append(("suser", record["user"]))
    if record.get("subject"):
        ext.append(("suid", record["subject"]))
    if record.get("role"):
        ext.append(("duser", record["role"]))
    elif record.get("target_user"):
        ext.append(("duser", record["target_user"]))
    ip, port = split_client(record.get("client"))
    if ip:
        ext.append(("src", ip))
        if port is not None:
            ext.append(("spt", port))
    if record.get("instance"):
        ext.append(("dvchost", record["instance"]))
    ext.append(("act", record.get("command") or event))
    outcome = record.get("outcome") or record.get("result") or ("failure" if failed(record) else "success")
    ext.append(("outcome", outcome))
    if record.get("reason"):
        ext.append(("reason", record["reason"]))
    if record.get("application_name"):
        ext.append(("requestClientApplication", record["application_name"]))
    uid = record.get("id", record.get("seq"))
    if uid is not None:
        ext.append(("externalId", uid))
    for member, key, label in _CEF_FIELDS:
        value = record.get(member)
        if value is None or value == "" or value == []:
            continue
        if isinstance(value, list):
            value = ",".join(map(str, value)) if member != "parameters" else json.dumps(value, ensure_ascii=False)
        ext += [(key, value), (f"{key}Label", label)]
    ext.append(("msg", _cef_message(record, event)))
    return "|".join(cef_header_escape(h) if i else h for i, h in enumerate(header)) + "|" + \
        " ".join(f"{k}={cef_value_escape(v)}" for k, v in ext)


def _cef_message(record: dict, event: str) -> str:
    if event == "statement":
        return f"{record.get('user')} as {record.get('role')}: {record.get('command') or 'statement'} " \
               f"{record.get('outcome')}"
    return f"{event} {record.get('user') or record.get('target_user') or ''}".strip()


# --- RFC 5424 syslog --------------------------------------------------------------------

FACILITIES = {name: i for i, name in enumerate(
    ["kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv", "ftp", "ntp",
     "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7"])}
SEVERITIES = {name: i for i, name in enumerate(
    ["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"])}
BOM = b"\xef\xbb\xbf"
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)")
_SD_NAME = re.compile(r"[!-~]{1,32}")  # PRINTUSASCII except = SP ] " (checked below)


def header_token(value, limit: int) -> str:
    """A HOSTNAME/APP-NAME/PROCID/MSGID: printable US-ASCII, at most ``limit``; else NILVALUE."""
    text = str(value or "")
    text = "".join(c for c in text if "!" <= c <= "~")[:limit]
    return text or "-"


def sd_escape(value) -> str:
    """An SD-PARAM value: '"', '\\' and ']' escaped with a backslash (RFC 5424 6.3.3)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def sd_element(sd_id: str, params: list[tuple[str, object]]) -> str:
    for name in [sd_id] + [n for n, _ in params]:
        if not _SD_NAME.fullmatch(name) or any(c in name for c in '= ]"'):
            raise ValueError(f"not an SD name: {name!r}")
    return f"[{sd_id}" + "".join(f' {n}="{sd_escape(v)}"' for n, v in params if v is not None) + "]"


def rfc5424(facility: int, severity: int, timestamp, hostname, app_name, procid, msgid,
            structured_data: list[tuple[str, object]], sd_id: str, message: str,
            max_size: int = 0) -> tuple[bytes, bool]:
    """One syslog message (RFC 5424), and whether its MSG was cut to fit ``max_size`` bytes.

    MSG is UTF-8 with a BOM when it holds non-ASCII characters; pure ASCII goes without
    one (it reads the same in any encoding). A cut MSG ends on a character boundary and
    the SD element says truncated="true"."""
    ts = timestamp if isinstance(timestamp, str) and _TIMESTAMP.fullmatch(timestamp) else "-"
    head = (f"<{facility * 8 + severity}>1 {ts} {header_token(hostname, 255)} {header_token(app_name, 48)} "
            f"{header_token(procid, 128)} {header_token(msgid, 32)} ")
    body = message.encode("utf-8")
    prefix = BOM if not message.isascii() else b""
    out = (head + sd_element(sd_id, structured_data) + " ").encode() + prefix + body
    if not max_size or len(out) <= max_size:
        return out, False
    start = (head + sd_element(sd_id, structured_data + [("truncated", "true")]) + " ").encode() + prefix
    room = max(0, max_size - len(start))
    cut = body[:room].decode("utf-8", "ignore").encode("utf-8")
    return start + cut, True


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 octet-counting framing (also RFC 5425 over TLS): ``LEN SP MSG``."""
    return b"%d %s" % (len(message), message)


# --- PostgreSQL COPY text format --------------------------------------------------------

_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_row(values: list) -> bytes:
    """One row of ``COPY ... FROM STDIN`` text format: tab-separated, \\N for NULL."""
    return ("\t".join("\\N" if v is None else str(v).translate(_COPY_ESCAPES) for v in values) + "\n").encode()


def without_nul(value):
    """The record with NUL characters replaced by U+FFFD: jsonb refuses \\u0000."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [without_nul(v) for v in value]
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    return value
