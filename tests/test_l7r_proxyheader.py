"""
The PROXY protocol in front of the L7R (qvd.l7r.proxyheader), socket-free:
the real L7R connection protocol under the connection caps (and TLS) on
StringTransport, time on task.Clock.
"""

import os

from twisted.internet import address, defer, task
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from qvd.config import Config
from qvd.l7r import tls
from qvd.l7r.limits import CappedFactory, ConnectionCaps
from qvd.l7r.proxyheader import (BalancerConfigError, Balancers, ProxyHeaderFactory,
                                 client_address)
from qvd.l7r.server import L7RFactory, ServerSettings
from qvd.l7r.tap import worker_spread
from qvd.protocols import http
from qvd.protocols.proxy import LOCAL, ProxyHeader, encode_v1, encode_v2

BALANCER = address.IPv4Address("TCP", "10.0.0.5", 40000)
CLIENT = ProxyHeader(2, "PROXY", "TCP4", ("203.0.113.7", 51234), ("10.0.0.1", 8443))
PING = b"GET /qvd/ping HTTP/1.1\r\n\r\n"


class StubL7R:
    """The L7R's routes as L7RProtocol sees them: each request's client address."""

    def __init__(self, clock):
        self.reactor = clock
        self.settings = ServerSettings(handshake_timeout=0)
        self.connections = set()
        self.seen = []

    def handle(self, request, conn):
        self.seen.append(conn.peer_ip)
        conn.write(http.response_with_body(200, "text/plain", b"I am alive!\r\n"))
        return defer.succeed(None)


class Events:
    def __init__(self, case):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def refusals(self):
        return [e for e in self.events if "PROXY protocol" in e.get("log_format", "")]


class Stack:
    """ProxyHeaderFactory(CappedFactory(L7RFactory)), as the service builds it."""

    def __init__(self, balancers=("10.0.0.0/24",), per_address=0, timeout=3.0, tls_context=None):
        self.clock = task.Clock()
        self.l7r = StubL7R(self.clock)
        self.caps = ConnectionCaps(per_address, 0)
        factory = L7RFactory(self.l7r)
        if tls_context is not None:
            factory = TLSMemoryBIOFactory(tls_context, False, factory)
        self.capped = CappedFactory(factory, self.caps, self.clock)
        self.factory = ProxyHeaderFactory(self.capped, Balancers.parse(balancers), self.clock,
                                          timeout)

    def connect(self, peer=BALANCER):
        proto = self.factory.buildProtocol(peer)
        if proto is None:
            return None, None
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        return proto, transport


class BalancerTests(unittest.TestCase):
    def test_v2_header_gives_client_address(self):
        """A v2 header from a balancer makes its client the address the L7R sees."""
        stack = Stack()
        proto, transport = stack.connect()
        proto.dataReceived(encode_v2(CLIENT) + PING)
        self.assertEqual(stack.l7r.seen, ["203.0.113.7"])
        self.assertIn(b"I am alive", transport.value())
        self.assertEqual(proto.getPeer(), address.IPv4Address("TCP", "203.0.113.7", 51234))
        self.assertEqual(stack.caps.held("203.0.113.7"), 1)
        self.assertEqual(stack.caps.held("10.0.0.5"), 0)

    def test_v1_header_byte_by_byte(self):
        """A v1 header arriving a byte at a time, then the request: the client's address."""
        stack = Stack()
        proto, transport = stack.connect()
        data = encode_v1(ProxyHeader(1, "PROXY", "TCP6", ("2001:db8::7", 1), ("::1", 2))) + PING
        for i in range(len(data)):
            proto.dataReceived(data[i:i + 1])
        self.assertEqual(stack.l7r.seen, ["2001:db8::7"])
        self.assertIsInstance(proto.getPeer(), address.IPv6Address)

    def test_local_keeps_balancer_address(self):
        """A LOCAL header (a health check) leaves the balancer's own address."""
        stack = Stack()
        proto, transport = stack.connect()
        proto.dataReceived(encode_v2(ProxyHeader(2, LOCAL)) + PING)
        self.assertEqual(stack.l7r.seen, ["10.0.0.5"])
        self.assertEqual(stack.caps.held("10.0.0.5"), 1)

    def test_unknown_keeps_balancer_address(self):
        """A v1 UNKNOWN header leaves the balancer's own address."""
        stack = Stack()
        proto, transport = stack.connect()
        proto.dataReceived(b"PROXY UNKNOWN\r\n" + PING)
        self.assertEqual(stack.l7r.seen, ["10.0.0.5"])

    def test_cap_counts_clients(self):
        """
        The per-address cap applies to the header's client: a second
        connection of one client is refused, another client's is not.
        """
        stack = Stack(per_address=1)
        first, _ = stack.connect()
        first.dataReceived(encode_v2(CLIENT))
        second, t2 = stack.connect()
        second.dataReceived(encode_v2(CLIENT) + PING)
        self.assertTrue(t2.disconnecting)
        other, t3 = stack.connect()
        other.dataReceived(encode_v2(ProxyHeader(2, "PROXY", "TCP4", ("203.0.113.8", 1),
                                                 ("10.0.0.1", 8443))) + PING)
        self.assertFalse(t3.disconnecting)
        self.assertEqual(stack.l7r.seen, ["203.0.113.8"])
        first.connectionLost(None)
        self.assertEqual(stack.caps.held("203.0.113.7"), 0)

    def test_no_header_closed(self):
        """A balancer's connection that starts with anything but a header is closed, unread."""
        events = Events(self)
        stack = Stack()
        proto, transport = stack.connect()
        proto.dataReceived(PING)
        self.assertTrue(transport.disconnected)
        self.assertEqual(stack.l7r.seen, [])
        self.assertEqual(transport.value(), b"")
        [event] = events.refusals()
        self.assertIn("no valid PROXY header", event["reason"])

    def test_bad_header_closed(self):
        """A malformed header from a balancer closes the connection."""
        stack = Stack()
        proto, transport = stack.connect()
        proto.dataReceived(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n" + PING)
        self.assertTrue(transport.disconnected)
        self.assertEqual(stack.l7r.seen, [])

    def test_slow_header_times_out(self):
        """A header not complete within the timeout: the connection is closed then, not before."""
        stack = Stack(timeout=3.0)
        proto, transport = stack.connect()
        proto.dataReceived(encode_v2(CLIENT)[:10])
        stack.clock.advance(2.9)
        self.assertFalse(transport.disconnected)
        stack.clock.advance(0.1)
        self.assertTrue(transport.disconnected)
        self.assertEqual(stack.l7r.seen, [])

    def test_header_in_time_stops_timer(self):
        """A header complete in time leaves no timer: the L7R's own timers take over."""
        stack = Stack(timeout=3.0)
        proto, transport = stack.connect()
        proto.dataReceived(encode_v2(CLIENT))
        stack.clock.advance(3.0)
        self.assertFalse(transport.disconnected)
        [conn] = stack.l7r.connections
        self.assertEqual(conn.peer_ip, "203.0.113.7")

    def test_lost_before_header(self):
        """A balancer's connection lost before its header builds nothing and holds no place."""
        stack = Stack()
        proto, transport = stack.connect()
        proto.connectionLost(None)
        stack.clock.advance(10)
        self.assertEqual((stack.caps.open, stack.l7r.connections), (0, set()))

    def test_under_tls(self):
        """Under TLS the L7R sees the header's client too (TLS asks the layers below)."""
        directory = self.mktemp()
        tls.self_signed(directory, "localhost")
        config = Config.load(os.devnull, overrides={"path.l7r.ssl": directory})
        context = tls.SwappableContextFactory(tls.make_context(
            tls.files_material(config), config.get("l7r.ssl.ciphers")))
        stack = Stack(tls_context=context)
        proto, transport = stack.connect()
        proto.dataReceived(encode_v2(CLIENT))
        [conn] = stack.l7r.connections
        self.assertEqual(conn.peer_ip, "203.0.113.7")


class OtherAddressTests(unittest.TestCase):
    def test_header_refused(self):
        """A PROXY header from an address that is not a balancer closes the connection."""
        events = Events(self)
        stack = Stack()
        peer = address.IPv4Address("TCP", "198.51.100.9", 1)
        for header in (encode_v1(CLIENT), encode_v2(CLIENT)):
            proto, transport = stack.connect(peer)
            proto.dataReceived(header + PING)
            self.assertTrue(transport.disconnected)
            self.assertEqual(transport.value(), b"")
        self.assertEqual(stack.l7r.seen, [])
        self.assertEqual(stack.factory.refused, 2)
        [event] = events.refusals()         # logged once per interval
        self.assertEqual(event["ip"], "198.51.100.9")
        self.assertIn("not a balancer", event["reason"])
        stack.clock.advance(10)
        proto, transport = stack.connect(peer)
        proto.dataReceived(b"PROXY ")
        self.assertEqual(len(events.refusals()), 2)

    def test_plain_connection(self):
        """Anything else from another address is the L7R's as it came, with its real peer."""
        stack = Stack()
        peer = address.IPv4Address("TCP", "198.51.100.9", 1)
        proto, transport = stack.connect(peer)
        for byte in PING:
            proto.dataReceived(bytes([byte]))
        self.assertEqual(stack.l7r.seen, ["198.51.100.9"])
        self.assertEqual(stack.caps.held("198.51.100.9"), 1)

    def test_capped_at_once(self):
        """From another address the cap applies before any byte, as without balancers."""
        stack = Stack(per_address=1)
        peer = address.IPv4Address("TCP", "198.51.100.9", 1)
        self.assertIsNotNone(stack.connect(peer)[0])
        self.assertIsNone(stack.connect(peer)[0])

    def test_off_adds_nothing(self):
        """With no balancer configured the wrapped factory's protocol is returned as it is."""
        stack = Stack(balancers=())
        proto = stack.factory.buildProtocol(BALANCER)
        self.assertIs(type(proto), type(stack.capped.buildProtocol(BALANCER)))

    def test_balancers_changed(self):
        """Replacing the balancers applies to the next connection."""
        stack = Stack(balancers=())
        stack.factory.balancers = Balancers.parse(["10.0.0.5"])
        proto, transport = stack.connect()
        proto.dataReceived(encode_v2(CLIENT) + PING)
        self.assertEqual(stack.l7r.seen, ["203.0.113.7"])


class BalancersTests(unittest.TestCase):
    def test_membership(self):
        """Addresses and networks of both families; IPv4-mapped IPv6 peers count as IPv4."""
        b = Balancers.parse(["10.0.0.5", " 192.0.2.0/28", "2001:db8::/64"])
        for host in ("10.0.0.5", "192.0.2.15", "2001:db8::1", "::ffff:10.0.0.5"):
            self.assertIn(host, b)
        for host in ("10.0.0.6", "192.0.2.16", "2001:db9::1", "", "/tmp/sock"):
            self.assertNotIn(host, b)
        self.assertFalse(Balancers.parse([]))

    def test_bad_value(self):
        """A value that is no address names itself and an example."""
        with self.assertRaises(BalancerConfigError) as e:
            Balancers.parse(["10.0.0.300"])
        self.assertIn("'10.0.0.300' is not an IP address or network", str(e.exception))

    def test_from_config(self):
        """l7r.proxy_protocol.from is empty by default: no balancer."""
        self.assertFalse(Balancers.from_config(Config.load(os.devnull)))
        config = Config.load(os.devnull, overrides={"l7r.proxy_protocol.from": "127.0.0.1, ::1"})
        self.assertIn("::1", Balancers.from_config(config))

    def test_client_address(self):
        """The header's source, or the connection's peer without one."""
        self.assertEqual(client_address(CLIENT, BALANCER),
                         address.IPv4Address("TCP", "203.0.113.7", 51234))
        self.assertIs(client_address(ProxyHeader(2, LOCAL), BALANCER), BALANCER)

    def test_worker_spread(self):
        """spread 'auto' is 'connection' behind a balancer, else 'address'; others are kept."""
        def spread(**overrides):
            return worker_spread(Config.load(os.devnull, overrides=overrides))
        self.assertEqual(spread(), "address")
        self.assertEqual(spread(**{"l7r.proxy_protocol.from": "10.0.0.5"}), "connection")
        self.assertEqual(spread(**{"l7r.proxy_protocol.from": "10.0.0.5",
                                   "l7r.workers.spread": "address"}), "address")
