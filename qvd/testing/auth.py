"""
Fakes for the authentication seam, for tests of the L7R and of the chain.

    authenticator = FakeAuthenticator({"alice": ("secret", AuthResult(7, 1, "alice", {}))})
    d = authenticator.authenticate({"authorization": "Basic ..."}, "192.0.2.1")

    Authenticator(db, config, reactor, plugins={"accept": AcceptingPlugin})
    # with l7r.auth.plugins = auto,accept: every non-empty password is accepted
"""

from twisted.internet import defer
from zope.interface import implementer

from qvd.l7r.auth import credentials
from qvd.l7r.auth.interfaces import AuthFailed, IAuthenticator
from qvd.l7r.auth.plugin import Plugin


@implementer(IAuthenticator)
class FakeAuthenticator:
    """
    Accepts Basic credentials listed in C{users} (login -> (password,
    AuthResult)) and bearer tokens listed in C{tokens} (token -> AuthResult).

    @ivar calls: every (headers, source_ip) it was asked about.
    """

    def __init__(self, users=None, tokens=None):
        self.users = dict(users or {})
        self.tokens = dict(tokens or {})
        self.calls = []

    def authenticate(self, request_headers, source_ip):
        self.calls.append((dict(request_headers), source_ip))
        try:
            creds = credentials.parse_authorization(request_headers.get("authorization"))
            if isinstance(creds, credentials.BearerCredentials):
                if creds.token in self.tokens:
                    return defer.succeed(self.tokens[creds.token])
                raise AuthFailed("unknown or expired bearer token")
            password, result = self.users.get(creds.login, (None, None))
            if result is None or not creds.password or creds.password != password:
                raise AuthFailed("wrong login or password")
            return defer.succeed(result)
        except AuthFailed:
            return defer.fail()


class AcceptingPlugin(Plugin):
    """
    An authentication plugin that accepts every non-empty password, standing
    in for an external directory.
    """
    name = "accept"

    def authenticate_basic(self, ctx, login, password):
        return bool(password)
