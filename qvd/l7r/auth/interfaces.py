"""
The seam between the L7R and its authentication.

    d = authenticator.authenticate({"authorization": "Basic ..."}, "192.0.2.7")
    d.addCallbacks(lambda result: ..., lambda f: f.trap(AuthFailed))

The L7R only knows L{IAuthenticator}; how the credentials are checked (plugin
chain, databases, directories) lives behind it.
"""

import attrs
from zope.interface import Interface


@attrs.frozen
class AuthResult:
    """
    Who an authenticated request belongs to.

    @ivar user_id: C{users.id}.
    @ivar tenant_id: C{tenants.id} of that user.
    @ivar login: the normalized login.
    @ivar params: parameters the plugins gathered for the VM (C{qvd.vm.user.*}).
    """
    user_id: int
    tenant_id: int
    login: str
    params: dict


class AuthFailed(Exception):
    """
    The request is not authenticated; C{reason} says why, for the log.
    """

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class IAuthenticator(Interface):
    """
    Decides who a request comes from.
    """

    def authenticate(request_headers, source_ip):
        """
        Authenticate one request.

        @param request_headers: dict of header name (lower-case) -> value.
        @param source_ip: the client's address, as text.
        @return: a Deferred firing with an L{AuthResult}, or failing with
            L{AuthFailed}.
        """
