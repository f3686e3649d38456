"""
A simple database-password L{IAuthenticator} for tests of the L7R.

    auth = FakeAuthenticator(db)      # db: qvd.db.pool.Database
    result = await auth.authenticate({"authorization": "Basic ..."}, "127.0.0.1")

Basic credentials C{login[@tenant]:password} are checked against
C{users.password} with L{qvd.passwords.verify_password}; the tenant defaults to
C{default}. Blocked tenants or users are refused. Bearer tokens are not
supported (refused). C{calls} counts authentications, so tests can see the
per-connection cache at work.
"""

import base64
import binascii

from twisted.internet import defer, threads
from zope.interface import implementer

from qvd.l7r.auth.interfaces import AuthFailed, AuthResult, IAuthenticator
from qvd.passwords import verify_password


@implementer(IAuthenticator)
class FakeAuthenticator:
    def __init__(self, db, default_tenant="default", reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.db = db
        self.default_tenant = default_tenant
        self.calls = 0

    @defer.inlineCallbacks
    def authenticate(self, request_headers, source_ip):
        self.calls += 1
        credentials = request_headers.get("authorization", "")
        scheme, _, encoded = credentials.partition(" ")
        if scheme != "Basic":
            raise AuthFailed(f"unsupported authorization scheme {scheme!r}")
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthFailed("undecodable Basic credentials")
        login, sep, password = decoded.partition(":")
        if not sep or not login:
            raise AuthFailed("Basic credentials without login:password")
        tenant = self.default_tenant
        for separator in "@#":
            if separator in login:
                login, tenant = login.split(separator, 1)
                break
        login = login.strip().lower()
        rows = yield self.db.runQuery(
            "SELECT u.id, u.tenant_id, u.password, u.blocked, t.blocked"
            " FROM users u JOIN tenants t ON t.id = u.tenant_id"
            " WHERE u.login = %s AND t.name = %s AND t.id > 0", (login, tenant))
        if not rows:
            raise AuthFailed(f"no user {login!r} in tenant {tenant!r}")
        user_id, tenant_id, stored, user_blocked, tenant_blocked = rows[0]
        if user_blocked or tenant_blocked:
            raise AuthFailed(f"user {login!r} or tenant {tenant!r} is blocked")
        # argon2 takes ~0.1 s of CPU: never in the reactor thread.
        ok, _ = yield threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), verify_password, stored, password)
        if not ok:
            raise AuthFailed(f"wrong password for {login!r}")
        return AuthResult(user_id=user_id, tenant_id=tenant_id, login=login,
                          params={"qvd.vm.user.name": login})
