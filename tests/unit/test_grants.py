"""Time-boxed elevation without a process: durations, the rules of grants, requests and
decisions, role mapping with a grant, the state file shared by workers, the [grants]
options and the CLI's requests."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading

import pytest

from pgproxy import grants as g
from pgproxy.auth import Identity
from pgproxy.cli import _grant_request
from pgproxy.config import ConfigError, RoleRule, parse_config
from pgproxy.roles import map_role

NOW = 1_800_000_000.0
RULES = g.Rules(roles=("dba_readonly", "dba_admin"), pool_role="pgproxy_pool", max_duration_s=3600,
                approver_groups=("dba_approvers",), request_timeout_s=600)


def person(name: str, *groups: str, subject: str = "", role: str = "") -> Identity:
    return Identity(username=name, subject=subject or f"sub|{name}", issuer="https://idp", groups=groups,
                    auth_method="jwt", role=role)


# --- durations --------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("3600", 3600), ("90s", 90), ("15m", 900), ("1h", 3600),
                                           ("1h30m", 5400), ("2d", 172_800), (" 3s ", 3), ("0.5h", 1800),
                                           ("1H", 3600)])
def test_durations_read_as_people_write_them(text, seconds):
    assert g.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5", "1x", "h", "1h 30m", "1hour", "nan", "inf", "1e12"])
def test_anything_else_is_no_duration(text):
    with pytest.raises(ValueError):
        g.parse_duration(text)


# --- grants -----------------------------------------------------------------------------

def test_a_grant_runs_from_now_for_its_duration_and_names_who_approved():
    grant = g.new_grant("alice", "dba_readonly", 3, "incident 42", RULES, NOW, approver="carol")
    assert (grant.person, grant.role, grant.start, grant.end) == ("alice", "dba_readonly", NOW, NOW + 3)
    assert (grant.requester, grant.approver, grant.source, grant.reason) == ("admin", "carol", "admin", "incident 42")
    assert grant.in_force(NOW) and grant.in_force(NOW + 2.999) and not grant.in_force(NOW + 3)
    assert not grant.in_force(NOW - 1)
    assert g.new_grant("alice", "dba_readonly", 3, "x", RULES, NOW).approver == "admin"


@pytest.mark.parametrize("who, role, seconds, reason, status, words", [
    ("alice", "pgproxy_pool", 60, "x", 400, "pool role"),
    ("alice", "superuser", 60, "x", 400, "not in grants.roles"),
    ("alice", "dba_readonly", 3601, "x", 400, "max_duration_s"),
    ("alice", "dba_readonly", 0, "x", 400, "duration"),
    ("alice", "dba_readonly", 60, "  ", 400, "reason"),
    ("alice", "dba_readonly", 60, "a\nb", 400, "printable"),
    ("alice", "dba_readonly", 60, "x" * 1001, 400, "reason"),
    ("", "dba_readonly", 60, "x", 400, "person"),
    ("svc:etl", "dba_readonly", 60, "x", 400, "service accounts"),
])
def test_a_grant_that_breaks_a_rule_is_refused(who, role, seconds, reason, status, words):
    with pytest.raises(g.Refused) as refused:
        g.new_grant(who, role, seconds, reason, RULES, NOW)
    assert refused.value.status == status and words in refused.value.message


def test_without_a_roles_list_any_role_but_the_pool_role_may_be_granted():
    open_rules = g.Rules(pool_role="pgproxy_pool")
    assert g.new_grant("alice", "anything", 60, "x", open_rules, NOW).role == "anything"
    with pytest.raises(g.Refused):
        g.new_grant("alice", "pgproxy_pool", 60, "x", open_rules, NOW)


def test_the_grant_in_force_replaces_the_mapping_for_that_person_alone():
    rules = [RoleRule(role="emea_analyst", group="sales_emea")]
    alice, bob = person("alice", "sales_emea"), person("bob", "sales_emea")
    grant = g.new_grant("alice", "dba_readonly", 3, "x", RULES, NOW)
    assert map_role(alice, rules, "", [grant], NOW + 1) == "dba_readonly"
    assert map_role(bob, rules, "", [grant], NOW + 1) == "emea_analyst"
    assert map_role(alice, rules, "", [grant], NOW + 3) == "emea_analyst"  # over: mapped as before
    assert map_role(alice, rules, "", [], NOW) == "emea_analyst"
    # A person no rule maps may connect while a grant is in force, and not after.
    carol = person("carol", "nobody")
    carols = g.new_grant("carol", "dba_readonly", 3, "x", RULES, NOW)
    assert map_role(carol, rules, "", [carols], NOW) == "dba_readonly"
    assert map_role(carol, rules, "", [carols], NOW + 4) is None
    # A service account names its own role; a grant does not change it.
    etl = person("svc:etl", role="etl_writer")
    assert map_role(etl, rules, "", [g.Grant("g-1", "svc:etl", "dba_admin", NOW, NOW + 9, "x", "admin", "admin",
                                             "admin")], NOW) == "etl_writer"


def test_of_several_grants_in_force_the_last_granted_wins_and_an_ended_one_counts_no_more():
    first = g.new_grant("alice", "dba_readonly", 600, "x", RULES, NOW)
    second = g.new_grant("alice", "dba_admin", 60, "y", RULES, NOW + 10)
    assert g.in_force_for([second, first], "alice", NOW + 20).role == "dba_admin"
    assert g.in_force_for([first, second], "alice", NOW + 80).role == "dba_readonly"  # the second is over
    state = g.State()
    state.merge([first, second])
    ended = g.end_grant(state, second.id, "admin", NOW + 30)
    assert ended.ended_at == NOW + 30 and ended.rev == second.rev + 1 and not ended.in_force(NOW + 31)
    assert g.in_force_for([first, ended], "alice", NOW + 31).role == "dba_readonly"
    state.merge([ended])
    with pytest.raises(g.Refused) as again:
        g.end_grant(state, second.id, "admin", NOW + 32)
    assert again.value.status == 409
    with pytest.raises(g.Refused) as unknown:
        g.end_grant(state, "g-nope", "admin", NOW)
    assert unknown.value.status == 404


# --- requests and decisions ----------------------------------------------------------------

def test_a_request_is_approved_by_someone_else_with_an_approver_group():
    state = g.State()
    request = g.file_request(state, "alice", "sub|alice", "dba_readonly", 900, "incident 42", RULES, NOW)
    assert (request.state, request.requester, request.role, request.duration_s) == ("pending", "alice",
                                                                                    "dba_readonly", 900)
    state.merge([request])
    decided, grant = g.decide(state, request.id, "bob", "sub|bob", ("dba_approvers",), True, "ok", RULES, NOW + 60)
    assert (decided.state, decided.decided_by, decided.decided_at, decided.grant) == ("approved", "bob", NOW + 60,
                                                                                      grant.id)
    # The grant runs from the approval, for the requested duration, and names both people.
    assert (grant.person, grant.role, grant.start, grant.end) == ("alice", "dba_readonly", NOW + 60, NOW + 960)
    assert (grant.requester, grant.approver, grant.source, grant.request) == ("alice", "bob", "request", request.id)
    state.merge([decided, grant])
    with pytest.raises(g.Refused) as twice:
        g.decide(state, request.id, "dave", "sub|dave", ("dba_approvers",), True, "", RULES, NOW + 61)
    assert twice.value.status == 409


def test_nobody_decides_their_own_request_and_only_approvers_decide():
    state = g.State()
    request = g.file_request(state, "carol", "sub|carol", "dba_readonly", 60, "x", RULES, NOW)
    state.merge([request])
    cases = [("carol", "sub|carol", ("dba_approvers",), "your own"),       # self-approval
             ("carol2", "sub|carol", ("dba_approvers",), "your own"),      # same subject, another name
             ("mallory", "sub|mallory", ("sales_emea",), "not an approver")]
    for who, subject, groups, words in cases:
        for approve in (True, False):
            with pytest.raises(g.Refused) as refused:
                g.decide(state, request.id, who, subject, groups, approve, "", RULES, NOW)
            assert refused.value.status == 403 and words in refused.value.message
    with pytest.raises(g.Refused) as unknown:
        g.decide(state, "r-nope", "bob", "sub|bob", ("dba_approvers",), True, "", RULES, NOW)
    assert unknown.value.status == 404
    denied, grant = g.decide(state, request.id, "bob", "sub|bob", ("dba_approvers",), False, "not now", RULES, NOW)
    assert grant is None and denied.state == "denied" and denied.decision_reason == "not now"


def test_requests_are_off_without_approver_groups_and_bounded_per_person():
    with pytest.raises(g.Refused) as off:
        g.file_request(g.State(), "alice", "s", "dba_readonly", 60, "x", g.Rules(pool_role="p"), NOW)
    assert off.value.status == 403 and "approver_groups" in off.value.message
    state = g.State()
    for i in range(g.MAX_PENDING_PER_PERSON):
        state.merge([g.file_request(state, "alice", "s", "dba_readonly", 60, f"#{i}", RULES, NOW)])
    with pytest.raises(g.Refused) as too_many:
        g.file_request(state, "alice", "s", "dba_readonly", 60, "one more", RULES, NOW)
    assert too_many.value.status == 409
    assert g.file_request(state, "bob", "t", "dba_readonly", 60, "mine", RULES, NOW).requester == "bob"
    # Lapsed ones do not count.
    assert g.file_request(state, "alice", "s", "dba_readonly", 60, "later", RULES, NOW + 601).state == "pending"
    with pytest.raises(g.Refused):
        g.file_request(state, "alice", "s", "superuser", 60, "x", RULES, NOW)


def test_lapsed_notes_each_expiry_once_and_lapses_undecided_requests():
    state = g.State()
    grant = g.new_grant("alice", "dba_readonly", 3, "x", RULES, NOW)
    request = g.file_request(state, "bob", "s", "dba_readonly", 60, "x", RULES, NOW)
    state.merge([grant, request])
    assert g.lapsed(state, NOW + 2, RULES) == []
    (noted,) = g.lapsed(state, NOW + 3, RULES)
    assert noted.id == grant.id and noted.expiry_noted and noted.rev == 2
    state.merge([noted])
    assert g.lapsed(state, NOW + 599, RULES) == []
    (gone,) = g.lapsed(state, NOW + 600, RULES)
    assert gone.state == "lapsed" and gone.decided_at == NOW + 600
    with pytest.raises(g.Refused) as late:  # an approver who comes too late
        g.decide(state, request.id, "carol", "c", ("dba_approvers",), True, "", RULES, NOW + 600)
    assert late.value.status == 409


def test_merging_keeps_the_newest_revision_and_pruning_forgets_what_is_long_over():
    grant = g.new_grant("alice", "dba_readonly", 3, "x", RULES, NOW)
    state = g.State()
    assert state.merge([grant]) == [grant]
    noted = g.lapsed(state, NOW + 3, RULES)[0]
    assert state.merge([noted]) == [noted]
    assert state.merge([grant]) == []  # an older revision arriving late changes nothing
    assert state.grants[grant.id].expiry_noted
    state.prune(NOW + 3 + g.KEEP_S - 1)
    assert grant.id in state.grants
    state.prune(NOW + 4 + g.KEEP_S)
    assert grant.id not in state.grants


def test_records_travel_as_json_and_malformed_ones_are_refused():
    state = g.State()
    request = g.file_request(state, "alice", "s", "dba_readonly", 60, "x", RULES, NOW)
    grant = g.new_grant("alice", "dba_readonly", 3, "x", RULES, NOW)
    for record in (request, grant):
        assert g.from_json(json.loads(json.dumps(g.to_json(record)))) == record
    for bad in [[], {"kind": "other"}, {"kind": "grant", "id": "g-1"}, {**g.to_json(grant), "rev": "2"},
                {**g.to_json(grant), "end": "soon"}]:
        with pytest.raises(ValueError):
            g.from_json(bad)
    state.merge([request, grant])
    assert g.decode_state(g.encode_state(state)) == state
    with pytest.raises(ValueError):
        g.decode_state(b'{"format": 99}')


# --- the state file ---------------------------------------------------------------------

def test_the_state_file_is_shared_kept_private_and_unchanged_by_a_refusal(tmp_path):
    path = str(tmp_path / "grants.json")
    one, two = g.FileStore(path), g.FileStore(path)  # two workers
    assert one.read() == g.State() and one.version() is None
    grant = g.new_grant("alice", "dba_readonly", 60, "x", RULES, NOW)
    state, records = asyncio.run(one.update(lambda s: [grant]))
    assert records == [grant] and state.grants[grant.id] == grant
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert two.version() is not None and two.read().grants[grant.id] == grant
    before = open(path, "rb").read()

    def refuse(s):
        raise g.Refused(409, "no")
    with pytest.raises(g.Refused):
        asyncio.run(two.update(refuse))
    assert open(path, "rb").read() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_workers_updating_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "grants.json")
    errors = []

    def worker(n: int) -> None:
        store = g.FileStore(path)
        try:
            for i in range(15):
                asyncio.run(store.update(lambda s, i=i: [g.new_grant(f"p{n}-{i}", "dba_readonly", 60, "x",
                                                                     RULES, NOW)]))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(g.FileStore(path).read().grants) == 60


def test_an_unreadable_state_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "grants.json"
    path.write_text("{not json")
    with pytest.raises(g.StateFileError) as bad:
        g.FileStore(str(path)).read()
    assert str(path) in str(bad.value) and "grants.state_file" in str(bad.value)
    path.write_text('{"format": 1, "grants": [{"kind": "grant", "id": 5}]}')
    with pytest.raises(g.StateFileError):
        g.FileStore(str(path)).read()


def test_a_memory_store_merges_what_other_workers_made():
    store = g.MemoryStore()
    grant = g.new_grant("alice", "dba_readonly", 60, "x", RULES, NOW)
    version = store.version()
    store.merge([grant])
    assert store.version() != version and store.read().grants[grant.id] == grant


# --- configuration and CLI ----------------------------------------------------------------

BASE = {"backend": {"user": "pgproxy_pool"}, "auth": {"jwt": {"issuer": "https://idp", "audience": "pgproxy"}},
        "audit": {"file": "/var/log/pgproxy/audit.jsonl"}}


def test_grants_options_have_defaults_and_bad_values_name_their_key():
    cfg = parse_config(BASE)
    assert cfg.grants.roles == [] and cfg.grants.max_duration_s == 28_800 and cfg.grants.approver_groups == []
    assert g.state_file_of(cfg) == "/var/log/pgproxy/pgproxy-grants.json"
    with pytest.raises(ConfigError) as bad:
        parse_config({**BASE, "grants": {"max_duration_s": 0, "request_timeout_s": -1, "webhook_url": "ftp://x",
                                         "webhook_timeout_s": 120, "roles": ["pgproxy_pool", ""], "color": 1}})
    problems = "\n".join(bad.value.problems)
    for key in ("grants.max_duration_s", "grants.request_timeout_s", "grants.webhook_url",
                "grants.webhook_timeout_s", "grants.roles: the pool role", "grants.roles[1]", "grants.color"):
        assert key in problems


class Args:
    def __init__(self, action, user="", role="", duration="", reason="", approver="", all=False):
        self.action, self.user, self.role, self.duration = action, user, role, duration
        self.reason, self.approver, self.all = reason, approver, all


def test_the_cli_asks_the_admin_api():
    method, path, query = _grant_request(Args("grant", "alice", "dba_readonly", "1h", "incident 42", "carol"))
    assert (method, path) == ("POST", "/admin/grants")
    assert query == "user=alice&role=dba_readonly&for=1h&reason=incident+42&approver=carol"
    assert _grant_request(Args("grants", all=True)) == ("GET", "/admin/grants", "all=1")
    assert _grant_request(Args("end-grant", "g-12ab")) == ("POST", "/admin/grants/end", "id=g-12ab")
    method, _, problem = _grant_request(Args("grant", "alice", role="dba_readonly"))
    assert method is None and "--for" in problem and "--reason" in problem
