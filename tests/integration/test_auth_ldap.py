"""
The ldap authentication plugin against a real OpenLDAP slapd started for these
tests (qvd.testing.slapd), with the real PostgreSQL behind the chain.
"""

import time

from twisted.internet import defer, protocol, reactor, task
from twisted.trial import unittest

from qvd.config import Config, declared_keys
from qvd.db.pool import Database
from qvd.l7r.auth.chain import Authenticator
from qvd.l7r.auth.interfaces import AuthFailed
from qvd.testing import pg
from qvd.testing.pg import DatabaseTestMixin
from qvd.testing.slapd import Slapd

from tests.test_auth import basic

SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=People,{SUFFIX}"

LDIF = f"""\
dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: {PEOPLE}
objectClass: organizationalUnit
ou: People

dn: ou=Others,{SUFFIX}
objectClass: organizationalUnit
ou: Others

dn: uid=Alice,{PEOPLE}
objectClass: inetOrgPerson
objectClass: posixAccount
uid: Alice
cn: Alice Liddell
sn: Liddell
uidNumber: 1001
gidNumber: 100
homeDirectory: /home/alice
userPassword: wonderland

dn: uid=bob,{PEOPLE}
objectClass: inetOrgPerson
objectClass: posixAccount
uid: bob
cn: Bob Builder
sn: Builder
uidNumber: 1002
gidNumber: 100
homeDirectory: /home/bob
userPassword: canwefixit

dn: uid=twin,{PEOPLE}
objectClass: inetOrgPerson
uid: twin
cn: Twin One
sn: One
userPassword: twinpass

dn: uid=twin,ou=Others,{SUFFIX}
objectClass: inetOrgPerson
uid: twin
cn: Twin Two
sn: Two
userPassword: twinpass

dn: cn=svc,{SUFFIX}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: svc
userPassword: svcpass
"""


class LdapTests(DatabaseTestMixin, unittest.TestCase):
    """
    A slapd (it starts in a fraction of a second), a fresh database and the
    chain 'ldap' per test.
    """

    def setUp(self):
        self.slapd = Slapd.start_or_skip(suffix=SUFFIX)
        self.addCleanup(self.slapd.stop)
        self.slapd.add_ldif(LDIF)
        super().setUp()
        self.db = Database(pg.role_dsn(self.dbname, "l7r"), reactor, size=2)
        self.addCleanup(self.db.stop)
        for login in ("alice", "bob", "twin", "a*"):
            self.query("INSERT INTO users (login, tenant_id) VALUES (%s, 1)", (login,))

    def authenticator(self, clock=None, **settings):
        node = {"l7r.auth.plugins": "ldap", "auth.ldap.host": self.slapd.uri,
                "auth.ldap.base": PEOPLE, "auth.ldap.scope": "sub",
                "auth.ldap.timeout": "5"}
        node.update({k.replace("__", "."): v for k, v in settings.items()})
        return Authenticator(self.db, Config(keys=declared_keys(), node=node), reactor,
                             clock=clock)

    def login(self, login, password, **settings):
        return self.authenticator(**settings).authenticate(basic(login, password), "192.0.2.1")

    @defer.inlineCallbacks
    def test_search_and_bind(self):
        """
        The user's entry is found by uid and bound with the password; its numbers and
        home become params; a wrong password is refused.
        """
        result = yield self.login("alice", "wonderland")
        self.assertEqual(result.login, "alice")
        self.assertEqual(result.params, {
            "qvd.vm.user.name": "alice", "qvd.vm.user.uid": "1001",
            "qvd.vm.user.gid": "100", "qvd.vm.user.ldap.name": "Alice",
            "qvd.vm.user.ldap.home": "/home/alice"})
        yield self.assertFailure(self.login("alice", "rabbit"), AuthFailed)
        yield self.assertFailure(self.login("alice", "canwefixit"), AuthFailed)

    @defer.inlineCallbacks
    def test_filter_injection(self):
        """
        Filter characters in the login are escaped: 'a*' does not match Alice's entry.
        """
        yield self.assertFailure(self.login("a*", "wonderland"), AuthFailed)
        yield self.assertFailure(self.login("*", "twinpass"), AuthFailed)

    @defer.inlineCallbacks
    def test_normalize_and_home(self):
        """
        With name.normalize the login becomes the LDAP uid; with home.set the home is set.
        """
        self.query("INSERT INTO users (login, tenant_id) VALUES ('Alice', 1)")
        result = yield self.login("ALICE", "wonderland", auth__ldap__name__normalize="1",
                                  auth__ldap__home__set="1")
        self.assertEqual(result.login, "Alice")
        self.assertEqual(result.params["qvd.vm.user.name"], "Alice")
        self.assertEqual(result.params["qvd.vm.user.home"], "/home/alice")

    @defer.inlineCallbacks
    def test_binddn(self):
        """
        The search may run as a service account; a wrong service password refuses all.
        """
        result = yield self.login("bob", "canwefixit", auth__ldap__binddn=f"cn=svc,{SUFFIX}",
                                  auth__ldap__bindpass="svcpass")
        self.assertEqual(result.params["qvd.vm.user.uid"], "1002")
        yield self.assertFailure(
            self.login("bob", "canwefixit", auth__ldap__binddn=f"cn=svc,{SUFFIX}",
                       auth__ldap__bindpass="nope"), AuthFailed)

    @defer.inlineCallbacks
    def test_userbindpattern(self):
        """
        A direct bind through userbindpattern accepts the user and reads its entry.
        """
        pattern = f"uid=%u,{PEOPLE}"
        result = yield self.login("bob", "canwefixit", auth__ldap__userbindpattern=pattern,
                                  auth__ldap__base="ou=Nowhere,dc=example,dc=org")
        self.assertEqual(result.params["qvd.vm.user.gid"], "100")
        yield self.assertFailure(
            self.login("bob", "wrong", auth__ldap__userbindpattern=pattern), AuthFailed)

    @defer.inlineCallbacks
    def test_several_entries(self):
        """
        A login matching more than one entry is refused.
        """
        yield self.assertFailure(self.login("twin", "twinpass", auth__ldap__base=SUFFIX),
                                 AuthFailed)
        result = yield self.login("twin", "twinpass")
        self.assertEqual(result.login, "twin")

    @defer.inlineCallbacks
    def test_unreachable(self):
        """
        A server that does not listen refuses the login (and the chain goes on).
        """
        probe = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        port = probe.getHost().port
        yield probe.stopListening()
        yield self.assertFailure(self.login("alice", "wonderland",
                                            auth__ldap__host=f"127.0.0.1:{port}"), AuthFailed)

    @defer.inlineCallbacks
    def test_silent_server(self):
        """
        A server that accepts but never answers is given up after auth.ldap.timeout.
        """
        silent = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol),
                                   interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        began = time.monotonic()
        yield self.assertFailure(
            self.login("alice", "wonderland", auth__ldap__host=f"ldap://127.0.0.1:"
                       f"{silent.getHost().port}", auth__ldap__timeout="0.5"), AuthFailed)
        self.assertLess(time.monotonic() - began, 3)

    @defer.inlineCallbacks
    def test_auto_ldap(self):
        """
        The typical chain auto,ldap lets a directory user in the first time, creating
        the user and a VM.
        """
        osf = self.query("INSERT INTO osfs (tenant_id, name) VALUES (1, 'desk') RETURNING id")
        self.query("DELETE FROM users WHERE login = 'bob'")
        result = yield self.login("bob", "canwefixit", l7r__auth__plugins="auto,ldap",
                                  auth__auto__osf_id=str(osf[0]["id"]))
        vms = self.query("SELECT v.name FROM vms v JOIN users u ON u.id = v.user_id"
                         " WHERE u.id = %s", (result.user_id,))
        self.assertEqual(vms, [{"name": "bob-1"}])
        self.assertEqual(result.params["qvd.vm.user.uid"], "1002")

    def counted(self, auth):
        """The LDAP checks `auth` makes, counted in the returned list."""
        plugin = auth._plugin("ldap")
        original, checks = plugin.authenticate_basic, []

        def authenticate_basic(ctx, login, password):
            checks.append(login)
            return original(ctx, login, password)
        plugin.authenticate_basic = authenticate_basic
        return checks

    def change_password(self, uid, password):
        self.slapd.add_ldif(f"dn: uid={uid},{PEOPLE}\nchangetype: modify\n"
                            f"replace: userPassword\nuserPassword: {password}\n")

    @defer.inlineCallbacks
    def test_not_cached_by_default(self):
        """
        By default (l7r.auth.cache.ldap off) the directory is asked at every
        login: a password changed there takes effect at the next login.
        """
        auth = self.authenticator(l7r__auth__failure__delay="0")
        checks = self.counted(auth)
        for _ in range(2):
            yield auth.authenticate(basic("bob", "canwefixit"), "192.0.2.1")
        self.assertEqual((len(checks), len(auth.cache)), (2, 0))
        self.change_password("bob", "newpass")
        yield self.assertFailure(auth.authenticate(basic("bob", "canwefixit"), "192.0.2.1"),
                                 AuthFailed)

    @defer.inlineCallbacks
    def test_cached_when_enabled(self):
        """
        With l7r.auth.cache.ldap on, a second login is not sent to the
        directory and gets the same parameters; a password changed in the
        directory still logs in until l7r.auth.cache.lifetime runs out, but a
        block in the database refuses it at the next login.
        """
        clock = task.Clock()
        clock.advance(time.time())
        auth = self.authenticator(clock=clock, l7r__auth__failure__delay="0",
                                  l7r__auth__cache__ldap="1")
        checks = self.counted(auth)
        first = yield auth.authenticate(basic("bob", "canwefixit"), "192.0.2.1")
        second = yield auth.authenticate(basic("bob", "canwefixit"), "192.0.2.1")
        self.assertEqual(second, first)
        self.assertEqual(second.params["qvd.vm.user.uid"], "1002")
        self.assertEqual(len(checks), 1)
        self.change_password("bob", "newpass")
        clock.advance(299)
        yield auth.authenticate(basic("bob", "canwefixit"), "192.0.2.1")
        self.assertEqual(len(checks), 1)
        clock.advance(1)
        yield self.assertFailure(auth.authenticate(basic("bob", "canwefixit"), "192.0.2.1"),
                                 AuthFailed)
        yield auth.authenticate(basic("bob", "newpass"), "192.0.2.1")
        self.query("UPDATE users SET blocked = true WHERE login = 'bob'")
        yield self.assertFailure(auth.authenticate(basic("bob", "newpass"), "192.0.2.1"),
                                 AuthFailed)
        self.assertEqual(len(checks), 4)

    @defer.inlineCallbacks
    def test_auto_ldap_cached(self):
        """
        With auto,ldap and the cache on, the first login creates the user (and
        is not remembered: it had no row to be checked against); from the
        second the directory is not asked.
        """
        osf = self.query("INSERT INTO osfs (tenant_id, name) VALUES (1, 'desk') RETURNING id")
        self.query("DELETE FROM users WHERE login = 'bob'")
        auth = self.authenticator(l7r__auth__failure__delay="0", l7r__auth__cache__ldap="1",
                                  l7r__auth__plugins="auto,ldap",
                                  auth__auto__osf_id=str(osf[0]["id"]))
        checks = self.counted(auth)
        for _ in range(3):
            result = yield auth.authenticate(basic("bob", "canwefixit"), "192.0.2.1")
        self.assertEqual(len(checks), 2)
        self.assertEqual(result.params["qvd.vm.user.uid"], "1002")
        self.assertEqual(len(self.query("SELECT id FROM vms")), 1)
