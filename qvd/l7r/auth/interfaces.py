"""
The seam between the L7R and its authentication plugins.

    @implementer(IAuthenticator)
    class MyAuth:
        def authenticate(self, request_headers, source_ip):
            ...                     # a Deferred
            return defer.succeed(AuthResult(user_id=7, tenant_id=1, login="ana",
                                            params={"qvd.vm.user.name": "ana"}))

The L7R calls C{authenticate} with the request's headers (names lower-cased,
values as sent, e.g. C{{"authorization": "Basic YW5hOnNlY3JldA=="}}) and the
client's IP address. A success fires with an L{AuthResult}; a refusal fails
with L{AuthFailed}, which the L7R answers with C{401} and
C{WWW-Authenticate: Basic realm="QVD"} (reference 1.3). Any other failure is a
server error (C{500}). The L7R caches the result for the rest of the
connection as long as the C{Authorization} header stays the same (the
original's C{recheck_authentication}).
"""

import attrs
from zope.interface import Interface


@attrs.frozen
class AuthResult:
    """
    Who the client is.

    @ivar user_id: C{users.id} of the authenticated user.
    @ivar tenant_id: C{tenants.id} of the user's tenant.
    @ivar login: the normalised login (without the tenant part).
    @ivar params: parameters for the VM (C{qvd.vm.user.name}, LDAP uid/gid/home
        ...), passed to the VMA's C{x_start} after the VM's properties
        (reference 2.4); text keys and text values.
    """
    user_id: int
    tenant_id: int
    login: str
    params: dict = attrs.field(factory=dict)


class AuthFailed(Exception):
    """
    The credentials were refused (missing, wrong, unknown or blocked user or
    tenant). C{reason} is for the log, never for the client.
    """

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class AuthBusy(Exception):
    """
    The credentials could not be checked now (every password check is busy):
    the client is asked to retry (C{503} with C{Retry-After}); not a failed
    attempt.
    """


class IAuthenticator(Interface):
    """
    Decides who a client is from its request headers.
    """

    def authenticate(request_headers, source_ip):
        """
        Authenticate one request.

        @param request_headers: dict of lower-case header name -> value (text).
        @param source_ip: the client's IP address (text).
        @return: a Deferred that fires with an L{AuthResult}, or fails with
            L{AuthFailed} when the credentials are refused.
        """
