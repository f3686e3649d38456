"""
Client endpoints that ask no resolver for an IP address.

    endpoint = client_endpoint(reactor, "10.241.0.12", 3030, timeout=4)

Twisted's C{HostnameEndpoint} (and C{Agent}, which uses it) resolves every
host through C{getaddrinfo} in the reactor's thread pool, literal addresses
included: under a login storm those trips queue behind the password checks
in the same pool, and the agent calls and the nxagent connection time out.
A VM's address is always a literal, so it gets a plain TCP endpoint.
"""

from twisted.internet import endpoints
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


def client_endpoint(reactor, host, port, timeout):
    """
    A TCP client endpoint to C{host}:C{port}: C{TCP4ClientEndpoint} or
    C{TCP6ClientEndpoint} for an address (no resolver), C{HostnameEndpoint}
    for a name.
    """
    if isIPAddress(host):
        return endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return endpoints.TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)


@implementer(IAgentEndpointFactory)
class LiteralEndpointFactory:
    """For C{Agent.usingEndpointFactory}: L{client_endpoint} for each plain-HTTP URI."""

    def __init__(self, reactor, timeout):
        self.reactor = reactor
        self.timeout = timeout

    def endpointForURI(self, uri):
        host = uri.host.decode("ascii").strip("[]")
        return client_endpoint(self.reactor, host, uri.port, self.timeout)
