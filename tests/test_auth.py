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
