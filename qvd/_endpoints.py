"""
Client endpoints that ask no resolver for an IP address.

    endpoint = client_endpoint(reactor, "10.241.0.12", 3030, timeout=4)

Twisted's C{HostnameEndpoint} resolves every
host through C{getaddrinfo} in the reactor's thread pool, literal addresses
included: under a login storm those trips queue behind the password checks
in the same pool, and the agent calls and the nxagent connection time out.
A VM's address is always a literal, so it gets a plain TCP endpoint.
"""

from twisted.internet import endpoints
from twisted.internet.abstract import isIPAddress, isIPv6Address


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
