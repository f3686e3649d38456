"""
The relay's wiring, socket-free: producers registered both ways, buffered
bytes forwarded, one end closing closes the other and ends the session once.
"""

from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from qvd.l7r.relay import PeerProtocol, Relay


class FakeClient:
    def __init__(self):
        self.transport = StringTransport()


def wired():
    clock = task.Clock()
    client = FakeClient()
    peer = PeerProtocol()
    peer.makeConnection(StringTransport())
    ended = []
    relay = Relay(client, peer, ended.append, clock=clock.seconds)
    return clock, client, peer, relay, ended


class RelayTests(unittest.TestCase):
    def test_producers(self):
        """Each side's transport is the streaming producer of the other's."""
        clock, client, peer, relay, ended = wired()
        relay.start()
        self.assertIs(client.transport.producer, peer.transport)
        self.assertIs(peer.transport.producer, client.transport)
        self.assertTrue(client.transport.streaming and peer.transport.streaming)

    def test_buffered_bytes(self):
        """Bytes the client sent after its request and bytes nxagent sent before
        the relay started are delivered first, in order."""
        clock, client, peer, relay, ended = wired()
        peer.dataReceived(b"NXPROXY-3.5.0 ")
        relay.start(b"early")
        relay.from_client(b" more")
        peer.dataReceived(b"link=LAN")
        self.assertEqual(peer.transport.value(), b"early more")
        self.assertEqual(client.transport.value(), b"NXPROXY-3.5.0 link=LAN")

    def test_client_closes(self):
        """When the client leaves, nxagent's connection is closed and the session
        ends once, with its duration."""
        clock, client, peer, relay, ended = wired()
        relay.start()
        clock.advance(42)
        relay.client_lost(None)
        peer.connectionLost(None)
        self.assertTrue(peer.transport.disconnecting)
        self.assertEqual(ended, [relay])
        self.assertEqual(relay.duration, 42)

    def test_peer_closes(self):
        """When nxagent closes, the client's connection is closed."""
        clock, client, peer, relay, ended = wired()
        relay.start()
        peer.connectionLost(None)
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(ended, [relay])

    def test_stop(self):
        """Stopping a relay (takeover) closes both connections."""
        clock, client, peer, relay, ended = wired()
        relay.start()
        relay.stop("taken over")
        self.assertTrue(client.transport.disconnecting and peer.transport.disconnecting)
        self.assertEqual(relay.reason, "taken over")

    def test_peer_closed_before_start(self):
        """A relay whose nxagent connection closed before it started ends at once."""
        clock, client, peer, relay, ended = wired()
        peer.dataReceived(b"bye")
        peer.connectionLost(None)
        relay.start()
        self.assertEqual(client.transport.value(), b"bye")
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(ended, [relay])


COOKIE = "0123456789abcdef0123456789abcdef"
GREETING = b"NXPROXY-3.5.0-3.5.99 stream=default,data=default "
REWRITTEN = b"NXPROXY-3.5.0-3.5.99 cookie=" + COOKIE.encode() + b",stream=default,data=default "


def wired_with_cookie():
    clock = task.Clock()
    client = FakeClient()
    peer = PeerProtocol()
    peer.makeConnection(StringTransport())
    ended = []
    relay = Relay(client, peer, ended.append, clock=clock.seconds, nx_cookie=COOKIE)
    return client, peer, relay, ended


class GreetingRelayTests(unittest.TestCase):
    def test_cookie_put_in(self):
        """With a session cookie, the client's greeting reaches nxagent with it;
        split reads are held until the greeting is complete."""
        client, peer, relay, ended = wired_with_cookie()
        relay.start(GREETING[:10])
        relay.from_client(GREETING[10:30])
        self.assertEqual(peer.transport.value(), b"")
        relay.from_client(GREETING[30:] + b"cachefile=none ")
        self.assertEqual(peer.transport.value(), REWRITTEN + b"cachefile=none ")

    def test_greeting_in_buffered_bytes(self):
        """A greeting the client sent together with its request is rewritten too."""
        client, peer, relay, ended = wired_with_cookie()
        relay.start(GREETING + b"\x00\x01")
        self.assertEqual(peer.transport.value(), REWRITTEN + b"\x00\x01")

    def test_direct_afterwards(self):
        """After the greeting the client's bytes go to nxagent's transport's own
        write, untouched: no code of the relay's between them."""
        client, peer, relay, ended = wired_with_cookie()
        relay.start()
        relay.from_client(GREETING)
        self.assertEqual(relay.from_client, peer.transport.write)
        relay.from_client(b"NXPROXY-x garbage\xff")
        self.assertEqual(peer.transport.value(), REWRITTEN + b"NXPROXY-x garbage\xff")

    def test_without_cookie_direct(self):
        """Without a session cookie nothing is parsed: bytes go straight through."""
        clock, client, peer, relay, ended = wired()
        relay.start()
        self.assertEqual(relay.from_client, peer.transport.write)
        relay.from_client(b"anything")
        self.assertEqual(peer.transport.value(), b"anything")

    def test_garbage_cuts(self):
        """A stream that is no NX greeting closes both sides; nxagent gets nothing,
        and what the client sends after that is dropped."""
        client, peer, relay, ended = wired_with_cookie()
        relay.start()
        relay.from_client(b"GET / HTTP/1.1\r\n")
        self.assertTrue(client.transport.disconnecting and peer.transport.disconnecting)
        self.assertIn("NXPROXY-", relay.reason)
        relay.from_client(GREETING)
        self.assertEqual(peer.transport.value(), b"")

    def test_oversize_cuts(self):
        """A greeting that does not end within 1 KiB closes the relay, nothing passed on."""
        client, peer, relay, ended = wired_with_cookie()
        relay.start()
        relay.from_client(b"NXPROXY-3.5.0 " + b"a" * 600)
        self.assertFalse(peer.transport.disconnecting)
        relay.from_client(b"a" * 600)
        self.assertTrue(client.transport.disconnecting and peer.transport.disconnecting)
        self.assertEqual(peer.transport.value(), b"")
