"""
Tests of the authentication chain against the real PostgreSQL: the default
plugin's passwords, tenants and logins, bearer tokens, TOTP codes, automatic
provisioning and the limits on failed logins.
"""

import base64

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from qvd import passwords
from qvd.config import Config, declared_keys
from qvd.db.pool import Database
from qvd.l7r.auth import otp
from qvd.l7r.auth.chain import PLUGINS, TOO_MANY, Authenticator
from qvd.l7r.auth.interfaces import AuthFailed, AuthResult, IAuthenticator
from qvd.l7r.auth.plugin import IAuthPlugin
from qvd.testing.auth import AcceptingPlugin, FakeAuthenticator
from qvd.testing import pg
from qvd.testing.pg import DatabaseTestMixin

NOW = 1_700_000_000
SECRET32 = "JBSWY3DPEHPK3PXP"
_HASHES = {}


def argon2_hash(password):
    """
    An argon2id hash of C{password}, made once per test run (hashing is slow).
    """
    if password not in _HASHES:
        _HASHES[password] = passwords.hash_password(password)
    return _HASHES[password]


def basic(login, password):
    value = base64.b64encode(f"{login}:{password}".encode()).decode()
    return {"authorization": "Basic " + value}


def bearer(auth_token):
    return {"authorization": "Bearer " + auth_token.strip()}


class AuthTestCase(DatabaseTestMixin, unittest.TestCase):
    """
    A fresh database with tenant 'acme' (id 2) besides 'default' (id 1), a
    pool, a fake clock at NOW and an Authenticator.
    """
    settings = {}
    tenant_settings = {}

    def setUp(self):
        super().setUp()
        self.db = Database(pg.role_dsn(self.dbname, "l7r"), reactor, size=2)
        self.addCleanup(self.db.stop)
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.acme = self.query("INSERT INTO tenants (name) VALUES ('acme') RETURNING id")[0]["id"]
        config = Config(keys=declared_keys(),
                        node={"l7r.auth.failure.delay": "0", **self.settings})
        if self.tenant_settings:
            config = config.with_database({}, {self.acme: dict(self.tenant_settings)})
        self.config = config
        self.auth = Authenticator(self.db, config, reactor, clock=self.clock,
                                  plugins={"accept": AcceptingPlugin})

    def add_user(self, login, password=None, tenant_id=1, stored=None, blocked=False):
        if stored is None and password is not None:
            stored = argon2_hash(password)
        return self.query(
            "INSERT INTO users (login, tenant_id, password, blocked) VALUES (%s, %s, %s, %s)"
            " RETURNING id", (login, tenant_id, stored, blocked))[0]["id"]

    def login(self, login, password, ip="192.0.2.1"):
        return self.auth.authenticate(basic(login, password), ip)

    @defer.inlineCallbacks
    def assertRefused(self, d, reason=None):
        failure = yield self.assertFailure(d, AuthFailed)
        if reason is not None:
            self.assertIn(reason, failure.reason)
        return failure


class AuthenticatorContract:
    """
    The behaviour every IAuthenticator shares; C{make()} returns one that knows
    user 'alice' with password 'pw' in tenant 1.
    """

    @defer.inlineCallbacks
    def test_contract_accepts(self):
        """
        Right credentials fire with an AuthResult for that user.
        """
        result = yield self.make().authenticate(basic("alice", "pw"), "192.0.2.1")
        self.assertIsInstance(result, AuthResult)
        self.assertEqual((result.login, result.tenant_id), ("alice", 1))

    @defer.inlineCallbacks
    def test_contract_refuses(self):
        """
        A wrong password, no header, another scheme and garbage fail with AuthFailed.
        """
        auth = self.make()
        for headers in (basic("alice", "nope"), {}, {"authorization": "Digest x"},
                        {"authorization": "Basic %%%"}):
            yield self.assertFailure(auth.authenticate(headers, "192.0.2.1"), AuthFailed)


class FakeContractTests(AuthenticatorContract, unittest.TestCase):
    def make(self):
        return FakeAuthenticator({"alice": ("pw", AuthResult(7, 1, "alice", {}))})


class InterfaceTests(unittest.TestCase):

    def test_provides(self):
        """
        The Authenticator and its fake provide IAuthenticator; every plugin IAuthPlugin.
        """
        config = Config(keys=declared_keys())
        verifyObject(IAuthenticator, Authenticator(None, config, task.Clock()))
        verifyObject(IAuthenticator, FakeAuthenticator())
        for cls in list(PLUGINS.values()) + [AcceptingPlugin]:
            verifyObject(IAuthPlugin, cls(None, task.Clock()))

    def test_live_config(self):
        """
        A config holder with a `current` attribute is read anew on each request.
        """
        class Live:
            current = Config(keys=declared_keys())
        live = Live()
        auth = Authenticator(None, live, task.Clock())
        self.assertIs(auth.config, live.current)
        live.current = Config(keys=declared_keys(), node={"l7r.auth.plugins": "totp"})
        self.assertEqual([p.name for p in auth.chain(auth.config)], ["totp", "default"])

    def test_unknown_plugin(self):
        """
        An unknown plugin name fails the request with an error that names it,
        answered after l7r.auth.failure.delay like every refusal.
        """
        config = Config(keys=declared_keys(), node={"l7r.auth.plugins": "kerberos"})
        clock = task.Clock()
        auth = Authenticator(None, config, clock)
        d = auth.authenticate(basic("a", "b"), "192.0.2.1")
        self.assertNoResult(d)
        clock.advance(1)
        failure = self.failureResultOf(d, AuthFailed)
        self.assertIn("'kerberos'", failure.value.reason)

    def test_fake(self):
        """
        The fake accepts its listed users and tokens and refuses others.
        """
        result = AuthResult(7, 1, "alice", {})
        fake = FakeAuthenticator({"alice": ("pw", result)}, {"tok": result})
        self.assertEqual(self.successResultOf(fake.authenticate(basic("alice", "pw"), "x")),
                         result)
        self.assertEqual(self.successResultOf(fake.authenticate(
            bearer(base64.b64encode(b"tok").decode()), "x")), result)
        self.failureResultOf(fake.authenticate(basic("alice", "no"), "x"), AuthFailed)
        self.failureResultOf(fake.authenticate({}, "x"), AuthFailed)


class ChainContractTests(AuthenticatorContract, AuthTestCase):
    def make(self):
        self.add_user("alice", "pw")
        return self.auth


class DefaultPluginTests(AuthTestCase):

    @defer.inlineCallbacks
    def test_password(self):
        """
        A user of the default tenant logs in with its argon2id password.
        """
        user_id = self.add_user("alice", "s3cret")
        result = yield self.login("alice", "s3cret")
        self.assertEqual(result, AuthResult(user_id, 1, "alice",
                                            {"qvd.vm.user.name": "alice"}))

    @defer.inlineCallbacks
    def test_tenant_and_normalization(self):
        """
        'user@tenant' and 'user#tenant' pick the tenant; logins are trimmed and lower-cased.
        """
        user_id = self.add_user("alice", "pw", tenant_id=self.acme)
        for login in (" ALICE@acme", "Alice#ACME "):
            result = yield self.login(login, "pw")
            self.assertEqual((result.user_id, result.tenant_id, result.login),
                             (user_id, self.acme, "alice"))
        yield self.assertRefused(self.login("alice", "pw"), "wrong login")

    @defer.inlineCallbacks
    def test_wrong_credentials(self):
        """
        A wrong or empty password, an unknown user or tenant are refused.
        """
        self.add_user("alice", "pw")
        yield self.assertRefused(self.login("alice", "wrong"), "wrong login or password")
        yield self.assertRefused(self.login("alice", ""), "empty password")
        yield self.assertRefused(self.login("bob", "pw"), "wrong login or password")
        yield self.assertRefused(self.login("alice@nowhere", "pw"), "no tenant")
        yield self.assertRefused(self.auth.authenticate({}, "192.0.2.1"), "no Authorization")

    @defer.inlineCallbacks
    def test_blocked(self):
        """
        A blocked user, a blocked tenant and the special tenants '*' and '-' are refused.
        """
        self.add_user("alice", "pw", blocked=True)
        self.add_user("bob", "pw", tenant_id=self.acme)
        self.add_user("root", "pw", tenant_id=0)
        yield self.assertRefused(self.login("alice", "pw"), "blocked")
        yield self.login("bob@acme", "pw")
        self.query("UPDATE tenants SET blocked = true WHERE id = %s", (self.acme,))
        yield self.assertRefused(self.login("bob@acme", "pw"), "blocked")
        yield self.assertRefused(self.login("root@*", "pw"), "not a login tenant")
        yield self.assertRefused(self.login("root@-", "pw"), "not a login tenant")

    @defer.inlineCallbacks
    def test_legacy_hash_upgraded(self):
        """
        A hash imported from QVD is accepted once and replaced by an argon2id hash.
        """
        self.add_user("alice", stored=passwords.legacy_hash("pw", "qvd1234"))
        yield self.login("alice", "pw")
        stored = self.query("SELECT password FROM users WHERE login = 'alice'")[0]["password"]
        self.assertTrue(stored.startswith("$argon2id$"))
        yield self.login("alice", "pw")
        yield self.assertRefused(self.login("alice", "other"))


class CaseSensitiveTests(AuthTestCase):
    settings = {"model.user.login.case-sensitive": "1",
                "l7r.auth.plugin.default.separators": "%",
                "l7r.auth.plugin.default.tenant": "acme",
                "l7r.auth.plugin.default.salt": "pepper"}

    @defer.inlineCallbacks
    def test_settings(self):
        """
        Case-sensitive logins, other separators, default tenant and salt are honoured.
        """
        self.add_user("Alice", stored=passwords.legacy_hash("pw", "pepper"),
                      tenant_id=self.acme)
        self.add_user("bob", "pw", tenant_id=1)
        result = yield self.login("Alice", "pw")
        self.assertEqual(result.tenant_id, self.acme)
        yield self.assertRefused(self.login("alice", "pw"))
        result = yield self.login("bob%default", "pw")
        self.assertEqual(result.login, "bob")
        yield self.assertRefused(self.login("bob@default", "pw"), "wrong login")


class RateLimitTests(AuthTestCase):
    settings = {"l7r.auth.ratelimit.login.max": "3",
                "l7r.auth.ratelimit.login.window": "60",
                "l7r.auth.ratelimit.address.max": "5",
                "l7r.auth.ratelimit.address.window": "100"}

    @defer.inlineCallbacks
    def test_login_limit(self):
        """
        After 3 failures of a login from one address within 60 s even its right
        password is refused from that address, until the first failure is 60 s
        old; the same login from another address is not affected.
        """
        self.add_user("alice", "pw")
        for _ in range(3):
            yield self.assertRefused(self.login("alice", "bad", ip="192.0.2.7"))
            self.clock.advance(10)
        yield self.assertRefused(self.login("alice", "pw", ip="192.0.2.7"), TOO_MANY)
        yield self.login("alice", "pw", ip="198.51.100.1")
        self.clock.advance(29)
        yield self.assertRefused(self.login("ALICE ", "pw", ip="192.0.2.7"), TOO_MANY)
        self.clock.advance(1)
        yield self.login("alice", "pw", ip="192.0.2.7")

    @defer.inlineCallbacks
    def test_spellings_share_one_count(self):
        """
        Spellings of one login (case, blanks, the tenant's case and blanks) are
        one key: together they get the login's 3 guesses, not 3 each.
        """
        self.add_user("alice", "pw", tenant_id=self.acme)
        for login in ("alice@acme", "ALICE@acme", "alice@ acme"):
            yield self.assertRefused(self.login(login, "bad", ip="192.0.2.7"), "wrong")
        for login in ("alice@acme", " Alice@ACME", "alice@acme "):
            yield self.assertRefused(self.login(login, "pw", ip="192.0.2.7"), TOO_MANY)

    @defer.inlineCallbacks
    def test_parallel_guesses_bounded(self):
        """
        Attempts in flight count: of 40 parallel guesses at most 3 passwords
        are checked, the others are refused unchecked.
        """
        self.add_user("alice", "pw")
        checked = []
        original = self.auth._verify

        def verify(ctx, password):
            checked.append(password)
            return original(ctx, password)
        self.auth._verify = verify
        results = yield defer.DeferredList(
            [self.login("alice", f"guess{i}", ip="192.0.2.7") for i in range(40)],
            consumeErrors=True)
        self.assertEqual(len(checked), 3)
        reasons = [r.value.reason for ok, r in results]
        self.assertEqual(sum(TOO_MANY in r for r in reasons), 37)

    @defer.inlineCallbacks
    def test_global_backstop(self):
        """
        Failures of one login from many addresses stop it everywhere at the
        slower global limit.
        """
        self.auth._config = Config(keys=declared_keys(), node={
            "l7r.auth.failure.delay": "0", "l7r.auth.ratelimit.login_global.max": "6"})
        self.add_user("alice", "pw")
        for i in range(6):
            yield self.assertRefused(self.login("alice", "bad", ip=f"192.0.2.{i}"), "wrong")
        yield self.assertRefused(self.login("alice", "pw", ip="203.0.113.1"), TOO_MANY)

    @defer.inlineCallbacks
    def test_address_limit(self):
        """
        After 5 failures from one address new logins from it are refused, but a
        login that succeeded from that address before still gets in; other
        addresses are not affected.
        """
        self.add_user("alice", "pw")
        self.add_user("bob", "pw")
        yield self.login("alice", "pw", ip="203.0.113.9")
        for i in range(5):
            yield self.assertRefused(self.login(f"user{i}", "bad", ip="203.0.113.9"))
        yield self.assertRefused(self.login("bob", "pw", ip="203.0.113.9"), TOO_MANY)
        yield self.login("alice", "pw", ip="203.0.113.9")
        yield self.login("bob", "pw", ip="203.0.113.10")

    @defer.inlineCallbacks
    def test_success_resets_login(self):
        """
        A successful login forgets the earlier failures of that login.
        """
        self.add_user("alice", "pw")
        for _ in range(2):
            yield self.assertRefused(self.login("alice", "bad", ip="192.0.2.50"))
        yield self.login("alice", "pw", ip="192.0.2.51")
        for _ in range(2):
            yield self.assertRefused(self.login("alice", "bad", ip="192.0.2.52"))
        yield self.login("alice", "pw", ip="192.0.2.53")


class BearerTests(AuthTestCase):

    @defer.inlineCallbacks
    def test_multi_use_token(self):
        """
        A token of create_auth_token works many times for 24 h with the stored params,
        then no more.
        """
        self.add_user("alice", "pw")
        result = yield self.login("alice", "pw")
        grant = yield self.auth.create_auth_token(result)
        self.assertTrue(grant.auth_token.endswith("\n"))
        self.assertEqual(grant.expiration, NOW + 86400)
        for _ in range(3):
            again = yield self.auth.authenticate(bearer(grant.auth_token), "192.0.2.1")
            self.assertEqual(again, result)
        self.clock.advance(86400)
        yield self.assertRefused(self.auth.authenticate(bearer(grant.auth_token), "192.0.2.1"),
                                 "bearer token")

    @defer.inlineCallbacks
    def test_single_use_token(self):
        """
        A single-use token works once and its row is deleted.
        """
        user_id = self.add_user("alice", "pw")
        params_id = self.query(
            "INSERT INTO user_auth_parameters (parameters) VALUES"
            " ('{\"qvd.vm.user.name\": \"alice\", \"qvd.vm.user.uid\": \"1001\"}') RETURNING id"
        )[0]["id"]
        self.query("INSERT INTO user_tokens (token, user_id, expiration, auth_params_id,"
                   " multi_use) VALUES ('tok1', %s, %s, %s, false)",
                   (user_id, NOW + 60, params_id))
        header = bearer(base64.b64encode(b"tok1").decode())
        result = yield self.auth.authenticate(header, "192.0.2.1")
        self.assertEqual(result.params["qvd.vm.user.uid"], "1001")
        self.assertEqual(self.query("SELECT count(*) AS n FROM user_tokens")[0]["n"], 0)
        yield self.assertRefused(self.auth.authenticate(header, "192.0.2.1"))

    @defer.inlineCallbacks
    def test_blocked_user_token(self):
        """
        The token of a user blocked since it was made is refused.
        """
        self.add_user("alice", "pw")
        result = yield self.login("alice", "pw")
        grant = yield self.auth.create_auth_token(result)
        self.query("UPDATE users SET blocked = true")
        yield self.assertRefused(self.auth.authenticate(bearer(grant.auth_token), "192.0.2.1"),
                                 "blocked")

    @defer.inlineCallbacks
    def test_store_auth_parameters(self):
        """
        store_auth_parameters keeps the result's params in user_auth_parameters.
        """
        self.add_user("alice", "pw")
        result = yield self.login("alice", "pw")
        params_id = yield self.auth.store_auth_parameters(result)
        row = self.query("SELECT parameters FROM user_auth_parameters WHERE id = %s",
                         (params_id,))
        self.assertEqual(row[0]["parameters"], {"qvd.vm.user.name": "alice"})


class TotpTests(AuthTestCase):
    settings = {"l7r.auth.plugins.head": "totp"}

    def setUp(self):
        super().setUp()
        self.user_id = self.add_user("alice", "pw")
        prop = self.query("INSERT INTO properties_list (key, tenant_id, qvd_object) VALUES"
                          " ('l7r.auth.plugin.totp.secret32', 1, 'user') RETURNING id")[0]["id"]
        self.query("INSERT INTO user_properties (user_id, property_id, value)"
                   " VALUES (%s, %s, %s)", (self.user_id, prop, SECRET32))
        self.secret = otp.decode_base32(SECRET32)

    def code(self, offset=0):
        return otp.totp(self.secret, self.clock.seconds() + offset)

    @defer.inlineCallbacks
    def test_code_once(self):
        """
        The password followed by the current code logs in; the same code again is refused.
        """
        code = self.code()
        result = yield self.login("alice", "pw" + code)
        self.assertEqual(result.user_id, self.user_id)
        yield self.assertRefused(self.login("alice", "pw" + code), "second factor")

    @defer.inlineCallbacks
    def test_previous_step(self):
        """
        The previous step's code is accepted, unless a later code was already used.
        """
        yield self.login("alice", "pw" + self.code(-30))
        self.clock.advance(30)
        yield self.login("alice", "pw" + self.code(0))
        yield self.assertRefused(self.login("alice", "pw" + self.code(-30)), "second factor")

    @defer.inlineCallbacks
    def test_refused(self):
        """
        A wrong code, an old code, a missing code or a wrong password are refused.
        """
        yield self.assertRefused(self.login("alice", "pw" + self.code(-60)), "second factor")
        wrong = str((int(self.code()) + 1) % 1000000).zfill(6)
        yield self.assertRefused(self.login("alice", "pw" + wrong), "second factor")
        yield self.assertRefused(self.login("alice", "pw"), "empty password")
        yield self.assertRefused(self.login("alice", "bad" + self.code()), "wrong login")

    @defer.inlineCallbacks
    def test_no_secret(self):
        """
        A user without the secret property cannot pass the second factor.
        """
        self.add_user("bob", "pw")
        yield self.assertRefused(self.login("bob", "pw" + self.code()), "second factor")


class AutoTests(AuthTestCase):
    settings = {"l7r.auth.plugins": "auto,accept"}

    def setUp(self):
        super().setUp()
        self.osf = self.query("INSERT INTO osfs (tenant_id, name) VALUES (%s, 'desk')"
                              " RETURNING id", (self.acme,))[0]["id"]
        self.config = self.config.with_database({}, {self.acme: {
            "auth.auto.osf_id": str(self.osf), "auth.auto.di_tag": "head"}})
        self.auth = Authenticator(self.db, self.config, reactor, clock=self.clock,
                                  plugins={"accept": AcceptingPlugin})

    def vms(self):
        return self.query(
            "SELECT v.name, v.user_id, v.osf_id, v.di_tag, host(v.ip) AS ip, v.mac::text AS mac,"
            " r.vm_state, r.user_state, c.run_attempts FROM vms v"
            " JOIN vm_runtimes r ON r.vm_id = v.id JOIN vm_counters c ON c.vm_id = v.id"
            " ORDER BY v.id")

    @defer.inlineCallbacks
    def test_provision(self):
        """
        The first login creates the user without a password and VM <login>-1 with the
        top address of the range, its MAC, runtime and counters; later logins create nothing.
        """
        result = yield self.login("Carol@acme", "directory-password")
        user = self.query("SELECT id, password FROM users WHERE login = 'carol'")[0]
        self.assertEqual((result.user_id, user["password"]), (user["id"], None))
        self.assertEqual(self.vms(), [dict(
            name="carol-1", user_id=user["id"], osf_id=self.osf, di_tag="head",
            ip="10.0.255.254", mac="54:52:00:00:ff:fe", vm_state="stopped",
            user_state="disconnected", run_attempts=0)])
        yield self.login("carol@acme", "directory-password")
        self.assertEqual(len(self.vms()), 1)

    @defer.inlineCallbacks
    def test_next_name_and_address(self):
        """
        A user whose VMs are of another OSF gets the next free name and address.
        """
        other_osf = self.query("INSERT INTO osfs (tenant_id, name) VALUES (%s, 'other')"
                               " RETURNING id", (self.acme,))[0]["id"]
        user_id = self.add_user("dave", tenant_id=self.acme)
        self.query("INSERT INTO vms (name, user_id, osf_id, ip, mac) VALUES"
                   " ('dave-1', %s, %s, '10.0.255.254', '54:52:00:00:ff:fe')",
                   (user_id, other_osf))
        yield self.login("dave@acme", "x")
        created = self.query("SELECT name, host(ip) AS ip FROM vms WHERE osf_id = %s",
                             (self.osf,))
        self.assertEqual(created, [{"name": "dave-2", "ip": "10.0.255.253"}])

    @defer.inlineCallbacks
    def test_concurrent_first_logins(self):
        """
        Two simultaneous first logins of one user create one user and one VM; two
        users' simultaneous first logins get different addresses.
        """
        yield defer.gatherResults([self.login("erin@acme", "x"), self.login("erin@acme", "x"),
                                   self.login("frank@acme", "x")])
        vms = self.vms()
        self.assertEqual(sorted(v["name"] for v in vms), ["erin-1", "frank-1"])
        self.assertEqual(len({v["ip"] for v in vms}), 2)

    @defer.inlineCallbacks
    def test_not_configured(self):
        """
        Without auth.auto.osf_id for the tenant the login fails with a configuration error.
        """
        yield self.assertRefused(self.login("gina", "x"), "auth.auto.osf_id")
        self.assertEqual(self.query("SELECT count(*) AS n FROM users")[0]["n"], 0)


class BadInputTests(AuthTestCase):

    @defer.inlineCallbacks
    def test_refused_not_crashing(self):
        """
        Logins with NUL or control characters, over-long logins, tenants and tokens are
        refused with AuthFailed, never a database error.
        """
        self.add_user("alice", "pw")
        for login in ("al\0ice", "alice\n", "a" * 65, "a" * 300, "alice@" + "t" * 65,
                      "alice@te\0nant"):
            yield self.assertRefused(self.login(login, "pw"))
        for token in (b"tok\0en", b"t" * 300):
            header = bearer(base64.b64encode(token).decode())
            yield self.assertRefused(self.auth.authenticate(header, "192.0.2.1"))

    @defer.inlineCallbacks
    def test_stored_params_become_text(self):
        """
        Non-text values stored in user_auth_parameters reach the result as text.
        """
        user_id = self.add_user("alice", "pw")
        params_id = self.query(
            "INSERT INTO user_auth_parameters (parameters) VALUES"
            " ('{\"n\": 5, \"b\": true, \"z\": null}') RETURNING id")[0]["id"]
        self.query("INSERT INTO user_tokens (token, user_id, expiration, auth_params_id,"
                   " multi_use) VALUES ('tok2', %s, %s, %s, true)",
                   (user_id, NOW + 60, params_id))
        result = yield self.auth.authenticate(bearer(base64.b64encode(b"tok2").decode()), "x")
        self.assertEqual(result.params, {"n": "5", "b": "1", "z": "",
                                         "qvd.vm.user.name": "alice"})

    @defer.inlineCallbacks
    def test_database_down(self):
        """
        When the database cannot be reached the failure is DatabaseUnavailable, not
        AuthFailed, and it is not counted as a failed attempt.
        """
        from qvd.db.pool import DatabaseUnavailable
        self.add_user("alice", "pw")
        yield self.db.stop()
        for _ in range(10):
            yield self.assertFailure(self.login("alice", "pw"), DatabaseUnavailable)
        self.assertEqual(len(self.auth.limits), 0)


class PerTenantChainTests(AuthTestCase):
    tenant_settings = {"l7r.auth.plugins.tail": "accept"}

    @defer.inlineCallbacks
    def test_tenant_chain(self):
        """
        The chain is read for the login's tenant: acme's users are checked by its own
        plugin only, the default tenant's by the default plugin.
        """
        self.add_user("alice", "pw", tenant_id=self.acme)
        self.add_user("bob", "pw", tenant_id=1)
        yield self.login("alice@acme", "anything")
        yield self.assertRefused(self.login("bob", "anything"))
        yield self.login("bob", "pw")

    @defer.inlineCallbacks
    def test_token_for_vm(self):
        """
        A token can be bound to a VM and made single-use.
        """
        user_id = self.add_user("bob", "pw", tenant_id=1)
        osf = self.query("INSERT INTO osfs (tenant_id, name) VALUES (1, 'd') RETURNING id")
        vm = self.query("INSERT INTO vms (name, user_id, osf_id, ip, mac) VALUES"
                        " ('v', %s, %s, '10.0.0.200', '54:52:00:00:00:c8') RETURNING id",
                        (user_id, osf[0]["id"]))[0]["id"]
        result = yield self.login("bob", "pw")
        grant = yield self.auth.create_auth_token(result, lifetime=60, vm_id=vm,
                                                  multi_use=False)
        row = self.query("SELECT vm_id, multi_use, expiration FROM user_tokens")
        self.assertEqual(row, [{"vm_id": vm, "multi_use": False, "expiration": NOW + 60}])
        yield self.auth.authenticate(bearer(grant.auth_token), "x")
        yield self.assertRefused(self.auth.authenticate(bearer(grant.auth_token), "x"))


class FactoryTests(unittest.TestCase):

    def test_make_authenticator(self):
        """
        make_authenticator, which the L7R service calls, gives the plugin chain.
        """
        from qvd.l7r.auth import make_authenticator
        auth = make_authenticator(Config(keys=declared_keys()), None, task.Clock())
        self.assertIsInstance(auth, Authenticator)
        self.assertEqual([p.name for p in auth.chain(auth.config)], ["default"])


class CountingChecks:
    """
    A `blocking` runner for the Authenticator that records the name of every
    function it runs (the password checks) before running it with `runner`.
    """

    def __init__(self, runner):
        self.runner = runner
        self.calls = []

    def __call__(self, function, *args):
        self.calls.append(function.__name__)
        return self.runner(function, *args)

    @property
    def checks(self):
        """Password checks run so far (known and unknown users)."""
        return sum(name in ("verify_password", "_verify_unknown") for name in self.calls)


class CachingPlugin(AcceptingPlugin):
    """
    Accepts every non-empty password, sets a parameter, counts its checks and
    lets the cache remember it while `cacheable`.
    """
    name = "caching"
    cacheable = True
    checked = 0

    def cache_verified(self, ctx):
        return self.cacheable

    def authenticate_basic(self, ctx, login, password):
        CachingPlugin.checked += 1
        ctx.params["qvd.vm.user.uid"] = "1001"
        return super().authenticate_basic(ctx, login, password)


class VerifiedCacheTests(AuthTestCase):
    """
    The verified-credentials cache through the real chain and database:
    password checks counted at the hash pool's seam.
    """
    settings = {"l7r.auth.ratelimit.login.max": "3"}

    def setUp(self):
        super().setUp()
        from qvd.l7r.auth.chain import _thread_runner
        self.hashes = CountingChecks(_thread_runner(reactor))
        self.auth = self.make_auth(self.config)
        self.user_id = self.add_user("alice", "pw")

    def make_auth(self, config):
        return Authenticator(self.db, config, reactor, clock=self.clock,
                             blocking=self.hashes,
                             plugins={"accept": AcceptingPlugin, "caching": CachingPlugin})

    @defer.inlineCallbacks
    def test_second_login_not_hashed(self):
        """
        A second and third login with the same password, also from another
        address (a new connection after a network change), run no password
        check and give the same result.
        """
        first = yield self.login("alice", "pw")
        self.assertEqual(self.hashes.checks, 1)
        second = yield self.login("Alice ", "pw")
        third = yield self.login("alice@default", "pw", ip="198.51.100.7")
        self.assertEqual((second, third), (first, first))
        self.assertEqual(self.hashes.checks, 1)
        self.assertEqual((self.auth.cache.hits, len(self.auth.cache)), (2, 1))

    @defer.inlineCallbacks
    def test_real_hash_pool(self):
        """
        With the L7R's process pool: the second login sends nothing to the pool.
        """
        from qvd.l7r.auth.hashpool import HashPool
        pool = HashPool(reactor, workers=1, queue=4)
        self.addCleanup(pool.stop)
        self.hashes.runner = pool
        yield self.login("alice", "pw")
        yield self.login("alice", "pw")
        self.assertEqual(self.hashes.calls, ["verify_password"])

    @defer.inlineCallbacks
    def test_wrong_password_never_cached(self):
        """
        A wrong password is checked every time, before and after the right one
        was cached, and never accepted; a refusal leaves nothing in the cache.
        """
        for i in range(2):
            yield self.assertRefused(self.login("alice", "wrong", ip=f"192.0.2.{i + 20}"),
                                     "wrong login")
        self.assertEqual((self.hashes.checks, len(self.auth.cache)), (2, 0))
        yield self.login("alice", "pw")
        for i, password in enumerate(("wrong", "pw ", "PW", "p")):
            yield self.assertRefused(self.login("alice", password, ip=f"192.0.2.{i + 10}"),
                                     "wrong login")
        self.assertEqual(self.hashes.checks, 7)
        yield self.assertRefused(self.login("bob", "pw"), "wrong login")
        self.assertEqual(self.hashes.checks, 8)

    @defer.inlineCallbacks
    def test_password_change(self):
        """
        After the stored password changes, the old password is checked (and
        refused) at the next login and the new one is checked once.
        """
        yield self.login("alice", "pw")
        self.query("UPDATE users SET password = %s WHERE id = %s",
                   (argon2_hash("new"), self.user_id))
        yield self.assertRefused(self.login("alice", "pw"), "wrong login")
        self.assertEqual(self.hashes.checks, 2)
        yield self.login("alice", "new")
        yield self.login("alice", "new")
        self.assertEqual(self.hashes.checks, 3)

    @defer.inlineCallbacks
    def test_password_reset_to_same(self):
        """
        Any update of the user's row (here the same hash written again) makes
        the next login check the password.
        """
        yield self.login("alice", "pw")
        self.query("UPDATE users SET password = password WHERE id = %s", (self.user_id,))
        yield self.login("alice", "pw")
        self.assertEqual(self.hashes.checks, 2)

    @defer.inlineCallbacks
    def test_user_block(self):
        """
        A blocked user is refused at the next login despite the cache, and
        after the unblock the password is checked again.
        """
        yield self.login("alice", "pw")
        self.query("UPDATE users SET blocked = true WHERE id = %s", (self.user_id,))
        yield self.assertRefused(self.login("alice", "pw"), "blocked")
        self.query("UPDATE users SET blocked = false WHERE id = %s", (self.user_id,))
        checks = self.hashes.checks
        yield self.login("alice", "pw")
        self.assertEqual(self.hashes.checks, checks + 1)

    @defer.inlineCallbacks
    def test_block_and_unblock_between_logins(self):
        """
        A block and unblock with no login in between still invalidates the
        entry (the row version changed).
        """
        yield self.login("alice", "pw")
        self.query("UPDATE users SET blocked = true WHERE id = %s", (self.user_id,))
        self.query("UPDATE users SET blocked = false WHERE id = %s", (self.user_id,))
        yield self.login("alice", "pw")
        self.assertEqual(self.hashes.checks, 2)

    @defer.inlineCallbacks
    def test_tenant_block(self):
        """
        A blocked tenant is refused at the next login despite the cache; after
        the unblock the password is checked again.
        """
        self.add_user("bob", "pw", tenant_id=self.acme)
        yield self.login("bob@acme", "pw")
        self.query("UPDATE tenants SET blocked = true WHERE id = %s", (self.acme,))
        yield self.assertRefused(self.login("bob@acme", "pw"), "blocked")
        self.query("UPDATE tenants SET blocked = false WHERE id = %s", (self.acme,))
        yield self.login("bob@acme", "pw")
        self.assertEqual(self.hashes.checks, 2)

    @defer.inlineCallbacks
    def test_user_deleted(self):
        """
        A deleted user is refused; re-created with the same password hash it
        is checked again.
        """
        yield self.login("alice", "pw")
        self.query("DELETE FROM users WHERE id = %s", (self.user_id,))
        yield self.assertRefused(self.login("alice", "pw"), "wrong login")
        self.add_user("alice", "pw")
        result = yield self.login("alice", "pw")
        self.assertNotEqual(result.user_id, self.user_id)
        self.assertEqual(self.hashes.checks, 3)

    @defer.inlineCallbacks
    def test_lifetime(self):
        """
        An entry serves for l7r.auth.cache.lifetime (300 s) from the check:
        a login at 299 s is not checked, one at 300 s is.
        """
        yield self.login("alice", "pw")
        self.clock.advance(299)
        yield self.login("alice", "pw")
        self.assertEqual(self.hashes.checks, 1)
        self.clock.advance(1)
        yield self.login("alice", "pw")
        self.assertEqual(self.hashes.checks, 2)

    @defer.inlineCallbacks
    def test_limits_on_a_hit(self):
        """
        A hit is a login like any other for the limits: a login locked out
        from an address stays locked out there although its password is
        cached, and a hit forgets that login's earlier failures.
        """
        yield self.login("alice", "pw", ip="192.0.2.7")
        for _ in range(2):
            yield self.assertRefused(self.login("alice", "bad", ip="192.0.2.7"), "wrong")
        yield self.login("alice", "pw", ip="192.0.2.7")           # a hit: failures forgotten
        for _ in range(2):
            yield self.assertRefused(self.login("alice", "bad", ip="192.0.2.7"), "wrong")
        yield self.login("alice", "pw", ip="192.0.2.7")
        self.assertEqual(self.hashes.checks, 5)
        for _ in range(3):
            yield self.assertRefused(self.login("alice", "bad", ip="192.0.2.7"), "wrong")
        yield self.assertRefused(self.login("alice", "pw", ip="192.0.2.7"), TOO_MANY)
        yield self.login("alice", "pw", ip="198.51.100.1")
        self.assertEqual(self.hashes.checks, 8)

    @defer.inlineCallbacks
    def test_disabled(self):
        """
        With l7r.auth.cache.size = 0 every login is checked.
        """
        self.auth = self.make_auth(Config(keys=declared_keys(), node={
            "l7r.auth.failure.delay": "0", "l7r.auth.cache.size": "0"}))
        for _ in range(3):
            yield self.login("alice", "pw")
        self.assertEqual(self.hashes.checks, 3)

    @defer.inlineCallbacks
    def test_config_change_clears(self):
        """
        A new configuration (a reload of the live configuration) empties the
        cache; a new lifetime applies.
        """
        class Live:
            current = self.config
        self.auth = self.make_auth(Live)
        yield self.login("alice", "pw")
        yield self.login("alice", "pw")
        Live.current = Config(keys=declared_keys(), node={
            "l7r.auth.failure.delay": "0", "l7r.auth.cache.lifetime": "10"})
        yield self.login("alice", "pw")
        self.assertEqual(self.hashes.checks, 2)
        self.clock.advance(10)
        yield self.login("alice", "pw")
        self.assertEqual(self.hashes.checks, 3)

    @defer.inlineCallbacks
    def test_legacy_hash(self):
        """
        A QVD hash is checked and upgraded; the upgrade changed the row, so
        the next login checks the new hash once; later ones are hits.
        """
        self.add_user("carol", stored=passwords.legacy_hash("pw", "qvd1234"))
        for _ in range(3):
            yield self.login("carol", "pw")
        self.assertEqual(self.hashes.checks, 2)

    @defer.inlineCallbacks
    def test_plugin_not_cacheable(self):
        """
        A plugin that does not allow caching (the base Plugin's answer) is
        asked at every login.
        """
        self.auth = self.make_auth(self.config.with_database(
            {"l7r.auth.plugins.tail": "accept"}, {}))
        checked = []
        plugin = self.auth._plugin("accept")
        original = plugin.authenticate_basic
        plugin.authenticate_basic = lambda *a: checked.append(1) or original(*a)
        for _ in range(3):
            yield self.login("alice", "anything")
        self.assertEqual((len(checked), len(self.auth.cache)), (3, 0))

    @defer.inlineCallbacks
    def test_plugin_params_and_withdrawn_permission(self):
        """
        A hit gives back the parameters the accepting plugin set; when the
        plugin no longer allows caching, its entry is not used (and a hit of
        a plugin that no longer allows it is dropped).
        """
        CachingPlugin.checked = 0
        self.auth = self.make_auth(self.config.with_database(
            {"l7r.auth.plugins.tail": "caching"}, {}))
        first = yield self.login("alice", "anything")
        second = yield self.login("alice", "anything")
        self.assertEqual(second, first)
        self.assertEqual(second.params["qvd.vm.user.uid"], "1001")
        self.assertEqual(CachingPlugin.checked, 1)
        self.auth._plugin("caching").cacheable = False
        yield self.login("alice", "anything")
        self.assertEqual((CachingPlugin.checked, self.auth.cache.hits), (2, 1))
        self.auth = self.make_auth(self.config.with_database(
            {"l7r.auth.plugins.tail": "caching,default"}, {}))
        self.auth._plugin("caching").cacheable = True
        yield self.login("alice", "anything")
        self.auth._plugin("caching").cacheable = False      # default still allows it
        yield self.login("alice", "anything")
        self.assertEqual((CachingPlugin.checked, self.auth.cache.hits, len(self.auth.cache)),
                         (4, 0, 0))


class VerifiedCacheTotpTests(TotpTests):
    """
    The cache with a TOTP second factor: the password part is cached, the
    code is checked at every login and never accepted twice.
    """

    def setUp(self):
        super().setUp()
        from qvd.l7r.auth.chain import _thread_runner
        self.hashes = CountingChecks(_thread_runner(reactor))
        self.auth = Authenticator(self.db, self.config, reactor, clock=self.clock,
                                  blocking=self.hashes)

    def used_steps(self):
        return self.query("SELECT last_step FROM user_totp_steps")

    @defer.inlineCallbacks
    def test_code_not_replayable(self):
        """
        The password and code sent again (a replayed request) are refused
        although the password is cached; the next step's code logs in
        without a password check.
        """
        code = self.code()
        yield self.login("alice", "pw" + code)
        yield self.assertRefused(self.login("alice", "pw" + code), "second factor")
        yield self.assertRefused(self.login("alice", "pw" + code, ip="198.51.100.9"),
                                 "second factor")
        self.assertEqual(self.hashes.checks, 1)
        self.clock.advance(30)
        yield self.login("alice", "pw" + self.code())
        self.assertEqual(self.hashes.checks, 1)
        yield self.assertRefused(self.login("alice", "pw" + self.code(-30)), "second factor")

    @defer.inlineCallbacks
    def test_wrong_code_not_cached(self):
        """
        The right password with a wrong code is a failed login: nothing is
        cached, and the next login checks the password.
        """
        wrong = str((int(self.code()) + 1) % 1000000).zfill(6)
        yield self.assertRefused(self.login("alice", "pw" + wrong), "second factor")
        self.assertEqual((len(self.auth.cache), self.used_steps()), (0, []))
        yield self.login("alice", "pw" + self.code())
        self.assertEqual(self.hashes.checks, 2)

    @defer.inlineCallbacks
    def test_wrong_password_right_code(self):
        """
        A wrong password with a fresh code is checked and refused, also when
        the right password is cached, and does not use up the code.
        """
        yield self.login("alice", "pw" + self.code())
        self.clock.advance(30)
        yield self.assertRefused(self.login("alice", "bad" + self.code()), "wrong login")
        self.assertEqual(self.hashes.checks, 2)
        yield self.login("alice", "pw" + self.code())
        self.assertEqual(self.hashes.checks, 2)
