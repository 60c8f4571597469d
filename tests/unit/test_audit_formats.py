"""OCSF, CEF, RFC 5424 and COPY renderings of audit records, and the [[audit_sinks]] rules."""

from __future__ import annotations

import ipaddress
import json
import re

import pytest

from pgproxy import __version__
from pgproxy import audit_formats as fmt
from pgproxy.config import ConfigError, parse_config

# --- records as pgproxy writes them (pgproxy/audit.py, frontend/session.py, http_api.py) -----

START = {"ts": "2026-03-02T09:15:00.000250+00:00", "session": "3f9a", "user": "alice", "role": "emea_analyst",
         "subject": "sub-alice", "issuer": "https://idp.example", "groups": ["sales_emea", "staff"],
         "auth_method": "jwt", "client": "10.1.2.3:50412", "database": "demo", "application_name": "psql",
         "backend_pid": 4242, "pool_mode": "session", "event": "session_start"}
STATEMENT = {"ts": "2026-03-02T09:15:01.250000+00:00", "event": "statement", "session": "3f9a", "user": "alice",
             "role": "emea_analyst", "auth_method": "jwt", "backend_pid": 4242,
             "statement": "SELECT * FROM orders WHERE note = $1", "command": "SELECT", "rows": 3,
             "duration_ms": 1.734, "outcome": "ok", "classes": ["READ"], "relations": ["public.orders"],
             "parameters": ["a|b"]}
FAILED = {**STATEMENT, "ts": "2026-03-02T09:15:02.000000+00:00", "statement": "SELECT 1/0", "command": None,
          "rows": None, "outcome": "error", "sqlstate": "22012"}
INSERT = {**STATEMENT, "statement": "INSERT INTO items VALUES (1, 'x')", "command": "INSERT", "rows": 1,
          "classes": ["WRITE"], "relations": ["public.items"]}
DENIED = {"ts": "2026-03-02T09:15:03.000000+00:00", "session": "3f9a", "user": "alice", "role": "emea_analyst",
          "statement": "DELETE FROM orders", "reason": "read_only policy", "event": "denied"}
PIN = {"ts": "2026-03-02T09:15:04.000000+00:00", "session": "3f9a", "user": "alice", "role": "emea_analyst",
       "reason": "SET", "result": "pinned", "event": "pin"}
END = {"ts": "2026-03-02T09:16:00.000000+00:00", "session": "3f9a", "user": "alice", "role": "emea_analyst",
       "reason": "client sent Terminate", "duration_s": 60.0, "event": "session_end"}
AUTH_FAILURE = {"ts": "2026-03-02T09:17:00.000000+00:00", "session": "77aa", "user": "mallory",
                "database": "demo", "client": "[2001:db8::7]:61000", "reason": "token expired",
                "event": "auth_failure"}
ADMIN = {"ts": "2026-03-02T09:18:00.000000+00:00", "target_user": "mallory", "client": "127.0.0.1:40000",
         "sessions_ended": 2, "workers": 1, "workers_unreachable": 0, "blocked_s": 60.0,
         "event": "admin_terminate"}
LOCAL = {"ts": "2026-03-02T09:19:00.000000+00:00", "session": "u1", "user": "svc:etl", "role": "etl",
         "auth_method": "service", "client": "unix", "database": "demo", "event": "session_start"}
ALL = [START, STATEMENT, FAILED, INSERT, DENIED, PIN, END, AUTH_FAILURE, ADMIN, LOCAL,
       {"ts": "2026-03-02T09:20:00+00:00", "event": "something_new", "detail": 1},
       {"ts": "2026-03-02T09:20:00+00:00", "event": "statement", "statement": "SELECT 1", "outcome": "ok",
        "render_error": True}]


def _enriched(records=ALL) -> list[dict]:
    context = fmt.SessionContext()
    return [context.enrich({**r, "instance": "pgproxy-a"}) for r in records]


# --- OCSF 1.5.0: the requirements of the classes we emit, written down from the schema -------
# (ocsf-schema v1.5.0: events/base_event.json, events/application/datastore_activity.json,
# events/application/api_activity.json, events/iam/authentication.json, objects/*.json)

BASE_REQUIRED = {"activity_id": int, "category_uid": int, "class_uid": int, "metadata": dict,
                 "severity_id": int, "time": int, "type_uid": int}
CLASSES = {
    6005: {"category_uid": 6, "required": {"actor": "actor", "src_endpoint": "network_endpoint"},
           "at_least_one": ["database", "databucket", "table"], "activities": {0, *range(1, 11), 99}},
    3002: {"category_uid": 3, "required": {"user": "user"}, "at_least_one": ["service", "dst_endpoint"],
           "activities": {0, *range(1, 8), 99}},
    6003: {"category_uid": 6, "required": {"actor": "actor", "api": "api", "src_endpoint": "network_endpoint"},
           "at_least_one": [], "activities": {0, 1, 2, 3, 4, 99}},
}
# object: (required attributes with their object types or Python types, at-least-one constraint)
OBJECTS = {
    "metadata": ({"product": "product", "version": str}, []),
    "product": ({}, ["name", "uid"]),
    "actor": ({}, ["process", "user", "invoked_by", "session", "app_name", "app_uid"]),
    "user": ({}, ["account", "name", "uid"]),
    "group": ({}, ["name", "uid"]),
    "session": ({}, []),
    "network_endpoint": ({}, ["ip", "uid", "name", "hostname", "svc_name", "instance_uid", "interface_uid",
                              "interface_name", "domain"]),
    "database": ({"type_id": int}, ["name", "uid"]),
    "table": ({}, ["name", "uid"]),
    "query_info": ({"query_string": str}, []),
    "api": ({"operation": str}, []),
    "service": ({}, ["name", "uid"]),
    "resource_details": ({}, ["name", "uid"]),
}
# Which object type an attribute holds, wherever it appears (the schema's dictionary).
ATTRIBUTE_OBJECTS = {"metadata": "metadata", "product": "product", "actor": "actor", "user": "user",
                     "session": "session", "src_endpoint": "network_endpoint", "dst_endpoint": "network_endpoint",
                     "database": "database", "table": "table", "query_info": "query_info", "api": "api",
                     "service": "service"}
ARRAY_OBJECTS = {"groups": "group", "resources": "resource_details"}
ENUMS = {"severity_id": ({0: "Unknown", 1: "Informational", 2: "Low", 3: "Medium", 4: "High", 5: "Critical",
                          6: "Fatal", 99: "Other"}, "severity"),
         "status_id": ({0: "Unknown", 1: "Success", 2: "Failure", 99: "Other"}, "status")}


def ocsf_problems(event: dict) -> list[str]:
    problems = []
    for key, kind in BASE_REQUIRED.items():
        if not isinstance(event.get(key), kind) or isinstance(event.get(key), bool):
            problems.append(f"{key}: required {kind.__name__}")
    spec = CLASSES.get(event.get("class_uid"))
    if spec is None:
        return problems + [f"class_uid: {event.get('class_uid')} is not a class we emit"]
    if event["category_uid"] != spec["category_uid"]:
        problems.append("category_uid: does not match the class")
    if event.get("type_uid") != event["class_uid"] * 100 + event.get("activity_id", -1):
        problems.append("type_uid: must be class_uid * 100 + activity_id")
    if event.get("activity_id") not in spec["activities"]:
        problems.append(f"activity_id: {event.get('activity_id')} is not in the class's enum")
    if event.get("activity_id") == 99 and not event.get("activity_name"):
        problems.append("activity_name: needed with activity_id 99")
    for key, object_type in spec["required"].items():
        if key not in event:
            problems.append(f"{key}: required by class {event['class_uid']}")
    if spec["at_least_one"] and not any(k in event for k in spec["at_least_one"]):
        problems.append(f"one of {spec['at_least_one']} is required")
    for key, (values, caption_key) in ENUMS.items():
        if key in event and (event[key] not in values or event.get(caption_key) not in (None, values[event[key]])):
            problems.append(f"{key}: {event[key]} / {event.get(caption_key)!r} is not a value with its caption")
    if isinstance(event.get("time"), int) and not 10 ** 12 < event["time"] < 10 ** 13:
        problems.append("time: milliseconds since the epoch")
    if "unmapped" in event and not isinstance(event["unmapped"], dict):
        problems.append("unmapped: must be an object")
    problems += _object_problems(event, "")
    return problems


def _object_problems(obj: dict, path: str, object_type: str | None = None) -> list[str]:
    problems = []
    if object_type is not None:
        required, at_least_one = OBJECTS[object_type]
        for key, kind in required.items():
            if key not in obj:
                problems.append(f"{path}.{key}: required in {object_type}")
            elif isinstance(kind, type) and not isinstance(obj[key], kind):
                problems.append(f"{path}.{key}: must be {kind.__name__}")
        if at_least_one and not any(obj.get(k) not in (None, "") for k in at_least_one):
            problems.append(f"{path}: {object_type} needs one of {at_least_one}")
    for key, value in obj.items():
        where = f"{path}.{key}" if path else key
        if key == "unmapped":
            continue
        if key.endswith("_id") or key in ("time", "port", "duration") or key.endswith("_time"):
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{where}: must be an integer")
        elif key.startswith("is_") and not isinstance(value, bool):
            problems.append(f"{where}: must be a boolean")
        elif key == "ip":
            try:
                ipaddress.ip_address(value)
            except ValueError:
                problems.append(f"{where}: not an IP address")
        elif key in ATTRIBUTE_OBJECTS:
            if not isinstance(value, dict):
                problems.append(f"{where}: must be an object")
            else:
                problems += _object_problems(value, where, ATTRIBUTE_OBJECTS[key])
        elif key in ARRAY_OBJECTS:
            if not isinstance(value, list):
                problems.append(f"{where}: must be an array")
            else:
                for i, item in enumerate(value):
                    problems += _object_problems(item, f"{where}[{i}]", ARRAY_OBJECTS[key])
        elif key in ("name", "uid", "version", "message", "type", "status", "status_code", "status_detail",
                     "activity_name", "query_string", "hostname", "svc_name", "operation", "issuer"):
            if not isinstance(value, str):
                problems.append(f"{where}: must be a string")
    if "port" in obj and not 0 <= obj["port"] < 65536:
        problems.append(f"{path}.port: out of range")
    return problems


@pytest.mark.parametrize("record", _enriched(), ids=lambda r: r["event"])
def test_every_record_is_a_valid_ocsf_event(record):
    event = fmt.to_ocsf(record)
    assert json.loads(json.dumps(event)) == event
    assert ocsf_problems(event) == []


def test_the_validator_catches_what_it_checks():
    good = fmt.to_ocsf(_enriched()[1])
    assert ocsf_problems({k: v for k, v in good.items() if k != "src_endpoint"}) == \
        ["src_endpoint: required by class 6005"]
    assert ocsf_problems({**good, "type_uid": 600501}) == ["type_uid: must be class_uid * 100 + activity_id"]
    assert ocsf_problems({**good, "metadata": {"product": {"name": "pgproxy"}}}) == \
        ["metadata.version: required in metadata"]
    assert ocsf_problems({**good, "database": {"name": "demo"}}) == ["database.type_id: required in database"]
    assert ocsf_problems({**good, "time": "2026-03-02"}) != []


def test_a_statement_is_datastore_activity_with_the_person_and_the_query():
    event = fmt.to_ocsf(_enriched()[1])
    assert (event["class_uid"], event["category_uid"], event["activity_id"], event["type_uid"]) == \
        (6005, 6, 4, 600504)
    assert event["time"] == 1772442901250 and event["duration"] == 2
    assert event["actor"]["user"] == {"name": "alice", "uid": "sub-alice", "type_id": 1, "type": "User",
                                      "groups": [{"name": "sales_emea"}, {"name": "staff"}]}
    assert event["actor"]["session"]["uid"] == "3f9a"
    assert event["actor"]["session"]["created_time"] == 1772442900000
    assert event["src_endpoint"] == {"ip": "10.1.2.3", "port": 50412}  # from the session's start
    assert event["dst_endpoint"] == {"hostname": "pgproxy-a", "svc_name": "pgproxy"}
    assert event["database"] == {"name": "demo", "type_id": 1, "type": "Relational", "desc": "PostgreSQL"}
    assert event["query_info"] == {"query_string": "SELECT * FROM orders WHERE note = $1",
                                   "data": {"parameters": ["a|b"]}}
    assert event["table"] == {"name": "public.orders"}
    assert (event["status_id"], event["severity_id"]) == (1, 1)
    assert event["metadata"]["product"] == {"name": "pgproxy", "vendor_name": "pgproxy", "version": __version__}
    assert event["metadata"]["version"] == "1.5.0" and event["metadata"]["correlation_uid"] == "3f9a"
    assert event["unmapped"]["role"] == "emea_analyst" and event["unmapped"]["rows"] == 3


def test_activities_statuses_and_severities():
    by_event = {(r["event"], r.get("statement")): fmt.to_ocsf(r) for r in _enriched()}
    failed = by_event[("statement", "SELECT 1/0")]
    assert (failed["status_id"], failed["status_code"], failed["severity_id"]) == (2, "22012", 2)
    assert by_event[("statement", INSERT["statement"])]["activity_id"] == 5
    denied = by_event[("denied", "DELETE FROM orders")]
    assert (denied["activity_id"], denied["status_id"], denied["severity_id"], denied["status_detail"]) == \
        (7, 2, 3, "read_only policy")
    assert by_event[("pin", None)]["activity_id"] == 99
    assert by_event[("something_new", None)]["unmapped"] == {"detail": 1}
    assert fmt.to_ocsf({**STATEMENT, "command": "CREATE TABLE"})["activity_id"] == 6
    assert fmt.to_ocsf({**STATEMENT, "command": "COPY", "classes": ["WRITE"]})["activity_id"] == 5


def test_logins_are_authentication_events():
    records = _enriched()
    start, end, failure, local = (fmt.to_ocsf(records[i]) for i in (0, 6, 7, 9))
    assert (start["class_uid"], start["activity_id"], start["status_id"], start["type_uid"]) == (3002, 1, 1, 300201)
    assert start["user"]["name"] == "alice" and start["session"]["issuer"] == "https://idp.example"
    assert (start["logon_type_id"], start["is_remote"]) == (3, True)
    assert (end["activity_id"], end["duration"], end["src_endpoint"]["ip"]) == (2, 60_000, "10.1.2.3")
    assert (failure["status_id"], failure["severity_id"], failure["status_detail"]) == (2, 3, "token expired")
    assert failure["src_endpoint"] == {"ip": "2001:db8::7", "port": 61000}
    assert (local["src_endpoint"], local["is_remote"], local["user"]["type_id"]) == ({"name": "unix socket"},
                                                                                     False, 99)
    assert (local["auth_protocol_id"], local["auth_protocol"]) == (99, "pgproxy service account")
    admin = fmt.to_ocsf(records[8])
    assert (admin["class_uid"], admin["api"]["operation"], admin["resources"]) == \
        (6003, "terminate", [{"name": "mallory", "type": "user"}])


def test_session_context_is_bounded_and_forgets_ended_sessions():
    context = fmt.SessionContext(limit=2)
    for sid in ("a", "b", "c"):
        context.enrich({**START, "session": sid})
    assert len(context) == 2
    assert "client" not in context.enrich({**STATEMENT, "session": "a"})  # the oldest went first
    assert context.enrich({**STATEMENT, "session": "c"})["client"] == "10.1.2.3:50412"
    assert context.enrich({**END, "session": "c"})["database"] == "demo"
    assert len(context) == 1
    assert context.enrich({**STATEMENT, "session": "c", "client": "own"})["client"] == "own"  # the record wins


# --- CEF: a strict parser ----------------------------------------------------------------

# The ArcSight CEF standard's extension dictionary (the keys we may use) and custom-field labels.
CEF_KEYS = {"act", "app", "cat", "cnt", "dhost", "dpt", "dst", "duid", "duser", "dvchost", "dvcpid", "end",
            "externalId", "msg", "outcome", "proto", "reason", "request", "requestClientApplication", "rt",
            "shost", "spt", "src", "start", "suid", "suser",
            *(f"cs{i}" for i in range(1, 7)), *(f"cs{i}Label" for i in range(1, 7)),
            *(f"cn{i}" for i in range(1, 4)), *(f"cn{i}Label" for i in range(1, 4)),
            *(f"cfp{i}" for i in range(1, 5)), *(f"cfp{i}Label" for i in range(1, 5)),
            "flexString1", "flexString1Label", "flexString2", "flexString2Label"}


def parse_cef(text: str) -> tuple[list[str], dict[str, str]]:
    """Header fields (unescaped) and extension pairs; raises ValueError on anything off-spec."""
    if "\n" in text or "\r" in text:
        raise ValueError("a CEF record is one line")
    header, i, field_text = [], 0, ""
    while len(header) < 7:
        if i >= len(text):
            raise ValueError("fewer than 7 header fields")
        c = text[i]
        if c == "\\":
            if text[i + 1] not in "\\|":
                raise ValueError(f"bad header escape \\{text[i + 1]}")
            field_text += text[i + 1]
            i += 2
        elif c == "|":
            header.append(field_text)
            field_text, i = "", i + 1
        else:
            field_text, i = field_text + c, i + 1
    if not header[0].startswith("CEF:") or header[0] != "CEF:0":
        raise ValueError("not CEF version 0")
    if not header[6].isdigit() or not 0 <= int(header[6]) <= 10:
        raise ValueError("severity must be 0-10")
    rest = text[i:]
    # Split at unescaped '=': each piece but the first and last is "value-of-previous SP next-key".
    pieces, current, j = [], "", 0
    while j < len(rest):
        c = rest[j]
        if c == "\\":
            if j + 1 >= len(rest) or rest[j + 1] not in "\\=nr":
                raise ValueError(f"bad extension escape at {j}")
            current += rest[j:j + 2]
            j += 2
        elif c == "=":
            pieces.append(current)
            current, j = "", j + 1
        else:
            current, j = current + c, j + 1
    pieces.append(current)
    ext, key = {}, pieces[0]
    for piece in pieces[1:-1]:
        value, _, next_key = piece.rpartition(" ")
        ext[key] = _unescape(value)
        key = next_key
    ext[key] = _unescape(pieces[-1])
    for key in ext:
        if not re.fullmatch(r"[A-Za-z0-9]+", key) or key not in CEF_KEYS:
            raise ValueError(f"unknown extension key {key!r}")
        if key.endswith("Label") and key[:-5] not in ext:
            raise ValueError(f"label without its field: {key}")
    return header, ext


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m[1], m[1]), value)


@pytest.mark.parametrize("record", _enriched(), ids=lambda r: r["event"])
def test_every_record_is_strict_cef(record):
    header, ext = parse_cef(fmt.to_cef(record))
    assert header[:4] == ["CEF:0", "pgproxy", "pgproxy", __version__] and header[4] == record["event"]
    assert ext["cat"] == record["event"] and int(ext["rt"]) == fmt.epoch_ms(record["ts"])
    assert ext["dvchost"] == "pgproxy-a"


def test_cef_escapes_survive_a_hostile_statement():
    nasty = "SELECT 'a|b' AS \"x=y\", '\\\\' suser=evil\nFROM t -- \\n cs2=forged"
    record = {**_enriched()[1], "statement": nasty, "event": "statement|x\\y"}
    header, ext = parse_cef(fmt.to_cef(record))
    assert header[4] == "statement|x\\y"
    assert ext["cs1"] == nasty and ext["cs1Label"] == "statement"
    assert ext["suser"] == "alice" and ext["cs2"] == "3f9a"  # not overridden from inside the value
    assert (ext["src"], ext["spt"], ext["duser"], ext["act"], ext["outcome"]) == \
        ("10.1.2.3", "50412", "emea_analyst", "SELECT", "ok")
    assert json.loads(ext["flexString2"]) == ["a|b"]
    with pytest.raises(ValueError):
        parse_cef("CEF:0|a|b|c|d|e|5|msg=a=b")  # the parser is strict: an unescaped '=' in a value


def test_cef_severity_follows_the_record():
    assert parse_cef(fmt.to_cef(AUTH_FAILURE))[0][6] == "5"
    assert parse_cef(fmt.to_cef(FAILED))[0][6] == "3"
    assert parse_cef(fmt.to_cef(STATEMENT))[0][6] == "1"


# --- RFC 5424 -------------------------------------------------------------------------------

def test_rfc5424_header_structured_data_and_bom():
    data, cut = fmt.rfc5424(fmt.FACILITIES["local0"], fmt.SEVERITIES["info"], STATEMENT["ts"], "db host",
                            "pgproxy", 123, "statement", [("user", 'al"i]c\\e'), ("role", None)],
                            "pgproxy@32473", '{"a": 1}')
    assert not cut
    assert data == (b'<134>1 2026-03-02T09:15:01.250000+00:00 dbhost pgproxy 123 statement '
                    b'[pgproxy@32473 user="al\\"i\\]c\\\\e"] {"a": 1}')
    data, _ = fmt.rfc5424(13, 4, "not a time", "", "", "", "", [], "pgproxy@32473", "caf\u00e9")
    assert data == b"<108>1 - - - - - [pgproxy@32473] \xef\xbb\xbfcaf\xc3\xa9"
    assert fmt.octet_counted(b"<134>1 x") == b"8 <134>1 x"


def test_rfc5424_cuts_on_a_character_boundary_and_says_so():
    message = "\u00e9" * 500
    data, cut = fmt.rfc5424(16, 6, STATEMENT["ts"], "h", "pgproxy", 1, "statement", [], "pgproxy@32473",
                            message, max_size=200)
    assert cut and len(data) <= 200 and b'truncated="true"' in data
    data.decode("utf-8")  # no half character at the end
    with pytest.raises(ValueError):
        fmt.sd_element("bad id", [])


# --- COPY text format ---------------------------------------------------------------------

def test_copy_rows_escape_and_nul_is_replaced():
    assert fmt.copy_row(["a\tb", None, "c\\d\ne\r"]) == b"a\\tb\t\\N\tc\\\\d\\ne\\r\n"
    assert fmt.without_nul({"k\x00": ["a\x00b", 1, None]}) == {"k\ufffd": ["a\ufffdb", 1, None]}


# --- [[audit_sinks]] --------------------------------------------------------------------------

MINIMAL = {"backend": {"user": "pool"}, "auth": {"jwt": {"issuer": "https://idp", "audience": "pgproxy"}},
           "audit": {"file": "/tmp/audit.jsonl"}}


def _problems(sinks) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, "audit_sinks": sinks})
    return info.value.problems


def test_sink_rules_load_with_their_defaults():
    cfg = parse_config({**MINIMAL, "audit_sinks": [
        {"type": "syslog", "address": "127.0.0.1:514"},
        {"type": "postgresql", "host": "db", "database": "audit", "user": "writer", "format": "ocsf"}]})
    syslog, pg = cfg.audit_sinks
    assert (syslog.transport, syslog.format, syslog.on_failure, syslog.facility, syslog.queue_size) == \
        ("tcp", "json", "refuse", "local0", 10_000)
    assert (pg.table, pg.port, pg.sslmode, pg.format) == ("pgproxy_audit", 5432, "disable", "ocsf")
    assert parse_config(MINIMAL).audit_sinks == []


def test_sink_rules_name_the_bad_key():
    problems = _problems([
        {"type": "kafka"},
        {"type": "syslog", "transport": "udp", "address": "nowhere", "format": "xml", "facility": "loca0",
         "on_failure": "ignore", "table": "t", "max_message_size": 70_000},
        {"type": "postgresql", "format": "cef", "sslmode": "verify-full", "transport": "udp",
         "table": "x; DROP TABLE y"},
        {"type": "syslog", "address": "h:1", "sd_id": "nope", "ca_file": "/ca.pem", "queue_size": 0},
        {"type": "syslog", "transport": "tls"},
    ])
    assert "audit_sinks[0].type: must be syslog or postgresql" in problems
    assert "audit_sinks[1].address: expected host:port (IPv6 as [addr]:port)" in problems
    assert "audit_sinks[1].format: must be json, ocsf or cef" in problems
    assert any(p.startswith("audit_sinks[1].facility: must be one of kern") for p in problems)
    assert "audit_sinks[1].on_failure: must be refuse or continue" in problems
    assert "audit_sinks[1].table: not an option of type = syslog" in problems
    assert "audit_sinks[1].max_message_size: must be between 480 and 65507" in problems
    assert "audit_sinks[2].format: must be json or ocsf (a table holds JSON)" in problems
    assert "audit_sinks[2].sslrootcert: required with sslmode = verify-full" in problems
    assert "audit_sinks[2].transport: not an option of type = postgresql" in problems
    assert "audit_sinks[2].table: must be a plain table name or schema.table" in problems
    assert "audit_sinks[2].host: required with type = postgresql" in problems
    assert any(p.startswith("audit_sinks[3].sd_id: must be name@enterprise-number") for p in problems)
    assert "audit_sinks[3].ca_file: only used with transport = tls" in problems
    assert "audit_sinks[3].queue_size: must be greater than zero" in problems
    assert "audit_sinks[4].address: required with transport = tls (host:port)" in problems


def test_sink_names_must_differ():
    assert _problems([{"type": "syslog", "transport": "unix", "name": "siem"},
                      {"type": "syslog", "transport": "unix", "name": "siem"}]) == \
        ["audit_sinks[1].name: 'siem' names another sink already"]


def test_an_access_condition_refusal_is_a_failed_logon_and_a_lowered_one_a_successful_one():
    refused = {"event": "access_denied", "ts": "2026-12-01T10:00:00.000000Z", "user": "alice", "role": "dba",
               "result": "refused", "condition": "require_amr", "client": "10.1.2.3:5000"}
    lowered = {**refused, "result": "lowered", "fallback_role": "analyst"}
    for record, status, severity in ((refused, "Failure", "Medium"), (lowered, "Success", "Low")):
        event = fmt.to_ocsf(record)
        assert event["class_uid"] == 3002 and event["activity_name"] == "Logon"
        assert event["status"] == status and event["severity"] == severity
    assert "refused by an access condition" in fmt.to_ocsf(refused)["message"]
