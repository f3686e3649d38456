"""
The PROXY protocol in front of the L7R: a connection from a configured load
balancer starts with a PROXY header (L{qvd.protocols.proxy}) naming the
client, and the client's address is the one the rest of the L7R sees.

    balancers = Balancers.from_config(config)        # l7r.proxy_protocol.from
    factory = ProxyHeaderFactory(CappedFactory(TLSMemoryBIOFactory(...)),
                                 balancers, clock, timeout=3.0)
    endpoint.listen(factory)

It wraps the whole listening factory, outside the connection caps and TLS:

- From a balancer address, nothing is built until the header is read: then
  the wrapped factory's C{buildProtocol} gets the client's address (so the
  per-address cap counts clients, not the balancer) and the protocols under
  it see that address as C{transport.getPeer()} (the L7R's logs, login
  limits and sessions). A C{LOCAL} or C{UNKNOWN} header (the balancer's
  health checks) leaves the balancer's own address. A balancer connection
  whose first bytes are not a valid header, or whose header is not complete
  within C{timeout} seconds, is closed.
- From any other address the connection is the wrapped factory's at once,
  with its real peer; if its first bytes are a PROXY header signature it is
  closed without passing them on: a header is never trusted from there.
- With no balancer configured (the default) the wrapped factory's protocols
  are returned as they are: nothing is looked at.

Refused connections are logged at most once per C{log_interval} seconds,
with how many were refused meanwhile. C{balancers} may be replaced while
listening (a live configuration change); it applies to new connections.
"""

import ipaddress

from twisted.internet import address as net_address
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, providedBy

from qvd.logs import Logger
from qvd.protocols import proxy

log = Logger()

#: Seconds a balancer has to send its whole header (l7r.proxy_protocol.timeout).
DEFAULT_TIMEOUT = 3.0


class BalancerConfigError(ValueError):
    """A value of C{l7r.proxy_protocol.from} is not an address or network."""


class Balancers:
    """
    The addresses and networks whose connections carry a PROXY header; pure.

        Balancers.parse(["10.0.0.5", "192.0.2.0/28", "2001:db8::/64"])
        "10.0.0.5" in balancers
    """

    def __init__(self, networks=()):
        self.networks = tuple(networks)

    @classmethod
    def parse(cls, values):
        networks = []
        for value in values:
            try:
                networks.append(ipaddress.ip_network(value.strip(), strict=False))
            except ValueError:
                raise BalancerConfigError(
                    f"l7r.proxy_protocol.from: {value.strip()!r} is not an IP address or "
                    "network (e.g. 10.0.0.5 or 10.0.0.0/24)") from None
        return cls(networks)

    @classmethod
    def from_config(cls, config):
        return cls.parse(v for v in config.getlist("l7r.proxy_protocol.from") if v.strip())

    def __bool__(self):
        return bool(self.networks)

    def __contains__(self, host):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False            # a UNIX socket's peer, or none
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def __repr__(self):
        return f"Balancers({', '.join(map(str, self.networks)) or 'none'})"


def client_address(header, peer):
    """
    The address a connection with C{header} from C{peer} is from: the
    header's source, or C{peer} for a header without one.
    """
    if header.source is None:
        return peer
    host, port = header.source
    kind = net_address.IPv4Address if header.family == "TCP4" else net_address.IPv6Address
    return kind("TCP", host, port)


class HeaderProtocol(ProtocolWrapper):
    """
    A balancer's connection. States: C{header} (bytes are gathered until
    the header is complete; the timer runs), C{open} (the wrapped protocol
    was built for the client's address and gets every byte), C{closed}.
    """

    def __init__(self, factory, peer):
        super().__init__(factory, None)
        self.peer = peer
        self.client = None
        self.state = "header"
        self._buffer = b""
        self._timer = None

    def logPrefix(self):
        return "PROXY header"

    def makeConnection(self, transport):
        # the wrapped protocol is built and connected once the header is read
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def connectionMade(self):
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    def getPeer(self):
        return self.client if self.client is not None else self.peer

    def _timed_out(self):
        self._timer = None
        if self.state == "header":
            self._refuse(f"no complete PROXY header within {self.factory.timeout:g} s "
                         f"({len(self._buffer)} bytes came)")

    def _refuse(self, reason):
        self.state = "closed"
        self._stop_timer()
        self.factory.refusal(self.peer, reason)
        self.transport.abortConnection()

    def _stop_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data):
        if self.state == "open":
            self.wrappedProtocol.dataReceived(data)
            return
        if self.state == "closed":
            return
        self._buffer += data
        try:
            found = proxy.parse(self._buffer, self.factory.max_v2_length)
        except proxy.ProxyHeaderError as e:
            self._refuse(f"the balancer's connection has no valid PROXY header: {e}")
            return
        if found is None:
            return
        header, used = found
        rest, self._buffer = self._buffer[used:], b""
        self._stop_timer()
        self.client = client_address(header, self.peer)
        inner = self.factory.wrappedFactory.buildProtocol(self.client)
        if inner is None:           # over a cap: the wrapped factory said so
            self.state = "closed"
            self.transport.loseConnection()
            return
        self.state = "open"
        self.wrappedProtocol = inner
        inner.makeConnection(self)
        if rest and self.state == "open":
            inner.dataReceived(rest)

    def connectionLost(self, reason):
        self._stop_timer()
        self.state = "closed"
        self.factory.unregisterProtocol(self)
        inner, self.wrappedProtocol = self.wrappedProtocol, None
        if inner is not None:
            inner.connectionLost(reason)


class SniffingProtocol(ProtocolWrapper):
    """
    A connection from any other address: its first bytes are passed on
    once they cannot be a PROXY header signature; a signature closes it.
    """

    def __init__(self, factory, wrapped):
        super().__init__(factory, wrapped)
        self._sniffing = True
        self._buffer = b""

    def dataReceived(self, data):
        if not self._sniffing:
            self.wrappedProtocol.dataReceived(data)
            return
        self._buffer += data
        found = proxy.signature_match(self._buffer)
        if found is None:
            return
        self._sniffing = False
        data, self._buffer = self._buffer, b""
        if found:
            self.factory.refusal(self.transport.getPeer(),
                                 "a PROXY header from an address that is not a balancer "
                                 "(l7r.proxy_protocol.from)")
            self.transport.abortConnection()
            return
        self.wrappedProtocol.dataReceived(data)


class ProxyHeaderFactory(WrappingFactory):
    """
    Wraps the listening factory (see the module's docstring).

    @ivar balancers: the L{Balancers}; replace it to change them.
    @ivar refused: connections refused so far.
    """

    noisy = False

    def __init__(self, wrapped, balancers, clock, timeout=DEFAULT_TIMEOUT,
                 max_v2_length=proxy.V2_MAX_LENGTH, log_interval=10.0):
        super().__init__(wrapped)
        self.balancers = balancers
        self.clock = clock
        self.timeout = timeout
        self.max_v2_length = max_v2_length
        self.log_interval = log_interval
        self.refused = 0
        self._last_log = None
        self._unlogged = 0

    def buildProtocol(self, addr):
        if not self.balancers:
            return self.wrappedFactory.buildProtocol(addr)
        if getattr(addr, "host", None) in self.balancers:
            return HeaderProtocol(self, addr)
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        return SniffingProtocol(self, wrapped)

    def refusal(self, peer, reason):
        """A connection from C{peer} is closed for C{reason}: count, log now and then."""
        self.refused += 1
        self._unlogged += 1
        now = self.clock.seconds()
        if self._last_log is None or now - self._last_log >= self.log_interval:
            log.warn("refused {n} connection(s) for the PROXY protocol (latest from {ip}: "
                     "{reason})", n=self._unlogged, ip=getattr(peer, "host", peer),
                     reason=reason)
            self._last_log = now
            self._unlogged = 0
