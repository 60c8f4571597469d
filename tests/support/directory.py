"""A throwaway OpenLDAP ``slapd`` (Debian's package) on a free loopback port.

memberOf overlay, groupOfNames with a nested group, the ppolicy overlay (a locked
account), StartTLS with a certificate from a CA made by the test. Entries are added over
LDAP after start so the overlays see them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import ldap3

from pgproxy.pgcluster import free_port, run_as, unprivileged_user
from tests.support.certs import TestCA
from tests.support.proxy import wait_for_port

SUFFIX = "dc=example,dc=org"
ADMIN_DN = f"cn=admin,{SUFFIX}"
SEARCH_DN = f"cn=pgproxy-search,ou=services,{SUFFIX}"
PASSWORDS = {"alice": "alice-directory-pw", "bob": "bob-directory-pw", "carol": "carol-directory-pw",
             "dave": "dave-directory-pw", "erin": "erin-directory-pw", "admin": "admin-directory-pw"}
SEARCH_PASSWORD = "search-account-pw"

CONFIG = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload memberof
moduleload ppolicy
pidfile {dir}/slapd.pid
TLSCACertificateFile {dir}/ca.pem
TLSCertificateFile {dir}/server.pem
TLSCertificateKeyFile {dir}/server.key

database mdb
suffix "{suffix}"
rootdn "{admin}"
rootpw {rootpw}
directory {dir}/data
maxsize 104857600
overlay memberof
memberof-group-oc groupOfNames
memberof-member-ad member
memberof-memberof-ad memberOf
memberof-refint TRUE
overlay ppolicy
ppolicy_default "cn=default,ou=policies,{suffix}"
ppolicy_use_lockout
access to attrs=userPassword by anonymous auth by self write by * none
access to * by users read by * none
"""


class Slapd:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pgproxy-slapd-"))
        self.port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.root_password = "root-" + os.urandom(6).hex()
        self.ca = TestCA(self.dir)
        self.ca.issue("localhost", ["127.0.0.1", "localhost"])
        (self.dir / "data").mkdir()
        (self.dir / "slapd.conf").write_text(CONFIG.format(dir=self.dir, suffix=SUFFIX, admin=ADMIN_DN,
                                                           rootpw=self.root_password))
        self.user = unprivileged_user()
        if self.user is not None:
            for path in [self.dir, *self.dir.rglob("*")]:
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.process: subprocess.Popen | None = None

    def start(self) -> "Slapd":
        slapd = shutil.which("slapd") or "/usr/sbin/slapd"
        self.log = open(self.dir / "slapd.log", "wb")
        self.process = subprocess.Popen([slapd, "-d", "0", "-h", f"{self.url}/", "-f", str(self.dir / "slapd.conf")],
                                        stdout=self.log, stderr=subprocess.STDOUT, **run_as(self.user))
        try:
            wait_for_port(self.port, self.process)
        except RuntimeError as exc:
            raise RuntimeError(f"slapd did not start: {exc}: {(self.dir / 'slapd.log').read_text()}") from None
        self._populate()
        return self

    def admin(self) -> ldap3.Connection:
        return ldap3.Connection(ldap3.Server(self.url), ADMIN_DN, self.root_password, auto_bind=True)

    def _populate(self) -> None:
        people, groups = f"ou=people,{SUFFIX}", f"ou=groups,{SUFFIX}"
        with self.admin() as conn:
            def add(dn: str, classes: list[str], **attributes) -> None:
                if not conn.add(dn, classes, attributes):
                    raise RuntimeError(f"cannot add {dn}: {conn.result}")
            add(SUFFIX, ["dcObject", "organization"], o="Example", dc="example")
            for ou in ("people", "groups", "services", "policies"):
                add(f"ou={ou},{SUFFIX}", ["organizationalUnit"], ou=ou)
            add(f"cn=default,ou=policies,{SUFFIX}", ["device", "pwdPolicy"], cn="default",
                pwdAttribute="userPassword", pwdLockout="TRUE", pwdMaxFailure="5")
            add(SEARCH_DN, ["organizationalRole", "simpleSecurityObject"], cn="pgproxy-search",
                userPassword=SEARCH_PASSWORD)
            for uid, password in PASSWORDS.items():
                add(f"uid={uid},{people}", ["inetOrgPerson"], uid=uid, cn=uid, sn=uid, userPassword=password,
                    employeeType="contractor" if uid == "dave" else "staff")
            add(f"cn=sales_emea,{groups}", ["groupOfNames"], cn="sales_emea",
                member=[f"uid=alice,{people}", f"uid=carol,{people}", f"uid=dave,{people}", f"uid=erin,{people}"])
            add(f"cn=amer_team,{groups}", ["groupOfNames"], cn="amer_team", member=[f"uid=bob,{people}"])
            add(f"cn=sales_amer,{groups}", ["groupOfNames"], cn="sales_amer", member=[f"cn=amer_team,{groups}"])
        self.lock("carol")

    def lock(self, uid: str) -> None:
        """Lock an account for good, as ppolicy does after too many failures."""
        with self.admin() as conn:
            if not conn.modify(f"uid={uid},ou=people,{SUFFIX}",
                               {"pwdAccountLockedTime": [(ldap3.MODIFY_REPLACE, ["000001010000Z"])]}):
                raise RuntimeError(f"cannot lock {uid}: {conn.result}")

    def remove_from_group(self, uid: str, group: str) -> None:
        with self.admin() as conn:
            if not conn.modify(f"cn={group},ou=groups,{SUFFIX}",
                               {"member": [(ldap3.MODIFY_DELETE, [f"uid={uid},ou=people,{SUFFIX}"])]}):
                raise RuntimeError(f"cannot remove {uid} from {group}: {conn.result}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
